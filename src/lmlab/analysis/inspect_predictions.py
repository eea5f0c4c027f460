"""Token-level inspection of a trained LM: the top-k next-token probabilities at each position of a text.

`lmlab inspect-predictions RUN --text "..."` loads the run's best (or last) checkpoint through the one loader
(full weights, or the base model + the adapter, with its checks), runs one forward pass and
reports, for every position t, the distribution over the token at t+1: its top k, and where the token that
really follows in the text ranks. A bar chart PNG shows the chosen positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from rich.text import Text

from lmlab.analysis.inspect_data import token_text
from lmlab.data.sft import encode_prompt, special_prefix
from lmlab.data.templates import PromptTemplate
from lmlab.errors import LmlabError
from lmlab.models.loading import load_checkpoint
from lmlab.recipe import DEFAULT_WORKSPACE
from lmlab.workspace.layout import safe_name

MAX_PANELS = 16  # bar charts per PNG; longer texts show their last positions


@dataclass
class Candidate:
    token_id: int
    text: str  # whitespace made visible (␣, ↵)
    prob: float


@dataclass
class PositionPrediction:
    position: int  # 0-based index of the input token after which the prediction is made
    token: Candidate  # the input token at `position` (prob: how likely the model found it; 0 at position 0)
    top: list[Candidate]  # most likely next tokens, best first
    actual: Candidate | None = None  # the token that follows in the text; None at the last position
    actual_rank: int | None = None  # 1 = the model's first choice


@dataclass
class Predictions:
    checkpoint: Path
    text: str
    token_ids: list[int]
    positions: list[PositionPrediction]
    chart: Path | None = None
    notes: list[str] = field(default_factory=list)


def encode_text(tokenizer: Any, text: str, checkpoint: Path | None = None, use_template: bool = False) -> list[int]:
    """Token ids of `text` as training would see it: the tokenizer's special prefix (BOS) + the text; with
    `use_template`, `text` is the instruction / user message rendered through the run's SFT template."""

    if not use_template:
        return special_prefix(tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])
    spec = Path(checkpoint) / "template.json" if checkpoint is not None else None
    if spec is None or not spec.is_file():
        raise LmlabError(f"--template: {checkpoint} has no template.json (not an sft run); leave --template out")
    import json
    import string

    template = PromptTemplate.from_dict(json.loads(spec.read_text()))
    if template.format == "text":  # no prompt: the text is what the model continues
        return encode_text(tokenizer, text)
    if template.format == "chat":
        return encode_prompt(template, tokenizer, [{"role": "user", "content": text}])
    if template.format == "alpaca":
        record = {template.column("instruction"): text, template.column("input"): ""}
    else:  # prompt_completion: every placeholder of the prompt gets the text
        names = [n for _, n, _, _ in string.Formatter().parse(template.prompt_template or "") if n]
        record = {template.column(n): text for n in names}
    return encode_prompt(template, tokenizer, record)


@torch.no_grad()
def next_token_predictions(model: torch.nn.Module, tokenizer: Any, ids: list[int], *, top_k: int = 10,
                           positions: list[int] | None = None) -> list[PositionPrediction]:
    """One forward pass over `ids`; for each position (default all) the top-k next tokens and the rank of
    the one that follows in `ids`."""

    if not ids:
        raise LmlabError("--text: the text has no tokens; give some text")
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # (T, V)
    probs = torch.softmax(logits, dim=-1)
    k = min(top_k, probs.shape[-1])
    out = []
    for p in positions if positions is not None else range(len(ids)):
        top = torch.topk(probs[p], k)
        cands = [Candidate(int(i), token_text(tokenizer, int(i)), float(v)) for v, i in zip(top.values, top.indices,
                                                                                         strict=True)]
        seen = float(probs[p - 1, ids[p]]) if p > 0 else 0.0
        pred = PositionPrediction(p, Candidate(ids[p], token_text(tokenizer, ids[p]), seen), cands)
        if p + 1 < len(ids):
            nxt = ids[p + 1]
            pred.actual = Candidate(nxt, token_text(tokenizer, nxt), float(probs[p, nxt]))
            pred.actual_rank = int((probs[p] > probs[p, nxt]).sum()) + 1
        out.append(pred)
    return out


def inspect_predictions(run: str, text: str, *, top_k: int = 10, position: int | None = None, last: bool = False,
                        use_template: bool = False, output_dir: str = DEFAULT_WORKSPACE,
                        chart: Path | None = None) -> Predictions:
    """Load the run's checkpoint, predict at every position of `text` (or only `position`; negative counts
    from the end) and write the bar chart (default <output_dir>/inspect/predictions-<run>.png)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the CLI's output is the table
    loaded = load_checkpoint(run, output_dir=output_dir, which="last" if last else "best", device="cpu")
    checkpoint, model, tokenizer = loaded.path, loaded.model, loaded.tokenizer
    ids = encode_text(tokenizer, text, checkpoint, use_template)
    positions = None
    if position is not None:
        if not -len(ids) <= position < len(ids):
            raise LmlabError(f"--position: {position} is outside the text's {len(ids)} tokens "
                             f"(0 … {len(ids) - 1}, or -1 for the last)")
        positions = [position % len(ids)]
    preds = Predictions(checkpoint, text, ids, next_token_predictions(model, tokenizer, ids, top_k=top_k,
                                                                      positions=positions))
    name = safe_name(Path(run).name if Path(run).is_dir() else run[:8])
    chart = chart or Path(output_dir) / "inspect" / f"predictions-{name}.png"
    preds.chart = predictions_chart(preds, chart)
    if len(preds.positions) > MAX_PANELS:
        preds.notes.append(f"the chart shows the last {MAX_PANELS} of {len(preds.positions)} positions")
    return preds


def predictions_chart(preds: Predictions, path: Path) -> Path:
    """One horizontal bar chart per position (the last MAX_PANELS): top-k probabilities, the token that
    really follows in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = preds.positions[-MAX_PANELS:]
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    k = len(shown[0].top)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, (0.22 * k + 1.0) * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, p in zip(axes.flat, shown, strict=False):
        colors = ["#c44e52" if p.actual is not None and c.token_id == p.actual.token_id else "#4c72b0" for c in p.top]
        ax.barh(range(len(p.top)), [c.prob for c in p.top], color=colors)
        ax.set_yticks(range(len(p.top)), [c.text[:18] for c in p.top], fontsize=7)
        ax.invert_yaxis()
        top = max(c.prob for c in p.top)
        ax.set_xlim(0, min(1.0, top * 1.3) or 1.0)  # a flat distribution still shows its bars
        for i, c in enumerate(p.top):
            ax.text(c.prob, i, f" {c.prob:.3f}", va="center", fontsize=6)
        ax.tick_params(axis="x", labelsize=7)
        after = f"after #{p.position} {p.token.text[:16]!r}"
        nxt = f"; next {p.actual.text[:12]!r} rank {p.actual_rank}" if p.actual is not None else ""
        ax.set_title(after + nxt, fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def predictions_table(preds: Predictions) -> Table:
    table = Table(title=f"next-token predictions ({len(preds.token_ids)} tokens)", title_justify="left")
    for col in ("pos", "token", "next in text (p, rank)", "top candidates"):
        table.add_column(col, overflow="fold")
    for p in preds.positions:
        nxt = f"{p.actual.text} ({p.actual.prob:.3f}, #{p.actual_rank})" if p.actual is not None else "—"
        top = "  ".join(f"{c.text} {c.prob:.3f}" for c in p.top)
        table.add_row(*(Text(cell) for cell in (str(p.position), p.token.text, nxt, top)))  # tokens are not markup
    return table

"""A recipe's data as the model will see it, without training or loading weights: `lmlab data inspect`
(counts, fingerprints, token lengths, truncation, unknown tokens, frequent tokens, the filter funnel; PNG
plots and one HTML page) and `lmlab data preview` (rendered examples with the loss mask, EOS and padding).

The data comes through the one pipeline training uses (lmlab.data.pipeline: records, filters, split, part,
tokenizer) and the same template, tokenization and collators, so the counts and fingerprints here are the ones a
run of the same recipe logs. Only the tokenizer is loaded, never the model.
"""

from __future__ import annotations

import base64
import html
import json
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.text import Text

from lmlab.data.filters import FilterReport, FilterStepReport, select_texts
from lmlab.data.lm import BlockView, tokenize_documents
from lmlab.data.packing import collate_padded
from lmlab.data.pairs import records_to_pairs
from lmlab.data.persona import load_persona_chat
from lmlab.data.pipeline import load_named_tokenizer, source_name, split_data
from lmlab.data.preference import tokenize_preference
from lmlab.data.sft import IGNORE, PROMPT_TOO_LONG, TOO_LONG, pad_token_id, special_prefix, tokenize_sft
from lmlab.data.sources import load_records
from lmlab.data.templates import template_from_config
from lmlab.errors import LmlabError
from lmlab.recipe.pair import pair_config
from lmlab.recipe.schema import Recipe
from lmlab.tasks.pairs.task import build_pair_task
from lmlab.workspace.resolve import resolve_init_from

TOP_N = 30  # rows of the token frequency table


class Unavailable(LmlabError):
    """The recipe names a model or data set that cannot be reached from here (offline): nothing to inspect."""


# ------------------------------------------------------------------------------------ recipe → data
@dataclass
class RecipeData:
    """The recipe's data after filters, split and part selection, with its tokenizer (no model)."""

    recipe: Recipe
    tokenizer: Any
    splits: dict[str, list]  # lm: document texts; sft / pair_classify: records
    fingerprints: dict[str, str]  # equal to the `data.fingerprint.<split>` params a run logs
    info: dict[str, Any]  # counts as `prepare` reports them (data.records, data.filtered.kept, part)
    filter_report: dict[str, Any]  # FilterReport.to_dict(), {} without filters
    template: Any = None  # sft: the PromptTemplate
    notes: list[str] = field(default_factory=list)  # what reading the source repaired or skipped

    @property
    def task(self) -> str:
        return self.recipe.run.task


def recipe_data(recipe: Recipe) -> RecipeData:
    """The recipe's data through the one pipeline training uses (lmlab.data.pipeline), tokenizer included."""
    if recipe.run.task not in ("lm", "sft", "pair_classify", "dpo"):
        raise LmlabError(f"run.task: '{recipe.run.task}' is not known to data inspect; use lm, sft, pair_classify "
                         "or dpo")
    parent = resolve_init_from(recipe).checkpoint if recipe.model.init_from is not None else None
    data = split_data(recipe, tokenizer_dir=parent, load_tokenizer=lambda name: _load_tokenizer(recipe, name),
                      read_records=_load)
    template = template_from_config(recipe.data, data.tokenizer) if recipe.run.task in ("sft", "dpo") else None
    return RecipeData(recipe, data.tokenizer, data.splits, data.fingerprints, data.info, data.filter_report,
                      template, _source_notes(recipe))


def _source_notes(recipe: Recipe) -> list[str]:
    """Persona chat CSVs: the loader's report of repaired and skipped rows (load_records keeps only records)."""
    if recipe.data.format != "persona_chat":
        return []

    return load_persona_chat(recipe.resolve_data_path())[1].lines()


def _load(recipe: Recipe) -> list[dict[str, Any]]:
    try:
        return load_records(recipe)
    except LmlabError as e:
        if recipe.data.hf_dataset is not None:
            raise Unavailable(f"data set '{recipe.data.hf_dataset}' cannot be loaded offline (not in the Hugging "
                              f"Face cache): {e}") from None
        raise


def _load_tokenizer(recipe: Recipe, name: str) -> Any:
    """The pipeline's named-tokenizer loader, with what cannot be reached offline reported as Unavailable."""
    try:
        path = recipe.resolve_model_path(name)
    except LmlabError as e:  # a `pkg:` model whose package is not installed
        raise Unavailable(str(e)) from None
    try:
        return load_named_tokenizer(recipe, name)
    except LmlabError:
        if Path(path).exists():
            raise
        raise Unavailable(f"model '{name}' cannot be resolved offline: not a folder beside the recipe or in "
                          "$LMLAB_MODELS, and not in the Hugging Face cache") from None


# --------------------------------------------------------------------------------------- inspection
@dataclass
class FieldLengths:
    """Token counts of one field over every example of every split (what the histogram shows)."""

    name: str
    lengths: list[int]
    limit: int | None = None  # drawn on the histogram: max_length / block_size where it applies

    def summary(self) -> dict[str, float]:
        xs = sorted(self.lengths)
        if not xs:
            return {"n": 0}
        pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
        return {"n": len(xs), "mean": statistics.fmean(xs), "p50": pick(0.5), "p90": pick(0.9),
                "p99": pick(0.99), "max": xs[-1]}


@dataclass
class DataInspection:
    recipe_name: str
    task: str
    source: str
    tokenizer: str  # what it is: 'byte-level BPE trained on the train split (2048 tokens)', a folder, ...
    counts: dict[str, int]  # split -> examples (records for sft / pairs, documents for lm)
    fingerprints: dict[str, str]
    fields: list[FieldLengths]
    limit_name: str  # 'data.max_length' or 'model.block_size'
    limit: int
    over_limit: dict[str, dict[str, Any]]  # split -> {examples, over, share, what}
    unknown: dict[str, Any]  # {tokens, unknown, rate, reason}
    top_tokens: list[dict[str, Any]]  # [{rank, id, token, count, share, targets?}] over the train split
    train_tokens: int
    funnel: list[tuple[str, int]]  # [('input', n), (filter, left after it), ...]; [] without filters
    filter_lines: list[str]
    notes: list[str]  # tokenization pre-flight lines (sft) / pair conversion lines
    info: dict[str, Any]
    seconds: float = 0.0
    plots: dict[str, Path] = field(default_factory=dict)  # name -> PNG
    html_path: Path | None = None


def inspect_data(recipe: Recipe, *, top_n: int = TOP_N, out_dir: Path | None = None,
                 html_page: bool = False, html_path: Path | None = None) -> DataInspection:
    """Statistics of the recipe's data; with `out_dir`, PNG plots there, and one HTML page with every table and
    plot at `html_path` (default `out_dir/index.html` with `html_page`)."""
    t0 = time.perf_counter()
    data = recipe_data(recipe)
    tok = data.tokenizer
    if data.task == "lm":
        ins = _inspect_lm(data, top_n)
    elif data.task == "sft":
        ins = _inspect_sft(data, top_n)
    elif data.task == "dpo":
        ins = _inspect_preference(data, top_n)
    else:
        ins = _inspect_pairs(data, top_n)
    ins.notes = data.notes + ins.notes
    ins.funnel = [(s["name"], s["examples"]) for s in data.filter_report.get("funnel", [])]
    if data.filter_report:

        steps = [FilterStepReport(s["name"], s["kind"], s["input"], s["kept"], s["reasons"], [], s["cached"])
                 for s in data.filter_report["filters"]]
        ins.filter_lines = FilterReport(data.filter_report["input"], steps).lines()
    ins.tokenizer = describe_tokenizer(tok, recipe)
    ins.seconds = time.perf_counter() - t0
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ins.plots = write_plots(ins, out_dir)
        if html_page or html_path is not None:
            ins.html_path = write_html(ins, Path(html_path) if html_path is not None else out_dir / "index.html")
        ins.seconds = time.perf_counter() - t0
    return ins


def _base(data: RecipeData, counts: dict[str, int], limit_name: str, limit: int) -> DataInspection:
    return DataInspection(
        recipe_name=data.recipe.run.name, task=data.task, source=source_name(data.recipe), tokenizer="",
        counts=counts, fingerprints=data.fingerprints, fields=[], limit_name=limit_name, limit=limit,
        over_limit={}, unknown={}, top_tokens=[], train_tokens=0, funnel=[], filter_lines=[], notes=[],
        info=dict(data.info))


def _inspect_lm(data: RecipeData, top_n: int) -> DataInspection:
    tok, block = data.tokenizer, data.recipe.model.block_size
    ids = {name: encode(tok, texts) for name, texts in data.splits.items()}
    ins = _base(data, {k: len(v) for k, v in data.splits.items()}, "model.block_size", block)
    lengths = [len(x) + 1 for split in ids.values() for x in split]  # + the EOS that ends every document
    ins.fields = [FieldLengths(f"{data.recipe.data.text_column} (+EOS)", lengths, block)]
    for name, docs in ids.items():
        if docs:
            over = sum(len(x) + 1 > block for x in docs)
            ins.over_limit[name] = {"examples": len(docs), "over": over, "share": over / len(docs),
                                    "what": "documents longer than a block: continued in the next block, nothing lost"}
    ins.unknown = unknown_tokens(tok, [x for split in ids.values() for x in split])
    eos = tok.eos_token_id
    train = [t for doc in ids["train"] for t in (*doc, eos)]
    ins.top_tokens, ins.train_tokens = top_tokens(tok, train, top_n), len(train)
    return ins


def _inspect_sft(data: RecipeData, top_n: int) -> DataInspection:
    recipe, tok, template = data.recipe, data.tokenizer, data.template
    cfg = recipe.data
    ins = _base(data, {k: len(v) for k, v in data.splits.items()}, "data.max_length", cfg.max_length)
    what = "truncated to max_length" if cfg.truncation == "truncate" else "dropped (truncation: drop)"

    def over_limit(report, n: int) -> dict[str, Any]:
        cut, lost = report.n_truncated + report.dropped.get(TOO_LONG, 0), report.dropped.get(PROMPT_TOO_LONG, 0)
        return {"examples": n, "over": cut + lost, "share": (cut + lost) / n,
                "what": what + (f"; {lost} prompts fill max_length (dropped)" if lost else "")}

    examples = _tokenized_splits(data, ins, lambda recs, source: tokenize_sft(recs, template, tok, cfg, source=source),
                                 over_limit)
    every = [r for recs in data.splits.values() for r in recs]
    ins.fields = sft_field_lengths(every, template, tok)
    ins.fields.append(FieldLengths("example as trained (≤ max_length)",
                                   [len(e["input_ids"]) for exs in examples.values() for e in exs], cfg.max_length))
    ins.unknown = unknown_tokens(tok, [e["input_ids"] for exs in examples.values() for e in exs])
    _train_top_tokens(ins, tok, examples.get("train", []), "input_ids", "labels", top_n)
    return ins


def _inspect_preference(data: RecipeData, top_n: int) -> DataInspection:
    """task dpo: the pairs as the DPO task tokenizes them (prompt + chosen, prompt + rejected, loss on responses)."""
    recipe, tok, template = data.recipe, data.tokenizer, data.template
    cfg = recipe.data
    ins = _base(data, {k: len(v) for k, v in data.splits.items()}, "data.max_length", cfg.max_length)

    def over_limit(report, n: int) -> dict[str, Any]:
        cut = report.truncated_chosen + report.truncated_rejected
        return {"examples": n, "over": cut, "share": cut / (2 * n),
                "what": "responses truncated to max_length (chosen + rejected)"}

    examples = _tokenized_splits(
        data, ins, lambda recs, source: tokenize_preference(recs, template, tok, cfg, recipe.dpo, source=source),
        over_limit)
    every = [e for exs in examples.values() for e in exs]
    for side in ("chosen", "rejected"):
        ins.fields.append(FieldLengths(f"prompt + {side} (tokens)", [len(e[f"{side}_ids"]) for e in every],
                                       cfg.max_length))
        ins.fields.append(FieldLengths(f"{side} response (loss tokens)",
                                       [sum(t != IGNORE for t in e[f"{side}_labels"]) for e in every]))
    ins.unknown = unknown_tokens(tok, [e[f"{side}_ids"] for e in every for side in ("chosen", "rejected")])
    _train_top_tokens(ins, tok, examples.get("train", []), "chosen_ids", "chosen_labels", top_n)
    return ins


def _tokenized_splits(data: RecipeData, ins: DataInspection, tokenize: Callable[[list, str], tuple[list, Any]],
                      over_limit: Callable[[Any, int], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each non-empty split tokenized as training tokenizes it (`tokenize(records, source)` → examples, report):
    its report's lines become notes, `over_limit(report, n records)` its row of what max_length cuts."""
    examples: dict[str, list[dict[str, Any]]] = {}
    for split, recs in data.splits.items():
        if recs:
            examples[split], report = tokenize(recs, f"{source_name(data.recipe)} ({split} split)")
            ins.notes += [f"{split}: {line}" for line in report.lines()]
            ins.over_limit[split] = over_limit(report, len(recs))
    return examples


def _train_top_tokens(ins: DataInspection, tok: Any, train: list[dict[str, Any]], ids: str, labels: str,
                      top_n: int) -> None:
    """The training split's most frequent tokens (and which of them carry loss) and its token count."""
    flat = [t for e in train for t in e[ids]]
    targets = Counter(t for e in train for t in e[labels] if t != IGNORE)
    ins.top_tokens, ins.train_tokens = top_tokens(tok, flat, top_n, targets), len(flat)


def sft_field_lengths(records: Sequence[dict[str, Any]], template: Any, tokenizer: Any) -> list[FieldLengths]:
    """Tokens per template field (chat: per message of each role; others: each column and the rendered prompt)."""

    texts: dict[str, list[str]] = {}
    if template.format == "chat":
        for role in ("system", "user", "assistant"):
            texts[f"{role} message"] = [m["content"] for r in records for m in template.messages(r)
                                        if m["role"] == role]
    else:
        for name in (*template.required_columns(), *template.optional_columns()):
            col = template.column(name)
            label = name if col == name else f"{name} ({col})"
            texts[label] = [t for r in records for t in (select_texts(r, col) or [])]
        if template.format != "text":
            texts["prompt (rendered)"] = [template.prompt_text(r) for r in records]
    return [FieldLengths(name, [len(x) for x in encode(tokenizer, values)]) for name, values in texts.items() if values]


def _inspect_pairs(data: RecipeData, top_n: int) -> DataInspection:
    recipe, tok = data.recipe, data.tokenizer
    cfg, max_length = pair_config(recipe), recipe.data.max_length
    ins = _base(data, {k: len(v) for k, v in data.splits.items()}, "data.max_length", max_length)
    task = build_pair_task(recipe, {k: v for k, v in data.splits.items() if v}, tok)  # the run's own conversion
    ins.notes, ins.info = list(task.notes), {**ins.info, **task.info}
    parts: dict[str, list[list[int]]] = {"prompt": [], "response A": [], "response B": []}
    train_ids: list[int] = []
    for split, recs in data.splits.items():
        if not recs:
            continue
        pairs, _ = records_to_pairs(recs, cfg, seed=recipe.run.seed, source=source_name(recipe))
        encoded = {name: encode(tok, [getattr(p, attr) for p in pairs])
                   for name, attr in (("prompt", "prompt"), ("response A", "a"), ("response B", "b"))}
        for name, ids in encoded.items():
            parts[name] += ids
        truncated = int(task.info.get(f"data.{split}.truncated", 0))
        ins.over_limit[split] = {"examples": len(pairs), "over": truncated, "share": truncated / max(len(pairs), 1),
                                 "what": f"cut to fit max_length ({cfg.architecture} layout, per-part budgets)"}
        if split == "train":
            train_ids = [t for ids in encoded.values() for x in ids for t in x]
    ins.fields = [FieldLengths(name, [len(x) for x in ids]) for name, ids in parts.items() if ids]
    ins.unknown = unknown_tokens(tok, [x for ids in parts.values() for x in ids])
    ins.top_tokens, ins.train_tokens = top_tokens(tok, train_ids, top_n), len(train_ids)
    return ins


# ------------------------------------------------------------------------------------------ counting
def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (one batched call)."""
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]


def never_unknown(tokenizer: Any) -> str | None:
    """Why this tokenizer cannot produce an unknown token, or None when it can."""
    if getattr(tokenizer, "unk_token_id", None) is None:
        return "the tokenizer has no unknown token"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer") or {})
    if '"ByteLevel"' in pre and model.get("type") == "BPE":
        return "byte-level BPE: every byte has a token, so no text is unknown"
    if model.get("byte_fallback"):
        return "byte fallback: unknown characters become byte tokens"
    return None


def unknown_tokens(tokenizer: Any, id_lists: Sequence[Sequence[int]]) -> dict[str, Any]:
    total = sum(len(x) for x in id_lists)
    reason = never_unknown(tokenizer)
    if reason is not None:
        return {"tokens": total, "unknown": 0, "rate": 0.0, "reason": reason}
    unk = tokenizer.unk_token_id
    n = sum(1 for x in id_lists for t in x if t == unk)
    return {"tokens": total, "unknown": n, "rate": n / max(total, 1),
            "reason": f"counted: {tokenizer.unk_token!r} (id {unk}) in the tokenized text"}


def token_text(tokenizer: Any, token_id: int) -> str:
    """How a token reads, with whitespace made visible: ' the' -> '␣the', '\\n' -> '↵'."""
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def top_tokens(tokenizer: Any, ids: Sequence[int], n: int, targets: Counter | None = None) -> list[dict[str, Any]]:
    counts = Counter(ids)  # by id: distinct tokens can read the same (byte pieces all decode to U+FFFD)
    total = max(len(ids), 1)
    rows = []
    for rank, (token_id, count) in enumerate(counts.most_common(n), 1):
        row = {"rank": rank, "id": int(token_id), "token": token_text(tokenizer, token_id), "count": count,
               "share": count / total}
        if targets is not None:
            row["targets"] = targets.get(token_id, 0)  # times it is a loss-bearing target
        rows.append(row)
    return rows


def describe_tokenizer(tokenizer: Any, recipe: Recipe) -> str:
    if recipe.run.task == "lm" and recipe.tokenizer.kind == "bpe" and recipe.model.init_from is None:
        return f"byte-level BPE trained on the train split ({len(tokenizer)} tokens)"
    name = getattr(tokenizer, "name_or_path", "") or "pretrained"
    return f"{name} ({len(tokenizer)} tokens)"


# ------------------------------------------------------------------------------------ plots and HTML
def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "field"


def write_plots(ins: DataInspection, out_dir: Path) -> dict[str, Path]:
    """lengths-<field>.png per field, top-tokens.png, funnel.png (with filters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, Path] = {}
    for f in ins.fields:
        if not f.lengths:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(f.lengths, bins=min(60, max(5, len(set(f.lengths)))), color="#4c72b0")
        if f.limit is not None:
            ax.axvline(f.limit, color="#c44e52", linestyle="--", label=f"{ins.limit_name} {f.limit}")
            ax.legend()
        s = f.summary()
        ax.set_title(f"{f.name}: tokens (n={s['n']}, median {s['p50']}, p99 {s['p99']}, max {s['max']})", fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("count")
        fig.tight_layout()
        plots[f"lengths: {f.name}"] = _save(fig, out_dir / f"lengths-{_slug(f.name)}.png")
    if ins.top_tokens:
        rows = ins.top_tokens
        fig, ax = plt.subplots(figsize=(6, max(2.5, 0.22 * len(rows) + 1)))
        ax.barh(range(len(rows)), [r["count"] for r in rows], color="#55a868")
        ax.set_yticks(range(len(rows)), [r["token"][:24] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"count in the train split ({ins.train_tokens:,} tokens)")
        ax.set_title(f"top {len(rows)} tokens", fontsize=9)
        fig.tight_layout()
        plots["top tokens"] = _save(fig, out_dir / "top-tokens.png")
    if ins.funnel:
        names, kept = zip(*ins.funnel, strict=True)
        fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
        ax.barh(range(len(names)), kept, color="#8172b2")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        for i, k in enumerate(kept):
            ax.text(k, i, f" {k}", va="center", fontsize=8)
        ax.set_xlabel("examples left")
        ax.set_title("filter funnel", fontsize=9)
        fig.tight_layout()
        plots["filter funnel"] = _save(fig, out_dir / "funnel.png")
    return plots


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def summary_rows(ins: DataInspection) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The report's tables as text: title -> (header, rows). The CLI and the HTML page show the same."""
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    tables["splits"] = (["split", "examples", "fingerprint (sha256)"],
                        [[k, str(n), ins.fingerprints.get(k, "")] for k, n in ins.counts.items()])
    field_rows = []
    for f in ins.fields:
        s = f.summary()
        field_rows.append([f.name, str(s["n"])] + ([f"{s['mean']:.1f}", str(s["p50"]), str(s["p90"]), str(s["p99"]),
                                                    str(s["max"])] if s["n"] else ["", "", "", "", ""]))
    tables["tokens per field"] = (["field", "n", "mean", "p50", "p90", "p99", "max"], field_rows)
    tables[f"over {ins.limit_name} ({ins.limit})"] = (
        ["split", "examples", "over", "share", "what happens"],
        [[k, str(v["examples"]), str(v["over"]), f"{100 * v['share']:.2f}%", v["what"]]
         for k, v in ins.over_limit.items()])
    u = ins.unknown
    tables["unknown tokens"] = (["tokens", "unknown", "rate", "why"],
                                [[f"{u['tokens']:,}", str(u["unknown"]), f"{100 * u['rate']:.4f}%", u["reason"]]])
    if ins.funnel:
        first = ins.funnel[0][1] or 1
        tables["filter funnel"] = (["step", "examples left", "of input"],
                                   [[n, str(k), f"{100 * k / first:.1f}%"] for n, k in ins.funnel])
    extra = ["as target"] if ins.top_tokens and "targets" in ins.top_tokens[0] else []
    tables[f"top {len(ins.top_tokens)} tokens (train split, {ins.train_tokens:,} tokens)"] = (
        ["rank", "id", "token", "count", "share", *extra],
        [[str(r["rank"]), str(r["id"]), r["token"], str(r["count"]), f"{100 * r['share']:.2f}%",
          *([str(r["targets"])] if extra else [])] for r in ins.top_tokens])
    return tables


def write_html(ins: DataInspection, path: Path) -> Path:
    """One self-contained page: every table, the pre-flight and filter lines, the plots inlined as PNG."""
    parts = [f"<h1>lmlab data inspect: {html.escape(ins.recipe_name)}</h1>",
             f"<p>task {html.escape(ins.task)} · data {html.escape(ins.source)} · tokenizer "
             f"{html.escape(ins.tokenizer)} · {ins.seconds:.1f} s</p>"]
    for title, (header, rows) in summary_rows(ins).items():
        parts += [f"<h2>{html.escape(title)}</h2>", _table(header, rows)]
    for title, lines in (("filters", ins.filter_lines), ("reading and tokenization", ins.notes)):
        if lines:
            parts += [f"<h2>{title}</h2>", f"<pre>{html.escape(chr(10).join(lines))}</pre>"]
    if ins.plots:
        parts.append("<h2>plots</h2>")
    for title, png in ins.plots.items():
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(title)}">'
                     f"<figcaption>{html.escape(title)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}pre{background:#f6f6f6;"
             "padding:8px;white-space:pre-wrap}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>data inspect: "
                        f"{html.escape(ins.recipe_name)}</title><style>{style}</style></head><body>"
                        + "\n".join(parts) + "</body></html>", encoding="utf-8")
    except OSError as e:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else (e.strerror or str(e))
        raise LmlabError(f"--html: cannot write {path} ({why}); give a file path in a folder you can write to") \
            from None
    return path


# ------------------------------------------------------------------------------------------- preview
@dataclass
class PreviewToken:
    id: int
    text: str  # decoded (several tokens when they only decode together, e.g. the bytes of one character)
    loss: bool  # the model is trained to predict this token (its label at the position before is not -100)
    special: str = ""  # 'EOS', 'BOS' or 'PAD' (an attention-masked position)
    n: int = 1  # tokens in this unit


@dataclass
class PreviewExample:
    split: str
    index: int  # position in the split (sft: the record; lm: the block)
    tokens: list[PreviewToken]

    def count(self, what: str) -> int:
        if what == "pad":
            return sum(t.n for t in self.tokens if t.special == "PAD")
        real = [t for t in self.tokens if t.special != "PAD"]
        return sum(t.n for t in real if t.loss == (what == "loss"))

    @property
    def eos_is_target(self) -> bool:
        real = [t for t in self.tokens if t.special != "PAD" and t.loss]
        return bool(real) and real[-1].special == "EOS"


@dataclass
class Preview:
    recipe_name: str
    task: str
    template: str
    examples: list[PreviewExample]
    eos: str  # "'<|im_end|>' (id 2)"
    pad: str  # how padding is done
    notes: list[str] = field(default_factory=list)


def preview(recipe: Recipe, n: int = 3, split: str = "train", data: RecipeData | None = None) -> Preview:
    """The first `n` examples of `split` as the collator hands them to the model: right-padded to the longest
    of them, with each token's loss flag, EOS and padding marked."""
    data = data or recipe_data(recipe)
    tok = data.tokenizer
    if split not in data.splits or not data.splits[split]:
        have = ", ".join(k for k, v in data.splits.items() if v)
        raise LmlabError(f"--split: the recipe has no examples in split '{split}' (splits with data: {have})")
    eos = tok.eos_token_id
    eos_text = f"{tok.eos_token!r} (id {eos})" if eos is not None else "none"
    if data.task == "lm":

        stream = tokenize_documents(data.splits[split], tok, eos)
        blocks = BlockView(stream.ids, recipe.model.block_size, drop_last=split == "train")
        shown = [blocks[i].tolist() for i in range(min(n, len(blocks)))]
        examples = [PreviewExample(split, i, _units(tok, ids, [False] + [True] * (len(ids) - 1), [True] * len(ids)))
                    for i, ids in enumerate(shown)]
        return Preview(recipe.run.name, "lm", f"documents joined by EOS, blocks of {recipe.model.block_size}",
                       examples, eos_text, "none (full blocks)")
    if data.task != "sft":
        raise LmlabError(f"data preview: task '{data.task}' has no loss mask to show; use lm or sft recipes")

    recs = data.splits[split]
    take = min(len(recs), 4 * n + 16)  # a few extra: some records may be dropped by tokenization
    while True:
        exs, report = tokenize_sft(recs[:take], data.template, tok, recipe.data, source=f"{split} split")
        if len(exs) >= n or take == len(recs):
            break
        take = len(recs)
    exs = exs[:n]
    pad = pad_token_id(tok)
    batch = collate_padded(exs, pad_id=pad)
    examples = []
    for b, ex in enumerate(exs):
        ids = batch["input_ids"][b].tolist()
        labels = batch["labels"][b].tolist()
        real = [bool(m) for m in batch["attention_mask"][b].tolist()]
        loss = [False] + [lab != IGNORE for lab in labels[:-1]]
        examples.append(PreviewExample(split, ex["row"], _units(tok, ids, loss, real)))
    if tok.pad_token_id is None:
        pad_text = f"the tokenizer has none: pads with EOS (id {pad}), masked by position"
    elif tok.pad_token_id == eos:
        pad_text = f"pad = EOS (id {pad}): pads are masked by position (attention 0, label -100), EOS stays a target"
    else:
        pad_text = f"{tok.pad_token!r} (id {pad}), masked by position"
    notes = [line for line in report.lines()[1:] if "WARNING" in line or "double BOS" in line]
    if recipe.data.packing:
        notes.append("training packs these examples into rows of max_length (block-diagonal attention); "
                     "shown here padded, as evaluation sees them")
    return Preview(recipe.run.name, "sft", data.template.name, examples, eos_text, pad_text, notes)


def _units(tok: Any, ids: list[int], loss: list[bool], real: list[bool]) -> list[PreviewToken]:
    """Tokens as display units: EOS, BOS and pads alone; byte pieces of one character decoded together.
    BOS is marked only where the tokenizer itself puts it (the start), not where a template writes that
    token as text (SmolLM2's BOS is '<|im_start|>', which opens every chat turn)."""

    eos, bos = tok.eos_token_id, tok.bos_token_id
    adds_bos = bos is not None and bos != eos and special_prefix(tok) == [bos]
    out: list[PreviewToken] = []
    t = 0
    while t < len(ids):
        if not real[t]:
            out.append(PreviewToken(ids[t], "", False, "PAD"))
            t += 1
            continue
        if ids[t] == eos or (t == 0 and adds_bos and ids[t] == bos):
            out.append(PreviewToken(ids[t], tok.decode([ids[t]]), loss[t], "EOS" if ids[t] == eos else "BOS"))
            t += 1
            continue
        end = t + 1
        text = tok.decode(ids[t:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        # a character split over byte tokens decodes to U+FFFD until all its bytes are there
        while text.endswith("\ufffd") and end < len(ids) and end - t < 4 and real[end] and loss[end] == loss[t] \
                and ids[end] not in (eos, bos):
            end += 1
            text = tok.decode(ids[t:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(PreviewToken(ids[t], text, loss[t], "", end - t))
        t = end
    return out


def render_plain(example: PreviewExample) -> str:
    """`[masked]…[/masked][loss]…[/loss]` runs; EOS / BOS as `[EOS]` / `[BOS]`; padding as `[PAD×k]`."""
    out: list[str] = []
    state: str | None = None
    pads = 0
    for tok in example.tokens:
        if tok.special == "PAD":
            pads += tok.n
            continue
        if pads:
            out.append(f"[/{state}][PAD×{pads}]" if state else f"[PAD×{pads}]")
            state, pads = None, 0
        kind = "loss" if tok.loss else "masked"
        if kind != state:
            out.append((f"[/{state}]" if state else "") + f"[{kind}]")
            state = kind
        out.append(f"[{tok.special}]" if tok.special else tok.text)
    if state:
        out.append(f"[/{state}]")
    if pads:
        out.append(f"[PAD×{pads}]")
    return "".join(out)


_SHADES = ("bold green on grey19", "bold bright_green on grey30")  # alternate per token: boundaries show


def render_rich(example: PreviewExample) -> Text:
    """Masked tokens dim, loss-bearing tokens highlighted (alternating shades mark token boundaries), EOS / BOS
    as ⟨EOS⟩ / ⟨BOS⟩ (magenta: reverse when a target), padding as one dim red ⟨PAD×k⟩; newlines as ↵."""
    text = Text()
    pads, shade = 0, 0
    for tok in example.tokens:
        if tok.special == "PAD":
            pads += tok.n
            continue
        if pads:
            text.append(f"⟨PAD×{pads}⟩", style="dim red")
            pads = 0
        if tok.special:
            text.append(f"⟨{tok.special}⟩", style="bold white on magenta" if tok.loss else "magenta")
            continue
        shown = tok.text.replace("\n", "↵\n")
        if tok.loss:
            text.append(shown, style=_SHADES[shade])
            shade ^= 1
        else:
            text.append(shown, style="dim")
    if pads:
        text.append(f"⟨PAD×{pads}⟩", style="dim red")
    return text


def example_header(i: int, ex: PreviewExample, task: str = "sft") -> str:
    loss, masked, pads = ex.count("loss"), ex.count("masked"), ex.count("pad")
    head = f"example {i} ({ex.split}[{ex.index}]): {loss + masked} tokens, {loss} bear loss, {masked} masked"
    if task == "lm":
        return head
    eos = "EOS is the last target" if ex.eos_is_target else "NO EOS target (the model will not learn to stop)"
    return f"{head}, {pads} padding; {eos}"

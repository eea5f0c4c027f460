"""`lmlab data inspect` and `lmlab data preview`: statistics equal to what a run logs, plots and one HTML
page, every shipped recipe inspected without loading a model, and exact loss-mask boundaries as printed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from helpers import tiny_tokenizer
from helpers.recipes import DATA, REPO, tiny_lm
from helpers.toy import lmlab_cli
from typer.testing import CliRunner

from lmlab.analysis.inspect_data import (
    Unavailable,
    encode,
    inspect_data,
    never_unknown,
    preview,
    recipe_data,
    render_plain,
    render_rich,
    unknown_tokens,
)
from lmlab.cli import app
from lmlab.data.templates import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT
from lmlab.errors import LmlabError
from lmlab.recipe.loading import load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUOTED = '### Question: "{input}"\n ### Answer: {output}'
runner = CliRunner()


def sft_recipe(path, template: str, **data) -> dict:
    return {"run": {"name": "preview", "task": "sft", "seed": 3},
            "data": {"path": str(path), "template": template, "split": {"train": 1.0, "val": 0.0}, **data},
            "model": {"pretrained": SMOL}, "tokenizer": {"kind": "pretrained"}}


def write_recipe(folder: Path, tree: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def load_or_skip(path: Path, overrides: list[str] | None = None):
    return load_recipe(path, overrides)


# ------------------------------------------------------------------------------------------ inspect
def test_counts_and_fingerprints_are_those_a_run_logs(workspace):
    from lmlab.training.prepare import prepare

    recipe = load_recipe(data=tiny_lm())
    ins = inspect_data(recipe, top_n=1000)
    prep = prepare(recipe)
    assert ins.fingerprints == prep.fingerprints
    assert ins.counts == {"train": prep.data_info["data.train.documents"], "val": prep.data_info["data.val.documents"],
                          "test": 0}
    (field,) = ins.fields
    assert field.name == "title (+EOS)" and field.limit == 32
    assert sum(field.lengths) == prep.data_info["data.train.tokens"] + prep.data_info["data.val.tokens"]
    # the top tokens are counted over the training stream, EOS included once per document
    assert ins.train_tokens == prep.data_info["data.train.tokens"]
    counts = {r["id"]: r["count"] for r in ins.top_tokens}
    assert len(counts) == len(ins.top_tokens) <= 400 and sum(counts.values()) == ins.train_tokens
    assert counts[0] == ins.counts["train"] and ins.top_tokens[[r["id"] for r in ins.top_tokens].index(0)]["token"] \
        == "<|endoftext|>"
    over = ins.over_limit["train"]
    assert over["over"] == sum(n > 32 for n in field.lengths[: ins.counts["train"]])
    assert ins.unknown == {"tokens": ins.unknown["tokens"], "unknown": 0, "rate": 0.0,
                           "reason": "the tokenizer has no unknown token"}


def test_plots_funnel_and_one_html_page(workspace):
    recipe = load_recipe(data=tiny_lm(data__filters=[{"kind": "word_count", "field": "title", "min": 4}]))
    ins = inspect_data(recipe, top_n=12, out_dir=workspace / "out", html_page=True)
    assert ins.funnel[0] == ("input", 1500) and ins.funnel[1][0] == "word_count(title)"
    assert 0 < ins.funnel[1][1] < 1500 and sum(ins.counts.values()) == ins.funnel[1][1]
    assert ins.filter_lines[0].startswith("filters: 1500 -> ")
    assert len(ins.top_tokens) == 12
    assert {p.name for p in ins.plots.values()} == {"lengths-title-eos.png", "top-tokens.png", "funnel.png"}
    for png in ins.plots.values():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = ins.html_path.read_text()
    for title in ("splits", "tokens per field", "over model.block_size (32)", "unknown tokens", "filter funnel",
                  "top 12 tokens"):
        assert f"<h2>{title}" in page
    assert page.count("data:image/png;base64,") == 3 and ins.fingerprints["train"] in page


def test_cli_html_writes_the_page_where_it_is_told(workspace):
    """`lmlab data inspect RECIPE --html out.html` as the README writes it: the page goes to out.html."""
    path = write_recipe(workspace, tiny_lm())
    out = runner.invoke(app, ["data", "inspect", str(path), "--html", "pages/out.html"])
    assert out.exit_code == 0, out.output
    page = workspace / "pages" / "out.html"
    assert page.is_file() and "<h1>lmlab data inspect: tiny</h1>" in page.read_text()
    assert "html: pages/out.html" in out.output


def test_cli_html_to_an_unwritable_path_is_one_line(workspace):
    path = write_recipe(workspace, tiny_lm())
    proc = lmlab_cli("data", "inspect", str(path), "--html", str(path / "out.html"), cwd=workspace)  # under a file
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: --html: cannot write {path / 'out.html'} ({path} is a file, not a " \
                                  "folder); give a file path in a folder you can write to"


def test_unknown_token_rate():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="[UNK]")
    assert never_unknown(tok) is None
    u = unknown_tokens(tok, encode(tok, ["a b c", "a zz"]))
    assert (u["tokens"], u["unknown"], u["rate"]) == (5, 2, 0.4)
    assert "'[UNK]' (id 2)" in u["reason"]
    # byte-level BPE with an unk token defined (GPT-2, SmolLM2) still never produces it
    bpe = tiny_tokenizer()
    bpe.unk_token = "<|endoftext|>"
    assert never_unknown(bpe).startswith("byte-level BPE")


def test_sft_inspection_counts_truncation(workspace, smol_models):
    tree = sft_recipe(DATA / "poundian_cantos" / "dataset.jsonl", "prompt_completion", prompt_template=QUOTED,
                      max_length=10_000)
    whole = inspect_data(load_recipe(data=tree)).fields[-1].lengths  # nothing cut
    limit = sorted(whole)[len(whole) * 3 // 4]
    tree["data"]["max_length"] = limit
    ins = inspect_data(load_recipe(data=tree))
    assert ins.counts == {"train": 101, "val": 0, "test": 0}
    names = [f.name for f in ins.fields]
    assert names == ["input", "output", "prompt (rendered)", "example as trained (≤ max_length)"]
    assert max(ins.fields[-1].lengths) == limit
    over = ins.over_limit["train"]
    assert over["over"] == sum(n > limit for n in whole) > 0 and over["share"] == over["over"] / 101
    assert over["what"].startswith("truncated to max_length")
    assert ins.unknown["reason"].startswith("byte-level BPE")
    assert "targets" in ins.top_tokens[0]


def test_unresolvable_model_is_one_clear_line(workspace, tmp_path):
    tree = sft_recipe(DATA / "poundian_cantos" / "dataset.jsonl", "alpaca")
    tree["model"]["pretrained"] = "no-such-org/no-such-model"
    with pytest.raises(Unavailable, match="model 'no-such-org/no-such-model' cannot be resolved offline"):
        recipe_data(load_recipe(data=tree))
    path = write_recipe(tmp_path, tree)
    single = runner.invoke(app, ["data", "inspect", str(path)])
    assert isinstance(single.exception, Unavailable)  # `lmlab` prints it as one 'error:' line, exit 2
    (tmp_path / "good").mkdir()
    good = write_recipe(tmp_path / "good", tiny_lm())
    both = runner.invoke(app, ["data", "inspect", str(path), str(good), "--top-n", "5"])
    assert both.exit_code == 0, both.output
    skipped = [line for line in both.output.splitlines() if "skipped" in line]
    assert skipped == [f"{path}: skipped: model 'no-such-org/no-such-model' cannot be resolved offline: not a "
                       "folder beside the recipe or in $LMLAB_MODELS, and not in the Hugging Face cache"]
    assert "tiny: task lm" in both.output and "inspected in" in both.output


def test_dpo_inspection_counts_truncated_responses(workspace, smol_models):
    recipe = REPO / "recipes" / "dpo-smollm2-lora-cpu.yaml"
    whole = inspect_data(load_recipe(recipe, ["data.max_examples=80"]))
    names = [f.name for f in whole.fields]
    assert names == ["prompt + chosen (tokens)", "chosen response (loss tokens)", "prompt + rejected (tokens)",
                     "rejected response (loss tokens)"]
    pairs = sum(whole.counts.values())
    assert len(whole.fields[0].lengths) == pairs and all(n > 0 for n in whole.fields[1].lengths)
    limit = sorted(whole.fields[0].lengths)[pairs // 2]  # half the chosen sides no longer fit
    ins = inspect_data(load_recipe(recipe, ["data.max_examples=80", f"data.max_length={limit}"]))
    over = ins.over_limit["train"]
    assert 0 < over["over"] <= 2 * ins.counts["train"] and over["share"] == over["over"] / (2 * ins.counts["train"])
    assert over["what"] == "responses truncated to max_length (chosen + rejected)"
    assert max(ins.fields[0].lengths) <= limit
    assert any(n.startswith("train: ") for n in ins.notes) and "targets" in ins.top_tokens[0]


def test_every_shipped_recipe_inspects_on_a_sample(workspace, recipe_path):
    """Quick: each recipe's data path (first 150 examples) builds without a model."""
    recipe = load_or_skip(recipe_path, ["data.max_examples=150"])
    try:
        ins = inspect_data(recipe, top_n=5, out_dir=workspace / "out")
    except Unavailable as e:
        pytest.skip(f"{recipe_path.name}: {e}")
    assert 0 < sum(ins.counts.values()) <= 150
    assert set(ins.fingerprints) == set(ins.counts) and all(len(f) == 64 for f in ins.fingerprints.values())
    assert ins.fields and all(f.lengths for f in ins.fields)
    assert ins.plots and ins.top_tokens


@pytest.mark.slow
def test_every_shipped_recipe_inspects_in_under_a_minute(workspace, recipe_path):
    recipe = load_or_skip(recipe_path)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        ins = inspect_data(recipe, out_dir=workspace / "out", html_page=True)
    except Unavailable as e:
        pytest.skip(f"{recipe_path.name}: {e}")
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"{recipe_path.name}: {wall:.1f} s wall, {cpu:.1f} s CPU")
    # CPU seconds (all threads of this process): the wall clock also counts other jobs on a shared machine
    assert cpu < 60
    assert ins.html_path.is_file()


def pytest_generate_tests(metafunc):
    if "recipe_path" in metafunc.fixturenames:
        metafunc.parametrize("recipe_path", RECIPES, ids=[p.stem for p in RECIPES])


# ------------------------------------------------------------------------------------------ preview
def test_preview_alpaca_boundaries_pad_and_eos(workspace, smol_models):
    path = DATA / "rasbt_instruction_data" / "instruction-data.json"
    recipe = load_recipe(data=sft_recipe(path, "alpaca", max_length=256))
    data = recipe_data(recipe)
    records = data.splits["train"]  # shuffled by the split: the preview's index is into this list
    p = preview(recipe, n=3, data=data)
    assert p.template == "alpaca" and p.eos == "'<|im_end|>' (id 2)"
    assert p.pad.startswith("pad = EOS (id 2): pads are masked by position")
    longest = max(sum(t.n for t in ex.tokens if t.special != "PAD") for ex in p.examples)
    for ex in p.examples:
        r = records[ex.index]
        prompt = (ALPACA_PROMPT_WITH_INPUT if r["input"] else ALPACA_PROMPT_NO_INPUT).format(**r)
        pads = longest - ex.count("loss") - ex.count("masked")
        assert ex.count("pad") == pads
        assert render_plain(ex) == (f"[masked]{prompt}[/masked][loss]{r['output']}[EOS][/loss]"
                                    + (f"[PAD×{pads}]" if pads else ""))
        assert ex.eos_is_target
    assert any(ex.count("pad") for ex in p.examples)


def test_preview_quoted_question_template(workspace, smol_models):
    tree = sft_recipe(DATA / "poundian_cantos" / "dataset.jsonl", "prompt_completion", prompt_template=QUOTED)
    data = recipe_data(load_recipe(data=tree))
    records = data.splits["train"]
    p = preview(data.recipe, n=2, data=data)
    assert p.template == "prompt_completion"
    for ex in p.examples:
        r = records[ex.index]
        plain = render_plain(ex).split("[PAD×")[0]
        assert plain == f'[masked]### Question: "{r["input"]}"\n ### Answer: [/masked][loss]{r["output"]}[EOS][/loss]'


CONVERSATION = {"messages": [
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
]}


def test_preview_chat_masks_all_but_assistant_turns(workspace, smol_models):
    data = workspace / "chat.jsonl"
    data.write_text(json.dumps(CONVERSATION) + "\n")
    (ex,) = preview(load_recipe(data=sft_recipe(data, "chat")), n=1).examples
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face[EOS]\n"
    # <|im_end|> is SmolLM2's EOS: it closes every turn, and only the assistant's bear loss
    assert render_plain(ex) == (
        f"[masked]{system}<|im_start|>user\nHi[EOS]\n<|im_start|>assistant\n[/masked]"
        "[loss]Hello![EOS][/loss]"
        "[masked]\n<|im_start|>user\nCapital of France?[EOS]\n<|im_start|>assistant\n[/masked]"
        "[loss]Paris.[EOS][/loss][masked]\n[/masked]"
    )
    text = render_rich(ex)
    loss = "".join(text.plain[s.start:s.end] for s in text.spans if "green" in str(s.style))
    dim = "".join(text.plain[s.start:s.end] for s in text.spans if str(s.style) == "dim")
    assert loss == "Hello!Paris."
    assert dim.startswith("<|im_start|>system↵\nYou are") and "Capital of France?" in dim
    eos = [str(s.style) for s in text.spans if text.plain[s.start:s.end] == "⟨EOS⟩"]
    assert eos == ["magenta", "magenta", "bold white on magenta", "magenta", "bold white on magenta"]


def tiny_tokenizer_recipe(folder: Path, records: list[dict], template: str, **data) -> dict:
    """An sft recipe on a tiny byte-level BPE saved to a folder (no SmolLM2 needed)."""
    tiny_tokenizer().save_pretrained(folder / "tok")
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tree = sft_recipe(folder / "data.jsonl", template, **data)
    tree["model"] = {"pretrained": None}
    tree["tokenizer"] = {"kind": "pretrained", "name_or_path": str(folder / "tok")}
    return tree


def test_preview_cli_plain_and_truncation_without_eos(workspace):
    records = [{"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
               {"instruction": "Say hi.", "input": "", "output": "Hi " * 80}]
    tree = tiny_tokenizer_recipe(workspace, records, "alpaca", max_length=120)
    result = runner.invoke(app, ["data", "preview", str(write_recipe(workspace, tree)), "-n", "2", "--plain"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == ("preview: template alpaca; EOS '<|endoftext|>' (id 0); padding: pad = EOS (id 0): pads are "
                        "masked by position (attention 0, label -100), EOS stays a target")
    first = [i for i, line in enumerate(lines) if line.startswith("example 1 (train[")][0]
    assert "0 padding; EOS is the last target" in lines[first] or "padding; NO EOS target" in lines[first]
    body = "\n".join(lines)
    assert "[loss]Paris.[EOS][/loss][PAD×" in body
    # the long answer is cut at max_length: its EOS is gone, and the header says so
    assert "NO EOS target (the model will not learn to stop)" in body
    assert "WARNING: 1 examples have no EOS target" in body


def test_preview_errors(workspace):
    tree = tiny_tokenizer_recipe(workspace, [{"instruction": "a", "input": "", "output": "b"}], "alpaca")
    with pytest.raises(LmlabError, match="no examples in split 'val'"):
        preview(load_recipe(data=tree), split="val")

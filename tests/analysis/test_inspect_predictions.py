"""`lmlab inspect-predictions`: top-k next-token probabilities equal a plain transformers forward pass, for a
run id (full weights) and for a LoRA checkpoint folder (base + adapter); chart PNG; CLI output."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import tiny_llama, tiny_tokenizer
from helpers.recipes import tiny_lm
from typer.testing import CliRunner

from lmlab.analysis.inspect_predictions import encode_text, inspect_predictions
from lmlab.cli import app
from lmlab.errors import LmlabError
from lmlab.recipe.loading import load_recipe
from lmlab.training.loop import train

runner = CliRunner()
TEXT = "Show HN: A tiny language model"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished tiny run in its own workspace: (workspace, result)."""
    import os

    ws = tmp_path_factory.mktemp("predictions")
    old = os.getcwd()
    os.chdir(ws)
    os.environ.pop("LMLAB_TRACKING_URI", None)
    try:
        result = train(load_recipe(data=tiny_lm(train__max_steps=4, eval__every_steps=4, eval__max_batches=2)),
                       quiet=True)
    finally:
        os.chdir(old)
    return ws, result


def test_top_k_equals_a_plain_forward_pass(tiny_run, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws, result = tiny_run
    monkeypatch.chdir(ws)
    preds = inspect_predictions(result.run_id[:10], TEXT, top_k=5)
    assert preds.checkpoint == result.best_checkpoint
    tok = AutoTokenizer.from_pretrained(result.best_checkpoint)
    ids = tok(TEXT)["input_ids"]
    assert preds.token_ids == ids and [p.position for p in preds.positions] == list(range(len(ids)))
    model = AutoModelForCausalLM.from_pretrained(result.best_checkpoint).eval()
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0], -1)
    for p in preds.positions:
        top = torch.topk(probs[p.position], 5)
        assert [c.token_id for c in p.top] == top.indices.tolist()
        assert [c.prob for c in p.top] == pytest.approx(top.values.tolist(), abs=1e-6)
        if p.position + 1 < len(ids):
            nxt = ids[p.position + 1]
            assert p.actual.token_id == nxt and p.actual.prob == pytest.approx(float(probs[p.position, nxt]), abs=1e-6)
            assert p.actual_rank == 1 + int((probs[p.position] > probs[p.position, nxt]).sum())
        else:
            assert p.actual is None
    assert preds.chart.resolve() == ws / "lmlab-runs" / "inspect" / f"predictions-{result.run_id[:8]}.png"
    assert preds.chart.read_bytes()[:4] == b"\x89PNG"


def test_one_position_last_checkpoint_and_cli(tiny_run, monkeypatch):
    ws, result = tiny_run
    monkeypatch.chdir(ws)
    preds = inspect_predictions(result.run_id, TEXT, top_k=3, position=-1, last=True, chart=ws / "one.png")
    assert preds.checkpoint == result.last_checkpoint and len(preds.positions) == 1
    assert preds.positions[0].position == len(preds.token_ids) - 1 and len(preds.positions[0].top) == 3
    out = runner.invoke(app, ["inspect-predictions", result.run_id, "--text", TEXT, "--top-k", "4",
                              "--position", "0", "--out", str(ws / "cli.png")])
    assert out.exit_code == 0, out.output
    assert "next-token predictions" in out.output and f"chart: {ws / 'cli.png'}" in out.output.replace("\n", "")
    assert (ws / "cli.png").is_file()
    with pytest.raises(LmlabError, match="--position: 99 is outside the text's"):
        inspect_predictions(result.run_id, TEXT, position=99)
    with pytest.raises(LmlabError, match="no run 'feedface'"):
        inspect_predictions("feedface", TEXT)


def test_lora_checkpoint_folder_and_template(workspace):
    """A LoRA checkpoint: the base named in its recipe.yaml + the adapter; --template renders the prompt."""
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    base.save_pretrained(workspace / "base")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # a non-zero adapter, so it changes the predictions
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ckpt = workspace / "ckpt"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    # a whole recipe, as every lmlab checkpoint holds (the one loader validates it like any other)
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump({"data": {"path": "-"}, "model": {"pretrained": str(workspace / "base")},
                                                      "adapter": {"kind": "lora", "r": 4}}))
    template = {"format": "alpaca", "columns": {}, "completion_column": "output"}
    (ckpt / "template.json").write_text(json.dumps(template))

    preds = inspect_predictions(str(ckpt), "Name a colour.", top_k=3, position=-1, use_template=True)
    ids = preds.token_ids
    assert tok.decode(ids).endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    assert ids == encode_text(tok, "Name a colour.", ckpt, use_template=True)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    assert [c.token_id for c in preds.positions[0].top] == torch.topk(probs, 3).indices.tolist()
    assert preds.chart.name == "predictions-ckpt.png"

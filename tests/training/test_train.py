import json
import math

import pytest
import torch
from helpers.recipes import tiny_lm
from safetensors.torch import load_file

from lmlab import load_recipe, train
from lmlab.errors import LmlabError, TrainingFailed
from lmlab.training.loop import resume_run
from lmlab.workspace.layout import list_checkpoints
from lmlab.workspace.runs import list_runs


def weights(ckpt):
    return load_file(str(ckpt / "model.safetensors"))


def test_run_trains_records_and_checkpoints(workspace):
    result = train(load_recipe(data=tiny_lm()), quiet=True)
    assert result.status == "FINISHED" and result.step == 12
    first = next(h["train/loss"] for h in result.history if "train/loss" in h)
    last = [h["train/loss"] for h in result.history if "train/loss" in h][-1]
    assert last < first  # it learned something
    m = result.metrics
    assert m["val/ppl"] == pytest.approx(math.exp(m["val/loss"]), rel=1e-6)
    # per-char = summed token NLL / characters of the val split: check against the token count
    assert m["val/loss_per_char"] == pytest.approx(m["val/loss"] * m["val/tokens"] / result_chars(result), rel=1e-9)
    ck = result.last_checkpoint
    # the trainer state without pickle (tensors in safetensors, the rest JSON) and the manifest written last
    assert {"model.safetensors", "config.json", "trainer_state.safetensors", "trainer_state.json", "meta.json",
            "recipe.yaml", "tokenizer.json", "manifest.json"} <= {p.name for p in ck.iterdir()}
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["step"] == 12 and set(meta["fingerprints"]) == {"train", "val", "test"}
    # keep_last=2 plus the best: never more than 3 folders, never a temp folder left behind
    names = [p.name for p in list_checkpoints(result.run_dir)]
    assert len(names) <= 3 and not list((result.run_dir / "checkpoints").glob(".tmp*"))
    # the ledger has it, with params, fingerprints and final metrics
    (row,) = list_runs()
    assert row.run_id == result.run_id and row.status == "FINISHED"
    assert row.params["train.lr"] == "0.003" and len(row.params["data.fingerprint.train"]) == 64
    assert row.metrics["final/val/loss"] == pytest.approx(m["val/loss"])
    assert "env.pkg.torch" in row.tags and "lmlab.run_dir" in row.tags


def result_chars(result):
    from lmlab.workspace.runs import list_runs

    (row,) = [r for r in list_runs() if r.run_id == result.run_id]
    return int(row.params["data.val.chars"])


def test_checkpoint_loads_with_plain_transformers(workspace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(load_recipe(data=tiny_lm(train__max_steps=4)), quiet=True)
    model = AutoModelForCausalLM.from_pretrained(result.best_checkpoint)
    tok = AutoTokenizer.from_pretrained(result.best_checkpoint)
    ids = tok("Show HN: a", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_resume_mid_epoch_equals_uninterrupted(workspace, arch):
    # ~117 steps per epoch at batch 8: step 5 is mid-epoch and between evals (every 4)
    full = train(load_recipe(data=tiny_lm(model__arch=arch, run__name="full")), quiet=True)
    part = train(load_recipe(data=tiny_lm(model__arch=arch, run__name="parts")), stop_after_steps=5, quiet=True)
    assert part.status == "PAUSED" and part.step == 5
    (paused,) = [r for r in list_runs() if r.run_id == part.run_id]
    assert paused.status == "PAUSED"
    resumed = resume_run(part.run_id, quiet=True)
    assert resumed.run_id == part.run_id and resumed.status == "FINISHED" and resumed.step == 12
    a, b = weights(full.last_checkpoint), weights(resumed.last_checkpoint)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert resumed.metrics["val/loss"] == pytest.approx(full.metrics["val/loss"], abs=1e-6)


def test_resume_unknown_run_is_a_clear_error(workspace):
    train(load_recipe(data=tiny_lm(train__max_steps=2, train__warmup_steps=0)), quiet=True)
    with pytest.raises(LmlabError, match="no run 'nope' in the ledger"):
        resume_run("nope", quiet=True)


def test_nan_loss_fails_the_run_and_keeps_the_last_good_checkpoint(workspace, monkeypatch):
    from lmlab.tasks import causal_lm

    real = causal_lm.token_nll
    calls = {"n": 0}

    def poisoned(model, batch):
        nll, count = real(model, batch)
        calls["n"] += model.training
        return (nll * float("nan"), count) if model.training and calls["n"] > 6 else (nll, count)

    monkeypatch.setattr(causal_lm, "token_nll", poisoned)
    with pytest.raises(TrainingFailed, match="loss became nan at step 7"):
        train(load_recipe(data=tiny_lm()), quiet=True)
    (row,) = list_runs()
    assert row.status == "FAILED" and "loss became nan at step 7" in row.tags["lmlab.failure_reason"]
    ckpts = list_checkpoints(workspace / "lmlab-runs" / "runs" / row.run_id)
    assert ckpts[-1].name == "step-0000004"
    assert all(torch.isfinite(t).all() for t in weights(ckpts[-1]).values())


def test_accumulation_matches_a_bigger_micro_batch(workspace):
    # same global batch, same data order: grad_accum only changes how it is computed
    a = train(load_recipe(data=tiny_lm(train__batch_size=8, model__dropout=0.0, run__name="a")), quiet=True)
    b = train(load_recipe(data=tiny_lm(train__batch_size=4, train__grad_accum=2, model__dropout=0.0,
                                       run__name="b")), quiet=True)
    la = [h["train/loss"] for h in a.history if "train/loss" in h]
    lb = [h["train/loss"] for h in b.history if "train/loss" in h]
    assert la == pytest.approx(lb, rel=1e-5)


def test_warmup_longer_than_run_and_oversized_batch(workspace):
    with pytest.raises(LmlabError, match="train.warmup_steps: warmup of 30 steps is not shorter than the run"):
        train(load_recipe(data=tiny_lm(train__max_steps=None, train__epochs=0.05, train__warmup_steps=30)), quiet=True)
    with pytest.raises(LmlabError, match="train.batch_size: 4096 × grad_accum 1 × 1 process"):
        train(load_recipe(data=tiny_lm(train__batch_size=4096)), quiet=True)


def test_runs_in_one_process_may_change_precision(workspace):
    """A notebook trains fp32, then bf16: accelerate's process-wide state must not keep the first precision."""
    first = train(load_recipe(data=tiny_lm(train__max_steps=2, train__warmup_steps=0, eval__every_steps=2, ledger__enabled=False)), quiet=True)
    second = train(load_recipe(data=tiny_lm(train__max_steps=2, train__warmup_steps=0, eval__every_steps=2, ledger__enabled=False,
                                            train__precision="bf16")), quiet=True)
    assert first.status == second.status == "FINISHED"
    assert first.metrics["val/loss"] != second.metrics["val/loss"]  # bf16 rounding shows in the loss


def test_fused_optimizer_is_the_default_and_matches_the_loop(workspace):
    """train.fused picks torch's one-kernel AdamW (the Trainer's default; much faster on CPU); it must train the
    same model as the per-tensor loop, up to float rounding."""
    from lmlab.training.optim import make_optimizer

    recipe = load_recipe(data=tiny_lm(ledger__enabled=False))
    model = torch.nn.Linear(4, 4)
    assert make_optimizer(recipe.train, model, strategy=recipe.distributed.strategy).defaults["fused"] is True
    recipe.train.fused = False
    assert not make_optimizer(recipe.train, model, strategy=recipe.distributed.strategy).defaults["fused"]
    fused = train(load_recipe(data=tiny_lm(ledger__enabled=False, train__max_steps=6, train__warmup_steps=0,
                                           eval__every_steps=6, model__dropout=0.0)), quiet=True)
    loop = train(load_recipe(data=tiny_lm(ledger__enabled=False, train__max_steps=6, train__warmup_steps=0,
                                          eval__every_steps=6, model__dropout=0.0, train__fused=False)), quiet=True)
    assert fused.metrics["val/loss"] == pytest.approx(loop.metrics["val/loss"], rel=1e-4)

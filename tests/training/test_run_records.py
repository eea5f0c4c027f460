"""What a run records about itself: the model that was trained (not the schema's from-scratch defaults),
throughput under names that say what they count, and how much of the split each evaluation scored."""

import pytest
from helpers.recipes import tiny_lm
from helpers.toy import make_base, toy_recipe

from lmlab import load_recipe, train
from lmlab.analysis.compare import compare, param
from lmlab.workspace.runs import list_runs


@pytest.fixture(scope="module")
def sft_and_scratch(tmp_path_factory):
    """A LoRA SFT run on a tiny pretrained-looking Llama (prompts masked) and a from-scratch LM run, one ledger."""
    root = tmp_path_factory.mktemp("records")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("LMLAB_TRACKING_URI", raising=False)
        base = make_base(root / "base")
        sft = train(load_recipe(data=toy_recipe(root, base, run__name="sft-lora", adapter={"kind": "lora", "r": 4},
                                                train__max_steps=6, train__log_every=3, eval__every_steps=3)),
                    quiet=True)
        scratch = train(load_recipe(data=tiny_lm(run__name="scratch", run__output_dir=str(root / "lmlab-runs"),
                                                 train__max_steps=4, eval__every_steps=2)), quiet=True)
        rows = {r.name: r for r in list_runs(output_dir=str(root / "lmlab-runs"))}
        yield rows["sft-lora"], rows["scratch"], sft, scratch


def test_a_pretrained_run_records_the_loaded_model(sft_and_scratch):
    sft, scratch, *_ = sft_and_scratch
    p = sft.params  # make_base: a llama, 2 layers, 4 heads (2 key/value), width 32, MLP 64, 256 positions
    assert (p["model.arch"], p["model.n_layer"], p["model.n_head"], p["model.n_kv_head"], p["model.d_model"],
            p["model.d_ff"], p["model.context_length"]) == ("llama", "2", "4", "2", "32", "64", "256")
    assert int(p["model.vocab_size"]) > 256
    assert "model.dropout" not in p and "model.rope_theta" in p  # scratch-only knobs: not logged as defaults
    assert param(sft, "model.dropout") is None  # ... and never filled in with them when compared
    assert param(scratch, "model.d_model") == "32" and param(scratch, "model.arch") == "gpt2"
    columns = {c.key: c.values for c in compare([sft, scratch]).columns}
    assert columns["model.arch"] == ["llama", "gpt2"] and columns["model.dropout"] == [None, "0.1"]
    assert "model.d_model" not in columns  # both are 32 wide: not a difference


def test_throughput_counts_all_tokens_and_loss_tokens(sft_and_scratch):
    sft, scratch, sft_result, _ = sft_and_scratch
    m = sft.metrics  # SFT masks the prompt: it reads more tokens than carry loss
    assert m["final/train/mean_tokens_per_s"] > 1.5 * m["final/train/mean_loss_tokens_per_s"] > 0
    assert m["train/tokens_seen"] > 1.5 * m["train/loss_tokens_seen"] > 0
    assert m["final/train/wall_tokens_per_s"] < m["final/train/mean_tokens_per_s"]  # evaluation pauses count here
    rows = [h for h in sft_result.history if "train/tokens_per_s" in h]
    assert all(h["train/tokens_per_s"] > h["train/loss_tokens_per_s"] for h in rows)
    s = scratch.metrics  # a from-scratch LM predicts every token it reads
    assert s["train/tokens_seen"] == s["train/loss_tokens_seen"] == 4 * 8 * 32


def test_every_eval_records_its_coverage(sft_and_scratch, workspace):
    _, scratch, _, scratch_result = sft_and_scratch
    assert scratch.metrics["final/val/coverage"] == 1.0 and "final/val/loss_per_char" in scratch.metrics
    evals = [h for h in scratch_result.history if "val/loss" in h]
    assert evals and all(h["val/coverage"] == 1.0 for h in evals)
    capped = train(load_recipe(data=tiny_lm(train__max_steps=2, train__warmup_steps=0, eval__every_steps=2,
                                            eval__max_batches=1, eval__batch_size=2)), quiet=True)
    coverage = capped.metrics["val/coverage"]  # 2 blocks of 32 targets out of the whole val split
    assert 0 < coverage < 0.5 and capped.metrics["val/tokens"] == 64
    assert "val/loss_per_char" not in capped.metrics  # only defined over the whole split


def test_tokens_seen_continue_across_a_resume(workspace):
    recipe = tiny_lm(train__max_steps=4, eval__every_steps=2)
    paused = train(load_recipe(data=recipe), quiet=True, stop_after_steps=2)
    resumed = train(load_recipe(data=recipe), resume=paused.run_id, quiet=True)
    seen = [h["train/tokens_seen"] for h in resumed.history if "train/tokens_seen" in h]
    assert seen == [4 * 8 * 32]  # 4 steps of 8 blocks of 32 tokens (a count restarted at the resume: 2 * 8 * 32)

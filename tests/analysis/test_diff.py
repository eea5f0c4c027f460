"""`lmlab diff`: planted differences are each named, and an identical re-run shows none.

All runs share one ledger in one git repository (a fresh sqlite ledger costs ~10 s; a tiny run ~2 s)."""

import json
import re
import subprocess

import pytest
from helpers.recipes import tiny_lm
from typer.testing import CliRunner

from lmlab import load_recipe, train
from lmlab.analysis.compare import read_artifact, resolve_uri, select_runs
from lmlab.analysis.diff import count_example_changes, diff_runs
from lmlab.data.splits import example_hashes
from lmlab.workspace.ledger import client


def git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, check=True,
                   capture_output=True)


def tiny_model(folder):
    """A 2-layer Llama with a byte-level BPE tokenizer saved like a hub model: a pretrained base for sft."""
    import torch
    from helpers import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_sft(model_dir, **data):
    return {"run": {"name": "sft", "task": "sft", "seed": 3},
            "data": {"path": "rasbt_instruction_data/instruction-data.json", "template": "alpaca",
                     "max_examples": 120, "max_length": 512, "split": {"train": 0.8, "val": 0.2}, **data},
            "model": {"pretrained": str(model_dir)}, "tokenizer": {"kind": "pretrained"},
            "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 3, "warmup_steps": 0, "log_every": 1},
            "eval": {"every_steps": 3}}


def log_split_hashes(uri, run_id, recipe_dict):
    """Log `split_hashes.json` as the loop will once wired: per split, example_hashes of the split's examples.
    The split is rebuilt here with lmlab's own functions, checked against the run's fingerprints."""
    from lmlab.data.sources import column, load_records
    from lmlab.data.splits import fingerprint, split_records

    recipe = load_recipe(data=recipe_dict)
    records = [r for r in load_records(recipe) if str(r.get("title") or "").strip()]
    splits = {k: column(v, "title", "test") if v else [] for k, v in split_records(records, recipe.data.split,
                                                                                 recipe.run.seed).items()}
    params = client(uri).get_run(run_id).data.params
    assert all(fingerprint(v) == params[f"data.fingerprint.{k}"] for k, v in splits.items())
    client(uri).log_dict(run_id, {k: example_hashes(v) for k, v in splits.items()}, "split_hashes.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ws = tmp_path_factory.mktemp("diff")
    model_dir = tiny_model(tmp_path_factory.mktemp("model"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        mp.delenv("LMLAB_TRACKING_URI", raising=False)
        (ws / ".gitignore").write_text("lmlab-runs/\n")
        (ws / "prep.py").write_text("LOWERCASE = False\n")
        git("init", "-q", cwd=ws)
        git("add", ".", cwd=ws)
        git("commit", "-q", "-m", "start", cwd=ws)
        uri = resolve_uri()

        def run(recipe):
            return train(load_recipe(data=recipe), quiet=True).run_id

        out = {"base": run(tiny_lm()), "rerun": run(tiny_lm()), "lr": run(tiny_lm(train__lr=1e-3)),
               "split_seed": run(tiny_lm(data__split={"train": 0.8, "val": 0.2, "seed": 99})),
               "pkg": run(tiny_lm())}
        # a package upgrade, planted after the fact: the run's environment tag and record say torch 2.0.0
        c = client(uri)
        c.set_tag(out["pkg"], "env.pkg.torch", "2.0.0")
        env_file = c.download_artifacts(out["pkg"], "environment.json", str(tmp_path_factory.mktemp("env")))
        env = json.loads(open(env_file).read())
        c.log_dict(out["pkg"], {**env, "pkg.torch": "2.0.0"}, "environment.json")
        # an uncommitted edit in the working tree
        (ws / "prep.py").write_text("LOWERCASE = True\n")
        out["dirty"] = run(tiny_lm())
        git("checkout", "prep.py", cwd=ws)
        for name in ("base", "split_seed"):
            log_split_hashes(uri, out[name], tiny_lm(data__split={"train": 0.8, "val": 0.2, "seed": 99})
                             if name == "split_seed" else tiny_lm())
        out["sft512"] = run(tiny_sft(model_dir))
        out["sft128"] = run(tiny_sft(model_dir, max_length=128))
        rows = {r.run_id: r for r in select_runs(name="*", uri=uri)}
        yield uri, {k: rows[v] for k, v in out.items()}


def diff(runs, a, b):
    uri, rows = runs
    return diff_runs(rows[a], rows[b], uri)


def inputs(d):
    return [(x.section, x.key) for x in d.input_differences]


def test_identical_rerun_has_no_difference_lines(runs):
    d = diff(runs, "base", "rerun")
    assert d.differences == []
    lines = d.lines()
    assert len(lines) == 3 and lines[0].startswith(f"A {runs[1]['base'].run_id} tiny started ")
    assert lines[1].startswith(f"B {runs[1]['rerun'].run_id} tiny started ")
    assert lines[2] == "no differences in recorded inputs"


def test_learning_rate_is_named_first_then_the_metrics_it_moved(runs):
    d = diff(runs, "base", "lr")
    assert inputs(d) == [("config", "train.lr")]
    assert d.lines()[2:4] == ["config", "  train.lr: 0.003 → 0.001"]
    assert "final/val/loss" in [x.key for x in d.section("metrics")]
    assert "final/train/mean_tokens_per_s" not in [x.key for x in d.section("metrics")]  # timing is no result


def test_max_length_names_the_field_and_the_truncation_it_caused(runs):
    d = diff(runs, "sft512", "sft128")
    assert d.section("config")[0].line() == "data.max_length: 512 → 128"
    data = {x.key: (x.a, x.b) for x in d.section("data")}
    assert data["data.train.truncated"][0] == "0" and int(data["data.train.truncated"][1]) > 0
    # truncation counts come before the other data counts
    assert d.section("data")[0].key.endswith(("truncated", "dropped"))
    assert {s for s, _ in inputs(d)} == {"config", "data", "derived"}


def test_split_seed_names_the_seed_and_counts_the_examples_that_moved(runs):
    d = diff(runs, "base", "split_seed")
    (seed,) = d.section("seed")
    assert seed.line() == "data.split.seed: None → 99  (split seed 7 vs 99)"
    data = {x.key: x for x in d.section("data")}
    assert [x.key for x in d.section("data")][:2] == ["train split", "val split"]  # then its consequences
    for split in ("train", "val"):
        only_a, of_a, only_b, of_b = map(int, re.fullmatch(r"(\d+) of (\d+) examples only in A, (\d+) of (\d+) only in B",
                                                             data[f"{split} split"].note).groups())
        assert 0 < only_a < of_a and 0 < only_b < of_b and of_a == of_b  # same sizes, different members
    assert "tokenizer.hash" in data  # the BPE was trained on a different training split
    assert {s for s, _ in inputs(d)} == {"data", "seed", "derived"}  # nothing in config, code or environment


def test_split_without_recorded_hashes_says_the_fingerprint_differs(runs):
    _, rows = runs
    d = diff_runs(rows["base"], rows["split_seed"])  # no ledger to read split_hashes.json from
    assert d.section("data")[0].line() == (
        f"train split: {rows['base'].params['data.fingerprint.train'][:12]} → "
        f"{rows['split_seed'].params['data.fingerprint.train'][:12]}  (fingerprint differs; per-example hashes "
        "(split_hashes.json) not recorded, so not counted)")


def test_the_loop_records_split_hashes(runs):
    uri, rows = runs
    if read_artifact(uri, rows["rerun"].run_id, "split_hashes.json") is None:
        pytest.skip("prepare does not log split_hashes.json yet (see lmlab.diff.example_hashes)")
    d = diff(runs, "rerun", "split_seed")
    assert "examples only in A" in d.section("data")[0].note


def test_package_version_is_named(runs):
    d = diff(runs, "base", "pkg")
    torch_version = runs[1]["base"].tags["env.pkg.torch"]
    assert [x.line() for x in d.input_differences] == [f"torch version: {torch_version} → 2.0.0"]
    assert d.section("metrics") == []


def test_dirty_working_tree_is_named_with_the_file(runs):
    d = diff(runs, "base", "dirty")
    (code,) = d.input_differences
    assert code.line() == "git.dirty: false → true  (B ran with uncommitted changes to prep.py (git.patch))"


def test_multiset_counts():
    a, b = example_hashes(["x", "y", "y", "z"]), example_hashes(["y", "z", "z", "w"])
    assert count_example_changes(a, b) == (2, 2)  # x and one y only in A; one z and w only in B
    assert count_example_changes(a, list(reversed(a))) == (0, 0)
    assert len(a[0]) == 16 and a[1] == a[2]


def test_cli_diff_prints_what_the_user_sees(runs, monkeypatch):
    from lmlab.cli import app

    uri, rows = runs
    monkeypatch.setenv("LMLAB_TRACKING_URI", uri)
    out = CliRunner().invoke(app, ["diff", rows["base"].run_id[:8], rows["rerun"].run_id[:8]])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[2:] == ["no differences in recorded inputs"]
    out = CliRunner().invoke(app, ["diff", rows["base"].run_id[:8], "nope"])
    assert out.exit_code != 0 and "no run 'nope' in the ledger" in str(out.exception)


def test_a_field_added_after_a_run_counts_as_its_default():
    """A run recorded before `train.eps` existed ran with the default: no false difference, and a real one
    says the value was not recorded."""
    from lmlab.workspace.runs import RunRow

    old = RunRow("a" * 32, "old", "FINISHED", 0.0, 1.0, {"train.lr": "0.001"})
    same = RunRow("b" * 32, "new", "FINISHED", 0.0, 1.0, {"train.lr": "0.001", "train.eps": "1e-08",
                                                          "alerts.spike_mad_k": "3.0"})
    other = RunRow("c" * 32, "new", "FINISHED", 0.0, 1.0, {"train.lr": "0.001", "train.eps": "1e-06"})
    assert diff_runs(old, same).differences == []  # alerts.spike_mad_k only watches the run: not a cause
    (d,) = diff_runs(old, other).differences
    assert d.line() == "train.eps: 1e-08 → 1e-06  (default; not recorded by A)"

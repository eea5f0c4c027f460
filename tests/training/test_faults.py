"""Faults a run must survive: kill -9 (during a save too), SIGTERM from a preemptible machine, errors after the run
is registered, and several runs starting together in a fresh workspace."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from helpers.processes import final_weights, lmlab_child, wait_until_it_trains
from helpers.recipes import tiny_lm

from lmlab import load_recipe, train
from lmlab.training.loop import resume_run
from lmlab.workspace import layout
from lmlab.workspace.ledger import client
from lmlab.workspace.runs import list_runs

# patched into a child `lmlab run` process: SIGKILL itself at one point of the run
KILLERS = {
    "during-save": """
import lmlab.models.checkpoint as ck
_write = ck.write_manifest
def write_manifest(folder):
    if "step-0000008" in str(folder):  # the weights and state are written, the manifest not yet
        os.kill(os.getpid(), signal.SIGKILL)
    return _write(folder)
ck.write_manifest = write_manifest
""",
    "after-a-logged-step": """
import lmlab.workspace.ledger as lg
_log = lg.MlflowLedger.log_metrics
def log_metrics(self, metrics, step):
    _log(self, metrics, step)
    if step == 6:  # logged, not yet saved: resuming computes steps 5-8 again
        os.kill(os.getpid(), signal.SIGKILL)
lg.MlflowLedger.log_metrics = log_metrics
""",
    "after-a-save": """
import lmlab.training.loop as lp
_prune = lp.prune
def prune(run_dir, keep_last, keep=None):
    _prune(run_dir, keep_last, keep)
    if (run_dir / "checkpoints" / "step-0000008").is_dir():
        os.kill(os.getpid(), signal.SIGKILL)
lp.prune = prune
""",
}


def write_recipe(folder: Path, **over) -> Path:
    path = folder / "recipe.yaml"
    tree = tiny_lm(checkpoint__keep_last=5, checkpoint__keep_best=False, **over)
    tree["data"]["path"] = str(Path(os.environ["LMLAB_DATA"]) / tree["data"]["path"])
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same recipe trained without interruption."""
    root = tmp_path_factory.mktemp("reference")
    proc = lmlab_child(["run", str(write_recipe(root)), "-q"], root)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    row = list_runs(output_dir=str(root / "lmlab-runs"))[0]
    return final_weights(layout.run_dir(root / "lmlab-runs", row.run_id))


@pytest.mark.parametrize("point", [
    "during-save",
    pytest.param("after-a-logged-step", marks=pytest.mark.slow),
    pytest.param("after-a-save", marks=pytest.mark.slow),
])
def test_kill_9_then_resume_ends_bit_identical_without_duplicate_rows(reference, tmp_path, point):
    recipe = write_recipe(tmp_path)
    proc = lmlab_child(["run", str(recipe), "-q"], tmp_path, KILLERS[point])
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    workspace = tmp_path / "lmlab-runs"
    (row,) = list_runs(output_dir=str(workspace))
    assert row.status == "RUNNING"  # what kill -9 leaves: nothing ran to mark it
    run_dir = layout.run_dir(workspace, row.run_id)
    if point == "during-save":
        assert list((run_dir / "checkpoints").glob(".tmp-step-0000008-*"))  # the half-written save
        assert [p.name for p in layout.list_checkpoints(run_dir)] == ["step-0000004"]
    proc = lmlab_child(["run", "--resume", row.run_id[:8], "-q"], tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    weights = final_weights(run_dir)
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    ledger = client(layout.ledger_uri(workspace))
    assert ledger.get_run(row.run_id).info.status == "FINISHED"
    for key, steps in (("train/loss", [2, 4, 6, 8, 10, 12]), ("val/loss", [4, 8, 12])):
        assert sorted(m.step for m in ledger.get_metric_history(row.run_id, key)) == steps, key


def test_sigterm_checkpoints_and_pauses_then_resumes(tmp_path):
    recipe = write_recipe(tmp_path, train__max_steps=400, eval__every_steps=1000)
    proc = lmlab_child(["run", str(recipe), "-q"], tmp_path)
    workspace = tmp_path / "lmlab-runs"
    wait_until_it_trains(workspace)  # then preempt it
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    (row,) = list_runs(output_dir=str(workspace))
    assert row.status == "PAUSED" and "Traceback" not in err
    step = int(row.tags["lmlab.paused_at_step"])
    run_dir = layout.run_dir(workspace, row.run_id)
    assert layout.list_checkpoints(run_dir)[-1].name == f"step-{step:07d}"
    assert row.tags["lmlab.failure_reason"].startswith(f"SIGTERM received at step {step}")
    # it continues from there (a shorter run this time: train.max_steps may change on resume)
    resumed = resume_run(row.run_id, output_dir=str(workspace), overrides=[f"train.max_steps={step + 2}"], quiet=True)
    assert (resumed.status, resumed.step) == ("FINISHED", step + 2)


def test_a_run_that_fails_after_it_started_ends_failed_with_its_reason(workspace):
    with pytest.raises(Exception, match="exceeds the"):
        train(load_recipe(data=tiny_lm(train__batch_size=100_000)), quiet=True)
    (row,) = list_runs()
    assert row.status == "FAILED"
    assert "train.batch_size: 100000" in row.tags["lmlab.failure_reason"]


def test_four_runs_started_together_in_a_fresh_workspace_all_finish(tmp_path):
    recipe = write_recipe(tmp_path, train__max_steps=2, train__warmup_steps=0, eval__every_steps=2)
    procs = [lmlab_child(["run", str(recipe), "-q", "--set", f"run.name=together-{i}"], tmp_path) for i in range(4)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    rows = list_runs(output_dir=str(tmp_path / "lmlab-runs"))
    assert sorted(r.name for r in rows) == [f"together-{i}" for i in range(4)]
    assert {r.status for r in rows} == {"FINISHED"}

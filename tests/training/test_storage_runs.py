"""Training with run.storage against a real S3 API server (moto on 127.0.0.1): a machine lost mid-run (kill -9 while a
checkpoint uploads, the whole workspace deleted) resumes from storage on an empty workspace and ends bit-identical
to an uninterrupted run with its full metric history; an endpoint that stops answering mid-run raises an alert and
tags the run storage.behind while training goes on."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from helpers.processes import final_weights, lmlab_child, wait_until_it_trains
from helpers.recipes import tiny_lm
from helpers.s3 import s3_server

from lmlab import load_recipe, train
from lmlab.analysis.runs_table import runs_grid
from lmlab.workspace import layout
from lmlab.workspace import mirror as mirror_mod
from lmlab.workspace.ledger import client
from lmlab.workspace.runs import list_runs
from lmlab.workspace.storage import Store

# patched into the child: SIGKILL while step 8 uploads (its files are in storage, its manifest not yet)
KILL_WHILE_STEP_8_UPLOADS = """
import lmlab.workspace.storage as st
_upload = st.Store.upload_checkpoint
def upload_checkpoint(self, folder, run_id, name, *, before_manifest=None, on_bytes=None):
    if name == "step-0000008":
        def before_manifest():
            os.kill(os.getpid(), signal.SIGKILL)
    return _upload(self, folder, run_id, name, before_manifest=before_manifest, on_bytes=on_bytes)
st.Store.upload_checkpoint = upload_checkpoint
"""


def test_kill_9_wipe_the_workspace_and_resume_from_storage_ends_bit_identical(tmp_path, monkeypatch):
    monkeypatch.delenv("LMLAB_STORAGE", raising=False)
    with s3_server(monkeypatch) as server:
        url = server.url("preempt")
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(tiny_lm(checkpoint__keep_last=2)))
        lost, reference, fresh = tmp_path / "lost-machine", tmp_path / "reference", tmp_path / "new-machine"
        for d in (lost, reference, fresh):
            d.mkdir()
        # the uninterrupted run (no storage) and the one whose machine is lost, side by side
        ref = lmlab_child(["run", str(recipe), "-q"], reference)
        killed = lmlab_child(["run", str(recipe), "-q", "--storage", url], lost, KILL_WHILE_STEP_8_UPLOADS)
        _, err = killed.communicate(timeout=600)
        assert killed.returncode == -signal.SIGKILL, err
        _, err = ref.communicate(timeout=600)
        assert ref.returncode == 0, err
        (run_id,) = Store(url).run_ids()
        store = Store(url)
        assert store.complete(run_id) == ["step-0000004"]  # step 8's files are there, without their manifest
        assert "model.safetensors" in store.listing(run_id)["step-0000008"]
        shutil.rmtree(lost)  # the machine is gone

        proc = lmlab_child(["run", "--resume", run_id[:8], "--storage", url, "-q"], fresh)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        workspace = fresh / "lmlab-runs"
        run_dir = layout.run_dir(workspace, run_id)
        (expected,) = list_runs(output_dir=str(reference / "lmlab-runs"))
        weights, want = final_weights(run_dir), final_weights(layout.run_dir(reference / "lmlab-runs", expected.run_id))
        assert weights.keys() == want.keys() and all(torch.equal(weights[k], want[k]) for k in weights)
        # the ledger here holds the whole run: what it logged on the lost machine, and since
        (row,) = list_runs(output_dir=str(workspace))
        assert (row.run_id, row.status, row.name) == (run_id, "FINISHED", "tiny")
        ledger = client(layout.ledger_uri(workspace))
        for key, steps in (("train/loss", [2, 4, 6, 8, 10, 12]), ("val/loss", [4, 8, 12])):
            history = ledger.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == steps, key
            reference_history = client(layout.ledger_uri(reference / "lmlab-runs")).get_metric_history(
                expected.run_id, key)
            assert [m.value for m in sorted(history, key=lambda m: m.step)] == \
                [m.value for m in sorted(reference_history, key=lambda m: m.step)], key
        assert row.params["run.storage"] == url and row.tags[layout.TAG_RUN_DIR] == str(run_dir)
        # and storage holds the finished run again: what the workspace keeps, the record FINISHED
        assert store.complete(run_id) == [p.name for p in layout.list_checkpoints(run_dir)]
        assert json.loads(server.read(f"preempt/runs/{run_id}/ledger/run.json"))["status"] == "FINISHED"


def test_an_endpoint_that_stops_answering_mid_run_alerts_tags_and_training_goes_on(workspace, monkeypatch, capsys):
    monkeypatch.delenv("LMLAB_STORAGE", raising=False)
    monkeypatch.setattr(mirror_mod, "RETRY_DELAYS", (0.1,))
    with s3_server(monkeypatch) as server:
        saved = mirror_mod.Mirror.checkpoint_saved

        def endpoint_dies_at_the_first_checkpoint(self, path, best=None):
            if server.server._server is not None and path is not None:
                server.stop()
                server.server._server = None
            return saved(self, path, best)

        monkeypatch.setattr(mirror_mod.Mirror, "checkpoint_saved", endpoint_dies_at_the_first_checkpoint)
        options = {"config_kwargs": {"retries": {"max_attempts": 1}}}  # each try fails at once
        result = train(load_recipe(data=tiny_lm(run__storage=server.url("dying"), run__storage_options=options)))
    assert (result.status, result.step) == ("FINISHED", 12)
    assert [p.name for p in layout.list_checkpoints(result.run_dir)][-1] == "step-0000012"
    out = capsys.readouterr().out
    assert "alert: uploading step-0000004 to s3://lmlab-test/dying/runs/" in out and "does not answer" in out
    assert "storage is behind" in out
    (row,) = list_runs()
    assert "failed 2 time(s)" in row.tags[layout.TAG_STORAGE_BEHIND]
    assert row.metrics["alerts/storage"] == 1
    assert [a["kind"] for a in _alerts(row.run_id)["alerts"]] == ["storage"]
    grid = runs_grid([row])
    assert [c.values[0] for c in grid.columns if c.key == "storage"] == ["behind"]


@pytest.mark.slow
def test_sigterm_pauses_and_the_run_drains_its_uploads_before_it_exits(tmp_path, monkeypatch):
    monkeypatch.delenv("LMLAB_STORAGE", raising=False)
    with s3_server(monkeypatch) as server:
        url = server.url("preempted")
        recipe = tmp_path / "recipe.yaml"  # no save before the end: the only checkpoint is the one SIGTERM makes
        recipe.write_text(yaml.safe_dump(tiny_lm(train__max_steps=400, eval__every_steps=1000)))
        proc = lmlab_child(["run", str(recipe), "-q", "--storage", url], tmp_path)
        workspace = tmp_path / "lmlab-runs"
        wait_until_it_trains(workspace)  # then preempt it
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        (row,) = list_runs(output_dir=str(workspace))
        step = int(row.tags["lmlab.paused_at_step"])
        assert row.status == "PAUSED" and 0 < step < 400
        assert Store(url).complete(row.run_id) == [f"step-{step:07d}"]
        record = json.loads(server.read(f"preempted/runs/{row.run_id}/ledger/run.json"))
        assert record["status"] == "KILLED" and record["tags"]["lmlab.paused_at_step"] == str(step)


def _alerts(run_id: str) -> dict:
    import tempfile

    c = client(layout.ledger_uri("lmlab-runs"))
    with tempfile.TemporaryDirectory() as d:
        return json.loads(Path(c.download_artifacts(run_id, "alerts.json", d)).read_text())


@pytest.fixture(autouse=True)
def _no_tracking_server(monkeypatch):
    monkeypatch.delenv("LMLAB_TRACKING_URI", raising=False)


def test_a_resume_with_storage_lists_storage_and_verifies_the_local_checkpoint_once(tmp_path, monkeypatch):
    """resume_run / `lmlab run --resume RUN --storage URL` decide once whether storage is ahead (resume_recipe);
    train() then resumes the run folder it is given instead of asking storage again."""
    from lmlab.training.loop import resume_run
    from lmlab.workspace import storage as storage_mod

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LMLAB_STORAGE", raising=False)
    url = (tmp_path / "store").as_uri()
    first = train(load_recipe(data=tiny_lm(run__storage=url)), quiet=True)
    checks = []
    newest = storage_mod._newest_verified_step
    monkeypatch.setattr(storage_mod, "_newest_verified_step", lambda run_dir: checks.append(run_dir) or newest(run_dir))
    resumed = resume_run(first.run_id, storage=url, overrides=["train.max_steps=14"], quiet=True)
    assert (resumed.status, resumed.step) == ("FINISHED", 14)
    assert len(checks) == 1

"""The one run/checkpoint resolver: every spelling of a reference, and the two bugs the five old resolvers had
(`run:<id>:last` read as a run id; `--resume ID --output-dir W` writing into the recipe's own workspace)."""

import pytest
from helpers.recipes import tiny_lm
from typer.testing import CliRunner

from lmlab import load_recipe, train
from lmlab.cli import app
from lmlab.errors import LmlabError
from lmlab.models.loading import base_model_path
from lmlab.workspace import layout
from lmlab.workspace.ledger import client
from lmlab.workspace.resolve import resolve, resolve_run_dir


@pytest.fixture
def finished_run(workspace):
    """12 steps, a checkpoint every 4 (keep 3): step 4, 8 and 12 on disk."""
    recipe = load_recipe(data=tiny_lm(checkpoint__keep_last=3, checkpoint__keep_best=False))
    return train(recipe, quiet=True)


def test_every_spelling_of_a_reference_resolves_to_the_same_run(finished_run, workspace):
    result = finished_run
    steps = layout.list_checkpoints(result.run_dir)
    assert [p.name for p in steps] == ["step-0000004", "step-0000008", "step-0000012"]
    best = resolve(result.run_id).checkpoint
    assert best == result.best_checkpoint.resolve()
    for ref in (result.run_id, result.run_id[:8], f"run:{result.run_id[:8]}", f"run:{result.run_id}:best",
                str(result.run_dir)):
        found = resolve(ref)
        assert (found.checkpoint, found.run_id, found.run_dir) == (best, result.run_id, result.run_dir), ref
        assert found.workspace == workspace / "lmlab-runs"
    for ref in (f"run:{result.run_id[:8]}:last", str(result.run_dir)):
        assert resolve(ref, which="last").checkpoint == steps[-1]
    folder = resolve(str(steps[0]))
    assert (folder.checkpoint, folder.run_id, folder.run_dir) == (steps[0], result.run_id, result.run_dir)
    assert folder.ledger_uri == layout.sqlite_uri(workspace / "lmlab-runs")


def test_init_from_run_last_names_the_parents_last_checkpoint(finished_run):
    """Was: 'run:<id>:last' reached the ledger as the run id '<id>:last' (no such run)."""
    result = finished_run
    child = load_recipe(data={"data": {"path": "-"}, "model": {"init_from": f"run:{result.run_id[:8]}:last"}})
    assert base_model_path(child) == str(layout.list_checkpoints(result.run_dir)[-1])
    child.model.init_from = f"run:{result.run_id[:8]}"
    assert base_model_path(child) == str(resolve(result.run_id).checkpoint)


def test_bad_references_are_one_clear_error(finished_run, workspace):
    with pytest.raises(LmlabError, match="run:abc:newest: expected run:<id>, run:<id>:best or run:<id>:last"):
        resolve("run:abc:newest")
    with pytest.raises(LmlabError, match="no run 'ffff' in the ledger"):
        resolve("ffff")
    with pytest.raises(LmlabError, match=r"model.init_from: .*not a checkpoint folder .* nor a run folder"):
        resolve(str(workspace), field="model.init_from")
    with pytest.raises(LmlabError, match="no workspace 'elsewhere' here"):
        resolve(finished_run.run_id, output_dir="elsewhere")


def test_resume_with_output_dir_reads_and_writes_that_workspace(tmp_path, monkeypatch):
    """Was: the checkpoint came from --output-dir W but new checkpoints and ledger rows went to the recipe's own
    output_dir (relative to wherever the run was started)."""
    monkeypatch.delenv("LMLAB_TRACKING_URI", raising=False)
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    paused = train(load_recipe(data=tiny_lm()), stop_after_steps=5, quiet=True)
    assert paused.status == "PAUSED"
    workspace = start / "lmlab-runs"
    monkeypatch.chdir(elsewhere)  # the recipe says output_dir: lmlab-runs, which here would be a new folder
    out = CliRunner().invoke(app, ["run", "--resume", paused.run_id[:8], "--output-dir", str(workspace), "--quiet"])
    assert out.exit_code == 0, out.output
    assert not (elsewhere / "lmlab-runs").exists()
    run_id, run_dir, uri = resolve_run_dir(paused.run_id, output_dir=workspace)
    assert run_dir == workspace / "runs" / paused.run_id
    assert layout.list_checkpoints(run_dir)[-1].name == "step-0000012"
    run = client(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client(uri).get_metric_history(run_id, "train/loss")] == [2, 4, 6, 8, 10, 12]

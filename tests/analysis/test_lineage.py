"""Multi-part training: part k of N is a deterministic shard; a child run starts from its parent's checkpoint;
the ledger links them and `lineage` walks the chain both ways."""

from __future__ import annotations

import os

import pytest
from helpers.recipes import tiny_lm

from lmlab.analysis.inspect_data import recipe_data
from lmlab.analysis.lineage import depths, lineage, lineage_table
from lmlab.errors import LmlabError
from lmlab.recipe.loading import load_recipe
from lmlab.training.loop import train
from lmlab.workspace.layout import sqlite_uri as default_uri
from lmlab.workspace.runs import list_runs


def part(k: int, **over):
    return load_recipe(data=tiny_lm(data__parts=2, data__part=k, train__max_steps=4, eval__every_steps=4,
                                    eval__max_batches=2, **over))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Part 0 of 2 trained from scratch, then part 1 from part 0's best checkpoint, in one workspace."""
    ws = tmp_path_factory.mktemp("chain")
    old, uri = os.getcwd(), os.environ.pop("LMLAB_TRACKING_URI", None)
    os.chdir(ws)
    try:
        first = train(part(0), quiet=True)
        second = train(part(1, model__init_from=f"run:{first.run_id}", run__name="tiny-part1"), quiet=True)
    finally:
        os.chdir(old)
        if uri is not None:
            os.environ["LMLAB_TRACKING_URI"] = uri
    return ws, first, second


def test_two_part_chain_trains_and_lineage_shows_it(chain, monkeypatch):
    ws, first, second = chain
    monkeypatch.chdir(ws)
    assert first.status == second.status == "FINISHED"

    runs = {r.run_id: r for r in list_runs()}
    parent, child = runs[first.run_id], runs[second.run_id]
    # the parts are different shards of the same split: different training data, same validation data
    assert parent.params["data.fingerprint.train"] != child.params["data.fingerprint.train"]
    assert parent.params["data.fingerprint.val"] == child.params["data.fingerprint.val"]
    assert parent.params["data.train.part"].startswith("0/2") and child.params["data.train.part"].startswith("1/2")
    assert child.tags["lmlab.parent_run"] == first.run_id
    assert child.tags["lmlab.parent_checkpoint"] == str(first.best_checkpoint)
    assert "lmlab.parent_run" not in parent.tags

    # from either end, the chain reads parent → child
    for start in (first.run_id, second.run_id, second.run_id[:8]):
        assert [r.run_id for r in lineage(start)] == [first.run_id, second.run_id]
    chain_rows = lineage(first.run_id, default_uri("lmlab-runs"))
    assert depths(chain_rows) == [0, 1]
    table = lineage_table(chain_rows, focus=second.run_id)
    cells = [list(c.cells) for c in table.columns]
    assert cells[0] == [first.run_id[:8], f"▶ └─ {second.run_id[:8]}"]
    assert cells[3] == ["0/2", "1/2"]
    assert cells[4][1].startswith(first.run_id[:8]) and cells[4][0] == "scratch / pretrained"


def test_runs_lineage_cli(chain, monkeypatch):
    from typer.testing import CliRunner

    from lmlab.cli import app

    runner = CliRunner()
    if "--lineage" not in runner.invoke(app, ["runs", "--help"]).output:
        pytest.skip("`lmlab runs --lineage` is not wired into lmlab.cli yet")
    ws, first, second = chain
    monkeypatch.chdir(ws)
    out = runner.invoke(app, ["runs", "--lineage", second.run_id[:8]], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    rows = [line for line in out.output.splitlines() if first.run_id[:8] in line or second.run_id[:8] in line]
    assert len(rows) == 2 and rows[0].index(first.run_id[:8]) < rows[1].index(second.run_id[:8])
    assert "▶ └─" in rows[1] and "1/2" in rows[1] and "0/2" in rows[0]


def test_parts_are_disjoint_and_cover_the_training_split(workspace):
    whole = recipe_data(load_recipe(data=tiny_lm()))
    halves = [recipe_data(part(k)) for k in (0, 1)]
    assert halves[0].splits["train"] + halves[1].splits["train"] == whole.splits["train"]
    assert halves[0].fingerprints["val"] == halves[1].fingerprints["val"] == whole.fingerprints["val"]
    assert halves[0].fingerprints["train"] == recipe_data(part(0)).fingerprints["train"]  # deterministic


def test_lineage_of_unknown_run_is_a_clear_error(workspace):
    with pytest.raises(LmlabError, match="no run 'nosuchrun' in the ledger"):
        lineage("nosuchrun")

"""`lmlab compare`: one row per run, the hyperparameters that differ, then results — terminal, Markdown, CSV."""

import csv
import io

import pytest
from helpers.recipes import tiny_lm
from typer.testing import CliRunner

from lmlab import load_recipe, train
from lmlab.analysis.compare import compare, differing_params, is_recipe_key, resolve_uri, select_runs
from lmlab.errors import LmlabError
from lmlab.workspace.ledger import client


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three short runs of a learning-rate × weight-decay sweep in one ledger; a judge score and an accuracy
    logged by hand on one of them (as an evaluation step would)."""
    ws = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        mp.delenv("LMLAB_TRACKING_URI", raising=False)
        ids = [train(load_recipe(data=tiny_lm(run__name=f"sweep-{i}", train__lr=lr, train__weight_decay=wd,
                                              train__max_steps=4, eval__every_steps=2)), quiet=True).run_id
               for i, (lr, wd) in enumerate([(3e-3, 0.1), (1e-3, 0.1), (1e-3, 0.0)])]
        train(load_recipe(data=tiny_lm(run__name="other", train__max_steps=2, train__warmup_steps=0)), quiet=True)
        uri = resolve_uri()
        c = client(uri)
        c.log_metric(ids[1], "final/judge/score", 7.5, step=4)
        c.log_metric(ids[1], "final/val/accuracy", 0.625, step=4)
        yield ws, uri, ids


def test_recipe_keys_are_told_from_counts_and_fingerprints():
    assert is_recipe_key("train.lr") and is_recipe_key("data.split.seed") and is_recipe_key("data.columns.input")
    assert not is_recipe_key("data.train.examples") and not is_recipe_key("data.fingerprint.train")
    assert not is_recipe_key("tokenizer.hash") and not is_recipe_key("derived.total_steps")
    assert not is_recipe_key("train")  # a section is not a field


def test_columns_are_the_differing_hyperparameters_then_results(sweep):
    _, uri, ids = sweep
    rows = select_runs(name="sweep-*", uri=uri)
    assert [r.run_id for r in rows] == ids  # a name glob lists oldest first, like a hand-kept run table
    assert differing_params(rows) == ["train.lr", "train.weight_decay"]  # run.name differs too: not a hyperparameter
    table = compare(rows, uri=uri)
    headers = [c.header for c in table.columns]
    assert headers == ["run", "name", "status", "model", "lr", "weight decay", "best val loss", "val loss", "val ppl",
                       "val nats/char", "val accuracy", "judge score", "duration", "tok/s", "loss tok/s", "wall tok/s",
                       "device"]
    m = rows[0].metrics  # a from-scratch LM: every token it reads is a target; evaluation slows the wall-clock rate
    assert m["final/train/mean_tokens_per_s"] == m["final/train/mean_loss_tokens_per_s"]
    assert m["final/train/wall_tokens_per_s"] < m["final/train/mean_tokens_per_s"]
    cells = table.cells()
    assert [row[4:6] for row in cells] == [["0.003", "0.1"], ["0.001", "0.1"], ["0.001", "0.0"]]
    judge = headers.index("judge score")
    assert [row[judge] for row in cells] == ["", "7.5000", ""]  # only where present
    assert all(row[-1] == "cpu fp32" for row in cells)


def test_markdown_and_csv(sweep):
    _, uri, ids = sweep
    table = compare(select_runs([i[:8] for i in ids[:2]], uri=uri), uri=uri, keep=["train.batch_size"])
    md = table.markdown().splitlines()
    assert md[0].startswith("| run | name | status | model | lr | micro-batch | best val loss |")
    assert md[1].startswith("|---|---|---|---|---|---|---:|") and len(md) == 4
    assert md[2].startswith(f"| {ids[0][:8]} | sweep-0 | FINISHED | gpt2 2L×32 | 0.003 | 8 |")
    rows = list(csv.DictReader(io.StringIO(table.csv())))
    assert [r["run_id"] for r in rows] == ids[:2] and rows[0]["train.lr"] == "0.003"
    assert float(rows[0]["val/loss"]) == pytest.approx(compare(select_runs([ids[0]], uri=uri)).runs[0]
                                                       .metrics["final/val/loss"])


def test_cli_compare(sweep):
    from lmlab.cli import app

    ws, uri, ids = sweep
    run = CliRunner()
    out = run.invoke(app, ["compare", "--name", "sweep-*", "--markdown", "--uri", uri])
    assert out.exit_code == 0, out.output
    assert len(out.output.splitlines()) == 5 and "| judge score |" in out.output
    out = run.invoke(app, ["compare", "--name", "sweep-*", "--csv", "--uri", uri])
    assert out.output.splitlines()[0].startswith("run_id,name,status,model,train.lr,train.weight_decay,")
    out = run.invoke(app, ["compare", ids[0][:8], ids[2][:8], "--uri", uri], env={"COLUMNS": "250"})
    assert out.exit_code == 0 and "weight decay" in out.output and "sweep-2" in out.output
    for args, message in [(["--name", "nothing-*"], "no runs named 'nothing-*'"),
                          (["abcdef"], "no run 'abcdef' in the ledger"),
                          ([], "give run ids or --name"),
                          (["--name", "*", "--csv", "--markdown"], "choose one of --markdown and --csv")]:
        out = run.invoke(app, ["compare", *args, "--uri", uri])
        assert isinstance(out.exception, LmlabError) and message in str(out.exception), (args, out.output)


def test_unrecorded_fields_compare_as_their_defaults():
    from lmlab.workspace.runs import RunRow

    rows = [RunRow("a", "a", "FINISHED", 0.0, 1.0, {"train.lr": "0.1"}),
            RunRow("b", "b", "FINISHED", 0.0, 1.0, {"train.lr": "0.1", "train.betas": "[0.9, 0.95]",
                                                    "alerts.early_stop_patience": "None"}),
            RunRow("c", "c", "FINISHED", 0.0, 1.0, {"train.lr": "0.2", "train.betas": "[0.9, 0.99]"})]
    assert differing_params(rows[:2]) == []
    assert differing_params(rows) == ["train.lr", "train.betas"]
    assert [c.values for c in compare(rows).columns if c.key == "train.betas"] == [
        ["[0.9, 0.95]", "[0.9, 0.95]", "[0.9, 0.99]"]]

"""The CLI as a user sees it: exit codes, one-line errors without tracebacks, identical results to the API."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.recipes import REPO, tiny_lm

from lmlab import load_recipe, train
from lmlab.workspace.runs import list_runs

LMLAB = [sys.executable, "-c", "from lmlab.cli import main; main()"]


def lmlab(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "COLUMNS": "200"}
    return subprocess.run([*LMLAB, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def write_recipe(folder: Path, recipe: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_api_and_cli_give_identical_metrics(workspace):
    path = write_recipe(workspace, tiny_lm(train__max_steps=6, eval__every_steps=3))
    proc = lmlab("run", str(path), "--quiet", cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    api = train(load_recipe(path), quiet=True)
    cli_run, api_run = sorted(list_runs(), key=lambda r: r.start_time)
    assert api_run.run_id == api.run_id
    keys = ["final/val/loss", "final/val/loss_per_char", "final/test/loss"]
    keys = [k for k in keys if k in api_run.metrics]
    assert keys and [cli_run.metrics[k] for k in keys] == [api_run.metrics[k] for k in keys]
    assert cli_run.params["data.fingerprint.train"] == api_run.params["data.fingerprint.train"]


@pytest.mark.parametrize("args, message", [
    (["validate", "missing.yaml"], "missing.yaml: recipe file not found"),
    (["run", "--resume", "0123abcd"], "no run '0123abcd' in the ledger"),
    (["run"], "give a recipe file, or --resume RUN_ID"),
])
def test_user_errors_are_one_line_without_traceback(workspace, args, message):
    proc = lmlab(*args, cwd=workspace)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_recipe_reports_every_problem(workspace):
    path = workspace / "bad.yaml"
    path.write_text("data:\n  path: x.csv\n  text_colum: title\ntrain:\n  lr: -1\n")
    proc = lmlab("validate", str(path), cwd=workspace)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2
    assert "line 3: data.text_colum: unknown key; did you mean 'text_column'?" in lines[0]
    assert "line 5: train.lr: input should be greater than 0 (got -1)" in lines[1]


@pytest.mark.parametrize("over, message", [
    ({"data__path": "nope.csv"}, "data.path: file 'nope.csv' not found"),
    ({"data__text_column": "headline"}, "no column 'headline' (columns: id, title, url"),
    ({"data__split": {"train": 0.9999, "val": 0.0001}}, "data.split.val: 0.0001 of 1500 examples leaves the val split empty"),
])
def test_data_errors_name_the_file_column_or_split(workspace, over, message):
    path = write_recipe(workspace, tiny_lm(**over))
    proc = lmlab("run", str(path), cwd=workspace)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr


def test_validate_ok_and_runs_table(workspace):
    proc = lmlab("validate", str(REPO / "recipes" / "headlines-tiny.yaml"), cwd=workspace)
    assert proc.returncode == 0 and "ok (lm, llama)" in proc.stdout
    assert "no runs yet" in lmlab("runs", cwd=workspace).stdout
    train(load_recipe(data=tiny_lm(run__name="listed", train__max_steps=2, train__warmup_steps=0)), quiet=True)
    out = lmlab("runs", cwd=workspace).stdout
    assert "listed" in out and "FINISHED" in out and "gpt2 2L×32" in out

"""`lmlab sweep`: trials are ordinary runs, children of one parent run; the table matches the ledger; the pruner
stops hopeless trials; several workers never run a trial twice; a killed sweep resumes its interrupted trial."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers.recipes import tiny_lm

from lmlab.analysis.sweep import sweep_table
from lmlab.errors import LmlabError
from lmlab.training.sweep import plan_sweep, run_sweep
from lmlab.workspace.layout import ledger_uri
from lmlab.workspace.runs import list_runs
from lmlab.workspace.sweeps import PARENT_TAG, TAG_PRUNED, TAG_TRIAL, sweep_runs

GRID = ["train.lr=1e-3,3e-3", "model.d_model=32,64"]


def sweep_recipe(folder, **over):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_lm(eval__max_batches=2, **{"train__max_steps": 8, **over})))
    return path


def study(workspace, name):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{workspace / 'lmlab-runs' / 'optuna.db'}")


def test_grid_trials_are_child_runs_and_the_table_matches_the_ledger(workspace):
    path = sweep_recipe(workspace)
    outcome = run_sweep(plan_sweep(path, grid=GRID))
    assert outcome.done and outcome.counts == {"COMPLETE": 4}
    runs = list_runs(limit=100)
    parent = [r for r in runs if r.tags.get("lmlab.sweep.role") == "parent"]
    children = [r for r in runs if r.tags.get("lmlab.sweep.role") == "trial"]
    assert len(parent) == 1 and parent[0].status == "FINISHED" and len(children) == 4
    assert {c.tags[PARENT_TAG] for c in children} == {parent[0].run_id}
    assert all(c.status == "FINISHED" for c in children)
    # every grid point once, as the run's own recorded params say
    points = {(c.params["train.lr"], c.params["model.d_model"]) for c in children}
    assert points == {("0.001", "32"), ("0.001", "64"), ("0.003", "32"), ("0.003", "64")}
    table = sweep_table(outcome.name, ledger_uri("lmlab-runs"))
    by_loss = sorted(children, key=lambda c: c.metrics["final/best/val/loss"])
    assert [r.run_id for r in table.runs] == [c.run_id for c in by_loss]  # best first, as the ledger says
    best = next(c for c in table.columns if c.key == "best/val/loss").values
    assert best == pytest.approx([c.metrics["final/best/val/loss"] for c in by_loss])
    assert outcome.best["run_id"] == by_loss[0].run_id
    assert parent[0].tags["lmlab.sweep.best_run"] == by_loss[0].run_id
    # the commands that read it back
    from typer.testing import CliRunner

    from lmlab.cli import app

    out = CliRunner().invoke(app, ["compare", "--sweep", outcome.name, "--markdown"])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 6 and [line.split(" | ")[1] for line in lines[2:]] == [c.run_id[:8] for c in by_loss]
    out = CliRunner().invoke(app, ["report", "--sweep", outcome.name, "-o", "sweep.html"])
    assert out.exit_code == 0, out.output
    page = (workspace / "sweep.html").read_text()
    assert "Parameter importances" in page and page.count("data:image/png") >= 4  # sweep plots + loss curves
    # the same command again continues the study: nothing left to run, nothing run twice
    again = run_sweep(plan_sweep(path, grid=GRID))
    assert again.done and again.counts == {"COMPLETE": 4} and again.parent_run_id == outcome.parent_run_id
    assert len([r for r in list_runs(limit=100) if r.tags.get("lmlab.sweep.role") == "trial"]) == 4


def test_a_machine_that_ran_no_trial_says_so_and_succeeds(workspace):
    """Two machines share a study; the first took every trial. The second's command finishes with exit 0 and says
    where the trials are (its own ledger has none: it used to end with 'no trial has started yet', exit 2)."""
    from typer.testing import CliRunner

    from lmlab.cli import app

    path = sweep_recipe(workspace)
    study_db = f"sqlite:///{workspace / 'shared-study.db'}"
    args = ["sweep", str(path), "--grid", "train.lr=1e-3", "--study-storage", study_db, "--name", "shared"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    (workspace / "other").mkdir()
    os.chdir(workspace / "other")  # another workspace and ledger: another machine
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "sweep shared done: 1 complete" in second.output and "no trial ran here" in second.output
    assert "shared-study.db" in second.output.replace("\n", "")


def test_tpe_with_the_median_pruner_prunes_a_hopeless_trial(workspace):
    path = sweep_recipe(workspace)
    # seed 2: TPE draws 3e-3 three times, then 1e-7, which learns nothing: worse than the median at its first eval
    (workspace / "space.yaml").write_text(yaml.safe_dump({"sweep": {
        "name": "prune", "sampler": "tpe", "pruner": "median", "trials": 4, "startup_trials": 2, "seed": 2,
        "params": {"train.lr": [3e-3, 1e-7]}}}))
    outcome = run_sweep(plan_sweep(path, sweep_file=workspace / "space.yaml"))
    assert outcome.done and outcome.counts.get("PRUNED", 0) >= 1, outcome.counts
    found = sweep_runs("prune", ledger_uri("lmlab-runs"))
    pruned = [r for r in found.trials if TAG_PRUNED in r.tags]
    assert pruned and all(r.status == "KILLED" and r.params["train.lr"] == "1e-07" for r in pruned)
    reason = pruned[0].tags["lmlab.failure_reason"]
    assert reason.startswith("pruned at step ") and "above the median" in reason
    assert all(r.tags.get("lmlab.last_checkpoint") for r in pruned)  # checkpoints kept
    statuses = {row: status for row, status in zip(
        [r.run_id for r in sweep_table("prune", ledger_uri("lmlab-runs")).runs],
        next(c for c in sweep_table("prune", ledger_uri("lmlab-runs")).columns if c.key == "status").values,
        strict=True)}
    assert {statuses[r.run_id] for r in pruned} == {"PRUNED"}


def test_two_workers_finish_a_study_without_running_a_trial_twice(workspace):
    path = sweep_recipe(workspace)
    outcome = run_sweep(plan_sweep(path, grid=GRID, workers=2), workers=2)
    assert outcome.done and outcome.counts == {"COMPLETE": 4}
    trials = study(workspace, outcome.name).trials
    assert len(trials) == 4 and len({tuple(sorted(t.params.items())) for t in trials}) == 4
    workers = {t.user_attrs["lmlab.worker"].split("/")[1] for t in trials}
    assert len(workers) == 2  # both processes took trials
    children = sweep_runs(outcome.name, ledger_uri("lmlab-runs")).trials
    assert sorted(c.tags[TAG_TRIAL] for c in children) == ["0", "1", "2", "3"]


def test_a_one_point_grid_completes(workspace):
    """Optuna's GridSampler raised KeyError 'grid_id' telling an enqueued trial when one grid point was left; the
    grid's points are enqueued, so no sampler of Optuna's decides anything there."""
    outcome = run_sweep(plan_sweep(sweep_recipe(workspace), grid=["train.lr=1e-3"]))
    assert outcome.done and outcome.counts == {"COMPLETE": 1}
    assert outcome.best["params"] == {"train.lr": 1e-3}


def _claim_all(url, ready, out):
    import optuna

    from lmlab.training.sweep import claim, open_storage

    storage = open_storage(url)
    study = optuna.load_study(study_name="race", storage=storage)
    ready.wait(timeout=300)  # both workers (and the test) ready: they start claiming together
    taken = []
    while (trial := claim(study, storage)) is not None:
        taken.append(trial.number)
    out.put(taken)


def test_workers_racing_for_waiting_trials_on_sqlite_never_take_the_same_one(tmp_path):
    """Two processes claim 100 waiting trials of one SQLite study at once. Without BEGIN IMMEDIATE both read a trial
    WAITING and both 'win' it (2 to 8 of 100 taken twice, here; the CI failure 'Trial#0 has already finished')."""
    import multiprocessing

    import optuna

    from lmlab.training.sweep import open_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    created = optuna.create_study(study_name="race", storage=open_storage(url))
    for _ in range(100):
        created.enqueue_trial({}, skip_if_exists=False)
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, ready, out)) for _ in range(2)]
    for p in procs:
        p.start()
    ready.wait(timeout=300)
    taken = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    claims = sum(taken, [])
    assert sorted(claims) == list(range(100)), f"{len(claims) - len(set(claims))} trials taken twice"


@pytest.mark.parametrize("error, line", [(LmlabError("data.path: file 'x.csv' not found"),
                                          "worker 1: data.path: file 'x.csv' not found"),
                                         (OSError(28, "No space left on device"),
                                          "worker 1: OSError: [Errno 28] No space left on device")])
def test_a_failing_worker_hands_its_reason_to_the_sweep(monkeypatch, error, line):
    import queue

    from lmlab.training import sweep as sweep_mod

    def fails(plan, worker):
        raise error

    monkeypatch.setattr(sweep_mod, "work", fails)
    errors = queue.SimpleQueue()
    with pytest.raises(type(error)):
        sweep_mod._worker_main(None, 1, errors)
    assert errors.get_nowait() == line


def test_a_killed_sweep_resumes_its_interrupted_trial_and_runs_each_trial_once(workspace):
    path = sweep_recipe(workspace, train__max_steps=24)
    cmd = [sys.executable, "-c", "from lmlab.cli import main; main()", "sweep", str(path), *sum(
        (["--grid", g] for g in GRID), [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = workspace / "lmlab-runs" / "runs"
    deadline = time.monotonic() + 300
    try:  # kill it as soon as the second trial has a checkpoint (the first trial is done by then)
        while time.monotonic() < deadline and proc.poll() is None:
            started = [d for d in runs.iterdir() if any((d / "checkpoints").glob("step-*"))] if runs.is_dir() else []
            if len(started) >= 2:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    killed = max(started, key=lambda d: d.stat().st_ctime).name
    before = {r.run_id: r.status for r in list_runs(limit=100)}
    assert before[killed] == "RUNNING"  # SIGKILL left it so
    outcome = run_sweep(plan_sweep(path, grid=GRID))
    assert outcome.done
    children = sweep_runs(outcome.name, ledger_uri("lmlab-runs")).trials
    assert sorted(c.tags[TAG_TRIAL] for c in children) == ["0", "1", "2", "3"]  # each trial exactly once
    assert all(c.status == "FINISHED" for c in children)
    # the killed run (it had a checkpoint) finished as the same run: resumed, not started again
    assert killed in {c.run_id for c in children}
    trials = study(workspace, outcome.name).trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4 and len({tuple(sorted(t.params.items())) for t in complete}) == 4
    assert [t.state.name for t in trials].count("FAIL") == 1  # the killed attempt, handed back once


def test_opening_a_study_database_another_machine_is_creating_tries_again(monkeypatch, tmp_path):
    """Two machines opening a new PostgreSQL study at once both create Optuna's tables; the loser's CREATE TABLE
    fails with a duplicate key in pg_type (seen in the PostgreSQL test). It opens again and finds them there; any
    other error is one line at once."""
    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    from lmlab.training import sweep as sweep_mod

    calls = []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("CREATE TABLE studies", {}, Exception(
                'duplicate key value violates unique constraint "pg_type_typname_nsp_index"'))
        return RDBStorage(url, **kwargs)

    monkeypatch.setattr("optuna.storages.RDBStorage", racing)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert sweep_mod.open_storage(url) is not None and len(calls) == 2

    def refused(url, **kwargs):
        calls.append(url)
        raise sqlalchemy.exc.OperationalError("connect", {}, Exception("connection refused"))

    calls.clear()
    monkeypatch.setattr("optuna.storages.RDBStorage", refused)
    with pytest.raises(LmlabError, match="--study-storage: cannot open .*connection refused"):
        sweep_mod.open_storage("postgresql://u:secret@127.0.0.1:9/x")
    assert len(calls) == 1
    # SQLite and MySQL say it as an OperationalError; a locked or unreachable database is no such race
    race = sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
    locked = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("database is locked"))
    assert sweep_mod._lost_schema_race(race) and not sweep_mod._lost_schema_race(locked)

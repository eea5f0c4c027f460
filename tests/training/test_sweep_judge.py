"""A sweep optimizing an LLM judge's score (sweep.metric judge/<split>/mean): each trial trains, then the recipe's
judge scores its best checkpoint and the score is the trial's value; a judge endpoint that fails after training
leaves the trial waiting, and the rerun judges the trained run without training it again.

The judge is a scripted OpenAI-compatible endpoint on loopback that gives 90 to a response equal to the reference
output and 10 to anything else, so the trial whose learning rate teaches the toy questions wins."""

from __future__ import annotations

import re

import pytest
import yaml
from helpers.fake_judge import FakeJudge
from helpers.toy import make_base, toy_recipe

from lmlab.errors import LmlabError, RecipeError
from lmlab.training.sweep import plan_sweep, run_sweep
from lmlab.workspace.layout import TAG_FAILURE, ledger_uri
from lmlab.workspace.runs import list_runs
from lmlab.workspace.sweeps import TAG_TRIAL, sweep_runs

PROMPT = re.compile(r"correct output `(?P<reference>.*?)`, score the model response `(?P<response>.*?)`", re.S)


def exact_match(prompt: str) -> str:
    m = PROMPT.search(prompt)
    return "90" if m and m["response"].strip() == m["reference"].strip() else "10"


@pytest.fixture
def judge():
    made = FakeJudge(exact_match)
    yield made
    made.close()


def judged_recipe(workspace, url: str, **over):
    base = workspace / "base"
    if not base.is_dir():
        make_base(base)
    recipe = toy_recipe(workspace, base, **{"judge__base_url": url, "judge__model": "fake-judge",
                                            "judge__api_key_env": "", "judge__split": "val", "judge__retries": 0,
                                            "judge__timeout_s": 10, **over})
    path = workspace / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_judge_scores_every_trial_and_the_best_score_wins(workspace, judge, monkeypatch):
    monkeypatch.setenv("LMLAB_JUDGE_CACHE", str(workspace / "cache.sqlite"))
    path = judged_recipe(workspace, judge.url)
    from lmlab.evaluation.judge import judge_trial

    plan = plan_sweep(path, grid=["train.lr=1e-2,1e-5"], metric="judge/val/mean", score=judge_trial)
    assert plan.config["direction"] == "maximize"  # a judge's score: higher is better, unless told otherwise
    outcome = run_sweep(plan)
    assert outcome.done and outcome.counts == {"COMPLETE": 2}
    assert 0 < judge.calls <= 16  # 8 val examples per trial (4 questions twice: the cache answers repeats)
    children = {c.params["train.lr"]: c for c in sweep_runs(outcome.name, ledger_uri("lmlab-runs")).trials}
    learned, barely = children["0.01"], children["1e-05"]
    # the score logged to each trial's run is the value Optuna was told, and the run that learned wins
    assert learned.metrics["judge/val/mean"] > barely.metrics["judge/val/mean"]
    assert outcome.best["run_id"] == learned.run_id and outcome.best["value"] == learned.metrics["judge/val/mean"]
    assert learned.metrics["judge/val/n"] == barely.metrics["judge/val/n"] == 8
    assert learned.metrics["judge/val/mean"] == 90 and barely.metrics["judge/val/mean"] == 10
    parent = next(r for r in list_runs(limit=20) if r.tags.get("lmlab.sweep.role") == "parent")
    assert parent.status == "FINISHED" and parent.tags["lmlab.sweep.best_run"] == learned.run_id
    from lmlab.analysis.sweep import sweep_table

    table = sweep_table(outcome.name, ledger_uri("lmlab-runs"))
    assert [r.run_id for r in table.runs] == [learned.run_id, barely.run_id]  # highest score first


def test_a_judge_down_after_training_leaves_the_trial_waiting_and_the_rerun_only_judges(workspace, judge,
                                                                                        monkeypatch):
    monkeypatch.setenv("LMLAB_JUDGE_CACHE", str(workspace / "cache.sqlite"))
    path = judged_recipe(workspace, judge.url)
    from lmlab.evaluation.judge import judge_trial

    def plan():
        return plan_sweep(path, grid=["train.lr=1e-2"], metric="judge/val/mean", score=judge_trial)

    judge.answer = lambda prompt: 503  # the endpoint fails on every request
    with pytest.raises(LmlabError) as e:
        run_sweep(plan())
    text = str(e.value)
    assert "trial 0 trained (run " in text and "run the same command again to score it" in text
    assert "Traceback" not in text and len(text.splitlines()) == 1
    runs = list_runs(limit=20)
    parent = next(r for r in runs if r.tags.get("lmlab.sweep.role") == "parent")
    assert parent.status == "KILLED" and "scoring it failed" in parent.tags[TAG_FAILURE]  # never left RUNNING
    trained = next(r for r in runs if r.tags.get("lmlab.sweep.role") == "trial")
    assert trained.status == "FINISHED" and "judge/val/mean" not in trained.metrics
    from lmlab.training.sweep import STOP_ATTR, open_storage, open_study, work

    stopped = plan()
    study = open_study(stopped, open_storage(stopped.storage_url))
    assert "scoring it failed" in study.user_attrs[STOP_ATTR]
    assert work(stopped) == 0  # another worker (here or on another machine) takes no trial while the sweep is stopped
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "WAITING"]  # the attempt, handed back

    judge.answer = exact_match  # the endpoint is back
    outcome = run_sweep(plan())
    assert outcome.done and outcome.counts == {"COMPLETE": 1}
    trials = [r for r in list_runs(limit=20) if r.tags.get("lmlab.sweep.role") == "trial"]
    assert [t.run_id for t in trials] == [trained.run_id]  # judged, not trained again
    assert trials[0].tags[TAG_TRIAL] == "0" and outcome.best["value"] == trials[0].metrics["judge/val/mean"]
    parent = next(r for r in list_runs(limit=20) if r.tags.get("lmlab.sweep.role") == "parent")
    assert parent.status == "FINISHED" and not study.user_attrs[STOP_ATTR]  # the rerun cleared the stop


def test_a_trial_that_cannot_be_scored_for_its_own_sake_fails_and_the_sweep_goes_on(workspace):
    """Only an unavailable endpoint holds a trial for a rerun; any other scoring error (here: an empty split) is
    the trial's result, FAIL with the reason, as a training error would be."""
    from lmlab.errors import LmlabError as Mistake

    def score(run_id, output_dir):
        if client_lr(run_id) == "0.01":
            raise Mistake("judge.split: the run's val split is empty; pick another split")
        return {"judge/val/mean": 42.0}

    def client_lr(run_id):
        return next(r for r in list_runs(limit=20) if r.run_id == run_id).params["train.lr"]

    path = judged_recipe(workspace, "http://127.0.0.1:9/v1", train__max_steps=4, eval__every_steps=4)
    outcome = run_sweep(plan_sweep(path, grid=["train.lr=1e-2,1e-3"], metric="judge/val/mean", score=score))
    assert outcome.done and outcome.counts == {"FAIL": 1, "COMPLETE": 1}
    assert outcome.best["params"] == {"train.lr": 1e-3} and outcome.best["value"] == 42.0
    study = optuna_study(workspace, outcome.name)
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert failed.user_attrs["lmlab.reason"] == "judge.split: the run's val split is empty; pick another split"


def optuna_study(workspace, name):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{workspace / 'lmlab-runs' / 'optuna.db'}")


def test_any_fault_in_a_sweep_ends_its_parent_run_killed_never_running(workspace, monkeypatch):
    from lmlab.training import sweep as sweep_mod

    def disk_full(plan, worker=0):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sweep_mod, "work", disk_full)
    path = judged_recipe(workspace, "http://127.0.0.1:9/v1")
    with pytest.raises(OSError):
        run_sweep(plan_sweep(path, grid=["train.lr=1e-2"]))
    parent = next(r for r in list_runs(limit=20) if r.tags.get("lmlab.sweep.role") == "parent")
    assert parent.status == "KILLED" and "No space left on device" in parent.tags[TAG_FAILURE]


def test_a_judge_metric_in_the_recipe_maximizes_unless_told(workspace):
    """The direction's default follows the metric wherever the metric is named (the recipe's sweep: section here;
    a section dumped with its defaults once made a judged sweep minimize the score)."""
    from lmlab.evaluation.judge import judge_trial

    space = {"metric": "judge/val/mean", "params": {"train.lr": [1e-2, 1e-3]}}
    path = judged_recipe(workspace, "http://127.0.0.1:9/v1", sweep=space)
    assert plan_sweep(path, score=judge_trial).config["direction"] == "maximize"
    path = judged_recipe(workspace, "http://127.0.0.1:9/v1", sweep={**space, "direction": "minimize"})
    assert plan_sweep(path, score=judge_trial).config["direction"] == "minimize"
    assert plan_sweep(path, score=judge_trial, direction="maximize").config["direction"] == "maximize"


@pytest.mark.parametrize("over, extra, line", [
    ({}, {"metric": "judge/val/mean", "pruner": "median"},
     "sweep.pruner: median judges judge/val/mean at each eval, but a judge score exists only once a trial has "
     "trained; use pruner: none"),
    ({"judge__split": "test"}, {"metric": "judge/val/mean"},
     "sweep.metric: judge/val/mean but judge.split is test; set judge.split: val or optimize judge/test/mean"),
    ({"judge__model": None}, {"metric": "judge/val/mean"},
     "sweep.metric: judge/val/mean scores each trial with the recipe's LLM judge, but judge.model is not set; "
     "add a judge: section (base_url, model)"),
    ({"judge__api_key_env": "LMLAB_TEST_NO_SUCH_KEY"}, {"metric": "judge/val/mean"},
     "judge.api_key_env: environment variable LMLAB_TEST_NO_SUCH_KEY is not set, and every trial would be judged "
     "through it"),
    ({}, {"metric": "judge/val/score"},
     "sweep.metric: 'judge/val/score' is not a judge metric; use judge/<split>/mean or judge/<split>/median, "
     "e.g. judge/val/mean"),
])
def test_judge_metric_mistakes_are_one_line_each_before_any_trial(workspace, over, extra, line):
    from lmlab.evaluation.judge import judge_trial

    path = judged_recipe(workspace, "http://127.0.0.1:9/v1", **over)
    with pytest.raises(RecipeError) as e:
        plan_sweep(path, grid=["train.lr=1e-2,1e-3"], score=judge_trial, **extra)
    assert line in str(e.value)


def test_the_command_wires_the_judge_in(workspace):
    """Without a scorer (plan_sweep from Python) a judge metric is refused; `lmlab sweep` passes the judge, so its
    only complaint about this recipe is the missing judge section."""
    from helpers.toy import lmlab_cli

    path = judged_recipe(workspace, "http://127.0.0.1:9/v1")
    with pytest.raises(RecipeError, match="needs a scorer"):
        plan_sweep(path, grid=["train.lr=1e-2"], metric="judge/val/mean")
    recipe = yaml.safe_load(path.read_text())
    del recipe["judge"]
    path.write_text(yaml.safe_dump(recipe))
    proc = lmlab_cli("sweep", str(path), "--grid", "train.lr=1e-2", "--metric", "judge/val/mean", cwd=workspace)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "judge.base_url and judge.model are not set" in proc.stderr and "needs a scorer" not in proc.stderr

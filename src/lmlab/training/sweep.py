"""`lmlab sweep`: a recipe's trials, searched by Optuna, each an ordinary lmlab run (same loop, checkpoints and
ledger) recorded as an MLflow child run of the sweep's parent run.

Optuna is the engine: its study (sqlite in the workspace, or any RDB URL shared by several machines) holds the
trials; a grid's points are enqueued, its RandomSampler / TPESampler choose the params of other searches; its MedianPruner / HyperbandPruner judge the
metric reported at each eval. lmlab adds what makes a trial a run:

- **Slots.** The process that creates the study enqueues one trial per slot (a grid point, or an empty slot the
  sampler fills when a worker takes it). Workers on any machine take WAITING trials atomically (Optuna's own
  WAITING → RUNNING transition), so the study holds `trials` trials in all and no trial is run twice.
- **Interrupted trials resume.** A trial whose worker stopped (Ctrl-C, SIGTERM, a killed process or machine) is
  failed once — by the RUNNING → FAIL transition only one process wins — and Optuna's RetryHeartbeatStaleTrialCallback
  enqueues it again with the same params and reports; whoever takes it resumes the same lmlab run from its last
  checkpoint. A dead worker is seen at once on its own machine (its pid is gone), elsewhere by Optuna's heartbeat.
- **Pruning.** `train(on_eval=...)` reports each eval's metric; a pruned trial ends KILLED in the ledger with the
  reason and keeps its checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import signal
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError, RecipeError, ServiceUnavailable, TrainingFailed
from lmlab.recipe.loading import _normalize_overrides, flatten, load_recipe
from lmlab.recipe.schema import Recipe
from lmlab.recipe.sweep import ParamSpec, SweepConfig, check_space, evaluate_expr, load_sweep_file, parse_grid
from lmlab.training.loop import resume_recipe, train
from lmlab.workspace.layout import ARTIFACTS, TAG_FAILURE, list_checkpoints, run_dir
from lmlab.workspace.ledger import MlflowLedger, client, search_runs, tracking_uri
from lmlab.workspace.sweeps import (
    PARENT_TAG,
    TAG_DIRECTION,
    TAG_METRIC,
    TAG_PARAMS,
    TAG_PRUNED,
    TAG_ROLE,
    TAG_SUPERSEDED,
    TAG_SWEEP,
    TAG_TRIAL,
)

STUDY_FILE = "optuna.db"  # the workspace's study storage: <workspace>/optuna.db
HEARTBEAT_S = 10  # a running trial's heartbeat; another machine takes it over GRACE_S after its last one
GRACE_S = 60
POLL_S = 2.0  # how often an idle worker looks again while other workers' trials still run
STOP_ATTR = "lmlab.stop"  # study attr: why the sweep stopped (a trial could not be scored); cleared by the rerun



@dataclass
class SweepPlan:
    """Everything a worker needs (picklable: workers are separate processes)."""

    recipe_path: str
    sets: list[str]
    config: dict[str, Any]  # the SweepConfig, complete (CLI options merged)
    name: str
    storage_url: str
    output_dir: str
    ledger_uri: str
    experiment: str
    n_trials: int
    sampler: str
    seed: int
    eval_every: int  # the base recipe's, for the pruners' warm-up and minimum resource
    parent_run_id: str | None = None
    threads: int | None = None
    workers: int = 1
    shared_storage: bool = False  # --study-storage given: other machines may work on the same study
    quiet: bool = True  # no per-step progress from the trials' training
    progress: bool = False  # one line per finished trial
    # metrics a layer above training computes once a trial has trained (the LLM judge's judge/<split>/*):
    # score(run_id, output_dir) -> {metric: value}, logged to the trial's run by the scorer; a module-level function
    # (workers are spawned processes)
    score: Callable[[str, str], dict[str, float]] | None = None

    @property
    def sweep(self) -> SweepConfig:
        return SweepConfig.model_validate(self.config)

    def values_key(self) -> str:
        """What makes two commands the same sweep: the space and the sampler (trials may grow)."""
        return json.dumps({"params": self.config["params"], "sampler": self.sampler,
                           "metric": self.config["metric"], "direction": self.config["direction"]}, sort_keys=True)


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str | None
    done: bool  # every trial finished (complete, pruned or failed)
    counts: dict[str, int] = field(default_factory=dict)
    best: dict[str, Any] | None = None  # number, value, params, run id


# ------------------------------------------------------------------------------------------------ planning
def plan_sweep(recipe_path: str | Path, sets: list[str] | None = None, *, sweep_file: str | Path | None = None,
               grid: list[str] | None = None, name: str | None = None, metric: str | None = None,
               direction: str | None = None, trials: int | None = None, sampler: str | None = None,
               pruner: str | None = None, storage: str | None = None, workers: int = 1,
               quiet: bool = True, progress: bool = False,
               score: Callable[[str, str], dict[str, float]] | None = None) -> SweepPlan:
    """Read the recipe and its space (the recipe's sweep: section, a space file, --grid and options, later ones
    winning), check the whole space up front (one RecipeError with every problem) and say how it will run.

    `score`: for a metric the training loop does not log (judge/<split>/mean), what computes it once a trial has
    trained: `lmlab sweep` passes the LLM judge (lmlab.evaluation.judge.judge_trial)."""
    sets = list(sets or [])
    recipe = load_recipe(recipe_path, sets)
    raw = dict(load_sweep_file(sweep_file)) if sweep_file is not None else \
        (recipe.sweep.model_dump(by_alias=True, exclude_none=True, exclude_unset=True)
         if recipe.sweep is not None else {})  # unset: defaults that depend on others (direction) stay free
    raw["params"] = {k: (v.model_dump(by_alias=True, exclude_none=True) if hasattr(v, "model_dump") else v)
                     for k, v in (raw.get("params") or {}).items()}
    if grid:
        raw["params"].update({k: p.model_dump(by_alias=True, exclude_none=True) for k, p in parse_grid(grid).items()})
    for key, value in (("name", name), ("metric", metric), ("direction", direction), ("trials", trials),
                       ("sampler", sampler), ("pruner", pruner)):
        if value is not None:
            raw[key] = value
    if str(raw.get("metric", "")).startswith("judge/") and "direction" not in raw:
        raw["direction"] = "maximize"  # a judge's score: higher is better
    config, problems = _read_sweep(raw)
    problems += _judge_problems(config, recipe, score)
    if not recipe.ledger.enabled:
        problems.append("ledger.enabled: is false; a sweep records its trials in the ledger, enable it")
    base_overrides = dict(_normalize_overrides(sets))
    problems += check_space(config, lambda values: load_recipe(recipe_path, {**base_overrides, **values}),
                            flatten(recipe.resolved()), Recipe)
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)), str(recipe_path))
    sweep_name = config.name or f"{recipe.run.name}-sweep"
    threads = recipe.train.num_threads or (max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None)
    return SweepPlan(
        recipe_path=str(Path(recipe_path).resolve()), sets=sets, config=config.model_dump(by_alias=True),
        name=sweep_name, storage_url=storage or study_url(recipe.run.output_dir), output_dir=recipe.run.output_dir,
        ledger_uri=tracking_uri(recipe), experiment=recipe.ledger.experiment, n_trials=config.n_trials(),
        sampler=config.sampler_name(), seed=config.seed if config.seed is not None else recipe.run.seed,
        eval_every=recipe.eval.every_steps or 1, threads=threads, workers=workers, shared_storage=storage is not None,
        quiet=quiet, progress=progress, score=score if config.metric.startswith("judge/") else None)


def _read_sweep(raw: dict[str, Any]) -> tuple[SweepConfig, list[str]]:
    """The sweep section with each param validated on its own, so one bad param does not hide the others."""
    from pydantic import ValidationError

    from lmlab.recipe.describe import describe_error

    problems: list[str] = []
    raw_params = raw.get("params") or {}
    if not raw_params:
        problems.append("sweep.params: nothing to search; add params (or --grid field=v1,v2)")
    try:
        config = SweepConfig.model_validate({**raw, "params": {}})
    except ValidationError as e:
        problems += [describe_error(err, root=SweepConfig, prefix="sweep.") for err in e.errors()]
        config = SweepConfig()
    params = {}
    for key, value in raw_params.items():
        try:
            params[key] = ParamSpec.model_validate(value)
        except ValidationError as e:
            problems += [f"sweep.params.{key}: " + describe_error(err, root=ParamSpec).partition(": ")[2]
                         for err in e.errors()]
    config.params = params
    return config, problems


JUDGE_STATS = ("mean", "median")


def _judge_problems(config: SweepConfig, recipe: Recipe, score: Callable | None) -> list[str]:
    """A judge/<split>/<stat> metric is scored after each trial trains, by the recipe's judge: section."""
    metric = config.metric
    if not metric.startswith("judge/"):
        return []
    parts = metric.split("/")
    if len(parts) != 3 or parts[1] not in ("train", "val", "test") or parts[2] not in JUDGE_STATS:
        return [f"sweep.metric: '{metric}' is not a judge metric; use judge/<split>/mean or judge/<split>/median, "
                "e.g. judge/val/mean"]
    problems = []
    judge = recipe.judge
    if recipe.run.task != "sft" or recipe.data.template in (None, "text"):
        problems.append(f"sweep.metric: {metric} scores a fine-tuned model's responses against the reference outputs; "
                        f"it needs run.task sft with a data.template (this recipe: task {recipe.run.task}, template "
                        f"{recipe.data.template}); optimize a val/ metric instead")
    missing = judge.missing_endpoint()
    if missing:
        problems.append(f"sweep.metric: {metric} scores each trial with the recipe's LLM judge, but {' and '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not set; add a judge: section (base_url, model)")
    elif judge.missing_key():
        problems.append(f"judge.api_key_env: environment variable {judge.api_key_env} is not set, and every trial "
                        f"would be judged through it; export it, or set judge.api_key_env: '' for an endpoint that "
                        "needs no key")
    if judge.split != parts[1]:
        problems.append(f"sweep.metric: {metric} but judge.split is {judge.split}; set judge.split: {parts[1]} or "
                        f"optimize judge/{judge.split}/{parts[2]}")
    if config.pruner != "none":
        problems.append(f"sweep.pruner: {config.pruner} judges {metric} at each eval, but a judge score exists only "
                        "once a trial has trained; use pruner: none")
    if score is None and not problems:
        problems.append(f"sweep.metric: {metric} needs a scorer: plan_sweep(..., "
                        "score=lmlab.evaluation.judge.judge_trial) (the lmlab sweep command passes it)")
    return problems


def study_url(output_dir: str | Path) -> str:
    root = Path(output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / STUDY_FILE}"


def redact(url: str) -> str:
    """A storage URL fit for a log or the ledger: the password left out."""
    head, sep, tail = url.partition("://")
    if sep and "@" in tail:
        creds, _, host = tail.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{head}://{user}:***@{host}"
    return url


# ------------------------------------------------------------------------------------------------ the study
def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


def open_storage(url: str):
    _quiet_optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            storage = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                     inherit_intermediate_values=True))
            break
        except Exception as e:  # a wrong URL, a missing driver, a server that does not answer
            if attempt + 1 < SCHEMA_ATTEMPTS and _lost_schema_race(e):
                time.sleep(0.5 + random.random())
                continue
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise LmlabError(f"--study-storage: cannot open {redact(url)} ({first}); check the URL, the server and "
                             "the driver (PostgreSQL: pip install 'psycopg[binary]')") from None
    if storage.engine.name == "sqlite":
        _serialize_sqlite(storage.engine)
    return storage


SCHEMA_ATTEMPTS = 4


def _lost_schema_race(error: Exception) -> bool:
    """Two machines opening a new study database at once both create Optuna's tables; on PostgreSQL the loser's
    CREATE TABLE fails ('duplicate key value violates unique constraint "pg_type_typname_nsp_index"', or
    'already exists'). Opened again, it finds the tables there."""
    from sqlalchemy import exc

    text = str(error).lower()
    if isinstance(error, (exc.IntegrityError, exc.ProgrammingError)):
        return "duplicate key" in text or "already exists" in text or "unique constraint" in text
    return isinstance(error, exc.OperationalError) and "already exists" in text  # SQLite, MySQL


def _serialize_sqlite(engine: Any) -> None:
    """Make Optuna's read-then-write transactions atomic on SQLite, as they are on PostgreSQL / MySQL.

    Optuna claims a WAITING trial by reading it `FOR UPDATE` and writing RUNNING. SQLite has no row locks, and Python's
    sqlite3 module opens a transaction only at the first write, so two workers both read WAITING and both "win" the
    same trial (28 double claims in 200 with 4 processes, before this). SQLAlchemy's documented remedy for pysqlite:
    let the driver open no transaction itself and begin each one with BEGIN IMMEDIATE, which takes SQLite's write
    lock before the read; the other worker waits (the busy timeout) and then reads RUNNING."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections pooled while Optuna set the schema up predate the hooks


def make_sampler(plan: SweepPlan, worker: int = 0):
    optuna = _quiet_optuna()
    sweep = plan.sweep
    # one worker alone draws reproducibly from the sweep's seed; several workers, here or on other machines sharing
    # the study, must not draw the same points: each mixes in who it is
    shared = worker > 0 or plan.workers > 1 or plan.shared_storage
    seed = plan.seed + (1 + zlib.crc32(worker_tag().encode()) % 1_000_000 if shared else 0)
    if plan.sampler == "grid":
        # every grid point is enqueued with its params fixed (see _enqueue), so no sampler draws anything. Optuna's
        # GridSampler is not used: its after_trial reads a 'grid_id' only trials it numbered itself have, and raises
        # KeyError on enqueued ones as soon as one grid point is left unvisited (a one-point grid, at once)
        return optuna.samplers.RandomSampler(seed=plan.seed)
    if plan.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, sweep.startup_trials))


def make_pruner(plan: SweepPlan):
    optuna = _quiet_optuna()
    sweep = plan.sweep
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.startup_trials,
                                           n_warmup_steps=sweep.warmup_evals * plan.eval_every)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=plan.eval_every)
    return optuna.pruners.NopPruner()


def open_study(plan: SweepPlan, storage: Any, worker: int = 0, wait_s: float = 120.0):
    """Create the study (and enqueue its slots) or load it; only the process that created it enqueues."""
    optuna = _quiet_optuna()
    kwargs = {"storage": storage, "study_name": plan.name, "sampler": make_sampler(plan, worker),
              "pruner": make_pruner(plan)}
    try:
        study = optuna.create_study(direction=plan.config["direction"], load_if_exists=False, **kwargs)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
        created = False
    if created:
        study.set_user_attr("lmlab.space", plan.values_key())
        _enqueue(study, plan, 0)
        study.set_user_attr("lmlab.trials", plan.n_trials)
        study.set_user_attr("lmlab.ready", True)
        return study
    deadline = time.monotonic() + wait_s
    while not study.user_attrs.get("lmlab.ready"):  # another process is enqueueing right now
        if time.monotonic() > deadline:
            raise LmlabError(f"sweep {plan.name}: its study in {redact(plan.storage_url)} was never finished setting "
                             "up (its creator died?); start a new sweep with --name")
        time.sleep(0.5)
    attrs = study.user_attrs
    if attrs.get("lmlab.space") != plan.values_key():
        before = json.loads(attrs.get("lmlab.space") or "{}")
        raise LmlabError(f"sweep {plan.name}: exists with another space or sampler ({_space_summary(before)}); run it "
                         "with the same space to continue it, or give --name to start a new sweep")
    have = int(attrs.get("lmlab.trials", 0))
    if plan.n_trials > have and plan.sampler != "grid":  # more trials asked for: more slots
        _enqueue(study, plan, have)
        study.set_user_attr("lmlab.trials", plan.n_trials)
    return study


def _space_summary(key: dict) -> str:
    params = key.get("params", {})
    return f"{key.get('sampler')} over {', '.join(params) or 'nothing'}, {key.get('metric')} {key.get('direction')}"


def _enqueue(study: Any, plan: SweepPlan, start: int) -> None:
    points = plan.sweep.grid()[:plan.n_trials] if plan.sampler == "grid" else [{}] * plan.n_trials
    for slot in range(start, plan.n_trials):
        study.enqueue_trial(points[slot], user_attrs={"lmlab.slot": slot}, skip_if_exists=False)


def study_counts(study: Any) -> dict[str, int]:
    """Trials by state; an attempt that was handed back (interrupted, or its scoring failed) and retried by a later
    Optuna trial counts once, as that trial."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in (t.system_attrs.get("retry_history") or [])}
    counts: dict[str, int] = {}
    for t in trials:
        if t.number in retried and t.state.is_finished():
            continue
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------ workers
def worker_tag() -> str:
    """host/pid/start: who runs a trial; `start` tells a reused pid from the original."""
    return f"{socket.gethostname()}/{os.getpid()}/{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def dead_here(tag: str) -> bool:
    """True when `tag`'s worker ran on this machine and is gone; other machines' workers are judged by heartbeat."""
    host, _, rest = tag.partition("/")
    pid, _, start = rest.partition("/")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return start not in ("?", _start_time(int(pid)))


def recover(study: Any, storage: Any) -> int:
    """Fail the RUNNING trials whose worker is gone and enqueue each again (once: only one process wins the
    RUNNING → FAIL transition). Returns how many this call recovered."""
    optuna = _quiet_optuna()
    from optuna.storages import fail_stale_trials

    before = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    fail_stale_trials(study)  # other machines: no heartbeat for GRACE_S
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = t.user_attrs.get("lmlab.worker")
        if owner and dead_here(owner):
            _release(study, storage, storage.get_trial_id_from_study_id_trial_number(study_id, t.number))
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))) - before


def claim(study: Any, storage: Any):
    """Take one WAITING trial (Optuna's atomic WAITING → RUNNING), as study.ask() does, but never create a trial
    beyond the enqueued slots. None when no trial waits."""
    optuna = _quiet_optuna()
    study_id = storage.get_study_id_from_name(study.study_name)
    waiting = storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    # interrupted trials first: their runs have checkpoints to resume, and their slots were taken long ago
    for t in sorted(waiting, key=lambda t: ("failed_trial" not in t.system_attrs, t.number)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            if storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.RUNNING):
                return optuna.Trial(study, trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


class Heartbeat:
    """Records the trial's heartbeat every HEARTBEAT_S seconds in a thread (what Study.optimize does for its trials)."""

    def __init__(self, storage: Any, trial_id: int):
        self.storage, self.trial_id, self.stop = storage, trial_id, threading.Event()
        storage.record_heartbeat(trial_id)
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a busy database skips a beat; the grace period covers several
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def work(plan: SweepPlan, worker: int = 0) -> int:
    """One worker: take trials until none waits and none runs elsewhere; returns how many it ran."""
    if plan.threads:
        import torch

        torch.set_num_threads(plan.threads)
    storage = open_storage(plan.storage_url)
    study = open_study(plan, storage, worker)
    done = 0
    while True:
        if study.user_attrs.get(STOP_ATTR):  # a worker could not score its trial: the sweep stops for a rerun
            return done
        recover(study, storage)
        trial = claim(study, storage)
        if trial is None:
            optuna = _quiet_optuna()
            if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,
                                                        optuna.trial.TrialState.WAITING)):
                time.sleep(POLL_S)  # others' trials still run: one may die and need taking over
                continue
            return done
        run_trial(plan, study, storage, trial)
        done += 1


# ------------------------------------------------------------------------------------------------ one trial
def suggest(trial: Any, sweep: SweepConfig) -> dict[str, Any]:
    """The trial's values: drawn by the sampler (or fixed by the enqueued grid point), then the derived ones."""
    values: dict[str, Any] = {}
    for key, spec in sweep.searched().items():
        if spec.choice is not None:
            values[key] = trial.suggest_categorical(key, spec.choice)
        elif spec.int_range is not None:
            values[key] = trial.suggest_int(key, *spec.int_range, step=int(spec.step or 1))
        elif spec.log_uniform is not None:
            values[key] = trial.suggest_float(key, *spec.log_uniform, log=True)
        else:
            values[key] = trial.suggest_float(key, *spec.uniform, step=spec.step)
    return values


def with_derived(values: dict[str, Any], sweep: SweepConfig, base: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for key, spec in sweep.params.items():
        if spec.expr is not None:
            out[key] = evaluate_expr(spec.expr, {**base, **values})
    return out


class Pruning:
    """train()'s on_eval hook: reports the metric to Optuna at each eval and says why when Optuna prunes."""

    def __init__(self, trial: Any, metric: str, minimize: bool, study: Any):
        self.trial, self.metric, self.minimize, self.study = trial, metric, minimize, study
        self.seen: dict[int, float] = {}

    def __call__(self, step: int, metrics: dict[str, float]) -> str | None:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return None
        self.seen[step] = value
        self.trial.report(value, step)
        if not self.trial.should_prune():
            return None
        return prune_reason(self.study, self.trial.number, self.metric, step, value, self.minimize)


def prune_reason(study: Any, number: int, metric: str, step: int, value: float, minimize: bool) -> str:
    """'pruned at step 40: val/loss 2.31 above the median 2.05 of 6 trials' (the median pruner's own test)."""
    optuna = _quiet_optuna()
    others = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=(
        optuna.trial.TrialState.COMPLETE,)) if step in t.intermediate_values and t.number != number]
    pruner = type(study.pruner).__name__
    if pruner == "MedianPruner" and others:
        import statistics

        side = "above" if minimize else "below"
        return (f"pruned at step {step}: {metric} {value:.4g} {side} the median {statistics.median(others):.4g} "
                f"of {len(others)} trials")
    return f"pruned at step {step} by {pruner}: {metric} {value:.4g} not among the best at this step"


def find_children(uri: str, experiment: str, sweep: str, trial: int | None = None) -> list:
    """The sweep's child runs in the ledger (newest first); of one trial when `trial` is given."""
    flt = f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_ROLE}` = 'trial'"
    if trial is not None:
        flt += f" and tags.`{TAG_TRIAL}` = '{trial}'"
    return [r for r in search_runs(uri, experiment, filter_string=flt) if TAG_SUPERSEDED not in r.data.tags]


def run_trial(plan: SweepPlan, study: Any, storage: Any, trial: Any) -> str:
    """Run one claimed trial as an lmlab run (or resume the run an interrupted attempt left) and tell Optuna how
    it ended. Returns the Optuna state it ended in; raises KeyboardInterrupt after releasing it if interrupted."""
    optuna = _quiet_optuna()
    sweep = plan.sweep
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    frozen = storage.get_trial(trial_id)
    history = frozen.system_attrs.get("retry_history") or []
    number = history[0] if history else trial.number  # a resumed trial keeps its first attempt's number
    trial.set_user_attr("lmlab.worker", worker_tag())
    trial.set_user_attr("lmlab.trial", number)
    beat = Heartbeat(storage, trial_id)
    base_overrides = dict(_normalize_overrides(plan.sets))
    base = flatten(load_recipe(plan.recipe_path, plan.sets).resolved())
    minimize = plan.config["direction"] == "minimize"
    pruning = Pruning(trial, plan.config["metric"], minimize, study)
    try:
        values = with_derived(suggest(trial, sweep), sweep, base)
        trial.set_user_attr("lmlab.values", json.dumps(values))
        tags = {PARENT_TAG: plan.parent_run_id or "", TAG_SWEEP: plan.name, TAG_ROLE: "trial",
                TAG_TRIAL: str(number), TAG_PARAMS: json.dumps(values)}
        if not plan.parent_run_id:
            tags.pop(PARENT_TAG)
        previous = find_children(plan.ledger_uri, plan.experiment, plan.name, number) if history else []
        result = None
        if previous and previous[0].info.status == "FINISHED":  # it ended; only the telling was lost
            run_id = previous[0].info.run_id
            metrics = dict(previous[0].data.metrics)
        else:
            if previous and list_checkpoints(run_dir(plan.output_dir, previous[0].info.run_id)):
                recipe, folder = resume_recipe(previous[0].info.run_id, output_dir=plan.output_dir)
                result = train(recipe, resume=folder, on_eval=pruning, tags=tags, quiet=plan.quiet)
            else:
                for stale in previous:  # interrupted before its first checkpoint: nothing to resume from
                    _supersede(plan.ledger_uri, stale.info.run_id)
                recipe = load_recipe(plan.recipe_path, {**base_overrides, **values,
                                                        "run.name": f"{plan.name}-{number}"})
                result = train(recipe, on_eval=pruning, tags=tags, quiet=plan.quiet)
            run_id, metrics = result.run_id, result.metrics
        trial.set_user_attr("lmlab.run_id", run_id)
        if result is not None and result.status == "PAUSED":  # Ctrl-C / SIGTERM: hand the trial back, stop
            _release(study, storage, trial_id)
            raise KeyboardInterrupt
        if plan.score is not None and (result is None or result.status == "FINISHED") \
                and plan.config["metric"] not in metrics:
            try:
                metrics = {**metrics, **plan.score(run_id, plan.output_dir)}
            except ServiceUnavailable as e:  # the judge endpoint failed: not the trial's settings; keep it for a rerun
                raise _ScoringFailed(f"trial {number} trained (run {run_id[:8]}) but scoring it failed: "
                                     f"{(str(e).splitlines() or [''])[0]}") from None
        if result is not None and result.status == "STOPPED":
            client(plan.ledger_uri).set_tag(run_id, TAG_PRUNED, "true")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            _update_parent(plan, study)
            _say(plan, f"trial {number} {_show(values)}: {client(plan.ledger_uri).get_run(run_id).data.tags.get(TAG_FAILURE)}")
            return "PRUNED"
        value = best_value(storage.get_trial(trial_id).intermediate_values, metrics, plan.config["metric"], minimize)
        if value is None:
            trial.set_user_attr("lmlab.reason", f"metric {plan.config['metric']} was never logged; logged: "
                                f"{', '.join(sorted(k for k in metrics if not k.startswith('final/'))) or 'nothing'}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return "FAIL"
        study.tell(trial, value)
        _update_parent(plan, study)
        _say(plan, f"trial {number} {_show(values)}: {plan.config['metric']} {value:.4f} (run {run_id[:8]})")
        return "COMPLETE"
    except _ScoringFailed as e:  # the trial waits for a rerun, which judges the finished run without training it
        _release(study, storage, trial_id)
        study.set_user_attr(STOP_ATTR, str(e))  # the other workers, here and elsewhere, take no new trial
        raise LmlabError(f"sweep {plan.name}: {e}; the trial waits: run the same command again to score it") from None
    except (TrainingFailed, LmlabError) as e:  # this trial's settings fail (NaN loss, a batch too big): others go on
        trial.set_user_attr("lmlab.reason", str(e).splitlines()[0][:500] if str(e) else type(e).__name__)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        _say(plan, f"trial {number} FAILED: {trial.user_attrs.get('lmlab.reason')}")
        return "FAIL"
    except KeyboardInterrupt:  # hand the trial back at once: a rerun resumes it
        _release(study, storage, trial_id)
        raise
    finally:
        beat.close()


class _ScoringFailed(Exception):
    """A trained trial could not be scored (the judge endpoint failed)."""


def _show(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _say(plan: SweepPlan, line: str) -> None:
    if plan.progress:
        from lmlab.console import console

        console.print(f"  {line}", soft_wrap=True)


def best_value(intermediate: dict[int, float], metrics: dict[str, float], metric: str, minimize: bool) -> float | None:
    """The trial's result: the best of the metric over its evals (those of earlier attempts included), else the
    value the run ended with (a test/ metric, say)."""
    values = [v for v in intermediate.values() if math.isfinite(v)]
    if not values:
        for key in (f"final/best/{metric}", f"final/{metric}", metric):
            if key in metrics and math.isfinite(metrics[key]):
                values.append(metrics[key])
                break
    if not values:
        return None
    return min(values) if minimize else max(values)


def _release(study: Any, storage: Any, trial_id: int) -> bool:
    """Hand a RUNNING trial back: fail it (only one process wins the RUNNING → FAIL transition) and enqueue it again
    with its params and reports (Optuna's RetryHeartbeatStaleTrialCallback). True when this call did."""
    optuna = _quiet_optuna()
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    try:
        won = storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    if won:
        RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, storage.get_trial(trial_id))
    return won


def _supersede(uri: str, run_id: str) -> None:
    c = client(uri)
    c.set_tag(run_id, TAG_SUPERSEDED, "true")
    c.set_tag(run_id, TAG_FAILURE, "interrupted before its first checkpoint; the trial started again as a new run")
    if c.get_run(run_id).info.status == "RUNNING":
        c.set_terminated(run_id, "KILLED")


# ------------------------------------------------------------------------------------------------ the parent run
def _ledger_key(uri: str) -> str:
    where = f"{socket.gethostname()}:{uri}" if uri.startswith("sqlite") or "://" not in uri else uri
    return "lmlab.parent." + hashlib.sha256(where.encode()).hexdigest()[:12]


def open_parent(plan: SweepPlan, study: Any) -> str:
    """The sweep's parent run in this ledger (created once, then reused by reruns): its space, sampler, pruner,
    metric and study; RUNNING while trials run."""
    key = _ledger_key(plan.ledger_uri)
    run_id = study.user_attrs.get(key)
    if run_id is not None:
        try:
            return MlflowLedger(plan.ledger_uri, plan.experiment, plan.name, run_id=run_id).run_id
        except LmlabError:
            pass  # the ledger was deleted: a new parent
    sweep = plan.sweep
    tags = {TAG_SWEEP: plan.name, TAG_ROLE: "parent", "lmlab.sweep.sampler": plan.sampler,
            "lmlab.sweep.pruner": sweep.pruner, TAG_METRIC: sweep.metric,
            TAG_DIRECTION: sweep.direction, "lmlab.sweep.storage": redact(plan.storage_url),
            "lmlab.sweep.recipe": plan.recipe_path, "lmlab.sweep.study": plan.name}
    ledger = MlflowLedger(plan.ledger_uri, plan.experiment, plan.name,
                          artifact_root=Path(plan.output_dir) / ARTIFACTS, tags=tags)
    ledger.log_params({**{f"space.{k}": p.describe() for k, p in sweep.params.items()},
                       "sweep.trials": plan.n_trials, "sweep.sampler": plan.sampler, "sweep.pruner": sweep.pruner,
                       "sweep.metric": sweep.metric, "sweep.direction": sweep.direction, "sweep.seed": plan.seed,
                       "sweep.set": " ".join(plan.sets)})
    ledger.log_dict(plan.config, "sweep.json")
    study.set_user_attr(key, ledger.run_id)
    return ledger.run_id


def _update_parent(plan: SweepPlan, study: Any) -> None:
    """The parent's best trial so far: metric best/<metric>, tags naming the trial, its run and params."""
    if not plan.parent_run_id:
        return
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return
    c = client(plan.ledger_uri)
    from mlflow.entities import Metric, RunTag

    n_done = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())
    c.log_batch(plan.parent_run_id, metrics=[Metric(f"best/{plan.config['metric']}", best.value,
                                                    int(time.time() * 1000), n_done)],
                tags=[RunTag("lmlab.sweep.best_trial", str(best.user_attrs.get("lmlab.trial", best.number))),
                      RunTag("lmlab.sweep.best_run", str(best.user_attrs.get("lmlab.run_id", ""))),
                      RunTag("lmlab.sweep.best_params", best.user_attrs.get("lmlab.values", "{}"))])


# ------------------------------------------------------------------------------------------------ the sweep
def _worker_main(plan: SweepPlan, worker: int, errors: Any = None) -> None:
    """A worker process: stops (releasing its trial) when the sweep process that started it goes away; what made it
    fail goes to `errors` (one line) for the sweep process to report, the traceback to stderr."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGINT)
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        work(plan, worker)
    except KeyboardInterrupt:
        os._exit(130)
    except BaseException as e:
        if errors is not None and not isinstance(e, SystemExit):
            text = str(e) if isinstance(e, LmlabError) else f"{type(e).__name__}: {e}"
            errors.put(f"worker {worker}: {(text.strip().splitlines() or [''])[0][:400]}")
        raise


def run_sweep(plan: SweepPlan, workers: int = 1) -> SweepOutcome:
    """Open (or continue) the study and its parent run, run the trials with `workers` processes, end the parent
    FINISHED when every trial has finished (KILLED if interrupted: the same command continues it)."""
    storage = open_storage(plan.storage_url)
    study = open_study(plan, storage)
    plan.parent_run_id = open_parent(plan, study)
    if study.user_attrs.get(STOP_ATTR):
        study.set_user_attr(STOP_ATTR, "")  # this is the rerun the stop asked for
    interrupted, error = False, None
    try:
        if workers <= 1:
            work(plan)
        else:
            ctx = multiprocessing.get_context("spawn")
            errors = ctx.SimpleQueue()
            procs = [ctx.Process(target=_worker_main, args=(plan, i, errors), daemon=False) for i in range(workers)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            interrupted = any(p.exitcode == 130 for p in procs)
            failed = [p.exitcode for p in procs if p.exitcode not in (0, 130)]
            if failed:
                why = errors.get() if not errors.empty() else f"exit {failed[0]}"
                raise LmlabError(f"sweep {plan.name}: {len(failed)} worker process(es) failed ({why}); "
                                 "run the same command again to continue")
    except KeyboardInterrupt:
        interrupted = True
    except Exception as e:  # a worker failed, a trial could not be scored, the study database gave up: the parent
        interrupted, error = True, e  # ends KILLED with the reason, never RUNNING
    counts = study_counts(study)
    done = not interrupted and not counts.get("WAITING") and not counts.get("RUNNING")
    c = client(plan.ledger_uri)
    c.set_tag(plan.parent_run_id, "lmlab.sweep.trials_done", str(sum(counts.get(s, 0) for s in
                                                                  ("COMPLETE", "PRUNED"))))
    if done:
        c.set_terminated(plan.parent_run_id, "FINISHED")
    else:
        c.set_tag(plan.parent_run_id, TAG_FAILURE, (str(error) or type(error).__name__)[:500] if error is not None
                  else "interrupted; run the same lmlab sweep command again to continue")
        c.set_terminated(plan.parent_run_id, "KILLED")
    if error is not None:
        raise error
    best = None
    try:
        b = study.best_trial
        best = {"number": b.user_attrs.get("lmlab.trial", b.number), "value": b.value,
                "params": json.loads(b.user_attrs.get("lmlab.values", "{}")), "run_id": b.user_attrs.get("lmlab.run_id")}
    except ValueError:
        pass
    if interrupted:
        raise KeyboardInterrupt
    return SweepOutcome(plan.name, plan.parent_run_id, done, counts, best)

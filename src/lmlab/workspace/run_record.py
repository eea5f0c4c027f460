"""A run's ledger record as a file that travels with its checkpoints: params, tags, every metric's full history,
status and times (`export_record`), and its import into another machine's ledger under the same run id
(`import_record`), so `lmlab runs`, compare and report there see the run as if it had trained there.

Why a per-run export and not a copy of the sqlite file (sqlite's backup API): the workspace ledger holds every run
of the workspace and would overwrite the ledger of the machine it is restored on; a per-run record merges into any
ledger, grows with the run rather than the workspace, and is read the same from a tracking server."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.workspace import layout
from lmlab.workspace.ledger import client, experiment_id, ledger_lock, redact

VERSION = 1
_BATCH = 900  # MLflow takes at most 1000 metrics per log_batch


def export_record(uri: str, run_id: str, c: Any = None) -> dict[str, Any]:
    """The run's ledger record as JSON-ready data."""
    c = c or client(uri)
    run = c.get_run(run_id)
    metrics = {key: [[m.step, m.timestamp, m.value] for m in c.get_metric_history(run_id, key)]
               for key in sorted(run.data.metrics)}
    return {"version": VERSION, "run_id": run_id, "run_name": run.info.run_name,
            "experiment": c.get_experiment(run.info.experiment_id).name, "status": run.info.status,
            "start_time": run.info.start_time, "end_time": run.info.end_time, "user_id": run.info.user_id or "",
            "params": dict(run.data.params), "tags": dict(run.data.tags), "metrics": metrics,
            "exported_at": int(time.time() * 1000)}


def export_artifacts(uri: str, run_id: str, dest: Path, c: Any = None) -> Path:
    """The run's ledger artifacts (recipe.yaml, environment.json, data reports, alerts.json, ...) copied to `dest`."""
    c = c or client(uri)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if c.list_artifacts(run_id):
        c.download_artifacts(run_id, "", str(dest))
    return dest


@dataclass
class Imported:
    run_id: str
    created: bool  # the run was not in this ledger before
    metric_points: int  # metric values added


def import_record(uri: str, record: dict[str, Any], *, run_dir: Path, artifact_root: Path | None,
                  artifacts: Path | None = None) -> Imported:
    """Put `record` into the ledger at `uri` under its own run id: created when the ledger lacks the run (its
    artifacts copied too), else completed with the params, tags and metric points it lacks. Paths recorded on the
    machine it came from (the run folder, its best / last checkpoint) are rewritten to `run_dir` here."""
    if record.get("version") != VERSION or not record.get("run_id"):
        raise LmlabError(f"storage: the ledger record of run {record.get('run_id', '?')} is not one lmlab "
                         f"{VERSION} reads; upgrade lmlab")
    from mlflow.entities import Metric, Param, RunTag

    c = client(uri)
    run_id = record["run_id"]
    tags = _rewrite_paths(record.get("tags", {}), Path(run_dir))
    existing = _get(c, run_id)
    created = existing is None
    if created:
        if not uri.startswith("sqlite:///"):
            raise LmlabError(f"storage: run {run_id[:8]} is not in the tracking server {redact(uri)} and its "
                             "record can only be imported into a workspace's sqlite ledger; unset "
                             "LMLAB_TRACKING_URI / ledger.uri, or resume it where that server holds it")
        with ledger_lock(uri):
            exp = experiment_id(c, record.get("experiment") or "lmlab", artifact_root)
            _insert_run(c, exp, record)
        have_params, have_tags, have_points = set(), {}, set()
    else:
        have_params = set(existing.data.params)
        have_tags = dict(existing.data.tags)
        have_points = {(key, m.step) for key in existing.data.metrics for m in c.get_metric_history(run_id, key)}
    params = [Param(k, v) for k, v in record.get("params", {}).items() if k not in have_params]
    new_tags = [RunTag(k, v) for k, v in tags.items() if k not in have_tags]
    points = [Metric(key, float(value), int(ts), int(step)) for key, history in record.get("metrics", {}).items()
              for step, ts, value in history if (key, step) not in have_points]
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(new_tags), 100):
        c.log_batch(run_id, tags=new_tags[i:i + 100])
    for i in range(0, len(points), _BATCH):
        c.log_batch(run_id, metrics=points[i:i + _BATCH])
    if created:
        if artifacts is not None and Path(artifacts).is_dir() and any(Path(artifacts).iterdir()):
            c.log_artifacts(run_id, str(artifacts))
        status = record.get("status") or "RUNNING"
        if status != "RUNNING":
            c.set_terminated(run_id, status, end_time=record.get("end_time"))
    return Imported(run_id, created, len(points))


def _get(c: Any, run_id: str):
    try:
        return c.get_run(run_id)
    except Exception:
        return None


def _insert_run(c: Any, exp_id: str, record: dict[str, Any]) -> None:
    """A run row with the record's own id. MLflow's API always draws a new id, and a resumed run must keep its id
    (its folders, storage paths and `--resume RUN` name it), so the row goes in through MLflow's own sqlite model,
    the way its store's create_run writes one."""
    from mlflow.entities import LifecycleStage, SourceType
    from mlflow.store.tracking.dbmodels.models import SqlRun

    store = c._tracking_client.store
    experiment = store.get_experiment(exp_id)
    run_id = record["run_id"]
    with store.ManagedSessionMaker(read_only=False) as session:
        session.add(SqlRun(
            run_uuid=run_id, name=record.get("run_name") or "run", experiment_id=int(exp_id),
            artifact_uri=f"{experiment.artifact_location.rstrip('/')}/{run_id}/artifacts",
            source_type=SourceType.to_string(SourceType.UNKNOWN), source_name="", entry_point_name="",
            user_id=record.get("user_id") or "", status="RUNNING", start_time=record.get("start_time"),
            end_time=None, deleted_time=None, source_version="", lifecycle_stage=LifecycleStage.ACTIVE))


def _rewrite_paths(tags: dict[str, str], run_dir: Path) -> dict[str, str]:
    """Tags holding paths of the run's folder on the machine it trained on, pointed at `run_dir` instead."""
    old = tags.get(layout.TAG_RUN_DIR)
    if not old:
        return dict(tags)
    out = {}
    for k, v in tags.items():
        if isinstance(v, str) and (v == old or v.startswith(old.rstrip("/") + "/")):
            v = str(run_dir) + v[len(old.rstrip("/")):] if v != old else str(run_dir)
        out[k] = v
    return out

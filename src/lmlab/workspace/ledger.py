"""The run ledger: MLflow (embedded sqlite by default, a tracking server when a team shares).

Only rank 0 writes; other ranks get a NullLedger with the same methods.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.recipe.loading import flatten
from lmlab.recipe.schema import Recipe
from lmlab.workspace import layout

_MAX_PARAM = 6000  # MLflow's param value limit is 6000 characters


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def client(uri: str):
    """An MLflow client for `uri`. A tracking server is asked first whether it answers (one clear error within
    ~10 s, not MLflow's minutes of retries); a sqlite ledger is created or upgraded under a file lock, so runs
    started together in a fresh workspace do not race MLflow's schema migration."""
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        check_server(uri)
    with ledger_lock(uri):
        c = MlflowClient(tracking_uri=uri)
        c._tracking_client.store  # noqa: B018  (creates / migrates the sqlite schema now, inside the lock)
    return c


@contextmanager
def ledger_lock(uri: str):
    """An exclusive lock beside a sqlite ledger (no-op for servers): creating tables, experiments and runs."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_server(uri: str, timeout: float = 5.0, tries: int = 2) -> None:
    """Raise one clear LmlabError when the tracking server at `uri` does not answer its health check."""
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    shown = redact(uri)
    request = urllib.request.Request(shown.rstrip("/") + "/health")
    parts = urllib.parse.urlsplit(uri)
    if parts.username:  # credentials in the URI go in a header, never in what is printed
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    problem = ""
    for _ in range(tries):
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                return
        except urllib.error.HTTPError:
            return  # it answered (an older server without /health, or behind auth): MLflow takes it from here
        except (urllib.error.URLError, OSError, ValueError) as e:
            problem = str(getattr(e, "reason", e))
    raise LmlabError(f"ledger: the tracking server {shown} does not answer ({problem}); start it, or point "
                     "LMLAB_TRACKING_URI / ledger.uri at one that runs (unset both to use the workspace's sqlite "
                     "ledger)")


def redact(uri: str) -> str:
    """`uri` without credentials (user:password@host → host), for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urlunsplit(parts)


def experiment_id(c, name: str, artifact_root: Path | None) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # a local sqlite ledger keeps artifacts next to it, not in ./mlruns of whatever the cwd was
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    return c.create_experiment(name, artifact_location=location)


class MlflowLedger:
    def __init__(self, uri: str, experiment: str, run_name: str, *, run_id: str | None = None,
                 artifact_root: Path | None = None, tags: dict[str, str] | None = None):
        self.uri = uri
        self.client = client(uri)
        self._logged: set[tuple[str, int]] = set()  # (metric, step) already in the ledger (a resumed run)
        try:
            if run_id is not None:
                run = self.client.get_run(run_id)
                self.run_id = run.info.run_id
                self.client.update_run(run_id, status="RUNNING")
                # steps logged after the checkpoint a resume starts from (a kill -9 between a log and the next
                # save) are computed again: log each (metric, step) once
                self._logged = {(key, m.step) for key in run.data.metrics
                                for m in self.client.get_metric_history(self.run_id, key)}
            else:
                with ledger_lock(uri):
                    exp = experiment_id(self.client, experiment, artifact_root)
                    self.run_id = self.client.create_run(exp, run_name=run_name, tags=tags or {}).info.run_id
        except Exception as e:
            if "RESOURCE_DOES_NOT_EXIST" in str(e) or "not found" in str(e).lower():
                raise LmlabError(f"ledger: no run '{run_id}' in {uri}; see `lmlab runs`") from None
            raise

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in params.items()]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are write-once (resume re-logs them)
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if (k, step) not in self._logged]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def delete_tag(self, key: str) -> None:
        if key in self.client.get_run(self.run_id).data.tags:
            self.client.delete_tag(self.run_id, key)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        if reason:
            self.set_tags({"lmlab.failure_reason": reason})
        self.client.set_terminated(self.run_id, status)


class NullLedger:
    """Records nothing (ledger disabled, or not rank 0); same methods as MlflowLedger."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_params(self, params): ...
    def log_metrics(self, metrics, step): ...
    def set_tags(self, tags): ...
    def delete_tag(self, key): ...
    def log_text(self, text, artifact_file): ...
    def log_dict(self, data, artifact_file): ...
    def log_artifact(self, path, artifact_path=None): ...
    def finish(self, status="FINISHED", reason=None): ...


# model.* fields that only shape a model built from scratch. A run on a loaded model (model.pretrained, or
# model.init_from: another run's checkpoint) records the loaded model's own values under these keys instead of the
# schema's from-scratch defaults, and nothing for those its config does not have.
SCRATCH_SHAPE = ("model.arch", "model.n_layer", "model.n_head", "model.n_kv_head", "model.d_model", "model.d_ff",
                 "model.context_length", "model.dropout", "model.tie_embeddings", "model.rope_theta")


def recipe_params(recipe: Recipe, loaded_model: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved recipe as flat params; `loaded_model` (models.build.loaded_model_params) replaces the
    from-scratch shape fields for a run whose model was loaded rather than built."""
    params = flatten(recipe.resolved())
    if loaded_model is not None:
        for key in SCRATCH_SHAPE:
            params.pop(key, None)
        params.update(loaded_model)
    return params


def uses_loaded_model(params: dict[str, Any]) -> bool:
    """Whether a run's recorded params describe a pretrained / init_from model (its model.* are the model's)."""
    return any(str(params.get(k)) not in ("None", "") for k in ("model.pretrained", "model.init_from")
               if k in params)


def tracking_uri(recipe: Recipe) -> str:
    """The ledger a recipe's run is recorded in."""
    return layout.ledger_uri(recipe.run.output_dir, recipe.ledger.uri)


def find_run(uri: str, run_id: str):
    """The MLflow run for an id (a unique prefix is enough), or a clear error."""
    c = client(uri)
    try:
        return c.get_run(run_id)
    except Exception:
        pass
    matches = [r for r in search_runs(uri) if r.info.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise LmlabError(f"no run '{run_id}' in the ledger {uri}; list runs with `lmlab runs`")
    raise LmlabError(f"run id prefix '{run_id}' is ambiguous ({len(matches)} runs); give more characters")


def search_runs(uri: str, experiment: str | None = None, filter_string: str = "") -> list:
    c = client(uri)
    exps = c.search_experiments()
    if experiment:
        exps = [e for e in exps if e.name == experiment]
    if not exps:
        return []
    return list(c.search_runs([e.experiment_id for e in exps], filter_string=filter_string,
                              order_by=["attributes.start_time DESC"], max_results=5000))

"""The on-disk and ledger layout of a workspace, as constants and small functions: everything that knows where a
run's files are.

    <workspace>/                     run.output_dir, `--output-dir` (default DEFAULT_WORKSPACE)
      mlflow.db                      the sqlite ledger (unless $LMLAB_TRACKING_URI / ledger.uri name a server)
      mlartifacts/                   the ledger's artifacts
      runs/<run id>/checkpoints/step-0000120/   checkpoint folders (lmlab.models.checkpoint writes them)
      feedback.jsonl                 ratings given in `lmlab playground` (lmlab.workspace.feedback)
    <storage>/runs/<run id>/...      the same run folder mirrored to object storage (lmlab.workspace.storage)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lmlab.recipe.defaults import DEFAULT_WORKSPACE

RUNS = "runs"
LEDGER_FILE = "mlflow.db"
ARTIFACTS = "mlartifacts"
TRACKING_ENV = "LMLAB_TRACKING_URI"
FEEDBACK_FILE = "feedback.jsonl"

# ledger tags lmlab writes and reads back
TAG_RUN_DIR = "lmlab.run_dir"
TAG_TASK = "lmlab.task"
TAG_BEST = "lmlab.best_checkpoint"
TAG_LAST = "lmlab.last_checkpoint"
TAG_PAUSED = "lmlab.paused_at_step"
TAG_FAILURE = "lmlab.failure_reason"
TAG_PARENT_RUN = "lmlab.parent_run"
TAG_PARENT_CHECKPOINT = "lmlab.parent_checkpoint"
TAG_STORAGE_BEHIND = "storage.behind"  # set while the run's storage lacks its newest checkpoint (uploads failing)

# a run in object storage (run.storage) mirrors its workspace folder:
#   <storage>/runs/<run id>/checkpoints/step-0000120/...   the files first, manifest.json last
#   <storage>/runs/<run id>/ledger/run.json                 the run's ledger record (lmlab.workspace.run_record)
#   <storage>/runs/<run id>/ledger/artifacts/...            its ledger artifacts
RECORD = "ledger"
RECORD_FILE = "run.json"
UPLOADING = ".uploading"  # <run dir>/.uploading/step-N: hard-linked snapshots of checkpoints being uploaded


def tracking_env_set() -> bool:  # noqa: N802 - reads like the constant it checks
    return bool(os.environ.get(TRACKING_ENV))


def safe_name(name: str) -> str:
    """A run or recipe name as one file-name component: path separators, '..' and control characters replaced, so
    `run.name: ../../escape` cannot write outside the folder it is put in."""
    cleaned = re.sub(r"[^\w.+-]+", "_", name).strip("._")
    return cleaned[:120] or "run"


def run_dir(output_dir: str | Path, run_id: str) -> Path:
    """Where a run's files live in a workspace (absolute, so ledger paths work from anywhere)."""
    return (Path(output_dir) / RUNS / run_id).resolve()


def ledger_uri(output_dir: str | Path | None = None, uri: str | None = None, *, create: bool = True) -> str:
    """The ledger a command uses: `uri` if given (ledger.uri, --uri), else $LMLAB_TRACKING_URI, else the
    workspace's sqlite file (its folder is created unless `create` is False: commands that only read)."""
    if uri:
        return uri
    if os.environ.get(TRACKING_ENV):
        return os.environ[TRACKING_ENV]
    return sqlite_uri(output_dir if output_dir is not None else DEFAULT_WORKSPACE, create=create)


def sqlite_uri(output_dir: str | Path, *, create: bool = True) -> str:
    root = Path(output_dir).resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / LEDGER_FILE}"


def ledger_exists(uri: str) -> bool:
    """False only for a local sqlite ledger whose file is not there (opening it would create it)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    return True


def workspace_of(checkpoint: Path) -> Path | None:
    """The workspace a run's checkpoint lives in (<workspace>/runs/<id>/checkpoints/step-N), else None."""
    parents = Path(checkpoint).resolve().parents
    if len(parents) > 3 and parents[0].name == CHECKPOINTS and parents[2].name == RUNS:
        return parents[3]
    return None


def ledger_near(checkpoint: Path) -> str | None:
    """The ledger of the workspace a checkpoint lives in ($LMLAB_TRACKING_URI wins), None when there is none."""
    if os.environ.get(TRACKING_ENV):
        return os.environ[TRACKING_ENV]
    workspace = workspace_of(checkpoint)
    if workspace is not None and (workspace / LEDGER_FILE).is_file():
        return f"sqlite:///{workspace / LEDGER_FILE}"
    return None


def is_checkpoint(path: Path) -> bool:
    return any((Path(path) / f).is_file() for f in ("meta.json", "adapter_config.json", "config.json"))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


CHECKPOINTS = "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def read_meta(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "meta.json").read_text())


def prune(run_dir: Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest `keep_last` checkpoints and `keep` (the best)."""
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[:-keep_last]:
        if keep is None or p.resolve() != Path(keep).resolve():
            shutil.rmtree(p, ignore_errors=True)

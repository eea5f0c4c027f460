"""Run queries: read runs back from the ledger (the rows behind `lmlab runs`, compare and diff)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from datetime import datetime, timezone

from lmlab.recipe.defaults import DEFAULT_WORKSPACE
from lmlab.workspace.layout import (
    TAG_BEST,
    TAG_LAST,
    TAG_PAUSED,
    TAG_RUN_DIR,
    TAG_STORAGE_BEHIND,
    ledger_exists,
    ledger_uri,
)
from lmlab.workspace.ledger import search_runs


@dataclass
class RunRow:
    run_id: str
    name: str
    status: str
    start_time: float  # seconds since epoch
    duration_s: float | None
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    in_workspace: bool = True  # False: listed from storage only (lmlab pull RUN brings it here)

    @property
    def storage(self) -> str | None:
        """Where the run stands with its storage: 'behind' (uploads failing), 'mirrored', 'storage only', or None
        (no storage)."""
        if not self.in_workspace:
            return "storage only"
        if self.tags.get(TAG_STORAGE_BEHIND):
            return "behind"
        return "mirrored" if self.params.get("run.storage") not in (None, "", "None") else None

    def record(self) -> dict:
        """The run as one JSON object (`lmlab runs --format json`): ids, status, times, params, metrics, paths."""
        return {"run_id": self.run_id, "name": self.name, "status": self.status,
                "start_time": datetime.fromtimestamp(self.start_time, timezone.utc).isoformat(timespec="seconds"),
                "duration_s": self.duration_s,
                "paths": {"run_dir": self.tags.get(TAG_RUN_DIR), "best_checkpoint": self.tags.get(TAG_BEST) or None,
                          "last_checkpoint": self.tags.get(TAG_LAST) or None},
                "params": dict(sorted(self.params.items())), "metrics": dict(sorted(self.metrics.items())),
                "tags": dict(sorted(self.tags.items()))}


def list_runs(*, uri: str | None = None, output_dir: str = DEFAULT_WORKSPACE, name: str | None = None,
              limit: int = 50, storage: str | None = None) -> list[RunRow]:
    """The workspace's runs, newest first; with `storage`, also the runs there that the workspace lacks (read from
    their ledger records; nothing is written here)."""
    uri = ledger_uri(output_dir, uri, create=False)
    rows = []
    # reading never creates a workspace: a folder without one has no runs
    for r in search_runs(uri) if ledger_exists(uri) else []:
        end = r.info.end_time
        rows.append(RunRow(r.info.run_id, r.info.run_name or "", _status(r.info.status, r.data.tags),
                           r.info.start_time / 1000, (end - r.info.start_time) / 1000 if end else None,
                           dict(r.data.params), dict(r.data.metrics), dict(r.data.tags)))
    if storage is not None:
        from lmlab.workspace.storage import records_of

        here = {r.run_id for r in rows}
        rows += [_row_of_record(rec) for rec in records_of(storage) if rec.get("run_id") not in here]
        rows.sort(key=lambda r: r.start_time, reverse=True)
    rows = [r for r in rows if not name or fnmatch.fnmatch(r.name, name)]
    return rows[:limit]


def _status(status: str, tags: dict[str, str]) -> str:
    return "PAUSED" if status == "KILLED" and TAG_PAUSED in tags else status


def _row_of_record(record: dict) -> RunRow:
    """A run's ledger record in storage (lmlab.workspace.run_record) as a row: each metric's latest value."""
    metrics = {key: max(history, key=lambda p: (p[0], p[1]))[2] for key, history in record.get("metrics", {}).items()
               if history}
    start, end = record.get("start_time") or 0, record.get("end_time")
    tags = dict(record.get("tags", {}))
    return RunRow(record["run_id"], record.get("run_name") or "", _status(record.get("status") or "RUNNING", tags),
                  start / 1000, (end - start) / 1000 if end else None, dict(record.get("params", {})), metrics, tags,
                  in_workspace=False)



"""Run queries: read runs back from the ledger (the rows behind `lmlab runs`, compare and diff)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from datetime import datetime, timezone

from lmlab.recipe.defaults import DEFAULT_WORKSPACE
from lmlab.workspace.layout import TAG_BEST, TAG_LAST, TAG_PAUSED, TAG_RUN_DIR, ledger_exists, ledger_uri
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
              limit: int = 50) -> list[RunRow]:
    uri = ledger_uri(output_dir, uri, create=False)
    if not ledger_exists(uri):  # reading never creates a workspace: a folder without one has no runs
        return []
    rows = []
    for r in search_runs(uri):
        run_name = r.info.run_name or ""
        if name and not fnmatch.fnmatch(run_name, name):
            continue
        status = r.info.status
        if status == "KILLED" and TAG_PAUSED in r.data.tags:
            status = "PAUSED"
        end = r.info.end_time
        rows.append(RunRow(r.info.run_id, run_name, status, r.info.start_time / 1000,
                           (end - r.info.start_time) / 1000 if end else None,
                           dict(r.data.params), dict(r.data.metrics), dict(r.data.tags)))
    return rows[:limit]



"""Run queries: read runs back from the ledger (the rows behind `lmlab runs`, compare and diff)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from lmlab.recipe.defaults import DEFAULT_WORKSPACE
from lmlab.workspace.layout import TAG_PAUSED, ledger_uri
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


def list_runs(*, uri: str | None = None, output_dir: str = DEFAULT_WORKSPACE, name: str | None = None,
              limit: int = 50) -> list[RunRow]:
    uri = ledger_uri(output_dir, uri)
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



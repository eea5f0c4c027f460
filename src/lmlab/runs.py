"""Read runs back from the ledger: the rows behind `lmlab runs` (and later compare/diff)."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from lmlab.ledger import default_uri, search_runs


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


def list_runs(*, uri: str | None = None, output_dir: str = "lmlab-runs", name: str | None = None,
              limit: int = 50) -> list[RunRow]:
    uri = uri or os.environ.get("LMLAB_TRACKING_URI") or default_uri(output_dir)
    rows = []
    for r in search_runs(uri):
        run_name = r.info.run_name or ""
        if name and not fnmatch.fnmatch(run_name, name):
            continue
        status = r.info.status
        if status == "KILLED" and "lmlab.paused_at_step" in r.data.tags:
            status = "PAUSED"
        end = r.info.end_time
        rows.append(RunRow(r.info.run_id, run_name, status, r.info.start_time / 1000,
                           (end - r.info.start_time) / 1000 if end else None,
                           dict(r.data.params), dict(r.data.metrics), dict(r.data.tags)))
    return rows[:limit]


def model_summary(p: dict[str, Any]) -> str:
    if p.get("model.pretrained") not in (None, "None"):
        return str(p["model.pretrained"]).rstrip("/").split("/")[-1]
    return f"{p.get('model.arch')} {p.get('model.n_layer')}L×{p.get('model.d_model')}"


def runs_table(rows: list[RunRow]) -> Table:
    table = Table(show_lines=False)
    for col in ("run", "name", "status", "task", "model", "optim", "lr", "batch", "steps", "best val loss",
                "val nats/char", "duration"):
        table.add_column(col, overflow="fold")
    for r in rows:
        p, m = r.params, r.metrics
        best = m.get("final/best/val/loss", m.get("final/val/loss"))
        per_char = m.get("final/val/loss_per_char")
        batch = p.get("derived.items_per_step") or p.get("train.batch_size", "")
        color = {"FINISHED": "green", "FAILED": "red", "RUNNING": "yellow", "PAUSED": "yellow"}.get(r.status, "")
        table.add_row(
            r.run_id[:8], r.name, f"[{color}]{r.status}[/]" if color else r.status, p.get("run.task", ""),
            model_summary(p), p.get("train.optimizer", ""), p.get("train.lr", ""), str(batch),
            p.get("derived.total_steps", ""), f"{best:.4f}" if best is not None else "",
            f"{per_char:.4f}" if per_char is not None else "",
            f"{r.duration_s:.0f}s" if r.duration_s is not None else "",
        )
    return table

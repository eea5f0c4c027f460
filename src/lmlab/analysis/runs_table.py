"""The table `lmlab runs` prints: one row per run."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from lmlab.workspace.runs import RunRow


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

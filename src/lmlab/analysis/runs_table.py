"""The listing `lmlab runs` prints: one row per run, in every output format (lmlab.console.Grid)."""

from __future__ import annotations

from typing import Any

from lmlab.console import Column, Grid, duration
from lmlab.workspace.runs import RunRow

STATUS_STYLE = {"FINISHED": "green", "FAILED": "red", "RUNNING": "yellow", "PAUSED": "yellow"}
# what the loss columns measure, under the terminal table and in `lmlab runs --help` / `lmlab compare --help`
LOSS_HELP = ("val loss: mean negative log-likelihood per validation token (nats/token; the figure to compare with "
             "other tools). val nats/char: lmlab's per-character loss, summed NLL over every validation token ÷ "
             "characters of the validation text, each document separator counted as one; it is not the Mainrun "
             "challenge's evaluate() (a fixed subset of windows, separators counted as several characters).")


def model_summary(p: dict[str, Any]) -> str:
    if p.get("model.pretrained") not in (None, "None"):
        return str(p["model.pretrained"]).rstrip("/").split("/")[-1]
    return f"{p.get('model.arch')} {p.get('model.n_layer')}L×{p.get('model.d_model')}"


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def runs_grid(rows: list[RunRow]) -> Grid:
    """run, name, status, task, model, optimizer, lr, batch, steps, best val loss, val nats/char, duration."""
    ps, ms = [r.params for r in rows], [r.metrics for r in rows]

    def col(key, header, values, kind="info", fmt=str, style=None):
        return Column(key, header, values, kind, fmt, style)

    # runs mirrored to storage (run.storage): whether storage holds them, is behind, or is all there is of them
    storage = [col("storage", "storage", [r.storage for r in rows],
                   style=lambda v: "red" if v == "behind" else "")] if any(r.storage for r in rows) else []
    return Grid([
        col("run_id", "run", [r.run_id for r in rows], fmt=lambda v: v[:8]),
        col("name", "name", [r.name for r in rows]),
        col("status", "status", [r.status for r in rows], style=lambda v: STATUS_STYLE.get(v, "")),
        col("run.task", "task", [p.get("run.task") for p in ps]),
        col("model", "model", [model_summary(p) if p else None for p in ps]),
        col("train.optimizer", "optim", [p.get("train.optimizer") for p in ps]),
        col("train.lr", "lr", [p.get("train.lr") for p in ps]),
        col("batch", "batch", [_int(p.get("derived.items_per_step") or p.get("train.batch_size")) for p in ps]),
        col("derived.total_steps", "steps", [_int(p.get("derived.total_steps")) for p in ps]),
        col("best/val/loss", "best val loss", [m.get("final/best/val/loss", m.get("final/val/loss")) for m in ms],
            "metric", lambda v: f"{v:.4f}"),
        col("val/loss_per_char", "val nats/char", [m.get("final/val/loss_per_char") for m in ms], "metric",
            lambda v: f"{v:.4f}"),
        col("duration_s", "duration", [_float(r.duration_s) for r in rows], "metric", duration),
        *storage,
    ], caption=LOSS_HELP)

"""`lmlab compare`: one row per run; the hyperparameters that differ across them, then the results.

Also the ledger reads that diff and report share: picking runs by id prefix or name glob, a run's
artifacts and metric histories.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, TypeAdapter

from lmlab.analysis.runs_table import LOSS_HELP, model_summary
from lmlab.console import Column, Grid, duration, human
from lmlab.errors import LmlabError
from lmlab.recipe.schema import DEFAULT_WORKSPACE, Recipe
from lmlab.workspace.layout import ledger_uri
from lmlab.workspace.ledger import SCRATCH_SHAPE, client, uses_loaded_model
from lmlab.workspace.runs import RunRow, list_runs

# Recipe fields that label, file or watch a run but cannot change what it learns: never a "difference".
# (alerts.early_stop_* can end a run early, so they stay. judge.* settings are logged with each judge result.)
BOOKKEEPING = ("run.name", "run.notes", "run.output_dir", "run.storage", "run.storage_options",
               "run.storage_options.", "ledger.", "checkpoint.", "train.log_every", "judge.",
               "generation.",  # how generate decodes the model later
               "alerts.spike_mad_k", "alerts.spike_window", "alerts.overfit_patience", "alerts.warmup_warn_fraction")
# Derived values worth a column when they differ (a LoRA rank changes the trainable count, a batch the steps).
DERIVED = ("derived.params_total", "derived.params_trainable", "derived.items_per_step", "derived.tokens_per_step",
           "derived.total_steps", "derived.warmup_steps")
# Short headers in the words of a hand-kept run table; other keys show as their dotted recipe path.
HEADERS = {
    "adapter.r": "rank", "adapter.alpha": "alpha", "train.lr": "lr", "train.min_lr": "min_lr",
    "train.warmup_steps": "warmup", "train.warmup_fraction": "warmup frac", "train.weight_decay": "weight decay",
    "train.batch_size": "micro-batch", "train.grad_accum": "accum", "train.max_steps": "max_steps",
    "run.seed": "seed", "derived.params_total": "params", "derived.params_trainable": "trainable",
    "derived.items_per_step": "batch", "derived.tokens_per_step": "tokens/step", "derived.total_steps": "steps",
    "derived.warmup_steps": "warmup steps", "model.pretrained": "model.pretrained",
}
# throughput metrics (machine speed, not a result: diff leaves them out). train/*: per logging window, training steps
# only; final/train/mean_*: the whole run's training steps; final/train/wall_*: the whole loop incl. eval and saving
THROUGHPUT = ("train/tokens_per_s", "train/loss_tokens_per_s", "train/mean_tokens_per_s",
              "train/mean_loss_tokens_per_s", "train/wall_tokens_per_s")
COMPARE_HELP = (LOSS_HELP + " tok/s: tokens the model processed per second (padding excluded), mean over the run's "
                "training steps (evaluation and checkpointing excluded); loss tok/s: the same for tokens that carry "
                "loss (fewer in SFT, where prompts are masked; runs recorded before lmlab logged both counted only "
                "these); wall tok/s: all tokens ÷ the loop's wall-clock time including evaluation and checkpoints.")


def resolve_uri(uri: str | None = None, output_dir: str = DEFAULT_WORKSPACE) -> str:
    """The ledger the reading commands (compare, diff, report) use; reading never creates a workspace."""
    return ledger_uri(output_dir, uri, create=False)


def select_runs(run_ids: list[str] | None = None, *, name: str | None = None, uri: str | None = None,
                output_dir: str = DEFAULT_WORKSPACE) -> list[RunRow]:
    """Runs by id (a unique prefix is enough; in the order given) or by name glob (oldest first)."""
    uri = resolve_uri(uri, output_dir)
    rows = list_runs(uri=uri, name=name if not run_ids else None, limit=100_000)
    if not run_ids:
        if not rows:
            what = f"named '{name}'" if name else "in the ledger"
            raise LmlabError(f"no runs {what} ({uri}); list them with `lmlab runs`")
        return sorted(rows, key=lambda r: r.start_time)
    picked = []
    for rid in run_ids:
        matches = [r for r in rows if r.run_id.startswith(rid)]
        if not matches:
            raise LmlabError(f"no run '{rid}' in the ledger {uri}; list runs with `lmlab runs`")
        if len(matches) > 1:
            raise LmlabError(f"run id prefix '{rid}' is ambiguous ({len(matches)} runs); give more characters")
        picked.append(matches[0])
    if name:
        from fnmatch import fnmatch

        picked = [r for r in picked if fnmatch(r.name, name)]
    return picked


# --------------------------------------------------------------------------------------- ledger reads
def read_artifact(uri: str, run_id: str, path: str) -> str | None:
    """Text of one run artifact, None if the run has no such file."""
    import tempfile

    c = client(uri)
    parent = os.path.dirname(path) or None
    try:
        names = {f.path for f in c.list_artifacts(run_id, parent)}
    except Exception:
        return None
    if path not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = c.download_artifacts(run_id, path, tmp)
        with open(local, encoding="utf-8") as f:
            return f.read()


def read_json_artifact(uri: str, run_id: str, path: str) -> Any:
    text = read_artifact(uri, run_id, path)
    return json.loads(text) if text is not None else None


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric, in step order."""
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


# --------------------------------------------------------------------------------------- recipe keys
def _section_model(annotation: Any) -> type[BaseModel] | None:
    for c in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def is_recipe_key(key: str) -> bool:
    """True for a flattened recipe field ('train.lr', 'data.columns.input'); False for counts, fingerprints,
    derived values ('data.train.examples', 'tokenizer.hash')."""
    model: type[BaseModel] = Recipe
    for part in key.split("."):
        field = model.model_fields.get(part)
        if field is None or field.exclude:
            return False
        sub = _section_model(field.annotation)
        if sub is None:
            return True  # a leaf; any remaining parts are keys of a dict-valued field
        model = sub
    return False


@functools.cache
def recipe_default(key: str) -> str | None:
    """The schema default of a recipe field as the ledger records it (str of its JSON form), None if it has none.

    A run recorded before a field existed ran with that field's behaviour as it was then, which is its default:
    comparing with the default keeps a newer field from showing up as a difference in every older run."""
    model: type[BaseModel] = Recipe
    parts = key.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None or field.exclude:
            return None
        sub = _section_model(field.annotation)
        if sub is None:
            if i != len(parts) - 1 or field.is_required():
                return None
            value = field.get_default(call_default_factory=True)
            return str(TypeAdapter(field.annotation).dump_python(value, mode="json"))
        model = sub
    return None


def param(row: RunRow, key: str) -> str | None:
    """A run's recorded param; for a recipe field it did not record, the field's default — except a from-scratch
    shape field of a run on a loaded model: its model has no such setting (None), the default would be wrong."""
    value = row.params.get(key)
    if value is not None or (key in SCRATCH_SHAPE and uses_loaded_model(row.params)):
        return value
    return recipe_default(key)


def is_bookkeeping(key: str) -> bool:
    return any(key == b or (b.endswith(".") and key.startswith(b)) for b in BOOKKEEPING)


def differing_params(rows: list[RunRow], keep: list[str] | None = None) -> list[str]:
    """Recipe fields and derived sizes whose values are not the same in every run (plus `keep`), schema order."""
    keys = dict.fromkeys(k for r in rows for k in r.params)
    out = []
    for k in keys:
        if not (is_recipe_key(k) or k in DERIVED) or is_bookkeeping(k):
            continue
        if len({param(r, k) for r in rows}) > 1:
            out.append(k)
    out.sort(key=lambda k: (k in DERIVED, DERIVED.index(k) if k in DERIVED else 0))  # derived ones last
    for k in keep or []:
        if k not in out:
            out.append(k)
    return out


# --------------------------------------------------------------------------------------- the table
@dataclass
class Comparison(Grid):
    """The compare table (lmlab.console.Grid: every output format) and the runs it is about."""

    runs: list[RunRow] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        """JSON: each run's full record (ids, status, params, metrics, paths) and its row of this table."""
        return [{**r.record(), "columns": row} for r, row in zip(self.runs, super().records(), strict=True)]


def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return str(x)
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:,.0f}"


def _param_fmt(key: str) -> Callable[[Any], str]:
    if key in ("derived.params_total", "derived.params_trainable"):

        return lambda v: human(float(v)) if str(v).lstrip("-").isdigit() else str(v)
    return str


def _first(m: dict[str, float], *keys: str) -> float | None:
    return next((m[k] for k in keys if k in m), None)


def device_label(tags: dict[str, str]) -> str | None:
    dev = tags.get("env.device")
    if dev is None:
        return None
    gpu = tags.get("env.gpu", "none")
    dtype = tags.get("env.dtype")
    return " ".join(x for x in (dev, f"({gpu})" if gpu != "none" else "", dtype) if x)


def best_val_loss(row: RunRow, uri: str | None = None) -> float | None:
    """The best val loss the run reached: recorded at its end, else the minimum of its val/loss history."""
    m = row.metrics
    if "final/best/val/loss" in m:
        return m["final/best/val/loss"]
    if "val/loss" in m and uri is not None:
        history = [v for _, v in metric_history(uri, row.run_id, "val/loss") if math.isfinite(v)]
        return min(history) if history else None
    return m.get("val/loss")


def compare(rows: list[RunRow], *, uri: str | None = None, keep: list[str] | None = None) -> Comparison:
    """The comparison table of `rows`: identity, differing hyperparameters (or `keep`), results."""
    if not rows:
        raise LmlabError("compare: no runs selected; give run ids or --name")
    cols = [Column("run_id", "run", [r.run_id for r in rows], "info", lambda v: v[:8]),
            Column("name", "name", [r.name for r in rows], "info"),
            Column("status", "status", [r.status for r in rows], "info"),
            Column("model", "model", [model_summary(r.params) if r.params else None for r in rows], "info")]
    shown = differing_params(rows, keep) if len(rows) > 1 else list(keep or [])
    for k in shown:
        cols.append(Column(k, HEADERS.get(k, k), [param(r, k) for r in rows], "param", _param_fmt(k)))

    def metric(key: str, header: str, values: list[float | None], fmt: Callable = _num) -> None:
        if any(v is not None for v in values):
            cols.append(Column(key, header, values, "metric", fmt))

    ms = [r.metrics for r in rows]
    metric("best/val/loss", "best val loss", [best_val_loss(r, uri) for r in rows])
    metric("val/loss", "val loss", [_first(m, "final/val/loss", "val/loss") for m in ms])
    metric("val/ppl", "val ppl", [_first(m, "final/val/ppl", "val/ppl") for m in ms])
    metric("val/loss_per_char", "val nats/char", [_first(m, "final/val/loss_per_char") for m in ms])
    metric("test/loss", "test loss", [_first(m, "final/test/loss") for m in ms])
    metric("test/ppl", "test ppl", [_first(m, "final/test/ppl") for m in ms])
    for split in ("val", "test"):
        metric(f"{split}/accuracy", f"{split} accuracy", [_first(m, f"final/{split}/accuracy") for m in ms])
        metric(f"{split}/log_loss", f"{split} log loss", [_first(m, f"final/{split}/log_loss") for m in ms])
        for k in ("chosen", "rejected", "margin"):  # task dpo: β·log-ratio to the reference; margin = chosen − rejected
            metric(f"{split}/rewards/{k}", f"{split} reward {k}", [_first(m, f"final/{split}/rewards/{k}") for m in ms])
    judges = dict.fromkeys(k.removeprefix("final/") for m in ms for k in m if "judge" in k)
    for k in judges:
        metric(k, k.replace("/", " ").replace("_", " "), [_first(m, f"final/{k}", k) for m in ms])
    for k in ("up", "down", "wins", "losses"):  # playground ratings (lmlab.workspace.feedback)
        metric(f"feedback/{k}", f"feedback {k}", [m.get(f"feedback/{k}") for m in ms], lambda v: f"{v:.0f}")
    metric("duration_s", "duration", [r.duration_s for r in rows], duration)
    rate = lambda v: f"{v:,.0f}"  # noqa: E731
    # before lmlab logged both counts, final/train/mean_tokens_per_s counted loss-bearing tokens only
    both = ["final/train/mean_loss_tokens_per_s" in m for m in ms]
    metric("train/mean_tokens_per_s", "tok/s", [m.get("final/train/mean_tokens_per_s") if new else None
                                                for m, new in zip(ms, both, strict=True)], rate)
    metric("train/mean_loss_tokens_per_s", "loss tok/s",
           [m.get("final/train/mean_loss_tokens_per_s" if new else "final/train/mean_tokens_per_s")
            for m, new in zip(ms, both, strict=True)], rate)
    metric("train/wall_tokens_per_s", "wall tok/s", [m.get("final/train/wall_tokens_per_s") for m in ms], rate)
    devices = [device_label(r.tags) for r in rows]
    if any(devices):
        cols.append(Column("device", "device", devices, "info"))
    return Comparison(cols, caption=COMPARE_HELP, runs=rows)

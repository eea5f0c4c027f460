"""A sweep read back from the ledger: the table a user used to keep by hand (one row per trial: the varied params,
status, steps, best metric, perplexity, time; best first) and the report's sweep section (param-vs-metric plots,
a parallel-coordinates plot, Optuna's parameter importances)."""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from lmlab.analysis.compare import Comparison, duration, metric_history, read_json_artifact
from lmlab.console import Column
from lmlab.errors import LmlabError
from lmlab.workspace.runs import RunRow
from lmlab.workspace.sweeps import TAG_PARAMS, TAG_PRUNED, TAG_TRIAL, SweepRuns, sweep_runs


@dataclass
class TrialRow:
    run: RunRow
    number: int
    values: dict[str, Any]
    status: str  # FINISHED, PRUNED, FAILED, RUNNING, PAUSED, KILLED
    steps: int | None
    best: float | None  # best value of the sweep's metric over the trial's evals
    val_loss: float | None  # best val/loss, for the perplexity


def trial_rows(found: SweepRuns, uri: str) -> list[TrialRow]:
    """One row per trial, best first (by the sweep's metric and direction), trials without a value last."""
    rows = []
    for r in found.trials:
        history = [(s, v) for s, v in metric_history(uri, r.run_id, found.metric) if math.isfinite(v)]
        best = (min if found.minimize else max)(v for _, v in history) if history else None
        if found.metric == "val/loss":
            val = best
        else:
            losses = [v for _, v in metric_history(uri, r.run_id, "val/loss") if math.isfinite(v)]
            val = min(losses) if losses else None
        status = "PRUNED" if TAG_PRUNED in r.tags else r.status
        rows.append(TrialRow(r, int(r.tags.get(TAG_TRIAL, "0") or 0), json.loads(r.tags.get(TAG_PARAMS) or "{}"),
                             status, max((s for s, _ in history), default=None), best, val))
    sign = 1 if found.minimize else -1
    return sorted(rows, key=lambda t: (t.best is None, sign * t.best if t.best is not None else 0, t.number))


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def sweep_table(name: str, uri: str, found: SweepRuns | None = None) -> Comparison:
    """The sweep as a compare table (terminal, --markdown, --csv); `found`: its runs, when already read."""
    found = found if found is not None else sweep_runs(name, uri)
    if not found.trials:
        raise LmlabError(f"--sweep {name}: no trial of it in this ledger yet (trials other machines ran are in their "
                         "ledgers, unless all share one tracking server: LMLAB_TRACKING_URI)")
    rows = trial_rows(found, uri)
    keys = list(dict.fromkeys(k for t in rows for k in t.values))
    cols = [Column("trial", "trial", [t.number for t in rows], "info"),
            Column("run_id", "run", [t.run.run_id for t in rows], "info", lambda v: v[:8]),
            Column("status", "status", [t.status for t in rows], "info")]
    cols += [Column(k, k, [t.values.get(k) for t in rows], "param", _num) for k in keys]
    cols += [Column("steps", "steps", [t.steps for t in rows], "metric"),
             Column(f"best/{found.metric}", f"best {found.metric}", [t.best for t in rows], "metric",
                    lambda v: f"{v:.4f}"),
             Column("val/ppl", "val ppl", [math.exp(t.val_loss) if t.val_loss is not None and t.val_loss < 50
                                           else None for t in rows], "metric", lambda v: f"{v:.2f}"),
             Column("duration_s", "time", [t.run.duration_s for t in rows], "metric", duration)]
    found_metric = f"best {found.metric}: its best value over the trial's evals ({'lowest' if found.minimize else 'highest'} first)"
    return Comparison(runs=[t.run for t in rows], columns=cols,
                      caption=f"{found_metric}; val ppl: exp of the best val loss; steps: the last eval's step; "
                      "PRUNED: stopped by the pruner (reason in the run's lmlab.failure_reason).")


# --------------------------------------------------------------------------------------------- the report
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _space(found: SweepRuns, uri: str) -> dict[str, dict]:
    config = read_json_artifact(uri, found.parent.run_id, "sweep.json") if found.parent is not None else None
    return dict((config or {}).get("params") or {})


def _axis(spec: dict, values: list[Any]) -> tuple[list[float], list[str] | None, bool]:
    """Positions of `values` on a plot axis: categories at 0, 1, …, numbers as they are (log for log_uniform)."""
    log = spec.get("log_uniform") is not None
    if spec.get("choice") is not None or any(not isinstance(v, int | float) or isinstance(v, bool) for v in values):
        cats = [str(c) for c in (spec.get("choice") or sorted(set(map(str, values))))]
        return [float(cats.index(str(v))) if str(v) in cats else float("nan") for v in values], cats, False
    return [float(v) for v in values], None, log


def plot_params(found: SweepRuns, rows: list[TrialRow], space: dict[str, dict]) -> str | None:
    """One panel per searched param: the trial's best metric against the param's value; pruned trials hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in dict.fromkeys(k for t in rows for k in t.values) if space.get(k, {}).get("expr") is None]
    scored = [t for t in rows if t.best is not None]
    if not keys or not scored:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        xs, cats, log = _axis(space.get(key, {}), [t.values.get(key) for t in scored])
        pruned = [t.status == "PRUNED" for t in scored]
        for flag, face in ((False, "tab:blue"), (True, "none")):
            pts = [(x, t.best) for x, t, p in zip(xs, scored, pruned, strict=True) if p == flag]
            if pts:
                ax.scatter(*zip(*pts, strict=True), facecolors=face, edgecolors="tab:blue",
                           label="pruned (at its last eval)" if flag else "finished")
        if cats is not None:
            ax.set_xticks(range(len(cats)), cats)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {found.metric}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def plot_parallel(found: SweepRuns, rows: list[TrialRow], space: dict[str, dict]) -> str | None:
    """Parallel coordinates: one axis per searched param (scaled to its range) and the metric; one line per trial,
    coloured by its metric (darker = better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in dict.fromkeys(k for t in rows for k in t.values) if space.get(k, {}).get("expr") is None]
    scored = [t for t in rows if t.best is not None]
    if not keys or len(scored) < 2:
        return None
    columns, labels = [], []
    for key in keys:
        xs, cats, log = _axis(space.get(key, {}), [t.values.get(key) for t in scored])
        xs = [math.log10(x) if log and x > 0 else x for x in xs]
        columns.append(_scale(xs))
        labels.append(key + (" (log)" if log else ""))
    metric = [t.best for t in scored]
    columns.append(_scale(metric))
    labels.append(f"best {found.metric}")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * len(columns)), 3.4))
    lo, hi = min(metric), max(metric)
    cmap = plt.get_cmap("viridis_r" if found.minimize else "viridis")
    for i, t in enumerate(scored):
        ax.plot(range(len(columns)), [c[i] for c in columns], color=cmap((t.best - lo) / ((hi - lo) or 1.0)),
                alpha=0.8, linestyle="--" if t.status == "PRUNED" else "-")
    ax.set_xticks(range(len(columns)), labels, fontsize=8)
    ax.set_yticks([0, 1], ["low", "high"])
    ax.grid(axis="x", alpha=0.5)
    fig.tight_layout()
    return _png(fig)


def _scale(xs: list[float]) -> list[float]:
    finite = [x for x in xs if math.isfinite(x)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    return [(x - lo) / (hi - lo) if hi > lo else 0.5 for x in xs]


def importances(found: SweepRuns, rows: list[TrialRow], space: dict[str, dict]) -> dict[str, float]:
    """Optuna's parameter importances (its default fANOVA evaluator) over the finished trials, computed on an
    in-memory study rebuilt from the ledger; {} with fewer than 3 finished trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    keys = [k for k in dict.fromkeys(k for t in rows for k in t.values) if space.get(k, {}).get("expr") is None]
    done = [t for t in rows if t.best is not None and t.status == "FINISHED" and all(k in t.values for k in keys)]
    if len(done) < 3 or not keys:
        return {}
    dists = {}
    for k in keys:
        spec, vals = space.get(k, {}), [t.values[k] for t in done]
        if spec.get("int") is not None:
            dists[k] = IntDistribution(*spec["int"])
        elif spec.get("uniform") is not None or spec.get("log_uniform") is not None:
            lo, hi = spec.get("uniform") or spec.get("log_uniform")
            dists[k] = FloatDistribution(lo, hi, log=spec.get("log_uniform") is not None)
        else:
            dists[k] = CategoricalDistribution(list(dict.fromkeys(spec.get("choice") or vals)))
    study = optuna.create_study(direction="minimize" if found.minimize else "maximize")
    for t in done:
        study.add_trial(optuna.trial.create_trial(params={k: t.values[k] for k in keys}, distributions=dists,
                                                  value=t.best))
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError):  # every trial has the same params, or the same value
        return {}


def sweep_section(name: str, uri: str) -> str:
    """The sweep's part of `lmlab report --sweep`: what was searched, the table, the plots, the importances."""
    found = sweep_runs(name, uri)
    rows = trial_rows(found, uri)
    space = _space(found, uri)
    table = sweep_table(name, uri)
    parts = [f"<h2>Sweep {escape(name)}</h2>"]
    if found.parent is not None:
        t = found.parent.tags
        searched = ", ".join(f"{k} {escape(v)}" for k, v in found.parent.params.items() if k.startswith("space."))
        parts.append(f"<p>{escape(t.get('lmlab.sweep.sampler', ''))} sampler, pruner "
                     f"{escape(t.get('lmlab.sweep.pruner', ''))}, {escape(found.metric)} "
                     f"{'minimized' if found.minimize else 'maximized'}; {len(rows)} trial(s); space: "
                     f"{escape(searched.replace('space.', ''))}</p>")
    parts.append(table.html())
    for b64, caption in ((plot_params(found, rows, space), f"Best {found.metric} of each trial against each searched "
                          "param (hollow: pruned, at its last eval)."),
                         (plot_parallel(found, rows, space), "Parallel coordinates: each line a trial, each axis a "
                          "param scaled to its range, the last the metric; darker = better, dashed = pruned.")):
        if b64:
            parts.append(f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{b64}">'
                         f"<figcaption>{escape(caption)}</figcaption></figure>")
    imp = importances(found, rows, space)
    if imp:
        parts.append("<h3>Parameter importances (Optuna, fANOVA)</h3><table><thead><tr><th>param</th>"
                     "<th>importance</th></tr></thead><tbody>" + "".join(
                         f"<tr><td>{escape(k)}</td><td class=\"metric\">{v:.3f}</td></tr>" for k, v in imp.items())
                     + "</tbody></table>")
    else:
        parts.append('<p class="muted">Parameter importances need at least 3 finished trials that differ.</p>')
    return "\n".join(parts)


def write_sweep_report(name: str, uri: str, path: str | Path, *, title: str | None = None) -> Path:
    """`lmlab report --sweep NAME`: the sweep section, then the usual report of its trials' runs."""
    from lmlab.analysis.report import build_report

    found = sweep_runs(name, uri)
    page = build_report(found.trials, uri, title=title or f"lmlab sweep {name}")
    section = sweep_section(name, uri)
    marker = "<h2>Runs</h2>"
    page = page.replace(marker, section + "\n" + marker, 1) if marker in page else \
        page.replace("</body>", section + "</body>", 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path

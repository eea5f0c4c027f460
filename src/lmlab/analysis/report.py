"""`lmlab report`: one self-contained HTML file about a set of runs (plots embedded as PNG, no network).

Contents: the compare table; train and val loss overlaid across runs against steps and against tokens seen;
the learning-rate schedule; the train–val gap with overfitting shaded; loss spikes marked; alerts; final
evaluation results; generations side by side when a run logged `generations.json`.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.analysis.compare import Comparison, compare, metric_history, read_json_artifact
from lmlab.console import Grid
from lmlab.errors import LmlabError
from lmlab.training.alerts import DEFAULTS, find_overfitting, find_spikes
from lmlab.workspace.runs import RunRow

Points = list[tuple[int, float]]
# post-hoc detection runs on the *logged* train loss (means over train.log_every steps): a shorter window than the
# loop's per-step one; the thresholds are the recipe's (alerts.*), defaults from the schema
SPIKE_WINDOW = 20


@dataclass
class RunCurves:
    row: RunRow
    train: Points = field(default_factory=list)  # (step, train/loss)
    val: Points = field(default_factory=list)  # (step, val/loss)
    lr: Points = field(default_factory=list)
    tokens: Points = field(default_factory=list)  # (step, train/tokens_seen)
    alerts: list[dict] = field(default_factory=list)  # logged by the run (alerts.json), else found here
    spikes: Points = field(default_factory=list)
    overfit_spans: list[tuple[int, int]] = field(default_factory=list)
    generations: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.row.name} ({self.row.run_id[:8]})"

    def tokens_at(self, steps: list[int]) -> np.ndarray | None:
        if not self.tokens:
            return None
        s, t = zip(*self.tokens, strict=True)
        return np.interp(steps, (0, *s), (0, *t))  # tokens seen grows linearly between logged steps


def load_curves(row: RunRow, uri: str) -> RunCurves:
    c = RunCurves(row)
    c.train = metric_history(uri, row.run_id, "train/loss")
    c.val = metric_history(uri, row.run_id, "val/loss")
    c.lr = metric_history(uri, row.run_id, "train/lr")
    c.tokens = metric_history(uri, row.run_id, "train/tokens_seen")
    p = row.params
    logged = read_json_artifact(uri, row.run_id, "alerts.json")
    if logged is not None:
        c.alerts = list(logged.get("alerts", []))
        c.spikes = [(a["step"], _at(c.train, a["step"])) for a in c.alerts if a.get("kind") == "spike"]
    else:
        c.spikes = find_spikes(c.train, SPIKE_WINDOW, _float(p.get("alerts.spike_mad_k"), DEFAULTS.spike_mad_k))
        c.alerts = [{"kind": "spike", "step": s, "message": f"loss {v:.4f} above the rolling median of the logged "
                     "train loss (found by the report)"} for s, v in c.spikes]
    patience = int(_float(p.get("alerts.overfit_patience"), DEFAULTS.overfit_patience))
    c.overfit_spans = find_overfitting(c.train, c.val, patience)
    if logged is None:
        c.alerts += [{"kind": "overfitting", "step": b, "message": f"val loss rose for {patience} evals in a row "
                      f"(steps {a}–{b}) while train loss fell (found by the report)"} for a, b in c.overfit_spans]
    gens = read_json_artifact(uri, row.run_id, "generations.json")
    if gens is not None:
        c.generations = list(gens.get("samples", []) if isinstance(gens, dict) else gens)
    return c


def _float(v: Any, default: float) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _at(points: Points, step: int) -> float:
    if not points:
        return math.nan
    s, v = zip(*points, strict=True)
    return float(np.interp(step, s, v))


# ------------------------------------------------------------------------------------------------ plots
def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def tokens_span(runs: list[RunCurves]) -> float:
    """Largest ÷ smallest tokens processed by the runs (1 when fewer than two runs logged any)."""
    ends = [r.tokens[-1][1] for r in runs if r.tokens and r.tokens[-1][1] > 0]
    return max(ends) / min(ends) if len(ends) > 1 else 1.0


def loss_figure(runs: list[RunCurves], x: str = "step"):
    """Train (solid) and val (dashed, dots) loss of every run; spikes ×, overfitting shaded; the legend beside the
    plot, never over the curves. x: step | tokens (a log axis when the runs' token counts differ by more than 10×,
    so a short fine-tuning run is not squashed at x ≈ 0 beside a long pre-training run). None when nothing logged."""
    if not any(r.train or r.val for r in runs):
        return None
    by_tokens = x == "tokens"
    log_x = by_tokens and tokens_span(runs) > 10
    fig, ax = _figure("Loss vs tokens processed" if by_tokens else "Loss vs step",
                      ("tokens processed (padding excluded)" + (", log scale" if log_x else "")) if by_tokens
                      else "optimizer step", "loss (nats/token)")
    for r, color in zip(runs, _colors(len(runs)), strict=True):
        if by_tokens and not r.tokens:
            continue
        xs = partial(_x_values, r, by_tokens)
        if r.train:
            ax.plot(xs(r.train), [v for _, v in r.train], color=color, lw=1.4, label=f"{r.label} train")
        if r.val:
            ax.plot(xs(r.val), [v for _, v in r.val], color=color, lw=1.4, ls="--", marker="o", ms=3.5,
                    label=f"{r.label} val")
        if r.spikes:
            ax.scatter(xs(r.spikes), [v for _, v in r.spikes], marker="x", s=60, color="red", zorder=5,
                       label=f"{r.label} spike")
        for a, b in r.overfit_spans:
            lo, hi = (r.tokens_at([a, b]) if by_tokens else (a, b))
            ax.axvspan(lo, hi, color=color, alpha=0.12, lw=0)
    if any(r.overfit_spans for r in runs):
        ax.plot([], [], color="grey", alpha=0.4, lw=8, label="overfitting")
    if log_x:
        ax.set_xscale("log")
    _legend_outside(fig, ax)
    return fig


def plot_loss(runs: list[RunCurves], x: str = "step") -> str | None:
    fig = loss_figure(runs, x)
    return _png(fig) if fig is not None else None


def _legend_outside(fig, ax) -> None:
    """The legend to the right of the axes (constrained layout makes room), so it covers no curve."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7)


def _x_values(run: RunCurves, by_tokens: bool, points: Points):
    steps = [s for s, _ in points]
    return run.tokens_at(steps) if by_tokens else steps


def plot_lr(runs: list[RunCurves]) -> str | None:
    if not any(r.lr for r in runs):
        return None
    fig, ax = _figure("Learning-rate schedule", "optimizer step", "learning rate")
    for r, color in zip(runs, _colors(len(runs)), strict=True):
        if r.lr:
            ax.plot([s for s, _ in r.lr], [v for _, v in r.lr], color=color, lw=1.4, label=r.label)
    _legend_outside(fig, ax)
    return _png(fig)


def plot_gap(runs: list[RunCurves]) -> str | None:
    """val − train loss at each eval (train loss interpolated to the eval step); overfitting shaded."""
    if not any(r.train and r.val for r in runs):
        return None
    fig, ax = _figure("Generalization gap (val − train loss)", "optimizer step", "val − train (nats/token)")
    ax.axhline(0, color="black", lw=0.8)
    for r, color in zip(runs, _colors(len(runs)), strict=True):
        if not (r.train and r.val):
            continue
        steps = [s for s, _ in r.val]
        gap = [v - _at(r.train, s) for s, v in r.val]
        ax.plot(steps, gap, color=color, marker="o", ms=3.5, lw=1.4, label=r.label)
        for a, b in r.overfit_spans:
            ax.axvspan(a, b, color=color, alpha=0.15, lw=0)
            ax.annotate("overfitting", xy=(b, gap[steps.index(b)] if b in steps else 0), fontsize=8, color=color,
                        xytext=(4, 6), textcoords="offset points")
    _legend_outside(fig, ax)
    return _png(fig)


# ------------------------------------------------------------------------------------------------ html
_CSS = """
body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0} th,td{border:1px solid #ccc;padding:4px 8px;
vertical-align:top} th{background:#f3f3f3;text-align:left} td.metric{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:12px 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:12px;color:#555}
pre{white-space:pre-wrap;margin:0;font-size:12px} .muted{color:#777} .wide{overflow-x:auto;max-width:100%}
details summary{cursor:pointer;font-size:13px;color:#444}
"""
# proves in a browser that every embedded plot decoded: the test reads this attribute from the rendered DOM
# and whether the runs table fits the page's width (no sideways scrolling)
_SCRIPT = ("window.addEventListener('load',function(){var n=0;for(var i of document.images)"
           "{if(i.complete&&i.naturalWidth>0)n++;}document.body.setAttribute('data-plots-loaded',n);"
           "var t=document.querySelector('table.compare');if(t){document.body.setAttribute('data-table-fits',"
           "t.getBoundingClientRect().right<=document.documentElement.clientWidth);}});")


def _img(b64: str | None, alt: str, caption: str) -> str:
    if b64 is None:
        return ""
    return (f'<figure><img class="plot" alt="{escape(alt)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    classes = classes or [""] * len(header)
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{cell}</td>' for c, cell in zip(classes, row, strict=True)) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CURVES = ("train/", "val/", "test/", "alerts/")


def _results(runs: list[RunCurves]) -> str:
    # the end-of-run metrics, and evaluations logged later (`lmlab eval`'s json/<split>/..., judge scores)
    keys = sorted(dict.fromkeys(k for r in runs for k in r.row.metrics
                                if k.startswith("final/") or not k.startswith(_CURVES)))
    if not keys:
        return '<p class="muted">no run finished with final metrics</p>'
    rows = []
    for k in keys:
        vals = [r.row.metrics.get(k) for r in runs]
        rows.append([escape(k.removeprefix("final/"))] + ["" if v is None else f"{v:.6g}" for v in vals])
    return _table(["metric"] + [r.label for r in runs], rows, [""] + ["metric"] * len(runs))


def _alerts(runs: list[RunCurves]) -> str:
    rows = [[escape(r.label), str(a.get("step", "")), escape(str(a.get("kind", ""))), escape(str(a.get("message", "")))]
            for r in runs for a in r.alerts]
    if not rows:
        return '<p class="muted">no spikes or overfitting found</p>'
    return _table(["run", "step", "kind", "message"], rows)


def _generations(runs: list[RunCurves]) -> str:
    with_gens = [r for r in runs if r.generations]
    if not with_gens:
        return ""
    prompts: dict[str, dict[str, str]] = {}
    references: dict[str, str] = {}
    for r in with_gens:
        for g in r.generations:
            prompt = str(g.get("prompt", ""))
            prompts.setdefault(prompt, {})[r.row.run_id] = str(g.get("output", g.get("completion", "")))
            if g.get("reference") is not None:
                references[prompt] = str(g["reference"])
    header = ["prompt"] + (["reference"] if references else []) + [r.label for r in with_gens]
    rows = []
    for prompt, outs in prompts.items():
        cells = [f"<pre>{escape(prompt)}</pre>"]
        if references:
            cells.append(f"<pre>{escape(references.get(prompt, ''))}</pre>")
        cells += [f"<pre>{escape(outs.get(r.row.run_id, ''))}</pre>" for r in with_gens]
        rows.append(cells)
    return "<h2>Generations</h2>" + _table(header, rows)


# the runs table at the top: who, what differs (at most SUMMARY_PARAMS hyperparameters), these results
SUMMARY_PARAMS = 6
KEY_COLUMNS = ("run_id", "name", "best/val/loss", "val/loss_per_char", "val/accuracy", "duration_s",
               "train/mean_tokens_per_s", "train/mean_loss_tokens_per_s")


# which differing hyperparameters the summary shows first: what shapes the model and the optimisation, at most
# SUMMARY_PER_SECTION of a section before the next section gets a turn; the model column already names a pretrained one
SUMMARY_SECTIONS = ("model.", "adapter.", "train.", "run.", "data.", "tokenizer.", "eval.", "derived.")
SUMMARY_PER_SECTION = 2


def summary_grid(table: Comparison) -> Grid:
    """The columns that differ between the runs (info columns, and SUMMARY_PARAMS hyperparameters picked by
    SUMMARY_SECTIONS) plus the key ones (run, name, best val loss, nats/char, accuracy, duration, throughput),
    in table order."""
    def differs(c) -> bool:
        return len({str(v) for v in c.values}) > 1

    def section(c) -> int:
        return next((i for i, p in enumerate(SUMMARY_SECTIONS) if c.key.startswith(p)), len(SUMMARY_SECTIONS))

    params = sorted((c for c in table.columns if c.kind == "param" and differs(c) and c.key != "model.pretrained"),
                    key=section)  # stable: table order within a section
    picked: list = []
    for c in params:  # first pass: a few of each section, in priority order
        if len(picked) < SUMMARY_PARAMS and sum(section(p) == section(c) for p in picked) < SUMMARY_PER_SECTION:
            picked.append(c)
    picked += [c for c in params if all(c is not p for p in picked)][:SUMMARY_PARAMS - len(picked)]
    cols = [c for c in table.columns
            if c.key in KEY_COLUMNS or (c.kind == "info" and differs(c)) or any(c is p for p in picked)]
    return Grid(cols, caption=table.caption)


def runs_tables_html(table: Comparison) -> str:
    """The summary table, then the whole compare table folded (it can be dozens of columns wide)."""
    summary = summary_grid(table)
    n_params = sum(c.kind == "param" and len({str(v) for v in c.values}) > 1 for c in table.columns)
    shown = sum(c.kind == "param" for c in summary.columns)
    more = f" {n_params - shown} more differing hyperparameters are in the full table." if n_params > shown else ""
    return (f'<div class="wide">{summary.html("compare")}</div>'
            f'<p class="muted">{escape(table.caption)}{escape(more)}</p>'
            f"<details><summary>Full table: all {len(table.columns)} columns</summary>"
            f'<div class="wide">{table.html("compare-full")}</div></details>')


def build_report(rows: list[RunRow], uri: str, *, title: str | None = None) -> str:
    """The report's HTML for runs in the ledger at `uri`."""

    if not rows:
        raise LmlabError("report: no runs selected; give run ids or --name")
    return render_report([load_curves(r, uri) for r in rows], runs_tables_html(compare(rows, uri=uri)), source=uri,
                         title=title)


def render_report(runs: list[RunCurves], table_html: str, *, source: str = "", title: str | None = None) -> str:
    """Everything inline (CSS, PNGs, a 3-line script): the file opens offline and makes no requests."""
    title = title or f"lmlab report: {len(runs)} run{'s' if len(runs) != 1 else ''}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{escape(title)}</title>",
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="muted">generated {datetime.now():%Y-%m-%d %H:%M}' + (f" from {escape(source)}" if source else "")
        + "</p>",
        "<h2>Runs</h2>", table_html,
        "<h2>Loss</h2>",
        _img(plot_loss(runs, "step"), "loss vs step", "Train (solid) and validation (dashed) loss per optimizer "
             "step; × = loss spike, shaded = overfitting (val loss rising while train loss falls)."),
        _img(plot_loss(runs, "tokens"), "loss vs tokens", "The same curves against tokens processed (every "
             "token the model read, padding excluded; prompt tokens of SFT included): runs with different batch "
             "sizes line up by data consumed. A log axis when the runs' totals differ by more than 10×."),
        "<h2>Learning rate</h2>", _img(plot_lr(runs), "learning rate", "Learning rate after each optimizer step."),
        "<h2>Train–val gap</h2>",
        _img(plot_gap(runs), "train-val gap", "Validation minus training loss at each evaluation; shaded spans "
             "are overfitting: val loss rose for alerts.overfit_patience evals in a row (default "
             f"{DEFAULTS.overfit_patience}) while train loss fell."),
        "<h2>Alerts</h2>", _alerts(runs),
        "<h2>Evaluation results</h2>", _results(runs),
        _generations(runs),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write_report(rows: list[RunRow], uri: str, path: str | Path, *, title: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(rows, uri, title=title), encoding="utf-8")
    return path

"""`lmlab compare`, `lmlab diff`, `lmlab report`: read runs back from the ledger and explain them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.cli.options import FormatOpt, Name, OutputDir, Uri
from lmlab.console import console
from lmlab.errors import LmlabError
from lmlab.recipe.defaults import DEFAULT_WORKSPACE


@app.command("compare")
def compare_cmd(
    runs: Annotated[list[str] | None, typer.Argument(help="Run ids (unique prefixes are enough)")] = None,
    name: Name = None,
    sweep: Annotated[str | None, typer.Option("--sweep", help="Compare this sweep's trials: one row per trial (the "
                                              "varied params, status, steps, best metric, ppl, time), best first")] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", help="Also show this recorded param even where runs agree, e.g. -p train.lr")] = None,
    fmt: FormatOpt = "table",  # type: ignore[assignment]
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table")] = False,
    csv: Annotated[bool, typer.Option("--csv", help="Same as --format csv (full keys, raw numbers)")] = False,
    output_dir: OutputDir = DEFAULT_WORKSPACE,
    uri: Uri = None,
):
    """One row per run: the hyperparameters that differ across the runs, then val loss, perplexity,
    accuracy, judge scores, duration, throughput and device.

    val loss: nats per validation token (the figure to compare across tools). val nats/char: lmlab's summed NLL over
    every validation token ÷ characters (one per document separator), not the Mainrun challenge's evaluate().
    tok/s: all tokens processed (padding excluded) per second of training steps, mean over the run; loss tok/s:
    tokens that carry loss; wall tok/s: all tokens ÷ wall-clock time including evaluation and checkpoints."""
    from lmlab.analysis.compare import compare, resolve_uri, select_runs
    from lmlab.console import emit

    if markdown and csv:
        raise LmlabError("compare: choose one of --markdown and --csv")
    if sweep is not None:
        from lmlab.cli.sweep import show_sweep

        show_sweep(sweep, resolve_uri(uri, output_dir), "markdown" if markdown else "csv" if csv else fmt)
        return
    if not runs and not name:
        raise LmlabError("compare: give run ids or --name GLOB (see `lmlab runs`)")
    uri = resolve_uri(uri, output_dir)
    table = compare(select_runs(runs, name=name, uri=uri), uri=uri, keep=param)
    emit("markdown" if markdown else "csv" if csv else fmt, grid=table)


@app.command("diff")
def diff_cmd(
    a: Annotated[str, typer.Argument(help="First run id (a unique prefix is enough)")],
    b: Annotated[str, typer.Argument(help="Second run id")],
    fmt: FormatOpt = "table",  # type: ignore[assignment]
    output_dir: OutputDir = DEFAULT_WORKSPACE,
    uri: Uri = None,
):
    """Why two runs may differ, most likely causes first: config, data, code, environment, seed; then metrics.
    csv / json: one row / object per difference (section, key, a, b, note)."""
    from lmlab.analysis.compare import resolve_uri, select_runs
    from lmlab.analysis.diff import diff_runs
    from lmlab.console import emit

    uri = resolve_uri(uri, output_dir)
    run_a, run_b = select_runs([a, b], uri=uri)
    found = diff_runs(run_a, run_b, uri)
    emit(fmt, grid=found.grid(), text=found.text(), data=found.to_dict())


@app.command("report")
def report_cmd(
    runs: Annotated[list[str] | None, typer.Argument(help="Run ids (unique prefixes are enough)")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write")] = Path("report.html"),
    name: Name = None,
    title: Annotated[str | None, typer.Option(help="Page title")] = None,
    sweep: Annotated[str | None, typer.Option("--sweep", help="Report on this sweep: its trials, param-vs-metric and "
                                              "parallel-coordinates plots, Optuna's parameter importances")] = None,
    output_dir: OutputDir = DEFAULT_WORKSPACE,
    uri: Uri = None,
):
    """Write one self-contained HTML file: loss curves (by step and by tokens), lr schedule, train–val gap with
    overfitting and spikes marked, the compare table, evaluation results, generations."""
    from lmlab.analysis.compare import resolve_uri, select_runs
    from lmlab.analysis.report import write_report

    if sweep is not None:
        from lmlab.analysis.sweep import write_sweep_report

        path = write_sweep_report(sweep, resolve_uri(uri, output_dir), output, title=title)
        console.print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
        return
    if not runs and not name:
        raise LmlabError("report: give run ids or --name GLOB (see `lmlab runs`)")
    uri = resolve_uri(uri, output_dir)
    path = write_report(select_runs(runs, name=name, uri=uri), uri, output, title=title)
    console.print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")

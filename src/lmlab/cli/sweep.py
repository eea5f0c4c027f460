"""`lmlab sweep`: search a recipe's hyperparameters with Optuna, every trial an ordinary run in the ledger.
Also what `runs --sweep`, `compare --sweep` and `report --sweep` print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.cli.options import SetOpt
from lmlab.console import console


@app.command()
def sweep(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML; its sweep: section holds the space (or use --grid)")],
    set_: SetOpt = None,
    grid: Annotated[list[str] | None, typer.Option(
        "--grid", "-g", help="Search this field over these values: --grid train.lr=1e-4,5e-5 (repeatable)")] = None,
    space: Annotated[Path | None, typer.Option(help="YAML file with a sweep: section (instead of the recipe's)")] = None,
    name: Annotated[str | None, typer.Option(help="The sweep's name (default sweep.name, else <run.name>-sweep); "
                                             "the same name continues it")] = None,
    metric: Annotated[str | None, typer.Option(help="Metric to optimize (default val/loss)")] = None,
    direction: Annotated[str | None, typer.Option(help="minimize or maximize")] = None,
    trials: Annotated[int | None, typer.Option(min=1, help="Trials in all, every worker and machine together")] = None,
    sampler: Annotated[str | None, typer.Option(help="grid, random or tpe (Optuna's samplers)")] = None,
    pruner: Annotated[str | None, typer.Option(help="none, median or hyperband (Optuna's pruners)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Trials at once on this machine, as separate processes with "
                                         "the CPU cores split between them")] = 1,
    study_storage: Annotated[str | None, typer.Option(
        help="Optuna RDB URL holding the study, e.g. postgresql://user:pw@host/db: start the same command on "
             "several machines to share the work (default: sqlite in the workspace)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show each trial's training progress")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the final table as Markdown")] = False,
):
    """Run a recipe's trials (grid, random or TPE search on Optuna), each an ordinary lmlab run recorded as a child
    of the sweep's parent run; print the trials best first. Running the same command again continues the sweep."""
    from lmlab.evaluation.judge import judge_trial
    from lmlab.training.sweep import plan_sweep, redact, run_sweep

    plan = plan_sweep(recipe, set_, sweep_file=space, grid=grid, name=name, metric=metric, direction=direction,
                      trials=trials, sampler=sampler, pruner=pruner, storage=study_storage, workers=workers,
                      quiet=not verbose, progress=True, score=judge_trial)
    sw = plan.sweep
    console.print(f"sweep {plan.name}: {plan.n_trials} trials, {plan.sampler} sampler, pruner {sw.pruner}, "
                  f"{sw.direction} {sw.metric}; {workers} worker(s)"
                  + (f" × {plan.threads} thread(s)" if plan.threads else "")
                  + f"; study {redact(plan.storage_url)}", soft_wrap=True, markup=False)
    try:
        outcome = run_sweep(plan, workers)
    except KeyboardInterrupt:
        console.print(f"interrupted; run the same command again to continue sweep {plan.name}", markup=False)
        raise typer.Exit(130) from None
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(outcome.counts.items()))
    console.print(f"sweep {plan.name} {'done' if outcome.done else 'not finished'}: {counts}; parent run "
                  f"{outcome.parent_run_id}", markup=False)
    from lmlab.workspace.sweeps import sweep_runs

    found = sweep_runs(plan.name, plan.ledger_uri)
    if not found.trials:  # other machines sharing the study took every trial
        console.print(f"no trial ran here: the other machines working on study {redact(plan.storage_url)} took them "
                      "all; their ledgers hold them (or share one ledger: LMLAB_TRACKING_URI)", markup=False,
                      soft_wrap=True)
    else:
        show_sweep(plan.name, plan.ledger_uri, "markdown" if markdown else "table", found=found)
    if outcome.best is not None:
        console.print(f"best: trial {outcome.best['number']} {sw.metric} {outcome.best['value']:.4f} "
                      f"(run {outcome.best['run_id']})", markup=False)


def show_sweep(name: str, uri: str, fmt: str = "table", found=None) -> None:
    """The sweep's table, one row per trial, best first (runs --sweep, compare --sweep), in the shared output
    formats (table, csv, json, markdown)."""
    from lmlab.analysis.sweep import sweep_table
    from lmlab.console import emit

    emit(fmt, grid=sweep_table(name, uri, found))

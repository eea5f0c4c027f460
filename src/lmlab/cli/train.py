"""`lmlab run`, `validate` and `runs`: train a recipe, check one, list runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.cli.options import FormatOpt, SetOpt, StorageOpt
from lmlab.console import console
from lmlab.errors import LmlabError
from lmlab.recipe.defaults import DEFAULT_WORKSPACE


@app.command()
def run(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML (not needed with --resume)")] = None,
    set_: SetOpt = None,
    resume: Annotated[str | None, typer.Option(help="Continue this run id from its last checkpoint")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Workspace holding the runs (with --resume)")] = None,
    stop_after_steps: Annotated[int | None, typer.Option(help="Train this many steps, checkpoint, pause")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output")] = False,
    nproc: Annotated[int | None, typer.Option(
        min=1, help="Processes per machine (one per GPU); starts them with accelerate launch")] = None,
    nodes: Annotated[int | None, typer.Option(min=1, help="Machines taking part (docs/multi-node.md)")] = None,
    node_rank: Annotated[int, typer.Option(min=0, help="This machine's rank among --nodes; 0 = main")] = 0,
    main_address: Annotated[str | None, typer.Option(help="Address of the main machine (several nodes)")] = None,
    main_port: Annotated[int | None, typer.Option(help="Rendezvous port on the main machine")] = None,
    allow_code: Annotated[bool, typer.Option("--allow-code", help="Let the recipe's predicate filters run the "
                                                                  "Python functions they name")] = False,
    storage: StorageOpt = None,
):
    """Train a recipe end to end (or resume a run), recording everything in the ledger."""
    import shlex
    import subprocess

    from lmlab.recipe.loading import load_recipe
    from lmlab.training import distributed
    from lmlab.training.loop import resume_recipe, train

    if recipe is None and resume is None:
        raise LmlabError("lmlab run: give a recipe file, or --resume RUN_ID")
    set_ = [*(set_ or []), *(["data.allow_code=true"] if allow_code else []),
            *([f"run.output_dir={output_dir}"] if recipe is not None and output_dir is not None else []),
            *([f"run.storage={storage}"] if storage is not None else [])]
    if recipe is None:  # the recipe the run started with; --set may change e.g. grad_accum for another world size
        # (with --storage / $LMLAB_STORAGE: pulled from storage first when it holds a newer checkpoint)
        r, resume_from = resume_recipe(resume, output_dir=output_dir, overrides=set_, storage=storage)
    else:
        r, resume_from = load_recipe(recipe, set_), resume
    if distributed.needs_launch(r.distributed, nproc, nodes):
        distributed.preflight(r.distributed)  # one clear error here rather than one per process
        args = [str(recipe.resolve())] if recipe is not None else []
        args += [a for s in set_ or [] for a in ("--set", s)]
        for flag, value in (("--resume", resume), ("--output-dir", output_dir), ("--stop-after-steps", stop_after_steps)):
            args += [flag, str(value)] if value is not None else []
        args += ["--quiet"] if quiet else []
        cmd = distributed.launch_command(args, r.distributed, nproc=nproc, nodes=nodes, node_rank=node_rank,
                                         main_address=main_address, main_port=main_port)
        if not quiet:
            console.print(f"launching: {shlex.join(cmd)}", soft_wrap=True)
        raise typer.Exit(subprocess.call(cmd, env=distributed.launch_env()))
    result = train(r, resume=resume_from, stop_after_steps=stop_after_steps, quiet=quiet)
    if quiet and distributed.main_process():
        console.print(f"{result.run_id} {result.status} step {result.step}")
    if result.status == "PAUSED":
        raise typer.Exit(0)


@app.command()
def validate(recipe: Path, set_: SetOpt = None):
    """Check a recipe without running it: every problem is reported at once."""
    from lmlab.recipe.loading import load_recipe

    r = load_recipe(recipe, set_)
    console.print(f"{recipe}: ok ({r.run.task}, {r.model.pretrained or r.model.arch})")


@app.command()
def runs(
    output_dir: Annotated[str, typer.Option(help="Workspace whose sqlite ledger to read")] = DEFAULT_WORKSPACE,
    uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: $LMLAB_TRACKING_URI or the workspace's sqlite)")] = None,
    name: Annotated[str | None, typer.Option(help="Only runs whose name matches this glob, e.g. 'alpaca-*'")] = None,
    limit: Annotated[int, typer.Option(help="Newest N runs")] = 50,
    lineage: Annotated[str | None, typer.Option("--lineage", help="Show this run's chain instead: its ancestors and descendants linked by model.init_from")] = None,
    sweep: Annotated[str | None, typer.Option("--sweep", help="Show this sweep's trials instead: one row per trial, best first")] = None,
    fmt: FormatOpt = "table",  # type: ignore[assignment]
    storage: StorageOpt = None,
):
    """List runs: name, status, key hyperparameters, best validation loss, duration; with --storage (or
    $LMLAB_STORAGE) also the runs there that this workspace lacks.

    val loss is nats per validation token (compare this one across tools); val nats/char is lmlab's summed NLL over
    every validation token ÷ characters (one per document separator), not the Mainrun challenge's evaluate()."""
    from lmlab.analysis.runs_table import runs_grid
    from lmlab.console import emit
    from lmlab.workspace.runs import list_runs

    if sweep is not None:
        from lmlab.analysis.compare import resolve_uri
        from lmlab.cli.sweep import show_sweep

        show_sweep(sweep, resolve_uri(uri, output_dir), fmt)
        return
    if lineage is not None:
        from lmlab.analysis.lineage import lineage as run_lineage
        from lmlab.analysis.lineage import lineage_table

        console.print(lineage_table(run_lineage(lineage, uri, output_dir=output_dir), focus=lineage))
        return

    from lmlab.workspace.storage import storage_url

    rows = list_runs(uri=uri, output_dir=output_dir, name=name, limit=limit, storage=storage_url(storage))
    if not rows and fmt.value == "table":
        console.print("no runs yet", markup=False)
        return
    emit(fmt, grid=runs_grid(rows), data=[r.record() for r in rows])

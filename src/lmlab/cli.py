"""The `lmlab` command: thin typer commands over the library. User mistakes print one line, exit non-zero."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmlab.console import console, err_console
from lmlab.errors import LmlabError, RecipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, fine-tune, evaluate and compare language models from one YAML recipe.")

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a recipe field: --set train.lr=3e-4")]


@app.command()
def run(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML (not needed with --resume)")] = None,
    set_: SetOpt = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue this run id from its last checkpoint")] = None,
    output_dir: Annotated[Optional[str], typer.Option(help="Workspace holding the runs (with --resume)")] = None,
    stop_after_steps: Annotated[Optional[int], typer.Option(help="Train this many steps, checkpoint, pause")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output")] = False,
):
    """Train a recipe end to end (or resume a run), recording everything in the ledger."""
    from lmlab.config import load_recipe
    from lmlab.train import resume_run, train

    if resume is not None and recipe is None:
        result = resume_run(resume, output_dir=output_dir, stop_after_steps=stop_after_steps, quiet=quiet)
    elif recipe is None:
        raise LmlabError("lmlab run: give a recipe file, or --resume RUN_ID")
    else:
        r = load_recipe(recipe, set_)
        result = train(r, resume=resume, stop_after_steps=stop_after_steps, quiet=quiet)
    if quiet:
        console.print(f"{result.run_id} {result.status} step {result.step}")
    if result.status == "PAUSED":
        raise typer.Exit(0)


@app.command()
def validate(recipe: Path, set_: SetOpt = None):
    """Check a recipe without running it: every problem is reported at once."""
    from lmlab.config import load_recipe

    r = load_recipe(recipe, set_)
    console.print(f"{recipe}: ok ({r.run.task}, {r.model.pretrained or r.model.arch})")


@app.command()
def runs(
    output_dir: Annotated[str, typer.Option(help="Workspace whose sqlite ledger to read")] = "lmlab-runs",
    uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: $LMLAB_TRACKING_URI or the workspace's sqlite)")] = None,
    name: Annotated[Optional[str], typer.Option(help="Only runs whose name matches this glob, e.g. 'alpaca-*'")] = None,
    limit: Annotated[int, typer.Option(help="Newest N runs")] = 50,
):
    """List runs: name, status, key hyperparameters, best validation loss, duration."""
    from lmlab.runs import list_runs, runs_table

    rows = list_runs(uri=uri, output_dir=output_dir, name=name, limit=limit)
    if not rows:
        console.print("no runs yet")
        return
    console.print(runs_table(rows))


# command groups living in their own modules register themselves on `app` when imported
import lmlab.commands  # noqa: E402,F401


def main() -> None:
    try:
        app()
    except RecipeError as e:
        for line in str(e).splitlines():
            err_console.print(f"[red]error:[/] {line}", soft_wrap=True)
        sys.exit(e.exit_code)
    except LmlabError as e:
        err_console.print(f"[red]error:[/] {e}", soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

"""`lmlab feedback export|summary`: the playground's ratings as a preference data set, and as win rates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.cli.options import OutputDirOpt
from lmlab.console import console
from lmlab.recipe.defaults import DEFAULT_WORKSPACE

feedback_app = typer.Typer(no_args_is_help=True, help="Ratings given in `lmlab playground`: export, summary.")
app.add_typer(feedback_app, name="feedback")

LogOpt = Annotated[Path | None, typer.Option("--log", help="The feedback log (default: <output-dir>/feedback.jsonl)")]


def _log(log: Path | None, output_dir: str) -> Path:
    from lmlab.workspace.feedback import feedback_path

    return log if log is not None else feedback_path(output_dir)


@feedback_app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write (overwritten)")],
    log: LogOpt = None,
    output_dir: OutputDirOpt = DEFAULT_WORKSPACE,
):
    """Write a preference data set: one row per verdict's winner against each other answer, with "prompt",
    "chosen", "rejected" (the pair classifier's and preference training's columns) and the conversation."""
    from lmlab.analysis.feedback import export_preferences

    result = export_preferences(_log(log, output_dir), out)
    console.print(f"wrote {len(result.rows)} preference rows to {out} from {result.verdicts} verdicts; left out: "
                  f"{result.left_out_line()}", markup=False, highlight=False, soft_wrap=True)


@feedback_app.command("summary")
def summary(
    log: LogOpt = None,
    output_dir: OutputDirOpt = DEFAULT_WORKSPACE,
):
    """Win rates per pair of models (ties count half; all-bad verdicts are shown, not rated), then each model's
    thumbs, wins and losses."""
    from rich.table import Table

    from lmlab.analysis.feedback import summarize
    from lmlab.workspace.feedback import read_ratings

    result = summarize(read_ratings(_log(log, output_dir)))
    pairs = Table(title="verdicts per pair", title_justify="left")
    for header in ("A", "B", "verdicts", "A wins", "B wins", "ties", "all bad", "A win rate"):
        pairs.add_column(header, justify="left" if header in ("A", "B") else "right")
    for p in result.pairs:
        rate = f"{p.a_win_rate:.0%}" if p.a_win_rate is not None else "–"
        pairs.add_row(p.a, p.b, str(p.verdicts), str(p.a_wins), str(p.b_wins), str(p.ties), str(p.all_bad), rate)
    models = Table(title="per model", title_justify="left")
    for header in ("model", "up", "down", "wins", "losses"):
        models.add_column(header, justify="left" if header == "model" else "right")
    for m in result.models:
        models.add_row(m.model, str(m.up), str(m.down), str(m.wins), str(m.losses))
    console.print(f"{result.ratings} ratings", highlight=False)
    if result.pairs:
        console.print(pairs)
    else:
        console.print("no verdicts between two models yet", highlight=False)
    console.print(models)

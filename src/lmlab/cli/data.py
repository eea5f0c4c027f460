"""`lmlab data inspect|preview` and `lmlab inspect-predictions`: look at data and predictions without training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from lmlab.cli.app import app
from lmlab.cli.options import SetOpt, StorageOpt, with_storage
from lmlab.console import console, err_console
from lmlab.errors import LmlabError
from lmlab.recipe.defaults import DEFAULT_WORKSPACE

data_app = typer.Typer(no_args_is_help=True, help="Look at a recipe's data as the model will see it, without training.")
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def inspect(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe YAML file(s)")],
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the plots (default <run.output_dir>/inspect/<run.name>)")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Also write one HTML page with every table and plot "
                                              "to this file (several recipes: PATH is a folder, one <run.name>.html "
                                              "each)")] = None,
    top_n: Annotated[int, typer.Option(help="Rows of the token frequency table")] = 30,
):
    """Counts and fingerprints per split, token lengths per field, truncation, unknown tokens, frequent tokens
    and the filter funnel, with PNG plots. Loads the tokenizer only, never the model weights."""
    from lmlab.analysis.inspect_data import Unavailable, inspect_data
    from lmlab.recipe.loading import load_recipe

    failed = 0
    for path in recipes:
        try:
            recipe = load_recipe(path, set_)
            if out is None:
                folder = Path(recipe.run.output_dir) / "inspect" / recipe.run.name
            else:
                folder = out if len(recipes) == 1 else out / recipe.run.name
            page = None if html is None else html / f"{recipe.run.name}.html" if len(recipes) > 1 or html.is_dir() \
                else html
            ins = inspect_data(recipe, top_n=top_n, out_dir=folder, html_path=page)
        except Unavailable as e:
            if len(recipes) == 1:
                raise
            console.print(f"[yellow]{path}: skipped:[/] {e}", soft_wrap=True)
            continue
        except LmlabError as e:
            if len(recipes) == 1:
                raise
            failed += 1
            for line in str(e).splitlines():
                err_console.print(f"[red]error:[/] {path}: {line}", soft_wrap=True)
            continue
        _print_inspection(ins)
    if failed:
        raise typer.Exit(2)


def _print_inspection(ins) -> None:
    from lmlab.analysis.inspect_data import summary_rows

    console.print(f"[bold]{ins.recipe_name}[/]: task {ins.task}, data {ins.source}, tokenizer {ins.tokenizer}")
    for title, (header, rows) in summary_rows(ins).items():
        if title == "splits":  # the full sha256 is in the HTML page and the run's params
            rows = [[split, n, fp[:16]] for split, n, fp in rows]
        if title.startswith("top ") and len(rows) > 15:
            title, rows = f"{title}, first 15 (all in the plot / HTML)", rows[:15]
        table = Table(title=title, title_justify="left", show_lines=False)
        for h in header:
            table.add_column(h, overflow="fold")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))  # token texts may contain [brackets], never markup
        console.print(table)
    for line in ins.filter_lines + ins.notes:
        console.print(f"  {line}", soft_wrap=True, markup=False)
    for name, png in ins.plots.items():
        console.print(f"  plot {name}: {png}", markup=False)
    if ins.html_path:
        console.print(f"  html: {ins.html_path}", markup=False)
    console.print(f"  inspected in {ins.seconds:.1f} s")


@data_app.command("preview")
def preview(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file")],
    n: Annotated[int, typer.Option("-n", help="How many examples")] = 3,
    split: Annotated[str, typer.Option(help="train, val or test")] = "train",
    plain: Annotated[bool, typer.Option("--plain", help="Plain text: [masked]…[/masked][loss]…[/loss], [EOS], [PAD×k] (the default when not on a terminal)")] = False,
    set_: SetOpt = None,
):
    """Print training examples as the model gets them, with the loss mask visible: masked tokens dim,
    loss-bearing tokens highlighted, EOS and padding marked."""
    from lmlab.analysis.inspect_data import example_header, render_plain, render_rich
    from lmlab.analysis.inspect_data import preview as build_preview
    from lmlab.recipe.loading import load_recipe

    if n < 1:
        raise LmlabError("-n: must be at least 1")
    p = build_preview(load_recipe(recipe, set_), n=n, split=split)
    plain = plain or not console.is_terminal  # piped output has no styles: the mask would be invisible
    console.print(f"{p.recipe_name}: template {p.template}; EOS {p.eos}; padding: {p.pad}", markup=False, soft_wrap=True)
    if not plain:
        legend = ("legend: [dim]masked (no loss)[/] [bold green on grey19]loss[/][bold bright_green on grey30]-bearing[/] "
                  "(shades alternate per token) [bold white on magenta]⟨EOS⟩[/] target [magenta]⟨EOS⟩[/] masked "
                  "[dim red]⟨PAD×k⟩[/]")
        console.print(legend)
    for line in p.notes:
        console.print(f"  {line}", markup=False, soft_wrap=True)
    for i, ex in enumerate(p.examples, 1):
        console.print(example_header(i, ex, p.task), markup=False, soft_wrap=True)
        if plain:
            console.print(render_plain(ex), markup=False, highlight=False, soft_wrap=True)
        else:
            console.print(render_rich(ex), soft_wrap=True)


@app.command("inspect-predictions")
@with_storage
def inspect_predictions(
    run: Annotated[str, typer.Argument(help="Run id (or unique prefix), or a checkpoint folder")],
    text: Annotated[str, typer.Option("--text", help="The text whose next-token predictions to show")],
    top_k: Annotated[int, typer.Option(help="Candidates per position")] = 10,
    position: Annotated[int | None, typer.Option(help="Only this token position (0-based; -1 = last)")] = None,
    last: Annotated[bool, typer.Option("--last", help="The run's last checkpoint instead of its best")] = False,
    template: Annotated[bool, typer.Option("--template", help="Render the text as a prompt of the run's SFT template")] = False,
    output_dir: Annotated[str, typer.Option(help="Workspace holding the runs and the ledger")] = DEFAULT_WORKSPACE,
    out: Annotated[Path | None, typer.Option(help="Bar chart PNG (default <output_dir>/inspect/predictions-<run>.png)")] = None,
    storage: StorageOpt = None,
):
    """Top-k next-token probabilities at each position of a text (or one), and a bar chart PNG."""
    from lmlab.analysis.inspect_predictions import inspect_predictions as run_inspection
    from lmlab.analysis.inspect_predictions import predictions_table

    if top_k < 1:
        raise LmlabError("--top-k: must be at least 1")
    result = run_inspection(run, text, top_k=top_k, position=position, last=last, use_template=template,
                            output_dir=output_dir, chart=out)
    console.print(f"checkpoint {result.checkpoint}", markup=False, soft_wrap=True)
    console.print(predictions_table(result))
    console.print(f"chart: {result.chart}", markup=False, soft_wrap=True)

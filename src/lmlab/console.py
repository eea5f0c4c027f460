"""All terminal output goes through here: one rich console, the output layer every listing command shares
(`--format table|csv|json`), and the Reporter the training loop talks to.

The library returns objects; only the Reporter (enabled on rank 0 unless quiet) and the CLI print.
Piped output (stdout not a terminal) never wraps: no line is split at 80 columns, so a path or a run id can be
copied from a log and `lmlab runs | grep FINISHED` sees one line per run; rich leaves out colour codes there.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleDimensions
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.rule import Rule

PIPE_WIDTH = 100_000  # "no wrapping": wider than any line lmlab prints
RULE_WIDTH = 80  # a horizontal rule in piped output (a full-width one would be PIPE_WIDTH dashes)
FORMATS = ("table", "csv", "json")


class PipeAwareConsole(Console):
    """A rich Console that, when its file is not a terminal, is as wide as any line (nothing wraps) and draws
    rules at a fixed width. Decided at each print, so test runners that swap stdout get the piped behaviour."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return size if self.is_terminal else ConsoleDimensions(PIPE_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)

    def rule(self, title: str = "", *, characters: str = "─", style: str = "rule.line", align: str = "center"):
        rule = Rule(title, characters=characters, style=style, align=align)  # type: ignore[arg-type]
        self.print(rule, width=None if self.is_terminal else RULE_WIDTH)


console = PipeAwareConsole(highlight=False)
err_console = PipeAwareConsole(stderr=True, highlight=False)


def human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}T"


def duration(seconds: float) -> str:
    """45s, 12m34s, 3h05m."""
    s = int(round(seconds))
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# ------------------------------------------------------------------------------------ the output layer
@dataclass
class Column:
    """One column of a listing: `key` names it in CSV and JSON, `header` in the table; `values` has one raw
    value (str, number or None) per row, `fmt` turns one into a table cell."""

    key: str
    header: str
    values: list[Any]
    kind: str = "info"  # info, param: left-aligned; metric: right-aligned
    fmt: Callable[[Any], str] = str
    style: Callable[[Any], str] | None = None  # terminal only: a rich style for a value (e.g. a status colour)

    def cell(self, i: int) -> str:
        v = self.values[i]
        return "" if v is None else self.fmt(v)

    @property
    def right(self) -> bool:
        return self.kind == "metric"


@dataclass
class Grid:
    """A listing (runs, a comparison, a plan's parts) in every form a command prints it: a rich table on a
    terminal, plain aligned columns in a pipe, CSV (full keys, raw values), Markdown, HTML, JSON records."""

    columns: list[Column]
    caption: str = ""  # what the columns mean; under the terminal table (help text says the same)

    @property
    def n_rows(self) -> int:
        return len(self.columns[0].values) if self.columns else 0

    def cells(self) -> list[list[str]]:
        return [[c.cell(i) for c in self.columns] for i in range(self.n_rows)]

    def records(self) -> list[dict[str, Any]]:
        return [{c.key: c.values[i] for c in self.columns} for i in range(self.n_rows)]

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([c.key for c in self.columns])
        for i in range(self.n_rows):
            w.writerow(["" if c.values[i] is None else c.values[i] for c in self.columns])
        return buf.getvalue()

    def plain(self) -> str:
        """Aligned columns two spaces apart, one line per row, no borders or colour (for pipes and logs)."""
        rows = [[c.header for c in self.columns]] + [[cell.replace("\n", " ") for cell in row] for row in self.cells()]
        widths = [max(cell_len(row[j]) for row in rows) for j in range(len(self.columns))]
        lines = []
        for row in rows:
            cells = [(" " * (w - cell_len(v)) + v) if c.right else (v + " " * (w - cell_len(v)))
                     for c, v, w in zip(self.columns, row, widths, strict=True)]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines) + "\n"

    def markdown(self) -> str:
        lines = ["| " + " | ".join(c.header for c in self.columns) + " |",
                 "|" + "|".join("---:" if c.right else "---" for c in self.columns) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.cells()]
        return "\n".join(lines) + "\n"

    def rich(self):
        from rich.table import Table
        from rich.text import Text

        table = Table(show_lines=False, caption=self.caption or None, caption_justify="left")
        for c in self.columns:
            table.add_column(c.header, justify="right" if c.right else "left", overflow="fold")
        for i in range(self.n_rows):
            table.add_row(*(Text(c.cell(i), style=(c.style(c.values[i]) if c.style else "") or "")
                            for c in self.columns))
        return table

    def html(self, table_class: str = "") -> str:
        from html import escape

        head = "".join(f"<th>{escape(c.header)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f'<td class="{c.kind}">{escape(v)}</td>'
                                        for c, v in zip(self.columns, row, strict=True)) + "</tr>"
                       for row in self.cells())
        cls = f' class="{table_class}"' if table_class else ""
        return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def check_format(fmt: str, allowed: tuple[str, ...] = FORMATS) -> str:
    from lmlab.errors import LmlabError

    if fmt not in allowed:
        raise LmlabError(f"--format: '{fmt}' is not one of {', '.join(allowed)}")
    return fmt


def emit(fmt: str = "table", *, grid: Grid | None = None, text: str | None = None, data: Any = None,
         out: Console | None = None) -> None:
    """Print a command's result in `fmt`. table: `text` if given, else the grid (rich on a terminal, plain
    columns in a pipe); csv: the grid; json: `data` if given, else the grid's records; markdown: the grid."""
    out = out or console
    fmt = getattr(fmt, "value", fmt)  # the CLI passes its OutputFormat enum
    if fmt == "json":
        payload = data if data is not None else (grid.records() if grid is not None else None)
        out.out(json.dumps(payload, indent=2, ensure_ascii=False, default=str), highlight=False)
    elif fmt == "csv":
        assert grid is not None, "csv needs a grid"
        out.out(grid.csv(), end="", highlight=False)
    elif fmt == "markdown":
        assert grid is not None, "markdown needs a grid"
        out.out(grid.markdown(), end="", highlight=False)
    elif text is not None:
        out.out(text if text.endswith("\n") else text + "\n", end="", highlight=False)
    elif grid is not None:
        if out.is_terminal:
            out.print(grid.rich())
        else:
            out.out(grid.plain(), end="", highlight=False)
    else:
        raise ValueError("emit: nothing to print")


class Reporter:
    """Start-of-run summary, a progress bar with loss / lr / tokens/s / ETA, eval lines, the final summary."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task = None
        self._tps = 0.0

    def start(self, recipe, run_id: str, run_dir, derived: dict[str, Any]) -> None:
        if not self.enabled:
            return
        d = derived
        console.print(f"[bold]lmlab[/] run [cyan]{recipe.run.name}[/] id [cyan]{run_id}[/] → {run_dir}")
        pct = 100 * d["derived.params_trainable"] / max(1, d["derived.params_total"])
        console.print(f"  parameters {human(d['derived.params_total'])} ({d['derived.params_total']:,}), "
                      f"trainable {human(d['derived.params_trainable'])} ({pct:.2f}%)")
        per_step = f"{d['derived.items_per_step']} sequences"
        if "derived.tokens_per_step" in d:
            per_step += f" = {d['derived.tokens_per_step']:,} tokens"
        t = recipe.train
        console.print(f"  per optimizer step: {per_step} (micro-batch {t.batch_size} × accumulation {t.grad_accum}"
                      f" × {d['derived.world_size']} process(es))")
        console.print(f"  steps {d['derived.total_steps']} ({d['derived.steps_per_epoch']}/epoch), warmup "
                      f"{d['derived.warmup_steps']}, {t.optimizer} lr {t.lr:g} → {t.schedule} min_lr {t.min_lr:g}, "
                      f"{t.precision} on {d['derived.device']}")

    def progress(self, total: int, completed: int) -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold blue]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} {task.fields[tps]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=completed, loss=float("nan"),
                                             lr=0.0, tps="")

    def advance(self, step: int, loss: float, lr: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=loss, lr=lr)

    def throughput(self, tokens_per_s: float, loss_tokens_per_s: float) -> None:
        """The last logging window's rate over training steps (evaluation and checkpoints excluded): all tokens
        processed, and those that carry loss where fewer (SFT masks prompts)."""
        if self._progress is not None:
            text = f"{tokens_per_s:,.0f} tok/s"
            if loss_tokens_per_s < 0.995 * tokens_per_s:
                text += f" ({loss_tokens_per_s:,.0f} with loss)"
            self._progress.update(self._task, tps=text + " now")

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                          if not k.endswith("/tokens") and not (k.endswith("/coverage") and v == 1.0))
        (self._progress.console if self._progress else console).print(f"  step {step}: {shown}")

    def alert(self, text: str) -> None:
        if self.enabled:
            (self._progress.console if self._progress else console).print(f"  [yellow]alert:[/] {text}")

    def note(self, text: str) -> None:
        if self.enabled:
            console.print(f"  {text}")

    @contextmanager
    def uploading(self, where: str) -> Iterator[Callable[[int, int], None]]:
        """A bytes progress bar for the uploads a run waits for at its end; yields update(done, total). Shown only
        when something is left to upload."""
        bar: list[Any] = []

        def update(done: int, total: int) -> None:
            if not self.enabled or (not bar and done >= total):
                return
            if not bar:
                p = Progress(TextColumn(f"[bold blue]upload[/] {where}"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)
                p.start()
                bar.extend([p, p.add_task("upload", total=total)])
            bar[0].update(bar[1], completed=done, total=max(total, done))

        try:
            yield update
        finally:
            if bar:
                bar[0].stop()

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def finish(self, result) -> None:
        if not self.enabled:
            return
        m = result.metrics
        console.print(f"[bold green]done[/] run {result.run_id} in {result.step} steps")
        lm = "val/ppl" in m  # token losses; classifiers report accuracy and log loss per example
        for split in ("val", "test"):
            for name in ("loss", "loss_per_char", "ppl", "accuracy", "log_loss", "baseline_majority_accuracy",
                         "baseline_longer_accuracy"):
                key = f"{split}/{name}"
                if key in m and not (name == "loss" and not lm):
                    unit = {"loss": " nats/token", "loss_per_char": " nats/char"}.get(name, "")
                    console.print(f"  {key} {m[key]:.4f}{unit}")
        if "train/mean_tokens_per_s" in m:
            line = f"  throughput {m['train/mean_tokens_per_s']:,.0f} tok/s over training steps"
            if m.get("train/mean_loss_tokens_per_s", 0) < 0.995 * m["train/mean_tokens_per_s"]:
                line += f" ({m['train/mean_loss_tokens_per_s']:,.0f} with loss)"
            if "train/wall_tokens_per_s" in m:
                line += f"; {m['train/wall_tokens_per_s']:,.0f} tok/s wall-clock incl. evaluation and checkpoints"
            console.print(line, markup=False)
        if result.best_checkpoint:
            console.print(f"  best checkpoint {result.best_checkpoint}", markup=False)

"""All terminal output goes through here: one rich console, and the Reporter the training loop talks to.

The library returns objects; only the Reporter (enabled on rank 0 unless quiet) and the CLI print.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}T"


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

    def throughput(self, tokens_per_s: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, tps=f"{tokens_per_s:,.0f} tok/s")

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("/tokens"))
        (self._progress.console if self._progress else console).print(f"  step {step}: {shown}")

    def alert(self, text: str) -> None:
        if self.enabled:
            (self._progress.console if self._progress else console).print(f"  [yellow]alert:[/] {text}")

    def note(self, text: str) -> None:
        if self.enabled:
            console.print(f"  {text}")

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
        if result.best_checkpoint:
            console.print(f"  best checkpoint {result.best_checkpoint}")

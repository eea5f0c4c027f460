"""In-run alerts: loss spikes, overfitting, non-finite loss, a run that is mostly warmup; optional early stopping.

The training loop owns one `Alerts` and calls it with what it already has: every step's loss
(`on_train`), every evaluation's metrics (`on_eval`). Each call returns the alerts it raised (the loop prints
and logs them) and `should_stop` says when to end the run. The same detectors run after the fact over a
run's logged history (`find_spikes`, `find_overfitting`), so `lmlab report` marks what the run would have.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise

from lmlab.recipe.alerts import AlertsConfig


@dataclass(frozen=True)
class Alert:
    kind: str  # spike, overfitting, nonfinite, warmup, early_stop, storage
    step: int  # optimizer step it was raised at (0 = before training)
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ detectors
class SpikeDetector:
    """Loss above median + k·MAD of the last `window` losses; one alert per spike, not per step of it."""

    def __init__(self, window: int, k: float):
        self.k = k
        self.losses: deque[float] = deque(maxlen=window)
        self.min_history = max(5, window // 2)  # a median of a handful of early steps is no baseline
        self.in_spike = False

    def update(self, loss: float) -> tuple[float, float, int] | None:
        """Feed one loss; returns (rolling median, threshold, losses in the window) when a spike starts."""
        started = None
        if len(self.losses) >= self.min_history:
            med = statistics.median(self.losses)
            mad = statistics.median(abs(v - med) for v in self.losses)
            # a perfectly flat window would make any wiggle a spike: floor the MAD at 0.1% of the loss
            threshold = med + self.k * max(mad, 1e-3 * abs(med), 1e-8)
            spiking = loss > threshold
            if spiking and not self.in_spike:
                started = (med, threshold, len(self.losses))
            self.in_spike = spiking
        # spikes join the window: a lasting level shift stops alerting once it is the new median
        self.losses.append(loss)
        return started


class OverfitDetector:
    """Val loss rising for `patience` evals in a row while the mean train loss between evals fell."""

    def __init__(self, patience: int):
        self.patience = patience
        self.evals: list[tuple[int, float, float | None]] = []  # (step, val loss, mean train loss since last eval)
        self.active = False

    def update(self, step: int, val_loss: float, train_loss: float | None) -> int | None:
        """Feed one eval; returns the step where the rise began when an overfitting episode starts."""
        self.evals.append((step, val_loss, train_loss))
        flagged = self.flagged()
        started = self.evals[-self.patience - 1][0] if flagged and not self.active else None
        self.active = flagged
        return started

    def flagged(self) -> bool:
        if len(self.evals) < self.patience + 1:
            return False
        recent = self.evals[-self.patience - 1:]
        rising = all(b[1] > a[1] for a, b in pairwise(recent))
        first, last = recent[0][2], recent[-1][2]
        falling = first is not None and last is not None and last < first
        return rising and falling


# ------------------------------------------------------------------------------------------ the loop's view
class Alerts:
    """What the training loop talks to. `history` holds every alert raised, for `alerts.json`."""

    def __init__(self, cfg: AlertsConfig, total_steps: int, warmup_steps: int, *,
                 val_metric: str = "val/loss", best_metric: str = "val/loss", best_mode: str = "min"):
        self.cfg, self.total_steps, self.warmup_steps = cfg, total_steps, warmup_steps
        self.val_metric, self.best_metric, self.best_mode = val_metric, best_metric, best_mode
        self.spikes = SpikeDetector(cfg.spike_window, cfg.spike_mad_k) if cfg.spike_mad_k else None
        self.overfit = OverfitDetector(cfg.overfit_patience) if cfg.overfit_patience else None
        self.history: list[Alert] = []
        self.should_stop = False
        self._train_sum, self._train_n = 0.0, 0  # train losses since the last eval
        self._best: float | None = None
        self._best_step = 0
        self._evals_since_best = 0

    def _raise(self, kind: str, step: int, message: str) -> list[Alert]:
        alert = Alert(kind, step, message)
        self.history.append(alert)
        return [alert]

    def on_start(self) -> list[Alert]:
        """Before the first step: a run that is mostly warmup never trains at its peak learning rate."""
        w, n = self.warmup_steps, self.total_steps
        if n > 0 and w / n > self.cfg.warmup_warn_fraction:
            return self._raise("warmup", 0, f"warmup is {w} of {n} steps ({100 * w / n:.0f}%): the run spends "
                               "most of its steps below the peak lr; shorten train.warmup_steps or train longer")
        return []

    def on_train(self, step: int, loss: float) -> list[Alert]:
        """After every optimizer step, with that step's mean train loss."""
        if not math.isfinite(loss):
            self.should_stop = True
            return self._raise("nonfinite", step, f"loss became {loss} at step {step}; stopping "
                               "(status FAILED, last good checkpoint kept)")
        self._train_sum += loss
        self._train_n += 1
        if self.spikes is not None:
            hit = self.spikes.update(loss)
            if hit is not None:
                median, threshold, n = hit
                return self._raise("spike", step, f"loss spike at step {step}: {loss:.4f} vs rolling median "
                                   f"{median:.4f} (threshold {threshold:.4f} = median + "
                                   f"{self.cfg.spike_mad_k:g}·MAD over the last {n} steps)")
        return []

    def on_eval(self, step: int, metrics: dict[str, float]) -> list[Alert]:
        """After every evaluation, with its metrics ('val/loss', ...)."""
        out: list[Alert] = []
        train_mean = self._train_sum / self._train_n if self._train_n else None
        self._train_sum, self._train_n = 0.0, 0
        val = metrics.get(self.val_metric)
        if self.overfit is not None and val is not None:
            began = self.overfit.update(step, val, train_mean)
            if began is not None:
                k = self.overfit.patience
                out += self._raise("overfitting", step, f"overfitting: {self.val_metric} rose for {k} evals in a "
                                   f"row (steps {began}–{step}, now {val:.4f}) while train loss fell; consider "
                                   "early stopping, more data, dropout or weight decay")
        out += self._early_stop(step, metrics.get(self.best_metric))
        return out

    def _early_stop(self, step: int, value: float | None) -> list[Alert]:
        patience = self.cfg.early_stop_patience
        if patience is None or value is None:
            return []
        delta = self.cfg.early_stop_min_delta
        better = self._best is None or (value < self._best - delta if self.best_mode == "min"
                                        else value > self._best + delta)
        if better:
            self._best, self._best_step, self._evals_since_best = value, step, 0
            return []
        self._evals_since_best += 1
        if self._evals_since_best < patience:
            return []
        self.should_stop = True
        return self._raise("early_stop", step, f"early stopping at step {step}: {self.best_metric} has not "
                           f"improved for {patience} eval{'s' if patience > 1 else ''} (best {self._best:.4f} at step "
                           f"{self._best_step})")

    def storage_behind(self, step: int, message: str) -> Alert:
        """The run's storage fell behind: an upload failed every try (training goes on; lmlab.workspace.mirror)."""
        return self._raise("storage", step, message)[0]

    def counts(self) -> dict[str, int]:
        """{'alerts/spike': 2, ...}: the per-kind totals the loop logs as metrics."""
        out: dict[str, int] = {}
        for a in self.history:
            out[f"alerts/{a.kind}"] = out.get(f"alerts/{a.kind}", 0) + 1
        return out

    def to_dict(self) -> dict:
        """Content of the run's `alerts.json` artifact."""
        return {"alerts": [a.to_dict() for a in self.history], "config": self.cfg.model_dump(mode="json")}


# ------------------------------------------------------------------------------------------ after the fact
DEFAULTS = AlertsConfig()  # the thresholds' one source: the recipe schema
def find_spikes(points: Sequence[tuple[int, float]], window: int | None = None,
                k: float | None = None) -> list[tuple[int, float]]:
    """(step, loss) points where a spike starts, by the same rule the loop uses on its logged losses (defaults:
    the recipe's alerts section)."""
    detector = SpikeDetector(window or DEFAULTS.spike_window, k or DEFAULTS.spike_mad_k or 6.0)
    return [(s, v) for s, v in points if math.isfinite(v) and detector.update(v) is not None]


def find_overfitting(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]],
                     patience: int | None = None) -> list[tuple[int, int]]:
    """(first step, last step) spans where val loss rose for `patience` evals while train loss fell.

    Train loss per eval is the mean of the logged train losses since the previous eval (as in the loop)."""
    detector = OverfitDetector(patience or DEFAULTS.overfit_patience or 3)
    spans: list[tuple[int, int]] = []
    prev = -1
    for step, value in val:
        between = [v for s, v in train if prev < s <= step and math.isfinite(v)]
        prev = step
        began = detector.update(step, value, sum(between) / len(between) if between else None)
        if began is not None:
            spans.append((began, step))
        elif detector.active and spans:
            spans[-1] = (spans[-1][0], step)
    return spans

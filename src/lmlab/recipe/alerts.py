"""The recipe's `alerts:` section: the one source of the in-run alert thresholds (lmlab.training.alerts reads them,
and `lmlab report` uses the same defaults for a run's history)."""

from __future__ import annotations

from pydantic import Field

from lmlab.recipe.section import Section


class AlertsConfig(Section):
    spike_mad_k: float | None = Field(
        6.0, gt=0, description="Alert when a step's train loss is above the rolling median by this many MADs "
        "(median absolute deviations); null = off"
    )
    spike_window: int = Field(50, ge=5, description="Steps in the rolling window of train losses for spikes")
    overfit_patience: int | None = Field(
        3, ge=1, description="Alert when val loss rose for this many evals in a row while train loss fell; null = off"
    )
    early_stop_patience: int | None = Field(
        None, ge=1, description="Stop when eval.best_metric has not improved for this many evals; null = never"
    )
    early_stop_min_delta: float = Field(0.0, ge=0, description="Smallest change of eval.best_metric that counts "
                                        "as an improvement for early stopping")
    warmup_warn_fraction: float = Field(0.5, gt=0, le=1, description="Alert at the start when warmup takes more "
                                        "than this fraction of the run")

"""Sweeps in the ledger: the tags `lmlab sweep` writes on its parent run and its trials' child runs, and the query
that reads them back (for `lmlab runs --sweep`, `compare --sweep`, `report --sweep`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmlab.errors import LmlabError
from lmlab.workspace.runs import RunRow, list_runs

TAG_SWEEP = "lmlab.sweep"  # on the parent and every child: the sweep's name
TAG_ROLE = "lmlab.sweep.role"  # parent | trial
TAG_TRIAL = "lmlab.sweep.trial"  # the trial's number (an interrupted trial keeps its number when it resumes)
TAG_PARAMS = "lmlab.sweep.params"  # JSON of the trial's values, derived ones included
TAG_PRUNED = "lmlab.sweep.pruned"  # set when the pruner stopped the trial (the reason is lmlab.failure_reason)
TAG_SUPERSEDED = "lmlab.sweep.superseded"  # a child interrupted before its first checkpoint, started again
TAG_METRIC = "lmlab.sweep.metric"  # on the parent: what the sweep optimizes, and which way
TAG_DIRECTION = "lmlab.sweep.direction"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: its UI nests the children under the parent


@dataclass
class SweepRuns:
    name: str
    parent: RunRow | None
    trials: list[RunRow] = field(default_factory=list)  # one per trial (superseded attempts left out)

    @property
    def metric(self) -> str:
        return (self.parent.tags.get(TAG_METRIC) if self.parent else None) or "val/loss"

    @property
    def minimize(self) -> bool:
        return (self.parent.tags.get(TAG_DIRECTION) if self.parent else "minimize") != "maximize"


def sweep_runs(name: str, uri: str) -> SweepRuns:
    """The sweep's parent run and its trials' runs, or a clear error naming the sweeps the ledger has."""
    rows = [r for r in list_runs(uri=uri, limit=1_000_000) if TAG_SWEEP in r.tags]
    parents = [r for r in rows if r.tags[TAG_SWEEP] == name and r.tags.get(TAG_ROLE) == "parent"]
    trials = [r for r in rows if r.tags[TAG_SWEEP] == name and r.tags.get(TAG_ROLE) == "trial"
              and TAG_SUPERSEDED not in r.tags]
    if not parents and not trials:
        known = sorted({r.tags[TAG_SWEEP] for r in rows})
        hint = f"sweeps here: {', '.join(known)}" if known else "start one with `lmlab sweep RECIPE`"
        raise LmlabError(f"--sweep: no sweep '{name}' in the ledger {uri}; {hint}")
    parent = max(parents, key=lambda r: r.start_time) if parents else None
    if parent is not None:  # several machines with one tracking server may each have made one: keep theirs too
        trials = [r for r in trials if r.tags.get(PARENT_TAG) in {p.run_id for p in parents} or PARENT_TAG not in r.tags]
    return SweepRuns(name, parent, sorted(trials, key=lambda r: int(r.tags.get(TAG_TRIAL, "0") or 0)))

"""Run lineage: the chain of runs linked by `model.init_from` (multi-part training, continued fine-tuning).

A child run records its parent in the ledger as the tags `lmlab.parent_run` (the parent's run id, empty when
it started from a bare checkpoint folder) and `lmlab.parent_checkpoint`. `lineage` walks those tags up to the
root and down to every descendant; `lmlab runs --lineage RUN` prints the result as a tree.
"""

from __future__ import annotations

from rich.table import Table

from lmlab.errors import LmlabError
from lmlab.recipe.defaults import DEFAULT_WORKSPACE
from lmlab.workspace.runs import RunRow, list_runs

PARENT_TAG = "lmlab.parent_run"
PARENT_CHECKPOINT_TAG = "lmlab.parent_checkpoint"


def lineage(run_id: str, uri: str | None = None, *, output_dir: str = DEFAULT_WORKSPACE) -> list[RunRow]:
    """The runs of `run_id`'s chain: its ancestors from the root down, the run itself, then its descendants
    depth-first (siblings oldest first). `run_id` may be a unique prefix."""
    rows = list_runs(uri=uri, output_dir=output_dir, limit=10**9)
    by_id = {r.run_id: r for r in rows}
    focus = by_id.get(run_id)
    if focus is None:
        matches = [r for r in rows if r.run_id.startswith(run_id)]
        if not matches:
            raise LmlabError(f"--lineage: no run '{run_id}' in the ledger; list runs with `lmlab runs`")
        if len(matches) > 1:
            raise LmlabError(f"--lineage: run id prefix '{run_id}' is ambiguous ({len(matches)} runs); "
                             "give more characters")
        focus = matches[0]
    ancestors: list[RunRow] = []
    seen = {focus.run_id}
    node = focus
    while (parent := by_id.get(node.tags.get(PARENT_TAG, ""))) is not None and parent.run_id not in seen:
        ancestors.append(parent)
        seen.add(parent.run_id)
        node = parent
    children: dict[str, list[RunRow]] = {}
    for r in sorted(rows, key=lambda r: r.start_time):
        children.setdefault(r.tags.get(PARENT_TAG, ""), []).append(r)
    descendants: list[RunRow] = []

    def walk(run: RunRow) -> None:
        for child in children.get(run.run_id, []):
            if child.run_id not in seen:
                seen.add(child.run_id)
                descendants.append(child)
                walk(child)

    walk(focus)
    return [*reversed(ancestors), focus, *descendants]


def depths(rows: list[RunRow]) -> list[int]:
    """Tree depth of each row of a `lineage` result (0 = the root)."""
    depth: dict[str, int] = {}
    out = []
    for r in rows:
        d = depth.get(r.tags.get(PARENT_TAG, ""), -1) + 1
        depth[r.run_id] = d
        out.append(d)
    return out


def lineage_table(rows: list[RunRow], focus: str | None = None) -> Table:
    """The chain as a tree: which part each run trained on, which checkpoint it started from, its data and
    result. `focus` (a run id or prefix) is marked."""
    table = Table(title="lineage (parent → child via model.init_from)", title_justify="left")
    for col in ("run", "name", "status", "part", "started from", "train data", "steps", "best val loss"):
        table.add_column(col, overflow="fold")
    for r, d in zip(rows, depths(rows), strict=True):
        p, m = r.params, r.metrics
        mark = "▶ " if focus and r.run_id.startswith(focus) else ""
        tree = ("  " * (d - 1) + "└─ ") if d else ""
        parts = p.get("data.parts", "1")
        part = f"{p.get('data.part', '0')}/{parts}" if parts not in ("1", "") else "all"
        parent_ckpt = r.tags.get(PARENT_CHECKPOINT_TAG, "")
        started = "/".join(parent_ckpt.rstrip("/").split("/")[-1:]) if parent_ckpt else "scratch / pretrained"
        if r.tags.get(PARENT_TAG):
            started = f"{r.tags[PARENT_TAG][:8]} {started}"
        if p.get("model.init_optimizer") == "True":
            started += " + optimizer"
        best = m.get("final/best/val/loss", m.get("final/val/loss"))
        table.add_row(f"{mark}{tree}{r.run_id[:8]}", r.name, r.status, part, started,
                      p.get("data.fingerprint.train", "")[:12], p.get("derived.total_steps", ""),
                      f"{best:.4f}" if best is not None else "")
    return table

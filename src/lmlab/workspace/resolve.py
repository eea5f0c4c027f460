"""The one resolver of run and checkpoint references. Every command that takes a run (generate, serve, export,
eval, inspect-predictions, --resume) and `model.init_from` goes through `resolve`:

    a checkpoint folder              .../runs/<id>/checkpoints/step-0000120
    a run folder                     .../runs/<id>            → its best (or last) checkpoint
    a run id, or a unique prefix     3f2a9c1e                 → looked up in the workspace, then the ledger
    run:<id>[:best|:last]            run:3f2a9c1e:last        (model.init_from's spelling)

A run that is neither in the workspace nor in its ledger is pulled from storage (`storage`, else $LMLAB_STORAGE)
when one is set: the checkpoint asked for, verified after the download, and the run's ledger record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmlab.errors import LmlabError
from lmlab.recipe.defaults import DEFAULT_WORKSPACE
from lmlab.workspace import layout
from lmlab.workspace.ledger import find_run
from lmlab.workspace.manifest import checkpoint_problem, has_manifest
from lmlab.workspace.storage import pull, storage_url

Which = Literal["best", "last"]


@dataclass
class Resolved:
    checkpoint: Path  # the chosen checkpoint folder
    run_id: str | None  # None for a bare checkpoint folder from elsewhere
    run_dir: Path | None  # the run's folder, when the checkpoint lives in one
    ledger_uri: str | None  # the ledger holding run_id, when known
    notes: list[str] = field(default_factory=list)  # checkpoints skipped (and why), unverifiable ones used

    @property
    def workspace(self) -> Path | None:
        return self.run_dir.parent.parent if self.run_dir is not None else layout.workspace_of(self.checkpoint)


def parse_run_spec(ref: str) -> tuple[str, Which | None]:
    """'run:<id>[:best|:last]' → (id, which); anything else → (ref, None)."""
    if not ref.startswith("run:"):
        return ref, None
    run_id, _, which = ref[4:].partition(":")
    if which not in ("", "best", "last"):
        raise LmlabError(f"{ref}: expected run:<id>, run:<id>:best or run:<id>:last")
    return run_id, (which or "best")  # type: ignore[return-value]


def resolve(ref: str | Path, *, output_dir: str | Path | None = None, uri: str | None = None, which: Which = "best",
            base: Path | None = None, field: str = "run", storage: str | None = None) -> Resolved:
    """A run or checkpoint reference → the checkpoint to load (the run's best by eval.best_metric, or its last),
    with the run's id, folder and ledger. `base`: the folder relative paths are read from (a recipe's folder);
    `field`: what error messages name ('model.init_from', '--resume', ...); `storage`: where to pull a run from that
    is not here (default $LMLAB_STORAGE)."""
    output_dir = Path(output_dir if output_dir is not None else DEFAULT_WORKSPACE)
    text, spec_which = parse_run_spec(str(ref))
    which = spec_which or which
    if spec_which is None:
        path = Path(text) if Path(text).is_absolute() or base is None else base / text
        if path.is_dir():
            return _resolve_folder(path.resolve(), which, field)
        if base is not None and Path(text).is_dir():
            return _resolve_folder(Path(text).resolve(), which, field)
    try:
        run_id, run_dir, ledger = _find_run_dir(text, output_dir, uri, field)
    except LmlabError as missing:
        url = storage_url(storage)
        if url is None:
            raise
        try:
            pulled = pull(url, text, output_dir=output_dir, uri=uri, which=which)
        except LmlabError as e:
            raise LmlabError(f"{missing} (and from storage: {e})") from None
        return Resolved(pulled.checkpoint, pulled.run_id, pulled.run_dir, pulled.ledger_uri,
                        [f"pulled from storage: {', '.join(pulled.downloaded) or 'nothing new'}", *pulled.notes])
    notes: list[str] = []
    return Resolved(_pick(run_dir, which, run_id, field, notes), run_id, run_dir, ledger, notes)


def resolve_run_dir(ref: str | Path, *, output_dir: str | Path | None = None, uri: str | None = None,
                    field: str = "--resume") -> tuple[str, Path, str | None]:
    """(run id, run folder, ledger) of a run reference: a run id, prefix or run folder; no checkpoint needed."""
    path = Path(ref)
    if path.is_dir() and (path / layout.CHECKPOINTS).is_dir():
        return path.name, path.resolve(), layout.ledger_near(path / layout.CHECKPOINTS / "x")
    text, _ = parse_run_spec(str(ref))
    return _find_run_dir(text, Path(output_dir if output_dir is not None else DEFAULT_WORKSPACE), uri, field)


def latest_checkpoint(run_dir: Path, field: str = "--resume", notes: list[str] | None = None) -> Path:
    """The run's newest checkpoint that verifies (what a resume continues from); skipped ones go to `notes`."""
    return _pick(run_dir, "last", run_dir.name, field, notes if notes is not None else [], for_resume=True)


def checkpoint_unusable(path: Path, *, for_resume: bool = False) -> str | None:
    """Why a checkpoint folder cannot be used — its manifest does not verify, it has no model config, its
    meta.json is not JSON (or, to resume from, is missing, as is its optimizer state) — or None. A folder without
    a manifest (written before manifests existed, or by hand) is usable, but unverified."""
    problem = checkpoint_problem(path)
    if problem is not None:
        return problem
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        return "config.json / adapter_config.json missing"
    if (path / "meta.json").exists() or for_resume:
        try:
            meta = layout.read_meta(path)
        except FileNotFoundError:
            return "meta.json missing"
        except (OSError, ValueError):
            return "meta.json is not readable JSON"
        if not isinstance(meta, dict):
            return "meta.json is not a JSON object"
    if for_resume and not any((path / f).is_file() for f in ("trainer_state.json", "trainer_state.pt")):
        return "optimizer state missing (trainer_state.*; checkpoint.save_optimizer false?)"
    return None


def _resolve_folder(path: Path, which: Which, field: str) -> Resolved:
    if layout.is_checkpoint(path) or (path / "manifest.json").is_file():
        problem = checkpoint_unusable(path)
        if problem is not None:
            raise LmlabError(f"{field}: checkpoint {path} does not verify: {problem}; give another checkpoint or the "
                             "run (its newest checkpoint that verifies is used)")
        meta = layout.read_json(path / "meta.json")
        run_dir = path.parent.parent if path.parent.name == layout.CHECKPOINTS else None
        notes = [] if has_manifest(path) or not (path / "meta.json").is_file() else [_unverified(path)]
        return Resolved(path, meta.get("run_id"), run_dir, layout.ledger_near(path), notes)
    if (path / layout.CHECKPOINTS).is_dir():
        notes: list[str] = []
        checkpoint = _pick(path, which, path.name, field, notes)
        return Resolved(checkpoint, path.name, path, layout.ledger_near(checkpoint), notes)
    raise LmlabError(f"{field}: {path} is not a checkpoint folder (no config.json / adapter_config.json) "
                     "nor a run folder (no checkpoints/)")


def _find_run_dir(run_id: str, output_dir: Path, uri: str | None, field: str) -> tuple[str, Path, str | None]:
    """A run id (or prefix) → (full id, run folder, ledger uri): the workspace's own folder first (runs recorded
    with the ledger off have no ledger row), then the ledger's record of where the run was written."""
    local = output_dir / layout.RUNS / run_id
    if run_id and local.is_dir():
        return run_id, local.resolve(), layout.ledger_near(local / layout.CHECKPOINTS / "x")
    if not uri and not layout.tracking_env_set() and not (output_dir / layout.LEDGER_FILE).is_file():
        where = "" if field == "run" else f"{field}: "
        raise LmlabError(f"{where}{run_id}: not a folder, and no workspace '{output_dir}' here to look the run id up "
                         f"in (no run '{run_id}' in the ledger); run from the folder holding the workspace, pass "
                         "--output-dir, or give a checkpoint folder")
    ledger = layout.ledger_uri(output_dir, uri)
    run = find_run(ledger, run_id)
    full_id, tags = run.info.run_id, run.data.tags
    recorded = tags.get(layout.TAG_RUN_DIR)
    for candidate in (Path(recorded) if recorded else None, output_dir / layout.RUNS / full_id):
        if candidate is not None and candidate.is_dir():
            return full_id, candidate.resolve(), ledger
    if not recorded:
        raise LmlabError(f"{field}: run {full_id[:8]} ({run.info.status}) saved nothing: the ledger records no run "
                         "folder for it, so it has no checkpoint to use")
    raise LmlabError(f"{field}: run {full_id[:8]}'s folder ({recorded}) is not on this machine; give a checkpoint "
                     "folder instead")


def _pick(run_dir: Path, which: Which, run_id: str | None, field: str, notes: list[str], *,
          for_resume: bool = False) -> Path:
    """The run's newest checkpoint that verifies ("last"), or its best: the one that checkpoint's meta.json names
    as best, if it verifies too. Every checkpoint skipped on the way is noted with what failed."""
    found = layout.list_checkpoints(run_dir)
    if not found:
        raise LmlabError(f"{field}: run {(run_id or run_dir.name)[:8]} saved no checkpoint in {run_dir}; nothing to load")
    newest = None
    for path in reversed(found):
        problem = checkpoint_unusable(path, for_resume=for_resume)
        if problem is None:
            newest = path
            break
        notes.append(f"skipped checkpoint {path.name}: {problem}")
    if newest is None:
        raise LmlabError(f"{field}: no checkpoint of run {(run_id or run_dir.name)[:8]} verifies ({'; '.join(notes)})")
    chosen = newest
    if which == "best":
        best = layout.read_json(newest / "meta.json").get("best_checkpoint")
        candidate = run_dir / layout.CHECKPOINTS / Path(best).name if best else None
        if candidate is not None and candidate.is_dir() and candidate != newest:
            problem = checkpoint_unusable(candidate)
            if problem is None:
                chosen = candidate
            else:
                notes.append(f"skipped the best checkpoint {candidate.name}: {problem}; using {newest.name}")
    if not has_manifest(chosen):
        notes.append(_unverified(chosen))
    return chosen


def _unverified(path: Path) -> str:
    return f"checkpoint {path.name} has no manifest (written before lmlab verified checkpoints): it cannot be verified"


def resolve_init_from(recipe) -> Resolved:
    """`model.init_from` of a recipe (lmlab.recipe.Recipe): a checkpoint folder relative to the recipe, a run
    folder, or run:<id>[:best|:last] looked up in the recipe's workspace and ledger."""
    spec = recipe.model.init_from
    base = Path(recipe.source_path).parent if recipe.source_path else None
    return resolve(spec, output_dir=recipe.run.output_dir, uri=recipe.ledger.uri, base=base, field="model.init_from")

"""Checkpoint integrity: every checkpoint carries a manifest written last; every reader verifies it, skips a
checkpoint that fails with a note naming what failed, and uses the newest one that verifies. No pickle on load."""

import json
from pathlib import Path

import pytest
import torch
from helpers.recipes import tiny_lm
from safetensors.torch import load_file

from lmlab import load_recipe, train
from lmlab.errors import LmlabError, TrainingFailed
from lmlab.models.checkpoint import load_trainer_state
from lmlab.models.loading import load_checkpoint
from lmlab.workspace import layout
from lmlab.workspace.manifest import checkpoint_problem, read_manifest
from lmlab.workspace.resolve import latest_checkpoint, resolve
from lmlab.workspace.runs import list_runs


def _recipe(**over):
    return load_recipe(data=tiny_lm(checkpoint__keep_last=5, checkpoint__keep_best=False, model__dropout=0.0, **over))


@pytest.fixture
def paused(workspace):
    """Paused at step 10: checkpoints at 4, 8 and 10."""
    result = train(_recipe(), stop_after_steps=10, quiet=True)
    assert [p.name for p in layout.list_checkpoints(result.run_dir)] == ["step-0000004", "step-0000008",
                                                                         "step-0000010"]
    return result


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path):
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    for i in range(start, min(start + 4096, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _delete(path: Path):
    path.unlink()


def _garbage(path: Path):
    path.write_text("{not json")


CORRUPTIONS = [
    ("model.safetensors", _truncate, "model.safetensors: "),
    ("model.safetensors", _flip, "model.safetensors: sha256 differs from the manifest"),
    ("meta.json", _delete, "meta.json: missing"),
    ("meta.json", _garbage, "meta.json: "),
    ("tokenizer.json", _delete, "tokenizer.json: missing"),
    ("trainer_state.safetensors", _delete, "trainer_state.safetensors: missing"),
    ("trainer_state.json", _garbage, "trainer_state.json: "),
    ("manifest.json", _garbage, "manifest.json unreadable"),
]


def test_every_checkpoint_has_a_manifest_that_verifies(paused):
    for ckpt in layout.list_checkpoints(paused.run_dir):
        manifest = read_manifest(ckpt)
        assert {"model.safetensors", "meta.json", "trainer_state.safetensors", "recipe.yaml"} <= set(manifest["files"])
        assert checkpoint_problem(ckpt) is None
    assert not list((paused.run_dir / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("name, corrupt, problem", CORRUPTIONS, ids=[f"{n}-{c.__name__[1:]}" for n, c, _ in CORRUPTIONS])
def test_a_corrupt_newest_checkpoint_is_skipped_by_every_reader(paused, name, corrupt, problem):
    newest = paused.run_dir / "checkpoints" / "step-0000010"
    corrupt(newest / name)
    notes: list[str] = []
    assert latest_checkpoint(paused.run_dir, notes=notes).name == "step-0000008"  # what --resume continues from
    assert len(notes) == 1 and notes[0].startswith(f"skipped checkpoint step-0000010: {problem}"), notes
    found = resolve(paused.run_id)  # generate, serve, export, eval, inspect-predictions, init_from
    assert found.checkpoint.name == "step-0000008" and found.notes == notes
    loaded = load_checkpoint(paused.run_id)
    assert loaded.path.name == "step-0000008"


def test_resume_past_a_corrupt_checkpoint_ends_equal_to_an_unbroken_run(paused, tmp_path, monkeypatch):
    _flip(paused.run_dir / "checkpoints" / "step-0000010" / "model.safetensors")
    resumed = train(_recipe(), resume=paused.run_id, quiet=True)
    assert resumed.status == "FINISHED" and resumed.step == 12
    monkeypatch.chdir(tmp_path)
    unbroken = train(_recipe(), quiet=True)
    a, b = load_file(str(resumed.last_checkpoint / "model.safetensors")), load_file(
        str(unbroken.last_checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_checkpoint_that_verifies_is_one_clear_error(paused):
    for ckpt in layout.list_checkpoints(paused.run_dir):
        _truncate(ckpt / "model.safetensors")
    with pytest.raises(LmlabError, match=r"no checkpoint of run \w+ verifies \(skipped checkpoint step-0000010"):
        resolve(paused.run_id)
    with pytest.raises(LmlabError, match="no checkpoint of run"):
        train(_recipe(), resume=paused.run_id, quiet=True)


def test_an_explicitly_named_corrupt_checkpoint_is_refused(paused):
    folder = paused.run_dir / "checkpoints" / "step-0000008"
    _flip(folder / "model.safetensors")
    with pytest.raises(LmlabError, match="step-0000008 does not verify: model.safetensors: sha256 differs"):
        load_checkpoint(str(folder))


def test_checkpoints_from_before_manifests_still_load_with_a_note(paused):
    newest = paused.run_dir / "checkpoints" / "step-0000010"
    (newest / "manifest.json").unlink()
    found = resolve(paused.run_id, which="last")
    assert found.checkpoint == newest
    assert found.notes == ["checkpoint step-0000010 has no manifest (written before lmlab verified checkpoints): "
                           "it cannot be verified"]


def test_an_orphan_temp_folder_from_a_killed_save_is_removed_at_the_next_save(paused):
    orphan = paused.run_dir / "checkpoints" / ".tmp-step-0000012-99999"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    train(_recipe(), resume=paused.run_id, quiet=True)
    assert not orphan.exists()


def test_trainer_state_is_read_without_pickle(paused, tmp_path):
    newest = paused.run_dir / "checkpoints" / "step-0000010"
    state = load_trainer_state(newest)
    assert set(state) == {"optimizer", "scheduler", "rng"} and not (newest / "trainer_state.pt").exists()
    json.loads((newest / "trainer_state.json").read_text())  # the structure is plain JSON
    # a legacy trainer_state.pt that smuggles code in is refused, not run
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"x": _Evil()}, legacy / "trainer_state.pt")
    with pytest.raises(LmlabError, match="lmlab does not unpickle code from a checkpoint"):
        load_trainer_state(legacy)
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path.cwd() / "pwned",))


def test_a_diverging_run_fails_before_it_saves_a_poisoned_checkpoint(workspace):
    with pytest.raises(TrainingFailed, match="FAILED"):
        train(_recipe(train__lr=1e6, train__max_steps=40, train__warmup_steps=0, eval__every_steps=2), quiet=True)
    (row,) = list_runs()
    assert row.status == "FAILED"
    run_dir = layout.run_dir("lmlab-runs", row.run_id)
    for ckpt in layout.list_checkpoints(run_dir):  # every checkpoint on disk holds finite weights
        assert all(bool(torch.isfinite(t).all()) for t in load_file(str(ckpt / "model.safetensors")).values())
    reason = row.tags["lmlab.failure_reason"]
    assert "became" in reason and ("nan" in reason or "inf" in reason), reason


def test_an_unchanged_file_is_hashed_once_and_any_change_is_hashed_again(tmp_path, monkeypatch):
    """A resume verifies the same checkpoint three times (storage pull, resume_recipe, open_run): its files are read
    once while unchanged. A file modified too recently to trust its mtime is never remembered (git's racily-clean
    rule), so an in-place edit inside the clock's tick cannot pass as the hashed file."""
    import hashlib

    from lmlab.workspace import manifest

    reads, real = [], hashlib.sha256

    def counting():
        reads.append(1)
        return real()

    monkeypatch.setattr(manifest.hashlib, "sha256", counting)
    monkeypatch.setattr(manifest, "_hashes", {})
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 1000)
    first = manifest.sha256_of(path)
    assert manifest.sha256_of(path) == first and len(reads) == 2  # just written: not remembered, read again
    monkeypatch.setattr(manifest, "_SETTLED_S", 0.0)  # as if written long ago
    manifest.sha256_of(path)
    assert manifest.sha256_of(path) == first and len(reads) == 3  # settled and unchanged: read once more, then not
    path.write_bytes(b"b" * 1000)  # same size, rewritten
    assert manifest.sha256_of(path) != first and len(reads) == 4

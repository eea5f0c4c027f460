"""Checkpoint manifests: every file of a checkpoint folder with its size and sha256, written last (after every file
is fsynced), so a folder whose manifest verifies is complete and unaltered. Readers verify before they load;
`checkpoint_problem` says in one line what is wrong with a folder (None when it verifies)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


_SETTLED_S = 2.0  # a file whose mtime is this old when hashed keeps its hash until its stat changes
_hashes: dict[tuple[str, int, int, int, int], str] = {}
_hashes_lock = threading.Lock()


def sha256_of(path: Path) -> str:
    """The file's sha256, hashed once per process while the file is unchanged: a resume verifies the same
    checkpoint in the storage pull, in resume_recipe and in open_run, and a multi-GB checkpoint is read once, not
    three times. Unchanged means the same inode, size, mtime and ctime; as in git's "racily clean" rule, a hash is
    remembered only for a file last modified over _SETTLED_S before it was read, so an in-place edit within the
    filesystem clock's tick (same size, same mtime) can never be mistaken for the file that was hashed."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _hashes_lock:
        if key in _hashes:
            return _hashes[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_S * 1e9:
        with _hashes_lock:
            if len(_hashes) > 10_000:
                _hashes.clear()
            _hashes[key] = digest
    return digest


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> dict:
    """fsync every file of `folder`, then write its manifest (fsynced too): the last file a checkpoint gets."""
    folder = Path(folder)
    entries = {}
    for path in files_of(folder):
        fsync_file(path)
        entries[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    manifest = {"version": 1, "files": entries}
    target = folder / MANIFEST
    with open(target, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)
    return manifest


def read_manifest(folder: Path) -> dict | None:
    """The manifest of `folder`; None when it has none (a checkpoint written before manifests existed)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def checkpoint_problem(folder: Path) -> str | None:
    """None when every file the manifest lists is there with its size and sha256; else what is wrong, in a few
    words ('model.safetensors: sha256 differs from the manifest'). A folder without a manifest is not a problem
    here (see `has_manifest`): it was written before manifests existed and cannot be verified."""
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    if manifest is None:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"{MANIFEST} lists no files"
    for name, entry in files.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name}: missing"
        if path.stat().st_size != entry.get("size"):
            return f"{name}: {path.stat().st_size} bytes, the manifest says {entry.get('size')} (truncated or replaced)"
        if sha256_of(path) != entry.get("sha256"):
            return f"{name}: sha256 differs from the manifest (the file was altered)"
    return None


def has_manifest(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()

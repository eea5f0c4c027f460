"""The background uploader that mirrors a training run to its storage (lmlab.workspace.storage).

The loop calls `checkpoint_saved(path)` right after a checkpoint is written and verified: the folder is
snapshotted with hard links (instant, no copy; the loop may prune the checkpoint at once) and queued, and the loop
goes on. One thread uploads each snapshot files first, then the run's ledger record, then the manifest, and prunes
storage to checkpoint.keep_last / keep_best. An upload that fails is retried with backoff (RETRY_DELAYS); when every
try fails the run is *behind*: `events()` hands the loop an alert (it tags the run storage.behind), training goes on,
and the next upload that succeeds catches storage up. `drain()` waits for the queue at the end of a run."""

from __future__ import annotations

import os
import shutil
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.workspace import layout
from lmlab.workspace.manifest import MANIFEST
from lmlab.workspace.storage import Store, explain, storage_url, upload_record

RETRY_DELAYS = (2.0, 5.0, 15.0, 30.0)  # seconds before the 2nd..5th try of one upload; then the run is behind


@dataclass
class StorageEvent:
    behind: bool  # True: storage fell behind (an upload failed every try); False: it caught up
    message: str


@dataclass
class _Job:
    kind: str  # "checkpoint" or "record"
    name: str = ""  # checkpoint folder name
    snapshot: Path | None = None
    best: str | None = None  # the best checkpoint's name when the job was queued (kept in storage)
    size: int = 0
    files: dict[str, int] = field(default_factory=dict)

    @property
    def what(self) -> str:
        return self.name if self.kind == "checkpoint" else "the ledger record"

    def discard(self) -> None:
        if self.snapshot is not None:
            shutil.rmtree(self.snapshot, ignore_errors=True)


class NoMirror:
    """A run without storage: the same methods, doing nothing."""

    active = False
    behind: str | None = None

    def attach(self, run_id: str, run_dir: Path, ledger_uri: str | None) -> None: ...
    def checkpoint_saved(self, path: Path | None, best: Path | None = None) -> None: ...
    def record_changed(self) -> None: ...
    def events(self) -> list[StorageEvent]:
        return []

    def pending(self) -> tuple[int, int]:
        return 0, 0

    def drain(self, on_progress: Callable[[int, int], None] | None = None) -> None: ...
    def abandon(self) -> None: ...
    def summary(self) -> str | None:
        return None


def open_mirror(url: str | None, options: dict[str, Any] | None = None, *, keep_last: int = 3,
                keep_best: bool = True, check_only: bool = False) -> Mirror | NoMirror:
    """A mirror for `url` (None: $LMLAB_STORAGE, else no storage → NoMirror), after one check that the storage can
    be written: an unreachable endpoint, a missing bucket or missing credentials is one clear error here, before the
    run starts. `check_only`: check, and return NoMirror (processes other than the main one upload nothing)."""
    url = storage_url(url)
    if url is None:
        return NoMirror()
    store = Store(url, options)
    store.check_writable()
    return NoMirror() if check_only else Mirror(store, keep_last=keep_last, keep_best=keep_best)


class Mirror:
    active = True

    def __init__(self, store: Store, *, keep_last: int, keep_best: bool):
        self.store, self.keep_last, self.keep_best = store, keep_last, keep_best
        self.behind: str | None = None  # why storage is behind, while it is
        self.uploaded: list[str] = []  # checkpoints uploaded, in order
        self.bytes_done = 0
        self.bytes_total = 0
        self._jobs: deque[_Job] = deque()
        self._active: _Job | None = None
        self._events: list[StorageEvent] = []
        self._cond = threading.Condition()
        self._closing = False
        self._draining = False
        self._abort = threading.Event()
        self._artifact_digests: dict[str, str] = {}
        self._client = None
        self._count = 0
        self._thread: threading.Thread | None = None

    # ---- the loop's side (main thread)
    def attach(self, run_id: str, run_dir: Path, ledger_uri: str | None) -> None:
        """Start mirroring the run `run_id` (its folder, its ledger; None: ledger off, no record)."""
        self.run_id, self.run_dir, self.ledger_uri = run_id, Path(run_dir), ledger_uri
        self.staging = self.run_dir / layout.UPLOADING
        shutil.rmtree(self.staging, ignore_errors=True)  # snapshots left by a process that was killed
        self._thread = threading.Thread(target=self._work, name="lmlab-storage", daemon=True)
        self._thread.start()

    def checkpoint_saved(self, path: Path | None, best: Path | None = None) -> None:
        """Queue a checkpoint the loop has just written and verified (snapshotted now: the loop may prune it)."""
        if path is None or self._thread is None:
            return
        self._count += 1
        snapshot = self.staging / f"{path.name}-{self._count}"
        files = _hard_link_tree(path, snapshot)
        job = _Job("checkpoint", path.name, snapshot, Path(best).name if best else None, sum(files.values()), files)
        with self._cond:
            # not uploaded after all: a queued record upload (this job uploads the record), an older save of this
            # step, and checkpoints storage would prune as soon as they arrived (older than keep_last, not the best)
            pending = [j for j in self._jobs if j.kind == "checkpoint" and j.name != job.name] + [job]
            keep = {j.name for j in sorted(pending, key=lambda j: j.name)[-self.keep_last:]} | {job.best}
            queued = [j for j in pending if j.name in keep]
            dropped = [j for j in self._jobs if not any(j is q for q in queued)]
            self._jobs = deque(queued)
            self.bytes_total += job.size - sum(j.size for j in dropped)
            self._cond.notify_all()
        for j in dropped:
            j.discard()

    def record_changed(self) -> None:
        """Queue an upload of the ledger record (the run's status changed); a job already queued uploads it too."""
        if self._thread is None or self.ledger_uri is None:
            return
        with self._cond:
            if not self._jobs:
                self._jobs.append(_Job("record"))
                self._cond.notify_all()

    def events(self) -> list[StorageEvent]:
        """What happened since the last call (storage fell behind / caught up), for the loop to report."""
        with self._cond:
            out, self._events = self._events, []
        return out

    def pending(self) -> tuple[int, int]:
        """(bytes uploaded, bytes queued in all) for a progress bar."""
        return self.bytes_done, self.bytes_total

    def drain(self, on_progress: Callable[[int, int], None] | None = None, poll: float = 0.2) -> None:
        """At the end of a run: wait until every queued upload is done (or has failed every try), then stop the
        thread. A storage already behind gets one try per upload here, so a dead endpoint does not hold the end of a
        run for minutes."""
        if self._thread is None:
            return
        self._draining = True
        while True:
            with self._cond:
                if (not self._jobs and self._active is None) or not self._thread.is_alive():
                    break
                self._cond.wait(timeout=poll)
            if on_progress is not None:
                on_progress(self.bytes_done, self.bytes_total)
        if on_progress is not None:
            on_progress(self.bytes_done, self.bytes_total)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            shutil.rmtree(self.staging, ignore_errors=True)

    def abandon(self) -> None:
        """Stop uploading (a second Ctrl-C while draining): what is in storage stays consistent, since a checkpoint
        there counts only once its manifest is uploaded."""
        self._abort.set()
        with self._cond:
            jobs, self._jobs = list(self._jobs), deque()
            self._closing = True
            self._cond.notify_all()
        for j in jobs:
            j.discard()
        self.behind = self.behind or "uploads interrupted"

    def summary(self) -> str | None:
        where = self.store.where(self.run_id) if self._thread is not None else self.store.shown
        if self.behind:
            return (f"storage is behind: {self.behind}. The workspace holds everything; lmlab push {self.run_id[:8]} "
                    "--storage URL uploads it when storage answers")
        if not self.uploaded:
            return f"storage {where}: nothing new to upload"
        return f"storage {where}: {', '.join(sorted(set(self.uploaded)))} and the ledger record uploaded"

    # ---- the uploader thread
    def _work(self) -> None:
        _yield_cpu()
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs or self._abort.is_set():
                    return
                job = self._active = self._jobs.popleft()
            try:
                self._run(job)
            finally:
                job.discard()
                with self._cond:
                    self._active = None
                    self._cond.notify_all()

    def _run(self, job: _Job) -> None:
        delays = () if (self._draining and self.behind) else RETRY_DELAYS
        problem = ""
        for attempt in range(len(delays) + 1):
            done_before = self.bytes_done
            try:
                if job.kind == "checkpoint":
                    self._upload_checkpoint(job)
                else:
                    self._upload_record()
                if self.behind is not None:
                    self.behind = None
                    self._event(StorageEvent(False, f"storage caught up: {job.what} uploaded to "
                                                    f"{self.store.where(self.run_id)}"))
                return
            except Exception as e:  # any failure: retry, then report; training goes on
                problem = explain(e)
                self.bytes_done = done_before
            if attempt < len(delays) and self._abort.wait(delays[attempt]):
                return
        self.bytes_done += job.size  # given up: the progress bar counts it as settled
        tries = len(delays) + 1
        message = (f"uploading {job.what} to {self.store.where(self.run_id)} failed {tries} time(s): {problem}; "
                   "training goes on, the workspace keeps every checkpoint")
        first = self.behind is None
        self.behind = message
        if first:
            self._event(StorageEvent(True, message))

    def _upload_checkpoint(self, job: _Job) -> None:
        assert job.snapshot is not None
        self.store.upload_checkpoint(job.snapshot, self.run_id, job.name, before_manifest=self._upload_record,
                                     on_bytes=self._add_bytes)
        self.uploaded.append(job.name)
        best = job.best if self.keep_best else None
        gone = self.store.prune(self.run_id, self.keep_last, best)
        self.uploaded = [n for n in self.uploaded if n not in gone]

    def _upload_record(self) -> None:
        if self.ledger_uri is None:
            return
        if self._client is None:
            from lmlab.workspace.ledger import client

            self._client = client(self.ledger_uri)
        upload_record(self.store, self.ledger_uri, self.run_id, self.staging / f"record-{os.getpid()}",
                      self._client, self._artifact_digests)

    def _add_bytes(self, n: int) -> None:
        self.bytes_done += n

    def _event(self, event: StorageEvent) -> None:
        with self._cond:
            self._events.append(event)


UPLOAD_NICENESS = 10  # the uploads' CPU priority below the training threads' (0): the loop keeps the cores


def _yield_cpu() -> None:
    """Lower the CPU priority of this thread (the uploader) and of fsspec's I/O thread, which runs the async
    filesystems' (s3fs, gcsfs, adlfs) transfers, so that hashing, TLS and request handling for uploads take cores the
    training threads leave idle instead of preempting them. Linux: the nice value is per thread; a thread that
    fsspec starts later inherits it from the thread that starts it. Elsewhere, or when not permitted: a no-op.
    fsspec's I/O thread is the process's, not the run's: it stays at the lower priority after the run (an
    unprivileged process cannot raise it back), so later async fsspec transfers in the same process (a pull, the next
    run in a notebook) also yield to computation; they are I/O-bound, and nothing else runs on that thread."""
    if not hasattr(os, "setpriority"):
        return
    tids = {threading.get_native_id()}
    try:
        import fsspec.asyn

        io = fsspec.asyn.iothread[0]
        if io is not None and io.native_id is not None:
            tids.add(io.native_id)
    except Exception:  # fsspec without its I/O thread (sync filesystems such as file://)
        pass
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), UPLOAD_NICENESS))
        except OSError:
            pass


def _hard_link_tree(src: Path, dest: Path) -> dict[str, int]:
    """A snapshot of checkpoint folder `src` at `dest` by hard links (checkpoint files are never rewritten in place,
    so a link is a stable copy); copied where links are not possible. Returns {file: size}."""
    files = {}
    for path in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
        if rel.as_posix() != MANIFEST:
            files[rel.as_posix()] = path.stat().st_size
    return files

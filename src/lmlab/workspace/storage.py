"""Runs in object storage: a run folder mirrored under an fsspec URL (`run.storage`, `--storage`, $LMLAB_STORAGE),
s3:// first (AWS S3, MinIO, Cloudflare R2: the endpoint from AWS_ENDPOINT_URL or `run.storage_options`), any other
fsspec protocol through the same code. Credentials come from the filesystem's own environment / profile chain and
are never part of a message lmlab prints, tags or logs.

    <storage>/runs/<run id>/checkpoints/step-0000120/...   files first, manifest.json last: a checkpoint in
                                                           storage is complete iff its manifest is there
    <storage>/runs/<run id>/ledger/run.json + artifacts/   the run's ledger record (lmlab.workspace.run_record)

`Store` is the remote side (upload / download / prune a checkpoint, put / get the record); `pull` brings a run's
checkpoint (verified against its manifest after the download) and record into a workspace, `push` uploads a local
run after the fact. The background uploader that mirrors a run while it trains is lmlab.workspace.mirror."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmlab.errors import LmlabError
from lmlab.recipe.storage import STORAGE_ENV, url_problem
from lmlab.workspace import layout
from lmlab.workspace.ledger import redact
from lmlab.workspace.manifest import MANIFEST, checkpoint_problem, read_manifest

# what lmlab asks of an S3 client unless run.storage_options says otherwise: fail a dead endpoint within seconds
# (botocore's default is 5 tries with its own backoff per request); the uploader retries on top of this
S3_DEFAULTS: dict[str, Any] = {"config_kwargs": {"connect_timeout": 10, "read_timeout": 120,
                                                 "retries": {"max_attempts": 3, "mode": "standard"}}}
DEFAULTS: dict[str, dict[str, Any]] = {"s3": S3_DEFAULTS, "s3a": S3_DEFAULTS, "file": {"auto_mkdir": True},
                                       "local": {"auto_mkdir": True}}
_CONNECT_ERRORS = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionRefusedError", "ConnectionError",
                   "ClientConnectorError", "ServerDisconnectedError", "ReadTimeoutError", "FSTimeoutError",
                   "TimeoutError")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY",
               "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN", "AZURE_CLIENT_SECRET")


def storage_url(explicit: str | None = None) -> str | None:
    """The storage a run or command uses: `explicit` (--storage, run.storage), else $LMLAB_STORAGE, else None."""
    url = explicit or os.environ.get(STORAGE_ENV) or None
    if url is not None:
        problem = url_problem(url)
        if problem:
            raise LmlabError(f"storage {redact(url)}: {problem}")
    return url


def scrub(text: str) -> str:
    """`text` with credentials removed: user:password@ in URLs, and the values of the credential variables."""
    text = re.sub(r"([A-Za-z][\w+.-]*://)[^/@\s]*@", r"\1", text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def explain(e: BaseException) -> str:
    """What went wrong talking to storage, in a few words and the fix; never credentials."""
    name = type(e).__name__
    first = scrub((str(e).strip().splitlines() or [""])[0])[:300]
    chain = {type(x).__name__ for x in (e, e.__cause__, e.__context__) if x is not None}
    if chain & set(_CONNECT_ERRORS) or isinstance(e, (ConnectionError, TimeoutError)):
        return (f"does not answer ({first or name}); check that the endpoint runs and AWS_ENDPOINT_URL / "
                "run.storage_options.endpoint_url")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return ("no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE (R2 and "
                "MinIO use the same variables)")
    if isinstance(e, FileNotFoundError) and "bucket" in first.lower():
        return f"{first.rstrip('.')}; create the bucket first (e.g. aws s3 mb s3://BUCKET)"
    if isinstance(e, PermissionError):
        return f"access denied ({first or name}); check the credentials and that they may write there"
    if isinstance(e, TypeError):
        return f"run.storage_options: {first} (an option the filesystem does not take)"
    return f"{name}: {first}" if first else name


def filesystem(url: str, options: dict[str, Any] | None = None):
    """(fsspec filesystem, root path) for a storage URL, with lmlab's defaults under the recipe's options."""
    import fsspec

    shown = redact(url)
    try:
        protocol = fsspec.utils.get_protocol(url)
        kwargs = _merge(DEFAULTS.get(protocol, {}), options or {})
        # a fresh instance: fsspec's cache would keep an endpoint that $AWS_ENDPOINT_URL has changed since
        return fsspec.core.url_to_fs(url, skip_instance_cache=True, **kwargs)
    except ImportError as e:
        raise LmlabError(f"storage {shown}: {protocol}:// needs a package that is not installed ({scrub(str(e))})"
                         ) from None
    except (ValueError, TypeError) as e:
        raise LmlabError(f"storage {shown}: {scrub(str(e))}; give an fsspec URL such as s3://bucket/prefix and "
                         "options the filesystem takes") from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    """One storage location (an fsspec URL + options) and the runs under it."""

    def __init__(self, url: str, options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.shown = redact(self.url)
        self.fs, root = filesystem(url, options)
        self.root = str(root).rstrip("/")

    # ---- paths
    def run_path(self, run_id: str) -> str:
        return f"{self.root}/{layout.RUNS}/{run_id}"

    def checkpoint_path(self, run_id: str, name: str) -> str:
        return f"{self.run_path(run_id)}/{layout.CHECKPOINTS}/{name}"

    def where(self, run_id: str) -> str:
        return f"{self.shown}/{layout.RUNS}/{run_id}"

    # ---- checks and listings
    def check_writable(self) -> None:
        """One clear error when the storage cannot be written (endpoint down, no bucket, no credentials)."""
        probe = f"{self.root}/.lmlab-write-probe-{uuid.uuid4().hex[:12]}"
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as e:  # whatever the filesystem raises: one line
            raise LmlabError(f"storage {self.shown}: {explain(e)}; nothing was started") from None

    def _names(self, path: str) -> list[str]:
        self.fs.invalidate_cache()
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def run_ids(self) -> list[str]:
        return [n for n in self._names(f"{self.root}/{layout.RUNS}") if n and not n.startswith(".")]

    def find_run(self, ref: str) -> str:
        """A run id, or a unique prefix of one, in this storage."""
        try:
            ids = self.run_ids()
        except Exception as e:
            raise LmlabError(f"storage {self.shown}: {explain(e)}") from None
        if ref in ids:
            return ref
        matches = [i for i in ids if i.startswith(ref)] if ref else []
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise LmlabError(f"storage {self.shown}: no run '{ref}' there ({len(ids)} run(s)); check the run id and "
                             "the URL (lmlab runs --storage URL lists them)")
        raise LmlabError(f"storage {self.shown}: run id prefix '{ref}' is ambiguous ({len(matches)} runs); give more "
                         "characters")

    def listing(self, run_id: str) -> dict[str, dict[str, int]]:
        """{checkpoint name: {file relative to it: size}} of the run in storage, complete or not."""
        base = f"{self.run_path(run_id)}/{layout.CHECKPOINTS}"
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        out: dict[str, dict[str, int]] = {}
        for path, info in found.items():
            rel = path[len(base):].strip("/")
            name, _, inner = rel.partition("/")
            if name.startswith("step-") and inner:
                out.setdefault(name, {})[inner] = int(info.get("size") or 0)
        return out

    def complete(self, run_id: str) -> list[str]:
        """The run's checkpoints in storage that have their manifest (all files were uploaded first), oldest first."""
        return sorted(n for n, files in self.listing(run_id).items() if MANIFEST in files)

    def read_json(self, path: str) -> dict[str, Any]:
        return json.loads(self.fs.cat_file(path))

    # ---- checkpoints
    def upload_checkpoint(self, folder: Path, run_id: str, name: str, *,
                          before_manifest: Callable[[], None] | None = None,
                          on_bytes: Callable[[int], None] | None = None) -> bool:
        """Upload a local checkpoint folder: every file its manifest lists, then (when the listing shows them all at
        their sizes) `before_manifest()`, then the manifest. An earlier upload of the same step loses its manifest
        first, so it is never complete with mixed files. False when storage holds this very checkpoint already."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise LmlabError(f"{folder}: has no manifest (written before lmlab verified checkpoints); not uploaded")
        local_manifest = (folder / MANIFEST).read_bytes()
        dest = self.checkpoint_path(run_id, name)
        remote = self.listing(run_id).get(name, {})
        if MANIFEST in remote:
            if self.fs.cat_file(f"{dest}/{MANIFEST}") == local_manifest:
                if before_manifest is not None:
                    before_manifest()
                return False
            self.fs.rm_file(f"{dest}/{MANIFEST}")
        files = manifest["files"]
        for rel in sorted(files):
            self.fs.put_file(str(folder / rel), f"{dest}/{rel}")
            if on_bytes is not None:
                on_bytes(int(files[rel]["size"]))
        there = self.listing(run_id).get(name, {})
        wrong = [rel for rel, entry in files.items() if there.get(rel) != entry["size"]]
        if wrong:
            raise OSError(f"{name}/{wrong[0]}: storage lists {there.get(wrong[0])} bytes after the upload, "
                          f"not {files[wrong[0]]['size']}")
        for rel in set(there) - set(files) - {MANIFEST}:  # left by an earlier upload of this step
            self.fs.rm_file(f"{dest}/{rel}")
        if before_manifest is not None:
            before_manifest()
        self.fs.pipe_file(f"{dest}/{MANIFEST}", local_manifest)
        return True

    def download_checkpoint(self, run_id: str, name: str, dest: Path,
                            on_bytes: Callable[[int], None] | None = None) -> str | None:
        """Download a complete checkpoint to `dest` (a folder name under a run's checkpoints/), verify it against
        its manifest and move it into place; None, or what is wrong with it (then nothing is left behind)."""
        src = self.checkpoint_path(run_id, name)
        for orphan in dest.parent.glob(f".tmp-pull-{name}-*"):  # left by a pull that was killed
            shutil.rmtree(orphan, ignore_errors=True)
        tmp = dest.parent / f".tmp-pull-{name}-{os.getpid()}"
        try:
            raw = self.fs.cat_file(f"{src}/{MANIFEST}")
            files = json.loads(raw).get("files")
            if not isinstance(files, dict):
                return f"{MANIFEST} lists no files"
            for rel, entry in files.items():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(f"{src}/{rel}", str(target))
                except FileNotFoundError:
                    return f"{rel}: missing in storage"
                if on_bytes is not None:
                    on_bytes(int(entry.get("size") or 0))
            (tmp / MANIFEST).write_bytes(raw)
            problem = checkpoint_problem(tmp)
            if problem is not None:
                return problem
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
            return None
        except (ValueError, KeyError) as e:
            return f"{MANIFEST} unreadable ({type(e).__name__})"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def delete_checkpoint(self, run_id: str, name: str) -> None:
        """Manifest first: a checkpoint being deleted is never listed as complete with files missing."""
        path = self.checkpoint_path(run_id, name)
        try:
            self.fs.rm_file(f"{path}/{MANIFEST}")
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def prune(self, run_id: str, keep_last: int, keep: str | None = None) -> list[str]:
        """checkpoint.keep_last / keep_best in storage: delete all but the newest `keep_last` complete checkpoints
        and `keep` (the best), incomplete leftovers included; returns the names deleted."""
        listing = self.listing(run_id)
        complete = sorted(n for n, files in listing.items() if MANIFEST in files)
        kept = set(complete[-keep_last:]) | ({keep} if keep else set())
        gone = sorted(n for n in listing if n not in kept)
        for name in gone:
            self.delete_checkpoint(run_id, name)
        return gone

    # ---- the ledger record
    def put_record(self, run_id: str, record: dict[str, Any], artifacts: Path | None = None,
                   uploaded: dict[str, str] | None = None) -> None:
        """The run's ledger record: artifacts that changed since `uploaded` (path → sha256), then run.json."""
        base = f"{self.run_path(run_id)}/{layout.RECORD}"
        uploaded = uploaded if uploaded is not None else {}
        if artifacts is not None:
            for path in sorted(p for p in Path(artifacts).rglob("*") if p.is_file()):
                rel = path.relative_to(artifacts).as_posix()
                digest = sha256_bytes(path.read_bytes())
                if uploaded.get(rel) != digest:
                    self.fs.put_file(str(path), f"{base}/artifacts/{rel}")
                    uploaded[rel] = digest
        self.fs.pipe_file(f"{base}/{layout.RECORD_FILE}", json.dumps(record).encode())

    def get_record(self, run_id: str, artifacts: Path | None = None) -> dict[str, Any] | None:
        """The run's ledger record (None when storage holds none); its artifacts downloaded to `artifacts`."""
        base = f"{self.run_path(run_id)}/{layout.RECORD}"
        try:
            record = self.read_json(f"{base}/{layout.RECORD_FILE}")
        except FileNotFoundError:
            return None
        if artifacts is not None:
            shutil.rmtree(artifacts, ignore_errors=True)
            artifacts.mkdir(parents=True)
            self.fs.invalidate_cache()
            try:
                found = self.fs.find(f"{base}/artifacts")
            except FileNotFoundError:
                found = []
            for path in found:
                target = artifacts / path[len(f"{base}/artifacts/"):]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(path, str(target))
        return record

    def records(self) -> list[dict[str, Any]]:
        """Every run's ledger record in this storage (what `lmlab runs --storage` lists)."""
        out = []
        for run_id in self.run_ids():
            try:
                record = self.read_json(f"{self.run_path(run_id)}/{layout.RECORD}/{layout.RECORD_FILE}")
            except FileNotFoundError:
                continue
            out.append(record)
        return out


# ------------------------------------------------------------------------------------------ pull and push
Which = Literal["best", "last"]


@dataclass
class Pulled:
    run_id: str
    run_dir: Path
    checkpoint: Path | None  # the checkpoint asked for, verified, in the local workspace
    ledger_uri: str | None  # the ledger the run's record went into (None: storage holds no record)
    notes: list[str] = field(default_factory=list)  # checkpoints skipped (and why), what was reused
    downloaded: list[str] = field(default_factory=list)


def import_run_record(store: Store, run_id: str, *, output_dir: str | Path, uri: str | None = None) -> str | None:
    """The run's ledger record from storage into the workspace's ledger (or $LMLAB_TRACKING_URI / `uri`): created
    there under the same id, or completed with what it lacks. Returns the ledger's URI, None when there is no
    record."""
    from lmlab.workspace.run_record import import_record

    staging = Path(output_dir) / layout.RUNS / run_id / layout.UPLOADING / f"record-{os.getpid()}"
    try:
        try:
            record = store.get_record(run_id, staging)
        except Exception as e:
            raise LmlabError(f"storage {store.shown}: {explain(e)}") from None
        if record is None:
            return None
        ledger = layout.ledger_uri(output_dir, uri)
        import_record(ledger, record, run_dir=layout.run_dir(output_dir, run_id),
                      artifact_root=Path(output_dir) / layout.ARTIFACTS, artifacts=staging)
        return ledger
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)


def pull(url: str, ref: str, *, output_dir: str | Path, uri: str | None = None, which: Which | int = "best",
         options: dict[str, Any] | None = None, with_best: bool = False, record: bool = True,
         on_bytes: Callable[[int], None] | None = None) -> Pulled:
    """Bring a run's checkpoint from storage into the workspace `output_dir`, and its ledger record into the ledger:
    `which` = "best" (the one the newest checkpoint names as best), "last" (the newest) or a step. Each candidate is
    verified against its manifest after the download; one that fails is skipped with a note and the next newest is
    used (for "best": the newest). A checkpoint already here, identical to storage's, is not downloaded again.
    `with_best`: also bring the best checkpoint (a resume continues to track it)."""
    store = Store(url, options)
    run_id = store.find_run(ref)
    run_dir = layout.run_dir(output_dir, run_id)
    notes: list[str] = []
    try:
        complete = store.complete(run_id)
    except Exception as e:
        raise LmlabError(f"storage {store.shown}: {explain(e)}") from None
    where = store.where(run_id)
    if not complete:
        raise LmlabError(f"storage {where}: no complete checkpoint (none has its manifest); nothing to pull")
    if isinstance(which, int):
        name = f"step-{which:07d}"
        if name not in complete:
            steps = ", ".join(str(int(n.removeprefix("step-"))) for n in complete)
            raise LmlabError(f"--step {which}: {where} has no complete checkpoint at step {which} (it has step(s) "
                             f"{steps})")
        candidates = [name]
    else:
        candidates = list(reversed(complete))
        if which == "best":
            best = _best_name(store, run_id, complete[-1])
            if best in complete and best != complete[-1]:
                candidates.insert(0, best)
    ledger = import_run_record(store, run_id, output_dir=output_dir, uri=uri) if record else None
    pulled = Pulled(run_id, run_dir, None, ledger, notes)
    for i, name in enumerate(candidates):
        problem = _fetch(store, run_id, name, run_dir, pulled, on_bytes)
        if problem is None:
            pulled.checkpoint = run_dir / layout.CHECKPOINTS / name
            break
        skipped = f"skipped {name} in storage: {problem}"
        if which == "best" and i == 0 and len(candidates) > 1 and name != complete[-1]:
            skipped += "; using the newest that verifies"
        notes.append(skipped)
    if pulled.checkpoint is None:
        raise LmlabError(f"storage {where}: no checkpoint there verifies ({'; '.join(notes)})")
    if with_best:
        best = _best_name(store, run_id, pulled.checkpoint.name)
        if best in complete and best != pulled.checkpoint.name:
            problem = _fetch(store, run_id, best, run_dir, pulled, on_bytes)
            if problem is not None:
                notes.append(f"skipped the best checkpoint {best} in storage: {problem}")
    return pulled


def pull_for_resume(url: str, ref: str, *, output_dir: str | Path, uri: str | None = None,
                    options: dict[str, Any] | None = None) -> Pulled | None:
    """Before a resume: pull the run's newest complete checkpoint (and its best, and the ledger record) when storage
    holds a newer one than the workspace — a fresh machine, or a workspace behind storage. None when storage does
    not hold the run (a run that starts mirroring now) or the workspace is up to date."""
    store = Store(url, options)
    try:
        run_id = store.find_run(ref)
    except LmlabError:
        if _local_run_dir(output_dir, ref) is not None:
            return None  # the run is here and not (yet) in storage: resume from the workspace
        raise
    try:
        complete = store.complete(run_id)
    except Exception as e:
        raise LmlabError(f"storage {store.shown}: {explain(e)}") from None
    local = _newest_verified_step(layout.run_dir(output_dir, run_id))
    if complete and (local is None or _step(complete[-1]) > local):
        return pull(url, run_id, output_dir=output_dir, uri=uri, which="last", options=options, with_best=True)
    if not _in_ledger(layout.ledger_uri(output_dir, uri, create=False), run_id):
        import_run_record(store, run_id, output_dir=output_dir, uri=uri)
    return None


def push(url: str, run_id: str, run_dir: Path, *, ledger_uri: str | None, options: dict[str, Any] | None = None,
         on_bytes: Callable[[int], None] | None = None) -> tuple[list[str], list[str]]:
    """Upload a local run: every checkpoint that verifies (files first, manifest last; ones storage holds already
    are left alone) and its ledger record. Returns (checkpoints uploaded, notes)."""
    store = Store(url, options)
    store.check_writable()
    uploaded, notes = [], []
    for path in layout.list_checkpoints(run_dir):
        if read_manifest(path) is None:
            notes.append(f"{path.name}: no manifest (written before lmlab verified checkpoints); not uploaded")
            continue
        problem = checkpoint_problem(path)
        if problem is not None:
            notes.append(f"{path.name}: does not verify ({problem}); not uploaded")
            continue
        try:
            if store.upload_checkpoint(path, run_id, path.name, on_bytes=on_bytes):
                uploaded.append(path.name)
        except LmlabError:
            raise
        except Exception as e:
            raise LmlabError(f"storage {store.shown}: uploading {path.name}: {explain(e)}") from None
    if ledger_uri is not None:
        upload_record(store, ledger_uri, run_id, Path(run_dir) / layout.UPLOADING / "record")
    return uploaded, notes


def upload_record(store: Store, ledger_uri: str, run_id: str, staging: Path, c: Any = None,
                  uploaded: dict[str, str] | None = None) -> None:
    """Export the run's ledger record (and artifacts) and put it in storage."""
    from lmlab.workspace.run_record import export_artifacts, export_record

    try:
        record = export_record(ledger_uri, run_id, c)
        artifacts = export_artifacts(ledger_uri, run_id, staging, c)
        store.put_record(run_id, record, artifacts, uploaded)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _in_ledger(uri: str, run_id: str) -> bool:
    if not layout.ledger_exists(uri):
        return False
    from lmlab.workspace.ledger import client

    try:
        client(uri).get_run(run_id)
        return True
    except Exception:  # MLflow raises its own 'not found'
        return False


def _best_name(store: Store, run_id: str, newest: str) -> str | None:
    try:
        best = store.read_json(f"{store.checkpoint_path(run_id, newest)}/meta.json").get("best_checkpoint")
    except (FileNotFoundError, ValueError):
        return None
    return Path(best).name if best else None


def _fetch(store: Store, run_id: str, name: str, run_dir: Path, pulled: Pulled,
           on_bytes: Callable[[int], None] | None) -> str | None:
    """A checkpoint from storage into run_dir (unless the same one is here and verifies); None or its problem."""
    local = run_dir / layout.CHECKPOINTS / name
    try:
        if local.is_dir() and (local / MANIFEST).is_file() and checkpoint_problem(local) is None and \
                store.fs.cat_file(f"{store.checkpoint_path(run_id, name)}/{MANIFEST}") == (local / MANIFEST).read_bytes():
            pulled.notes.append(f"{name}: already in the workspace")
            return None
        local.parent.mkdir(parents=True, exist_ok=True)
        problem = store.download_checkpoint(run_id, name, local, on_bytes)
    except LmlabError:
        raise
    except Exception as e:
        raise LmlabError(f"storage {store.shown}: downloading {name}: {explain(e)}") from None
    if problem is None:
        pulled.downloaded.append(name)
    return problem


def _step(name: str) -> int:
    return int(name.removeprefix("step-"))


def _newest_verified_step(run_dir: Path) -> int | None:
    for path in reversed(layout.list_checkpoints(run_dir)):
        if (path / MANIFEST).is_file() and checkpoint_problem(path) is None:
            return _step(path.name)
    return None


def _local_run_dir(output_dir: str | Path, ref: str) -> Path | None:
    root = Path(output_dir) / layout.RUNS
    if (root / ref).is_dir():
        return root / ref
    found = [p for p in root.glob(f"{ref}*") if p.is_dir()] if ref and root.is_dir() else []
    return found[0] if len(found) == 1 else None


def records_of(url: str, options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every run's ledger record in the storage at `url` (one clear error when it cannot be read)."""
    store = Store(url, options)
    try:
        return store.records()
    except Exception as e:
        raise LmlabError(f"storage {store.shown}: {explain(e)}") from None

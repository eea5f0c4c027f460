"""The workspace's cache of derived data: trained BPE tokenizers and tokenized splits, so runs that share data
settings (a sweep's trials, a rerun) reuse them instead of training the BPE and tokenizing again.

Entries are keyed by what determines them — a split's fingerprint (its examples, in order), the tokenizer's hash
and the settings that shape the result — never by file names or run ids, so a changed file, split or tokenizer is
a miss, not a stale hit. They live in `<workspace>/cache/data/<kind>/<key>.pkl`, written under a temporary name
and renamed (several workers may fill the same entry at once; the first rename wins, both are identical).
Delete the folder to reclaim the space; `LMLAB_DATA_CACHE=0` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lmlab import __version__

T = TypeVar("T")
CACHE_ENV = "LMLAB_DATA_CACHE"
FORMAT = 1  # bump when what an entry holds changes


def cache_key(parts: dict[str, Any]) -> str:
    payload = json.dumps({"lmlab": __version__, "format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cached(workspace: str | Path, kind: str, parts: dict[str, Any], make: Callable[[], T]) -> T:
    """`make()`'s result, read from the cache when an entry for `parts` exists, else made and stored."""
    if os.environ.get(CACHE_ENV, "1") == "0":
        return make()
    path = Path(workspace) / "cache" / "data" / kind / f"{cache_key(parts)}.pkl"
    if path.is_file():
        try:
            with path.open("rb") as f:
                return pickle.load(f)
        except Exception:  # a damaged entry (disk full, older format): make it again
            path.unlink(missing_ok=True)
    value = make()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except OSError:  # a read-only or full workspace only loses the speed-up
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return value

"""Deterministic train/val/test splits and their fingerprints."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from lmlab.errors import LmlabError
from lmlab.recipe.schema import SplitConfig


def split_records(records: list[Any], cfg: SplitConfig, seed: int) -> dict[str, list[Any]]:
    """Shuffle indices with the split seed, then cut by fractions. Same data + seed -> same splits."""
    order = list(range(len(records)))
    random.Random(cfg.seed if cfg.seed is not None else seed).shuffle(order)
    n = len(order)
    n_val = round(n * cfg.val)
    n_test = round(n * cfg.test)
    n_train = n - n_val - n_test
    cut = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    for name, frac in (("train", cfg.train), ("val", cfg.val), ("test", cfg.test)):
        if frac > 0 and not cut[name]:
            raise LmlabError(
                f"data.split.{name}: {frac:g} of {n} examples leaves the {name} split empty; "
                "raise the fraction or use more data"
            )
    return {name: [records[i] for i in idx] for name, idx in cut.items()}


def fingerprint(examples: list[Any]) -> str:
    """sha256 over the examples in order (canonical JSON): equal fingerprints = identical split."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def example_hashes(examples: list[Any]) -> list[str]:
    """A short sha256 per example (same canonical JSON as the fingerprint), in split order: logged as
    `split_hashes.json` so `lmlab diff` can count how many examples two runs' splits do not share."""
    return [hashlib.sha256(json.dumps(ex, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]
            for ex in examples]

"""Where the tests find things, and recipe dicts small enough to train in seconds on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the public data sets live beside the checkout (../shared/data); $LMLAB_DATA may point elsewhere
os.environ.setdefault("LMLAB_DATA", str(REPO.parent / "shared" / "data"))
DATA = Path(os.environ["LMLAB_DATA"])


def tiny_lm(**over) -> dict:
    """A from-scratch LM recipe that trains in a couple of seconds on 2 CPU cores."""
    recipe = {
        "run": {"name": "tiny", "seed": 7},
        "data": {"path": "hn_headlines/hacker_news.csv", "text_column": "title", "max_examples": 1500,
                 "split": {"train": 0.8, "val": 0.2}},
        "tokenizer": {"vocab_size": 400},
        "model": {"arch": "gpt2", "n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 32, "dropout": 0.1},
        "train": {"lr": 3e-3, "batch_size": 8, "max_steps": 12, "warmup_steps": 2, "log_every": 2},
        "eval": {"every_steps": 4},
    }
    return with_overrides(recipe, over)


def with_overrides(recipe: dict, over: dict) -> dict:
    """Apply keyword overrides named like train__lr=1e-3 (double underscore = nesting) to a recipe dict."""
    for dotted, value in over.items():
        node = recipe
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return recipe

"""Headline-model sweep at the fixed 7-epoch budget: which change buys how much validation loss.

Runs recipes/headlines-mainrun-baseline.yaml, then one change at a time towards
recipes/headlines-improved.yaml, through lmlab's own API (the same path as `lmlab run`), and prints
val loss per token and per character (per-char compares runs with different tokenizers fairly).

  python bench/headlines_sweep.py                # all variants (GPU-sized: minutes on one GPU)
  python bench/headlines_sweep.py --only baseline improved --set train.epochs=1
Last line: one JSON object {variant: val_loss_per_char}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmlab import load_recipe, train

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "recipes" / "headlines-mainrun-baseline.yaml"
VARIANTS: dict[str, tuple[Path, list[str]]] = {
    "baseline": (BASE, []),
    "adamw": (BASE, ["train.optimizer=adamw", "train.lr=1e-3", "train.min_lr=1e-4", "train.weight_decay=0.1",
                     "train.warmup_fraction=0.05"]),
    "adamw+rope": (BASE, ["train.optimizer=adamw", "train.lr=1e-3", "train.min_lr=1e-4", "train.weight_decay=0.1",
                          "train.warmup_fraction=0.05", "model.arch=llama"]),
    "adamw+rope+vocab8k": (BASE, ["train.optimizer=adamw", "train.lr=1e-3", "train.min_lr=1e-4",
                                  "train.weight_decay=0.1", "train.warmup_fraction=0.05", "model.arch=llama",
                                  "tokenizer.vocab_size=8192"]),
    "improved": (ROOT / "recipes" / "headlines-improved.yaml", []),
    "improved-batch64": (ROOT / "recipes" / "headlines-improved.yaml", ["train.batch_size=64"]),
    "improved-vocab4k": (ROOT / "recipes" / "headlines-improved.yaml", ["tokenizer.vocab_size=4096"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="variant names to run")
    ap.add_argument("--set", action="append", default=[], help="extra override for every variant")
    ap.add_argument("--output-dir", default="lmlab-runs/sweep")
    args = ap.parse_args()
    results = {}
    print(f"{'variant':24} {'val nats/token':>14} {'val nats/char':>13} {'steps':>6} {'seconds':>8}")
    for name, (path, overrides) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        recipe = load_recipe(path, [*overrides, *args.set, f"run.output_dir={args.output_dir}",
                                    f"run.name=sweep-{name}"])
        t0 = time.perf_counter()
        r = train(recipe, quiet=True)
        m = r.metrics
        results[name] = round(m["val/loss_per_char"], 4)
        print(f"{name:24} {m['val/loss']:14.4f} {m['val/loss_per_char']:13.4f} {r.step:6d} "
              f"{time.perf_counter() - t0:8.1f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

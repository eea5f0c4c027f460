"""What a sweep saves over running its trials by hand: an 8-trial grid on the headline data
(recipes/sweep-headlines-cpu.yaml: optimizer x peak lr x vocabulary, shortened) as one `lmlab sweep`, against the same
8 runs as separate `lmlab run` calls, each mode in a fresh workspace (empty ledger and data cache), alternating.

Per-trial overhead = (wall time - time in training steps) / trials, where a run's time in training steps is its
tokens seen / its mean training tokens per second (both in the ledger; evaluation and checkpointing excluded).
Target: sweep wall time <= 0.85x the separate runs'. Last line: one JSON object.

    nice -n 10 .venv/bin/python bench/sweep_overhead.py [--steps 12] [--rounds 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "sweep-headlines-cpu.yaml"
LMLAB = [sys.executable, "-c", "from lmlab.cli import main; main()"]
GRID = {"train.optimizer": ["adamw", "sgd"], "train.lr": [3e-3, 1e-2], "tokenizer.vocab_size": [1024, 4096]}


def run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def training_seconds(workspace: Path) -> tuple[int, float]:
    """(trial runs, seconds their training steps took) from the workspace's ledger."""
    sys.path.insert(0, str(REPO / "src"))
    from lmlab.workspace.layout import ledger_uri
    from lmlab.workspace.runs import list_runs

    runs = [r for r in list_runs(uri=ledger_uri(workspace / "lmlab-runs"), limit=1000)
            if r.tags.get("lmlab.sweep.role") != "parent"]
    seconds = sum(r.metrics["train/tokens_seen"] / r.metrics["final/train/mean_tokens_per_s"] for r in runs
                  if r.metrics.get("final/train/mean_tokens_per_s"))
    return len(runs), seconds


def sweep_mode(workspace: Path, sets: list[str]) -> float:
    t = time.perf_counter()
    run([*LMLAB, "sweep", str(RECIPE), "--pruner", "none", "--metric", "val/loss", "--name", "bench", *sets],
        workspace)
    return time.perf_counter() - t


def separate_mode(workspace: Path, sets: list[str]) -> float:
    t = time.perf_counter()
    for values in itertools.product(*GRID.values()):
        point = [a for k, v in zip(GRID, values, strict=True) for a in ("--set", f"{k}={v}")]
        run([*LMLAB, "run", str(RECIPE), "--quiet", *sets, *point], workspace)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12, help="training steps per trial")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    # one eval, at the end, of 2 batches: the trials' own work stays small next to what a sweep saves or not
    sets = ["--set", f"train.max_steps={args.steps}", "--set", f"eval.every_steps={args.steps}", "--set",
            "eval.max_batches=2"]
    n = len(list(itertools.product(*GRID.values())))
    rows = {"sweep": [], "separate": []}
    for r in range(args.rounds):
        for mode in (("sweep", "separate") if r % 2 == 0 else ("separate", "sweep")):
            with tempfile.TemporaryDirectory(prefix=f"lmlab-bench-{mode}-") as tmp:
                wall = (sweep_mode if mode == "sweep" else separate_mode)(Path(tmp), sets)
                trials, train_s = training_seconds(Path(tmp))
                assert trials == n, f"{mode}: {trials} runs in the ledger, expected {n}"
                rows[mode].append((wall, train_s))
                print(f"round {r + 1} {mode:8s}: wall {wall:6.1f} s, training steps {train_s:6.1f} s, "
                      f"overhead per trial {(wall - train_s) / n:5.2f} s", flush=True)
    wall = {m: statistics.median(w for w, _ in v) for m, v in rows.items()}
    over = {m: statistics.median((w - t) / n for w, t in v) for m, v in rows.items()}
    print(f"{n} trials x {args.steps} steps: sweep {wall['sweep']:.1f} s, separate runs {wall['separate']:.1f} s "
          f"-> {wall['sweep'] / wall['separate']:.3f}x (target <= 0.85x); overhead per trial: sweep "
          f"{over['sweep']:.2f} s, separate {over['separate']:.2f} s")
    print(json.dumps({"sweep_vs_separate": round(wall["sweep"] / wall["separate"], 3),
                      "sweep_overhead_per_trial_s": round(over["sweep"], 2),
                      "separate_overhead_per_trial_s": round(over["separate"], 2), "trials": n,
                      "steps": args.steps, "rounds": args.rounds}))


if __name__ == "__main__":
    main()

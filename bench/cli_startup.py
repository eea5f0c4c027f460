"""CPU time of the cheap CLI commands against the floor of starting Python and importing typer.

Each command runs `--rounds` times in a fresh process (alternating with the floor); the figure is the median of
user + system CPU seconds of the child (getrusage), which, unlike wall time, does not move with other load.
Target (issue #13): `lmlab --help` and `lmlab validate` ≤ 3× the floor. Last line: one JSON object.

    python bench/cli_startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds(cmd: list[str], env: dict[str, str], cwd: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("LMLAB_DATA", str(REPO.parent / "shared" / "data"))
    env.pop("LMLAB_TRACKING_URI", None)
    lmlab = [sys.executable, "-m", "lmlab"]
    with tempfile.TemporaryDirectory() as empty:
        commands = {
            "floor": [sys.executable, "-c", "import typer"],
            "help": [*lmlab, "--help"],
            "validate": [*lmlab, "validate", str(REPO / "recipes" / "headlines-tiny.yaml")],
            "runs": [*lmlab, "runs", "--output-dir", empty],
            "diff": [*lmlab, "diff", "aaaa", "bbbb", "--output-dir", empty],  # a user error after the imports
        }
        times: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(args.rounds):
            for name, cmd in commands.items():
                times[name].append(cpu_seconds(cmd, env, empty))
    median = {k: statistics.median(v) for k, v in times.items()}
    for name, t in median.items():
        print(f"{name:9s} {t * 1000:7.0f} ms CPU  ({t / median['floor']:.2f}× floor)")
    print(json.dumps({f"{k}_vs_floor": round(median[k] / median["floor"], 2) for k in commands if k != "floor"}
                     | {"floor_ms": round(median["floor"] * 1000)}))


if __name__ == "__main__":
    main()

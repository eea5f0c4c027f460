"""`lmlab` in child processes, for the tests that kill, preempt or race real runs (tests/training/test_faults.py,
test_storage_runs.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmlab.workspace import layout
from lmlab.workspace.runs import list_runs


def lmlab_child(args: list[str], cwd: Path, prelude: str = "") -> subprocess.Popen:
    """`lmlab ARGS` in a child process (the environment of this one, one thread, no tracking server), with `prelude`
    run first (e.g. a patch that kills the child at a chosen point)."""
    code = f"import os, signal, sys\n{prelude}\nfrom lmlab.cli import main\nsys.argv = ['lmlab', *sys.argv[1:]]\nmain()"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LMLAB_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until_it_trains(workspace: Path, timeout: float = 300) -> None:
    """Until the only run in `workspace` has logged a training step (the moment to preempt it), or `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = list_runs(output_dir=str(workspace)) if (workspace / "mlflow.db").exists() else []
        if rows and "train/loss" in rows[0].metrics:
            return
        time.sleep(0.5)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of the run's newest checkpoint."""
    return load_file(str(layout.list_checkpoints(run_dir)[-1] / "model.safetensors"))

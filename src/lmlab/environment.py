"""What a run ran on and with: packages, hardware, threads, code version. Recorded so `lmlab diff` can name it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

PACKAGES = ["lmlab", "torch", "transformers", "accelerate", "tokenizers", "safetensors", "datasets", "peft",
            "mlflow", "pydantic", "numpy", "bitsandbytes", "deepspeed"]


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, dtype: str) -> dict[str, str]:
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "device": device,
        "dtype": dtype,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "gpu_count": str(torch.cuda.device_count()),
    }
    env.update({f"pkg.{k}": v for k, v in package_versions().items()})
    return env


def git_state(cwd: str | Path | None = None) -> dict[str, str] | None:
    """Commit, branch and uncommitted patch of the working directory's repo; None outside a repo."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
    except (subprocess.SubprocessError, OSError):
        return None
    patch = git("diff", "HEAD")
    untracked = git("ls-files", "--others", "--exclude-standard").split()
    return {"commit": commit, "dirty": str(bool(patch or untracked)).lower(), "patch": patch,
            "untracked": "\n".join(untracked)}

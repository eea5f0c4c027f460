"""Memory a training process can use on the devices `lmlab plan` knows: name → usable bytes.

GPU totals are what `nvidia-smi` reports for the card (MiB); usable = total − a reserve for the CUDA context,
the cuBLAS/cuDNN workspaces and allocator fragmentation, none of which `torch.cuda.max_memory_allocated`
counts. A CPU is named by its RAM, `cpu:<N>gb`; usable = N GiB − a reserve for the OS and the Python process
(interpreter, torch, transformers and their libraries: about 1 GiB of resident memory before any tensor).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmlab.errors import LmlabError

MiB = 1024**2
GiB = 1024**3

# CUDA context (~0.3–0.5 GiB on A100/H100 with torch 2.x) + cuBLAS workspace + fragmentation slack
CUDA_RESERVE_BYTES = 1 * GiB
# OS + interpreter + imported libraries on a CPU box
CPU_RESERVE_BYTES = 2 * GiB

# name → (what it is, total memory in MiB as nvidia-smi reports it)
GPUS: dict[str, tuple[str, int]] = {
    "t4-16gb": ("NVIDIA T4 16 GB", 15_360),
    "a10g-24gb": ("NVIDIA A10G 24 GB", 23_028),
    "a100-40gb": ("NVIDIA A100 40 GB", 40_960),
    "a6000-48gb": ("NVIDIA RTX A6000 48 GB", 49_140),
    "a100-80gb": ("NVIDIA A100 80 GB", 81_920),
    "h100-80gb": ("NVIDIA H100 80 GB", 81_559),
    "h200-141gb": ("NVIDIA H200 141 GB", 143_771),
}

_CPU = re.compile(r"cpu:(\d+(?:\.\d+)?)gb?$")
_GPU = re.compile(r"gpu:(\d+(?:\.\d+)?)gb?$")


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: str  # "cuda" or "cpu": decides the optimizer kernels (foreach on CUDA) and the attention path
    total_bytes: int
    usable_bytes: int


def known_devices() -> list[str]:
    return [*GPUS, "cpu:<N>gb", "gpu:<N>gb"]


def parse_device(name: str) -> Device:
    """'a100-40gb', 'cpu:24gb' or 'gpu:12gb' (any CUDA card with that much memory) → Device."""
    key = name.strip().lower()
    if key in GPUS:
        description, mib = GPUS[key]
        total = mib * MiB
        return Device(key, description, "cuda", total, total - CUDA_RESERVE_BYTES)
    if m := _CPU.match(key):
        total = int(float(m.group(1)) * GiB)
        return Device(key, f"CPU with {m.group(1)} GiB RAM", "cpu", total, max(total - CPU_RESERVE_BYTES, 0))
    if m := _GPU.match(key):
        total = int(float(m.group(1)) * GiB)
        return Device(key, f"CUDA GPU with {m.group(1)} GiB", "cuda", total, max(total - CUDA_RESERVE_BYTES, 0))
    raise LmlabError(f"--device: unknown device '{name}'; use one of {', '.join(known_devices())}")

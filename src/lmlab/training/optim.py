"""The optimizer (AdamW or SGD, nanoGPT's decay groups, fused kernels) and the learning-rate schedule: linear
warmup, then constant / linear / cosine decay to min_lr."""

from __future__ import annotations

import math
from typing import Any

import torch

from lmlab.recipe.schema import TrainConfig


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, schedule: str) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1.0 - progress)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def param_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool) -> list[dict[str, Any]]:
    """Decay matrices; exclude biases, norm weights and embeddings unless decay_all (nanoGPT's split)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if decay_all or (p.dim() >= 2 and id(p) not in embeddings) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(t: TrainConfig, model: torch.nn.Module, *, strategy: str = "none") -> torch.optim.Optimizer:
    groups = param_groups(model, t.weight_decay, t.decay_norms_and_biases)
    # fused kernels need plain tensors on one CPU/CUDA device; DeepSpeed and FSDP shard and step on their own
    fused = t.fused and strategy in ("none", "ddp") and \
        len({p.device.type for g in groups for p in g["params"]} - {"cpu", "cuda"}) == 0
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, fused=fused or None)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=fused or None)

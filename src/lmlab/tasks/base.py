"""What the one training loop needs from a task (lm, sft, pair_classify): the loop never branches on task.
`training.prepare` returns a Task; `tests/tasks` checks that every task implements it.

A batch is a dict of tensors. For causal LMs: `input_ids` (B, T), `labels` (B, T) already aligned so that
labels[:, t] is the target for position t (-100 = no loss), optional `attention_mask` (B, T) or a 4-D
additive/boolean mask (B, 1, T, T) and `position_ids` (B, T) for packed rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Task(Protocol):
    train_set: Sequence[Any]  # examples, indexable; the loop shuffles indices, not data
    val_set: Sequence[Any]
    test_set: Sequence[Any]  # empty unless data.split.test > 0; evaluated once at the end

    def collate(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        """Examples -> one batch of tensors (on CPU; the loop moves it to the device)."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of per-item losses, number of items) for the batch: tokens for LMs, examples for classifiers.
        The loop divides by the item count over the whole optimizer step, so accumulation and world size
        do not change the result."""
        ...

    def evaluate(self, model: torch.nn.Module, examples: Sequence[Any], prefix: str,
                 device: torch.device | None = None, autocast: Callable | None = None) -> dict[str, float]:
        """Metrics on a split, keys prefixed ('val/loss', 'val/accuracy', ...), on `device` under the loop's
        `autocast`. Runs under torch.no_grad."""
        ...

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Items the loss of this batch is a sum over (the same number `loss` returns), known before the
        forward pass so the loop can normalise the loss once per step, before backward."""
        ...

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the model processed in the batch, padding excluded (train/tokens_per_s, train/tokens_seen)."""
        ...

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens that carry loss (train/loss_tokens_per_s): fewer than `tokens` where prompts are masked (SFT)."""
        ...

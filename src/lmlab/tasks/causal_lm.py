"""The causal-LM task (tasks lm and sft): token cross-entropy, val loss per token and per character."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.data.packing import batch_token_counts


def token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL in nats, number of target tokens). labels are already aligned with positions."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # use_cache=False: with a KV cache transformers skips packed-sequence detection (position_ids path)
    logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    labels = batch["labels"]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return nll, (labels != -100).sum()


class CausalLMTask:
    def __init__(self, train_set: Sequence[Any], val_set: Sequence[Any], collate: Callable[[list], dict],
                 *, eval_batch_size: int, eval_max_batches: int | None = None,
                 chars: dict[str, int] | None = None, test_set: Sequence[Any] = (),
                 eval_collate: Callable[[list], dict] | None = None, pad_id: int | None = None):
        self.train_set, self.val_set, self.test_set = train_set, val_set, test_set
        self.collate = collate  # training batches (padded, packed or fixed blocks)
        self.eval_collate = eval_collate or collate  # evaluation scores every example on its own row
        self.eval_batch_size, self.eval_max_batches = eval_batch_size, eval_max_batches
        self.chars = chars or {}  # split prefix -> characters of that split's text
        self.pad_id = pad_id  # finds a packed row's trailing padding (packed batches have no 2-D attention mask)

    def loss(self, model, batch):
        return token_nll(model, batch)

    def tokens(self, batch) -> int:
        """Tokens the model read, padding excluded (a packed row's trailing padding block too)."""
        return batch_token_counts(batch, self.pad_id)[0]

    def loss_tokens(self, batch) -> int:
        return int((batch["labels"] != -100).sum())

    def count(self, batch) -> int:
        """Items the loss is averaged over: target tokens."""
        return int((batch["labels"] != -100).sum())

    def _eval_batches(self, examples: Sequence[Any]):
        n, size = len(examples), self.eval_batch_size
        for start in range(0, n, size):
            yield self.eval_collate([examples[i] for i in range(start, min(start + size, n))])

    @torch.no_grad()
    def evaluate(self, model, examples, prefix: str, device: torch.device | None = None,
                 autocast: Callable | None = None) -> dict[str, float]:
        """loss (nats per target token), ppl, tokens scored, coverage (tokens scored ÷ target tokens in the split:
        below 1 when eval.max_batches caps it) and, for a whole split with known characters, loss_per_char."""
        was_training = model.training
        model.eval()
        total_nll, total_tokens, in_split = 0.0, 0, 0
        limit = self.eval_max_batches
        for b, batch in enumerate(self._eval_batches(examples)):
            if limit is not None and b >= limit:  # not scored; counted for the coverage
                in_split += int((batch["labels"] != -100).sum())
                continue
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            with autocast() if autocast else contextlib.nullcontext():
                nll, count = token_nll(model, batch)
            total_nll += float(nll)
            total_tokens += int(count)
        model.train(was_training)
        in_split += total_tokens
        loss = total_nll / max(total_tokens, 1)
        out = {f"{prefix}/loss": loss, f"{prefix}/ppl": math.exp(min(loss, 50.0)), f"{prefix}/tokens": total_tokens,
               f"{prefix}/coverage": total_tokens / max(in_split, 1)}
        # nats per character only when the whole split was scored: a capped eval would divide by the wrong count
        if prefix in self.chars and limit is None:
            out[f"{prefix}/loss_per_char"] = total_nll / self.chars[prefix]
        return out


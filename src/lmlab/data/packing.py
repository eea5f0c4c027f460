"""Batches for SFT: right-padded, or packed into fixed-length rows without cross-example attention.

Packing concatenates examples into rows of at most `max_length` tokens (best-fit decreasing: deterministic, and
rows come out nearly full). Each example keeps its own positions (position_ids restart at 0) and attends only
to itself: `collate_packed` builds a block-diagonal causal mask. Labels are already aligned per example with the
last position -100, so no example ever predicts the first token of the next one.

Which mask, measured on transformers 5.23 (tests/data/test_packing.py):
- attention="mask" (default): a 4-D *additive float* mask (B, 1, T, T), 0 = attend, float32 min = blocked.
  transformers uses any 4-D mask as is, for Llama and GPT-2 alike, with sdpa and eager attention, whatever the
  model's `use_cache`. A *boolean* 4-D mask is right under sdpa but silently wrong under eager attention (eager
  adds the mask to the scores, so True/False become +1/+0), which is why we never emit one.
- attention="position_ids": no mask at all; transformers infers the blocks from position_ids restarting at 0
  (its padding-free path, the one flash-attention uses, no (T, T) tensor). It only does so when no KV cache is
  passed, and models build one by default (`config.use_cache` is True even in train mode): call the model with
  `use_cache=False`, or the examples silently attend to each other.
`packed_attention(model)` picks the mode for a model and refuses attention kernels that take neither.
"""

from __future__ import annotations

import bisect
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from lmlab.errors import LmlabError

IGNORE = -100
Attention = Literal["mask", "position_ids"]


def pack_examples(examples: Sequence[Mapping[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Pack examples into rows of at most `max_length` tokens, best-fit decreasing.

    Each row is `{"input_ids", "labels", "position_ids", "lengths", "rows"}`: concatenated ids and labels,
    positions restarting at 0 per example, the example lengths, and the examples' `row` numbers (their indices
    when they have none). Within a row, examples keep their input order; rows come longest-first."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise LmlabError(
            f"data.packing: {len(too_long)} examples are longer than max_length ({max_length}), first is example "
            f"{too_long[0]} with {lengths[too_long[0]]} tokens; tokenize with the same data.max_length"
        )
    order = sorted(range(len(examples)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[
        tuple[int, int]
    ] = []  # (room left, bin index), sorted: the tightest bin that fits is found by bisect
    for i in order:
        n = lengths[i]
        if n == 0:
            continue
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    rows = []
    for members in bins:
        members.sort()
        row: dict[str, Any] = {"input_ids": [], "labels": [], "position_ids": [], "lengths": [], "rows": []}
        for i in members:
            ex = examples[i]
            row["input_ids"] += list(ex["input_ids"])
            row["labels"] += list(ex["labels"])
            row["position_ids"] += list(range(lengths[i]))
            row["lengths"].append(lengths[i])
            row["rows"].append(ex.get("row", i))
        rows.append(row)
    return rows


def packing_efficiency(rows: Sequence[Mapping[str, Any]], max_length: int) -> float:
    """Fraction of the rows' token slots holding real tokens (1.0 = no padding at all)."""
    if not rows:
        return 0.0
    return sum(len(r["input_ids"]) for r in rows) / (len(rows) * max_length)


def collate_packed(
    rows: Sequence[Mapping[str, Any]], pad_id: int, attention: Attention = "mask"
) -> dict[str, torch.Tensor]:
    """Packed rows -> batch: input_ids, labels, position_ids (B, T) and, with attention="mask", a block-diagonal
    causal `attention_mask` (B, 1, T, T) float32 (0 attend, min blocked). Rows shorter than the longest are
    right-padded; the padding forms its own block (positions from 0, labels -100) so no attention row is empty."""
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.zeros((B, T), dtype=torch.long)  # which example each position belongs to
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(r["labels"], dtype=torch.long)
        position_ids[b, :n] = torch.tensor(r["position_ids"], dtype=torch.long)
        lengths = r.get("lengths") or [n]
        segment[b, :n] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        if n < T:
            position_ids[b, n:] = torch.arange(T - n)
            segment[b, n:] = len(lengths)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if attention == "mask":
        batch["attention_mask"] = block_causal_mask(segment)
    elif attention != "position_ids":
        raise ValueError(f"attention must be 'mask' or 'position_ids', got {attention!r}")
    return batch


def block_causal_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) additive float32 mask: query t sees key s iff s <= t and same segment."""
    T = segment.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return mask[:, None]


def collate_padded(examples: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Examples -> right-padded batch: input_ids, labels, attention_mask (B, T). Padding is masked by position
    (labels -100, attention 0), never by comparing ids with pad_id, so an EOS equal to pad stays a target."""
    T = max(len(ex["input_ids"]) for ex in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def batch_token_counts(batch: Mapping[str, torch.Tensor], pad_id: int | None = None) -> tuple[int, int]:
    """(real tokens, loss-bearing tokens) in a batch, for effective tokens/s. Real = attended positions for
    padded batches; for packed batches (no 2-D mask) all positions minus the trailing padding block."""
    labels = batch["labels"]
    loss_tokens = int((labels != IGNORE).sum())
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum()), loss_tokens
    if "position_ids" in batch and pad_id is not None:
        # trailing padding of a packed row: the last block, made of pad ids only, with no targets
        real = 0
        for ids, pos in zip(batch["input_ids"], batch["position_ids"], strict=True):
            starts = (pos == 0).nonzero().flatten().tolist()
            last = starts[-1]
            tail_is_pad = len(starts) > 1 and bool((ids[last:] == pad_id).all())
            real += last if tail_is_pad else len(ids)
        return real, loss_tokens
    return labels.numel(), loss_tokens


def packed_attention(model: torch.nn.Module) -> Attention:
    """How to feed packed rows to `model`: 'mask' for eager/sdpa attention, 'position_ids' for flash / flex
    attention (which cannot take a dense 4-D mask). Raises LmlabError for a model that takes no position_ids."""
    base = getattr(model, "get_base_model", lambda: model)()  # a peft wrapper forwards to the base model
    params = inspect.signature(base.forward).parameters
    if "position_ids" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise LmlabError(
            f"data.packing: {type(base).__name__} takes no position_ids, so packed examples cannot restart their "
            "positions; set data.packing: false"
        )
    impl = str(getattr(getattr(base, "config", None), "_attn_implementation", None) or "eager")
    if impl.startswith("flash") or impl.startswith("flex") or "paged" in impl:
        return "position_ids"
    if impl not in ("eager", "sdpa"):
        raise LmlabError(
            f"data.packing: attention implementation '{impl}' is not known to take a 4-D mask; "
            "load the model with attn_implementation='sdpa' or set data.packing: false"
        )
    return "mask"

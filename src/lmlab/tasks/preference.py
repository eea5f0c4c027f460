"""The dpo task (lmlab.tasks.base.Task): Direct Preference Optimization on (prompt, chosen, rejected) pairs.

One batch of B pairs is one forward pass over 2B rows — the B chosen sequences, then the B rejected ones — each
scored by the sum of its response tokens' log-probabilities. Rows are padded on the left (positions counted from
each row's first real token), so every response ends in the last column and the LM head runs only over the last
`max response length + 1` columns instead of every prompt position (`logits_to_keep`).

The reference π_ref is one of three strategies (dpo.reference, see lmlab.recipe.dpo):
- AdapterDisabled: the policy itself with its LoRA adapter switched off (peft's disable_adapter): no copy;
- FrozenCopy: a frozen copy of the starting model, moved to the batch's device on first use;
- Precomputed: log-probs computed once before training (`precompute_reference`) and carried in the examples.

`loss` returns the sum of per-pair losses and the loop divides by the pairs of the whole step. Rewards, margin and
accuracy of the pairs trained on since the last log step come out of `train_metrics()`, which the loop merges into
its logged row.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


# ------------------------------------------------------------------------------------------------ batches
def collate_pairs(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """B pair examples → 2B left-padded rows: input_ids, labels (aligned; -100 = no loss), attention_mask,
    position_ids (each row counts from its first real token) and, when the examples carry precomputed
    reference log-probs, ref_logps (2B,) in the same row order."""
    rows = [(e["chosen_ids"], e["chosen_labels"]) for e in examples] + \
           [(e["rejected_ids"], e["rejected_labels"]) for e in examples]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        n = len(ids)
        input_ids[i, width - n:] = torch.tensor(ids)
        labels[i, width - n:] = torch.tensor(labs)
        attention_mask[i, width - n:] = 1
        position_ids[i, width - n:] = torch.arange(n)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}
    if "ref" in examples[0]:
        batch["ref_logps"] = torch.tensor([e["ref"][0] for e in examples] + [e["ref"][1] for e in examples],
                                          dtype=torch.float32)
    return batch


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows,) summed log-probability of each row's labelled tokens under `model` (fp32)."""
    labels = batch["labels"]
    labelled = (labels != IGNORE).any(0)
    first = int(labelled.float().argmax()) if bool(labelled.any()) else labels.shape[1] - 1
    keep = labels.shape[1] - first  # columns from the first labelled one on: the LM head runs over these only
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if _takes_logits_to_keep(model):
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (rows, keep, V)
    else:
        logits = model(**inputs, use_cache=False).logits[:, first:]
    targets = labels[:, first:]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(targets.shape).sum(1)


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = unwrap(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP / DeepSpeed (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


# --------------------------------------------------------------------------------------------------- loss
def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen rewards, rejected rewards), each (B,). Rewards are β · (log π − log π_ref), detached.

    sigmoid (DPO, Rafailov et al. 2023, eq. 7; label smoothing ε as conservative DPO):
        −(1−ε) log σ(βΔ) − ε log σ(−βΔ),  Δ = (log π_w − log π_ref,w) − (log π_l − log π_ref,l)
    ipo (Azar et al. 2023, eq. 17, with per-token log-ratios as TRL): (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))²"""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the response token counts")
        z = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss '{loss}'")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean rewards and margin, and preference accuracy: the share of pairs whose margin is > 0, a margin of
    exactly 0 (policy = reference, as before training) counting half — so an untrained policy scores chance."""
    margin = (chosen_rewards - rejected_rewards).double()
    if not margin.numel():
        return {}
    accuracy = ((margin > 0).double() + 0.5 * (margin == 0).double()).mean()
    return {f"{prefix}/rewards/chosen": float(chosen_rewards.double().mean()),
            f"{prefix}/rewards/rejected": float(rejected_rewards.double().mean()),
            f"{prefix}/rewards/margin": float(margin.mean()), f"{prefix}/accuracy": float(accuracy)}


# ------------------------------------------------------------------------------------------- references
class AdapterDisabled:
    """π_ref = the policy with its LoRA adapter off: the base model the adapter was added to."""

    name = "adapter_disabled"

    def logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = unwrap(model)
        with torch.no_grad(), inner.disable_adapter():
            return sequence_logps(inner, batch)


class FrozenCopy:
    """π_ref = a frozen copy of the starting model (one more model's weights in memory)."""

    name = "frozen_copy"

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = batch["input_ids"].device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        with torch.no_grad():
            return sequence_logps(self.model, batch)


class Precomputed:
    """π_ref's log-probs computed once before training, carried by every example (`precompute_reference`)."""

    name = "precomputed"

    def logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["ref_logps"]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of every parameter (name, shape, sum and first values): tells a starting model from another,
    a trained adapter included, without hashing every byte."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().flatten()
            h.update(f"{name}{tuple(p.shape)}{float(flat.double().sum()):.6e}".encode())
            h.update(torch.round(flat[:16].float().cpu() * 1e4).to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def precompute_reference(model: torch.nn.Module, examples: Sequence[dict[str, Any]], collate: Callable,
                         batch_size: int, *, device: torch.device | None = None,
                         autocast: Callable | None = None) -> list[tuple[float, float]]:
    """(chosen, rejected) reference log-probs of every example under `model` as it is now, in eval mode."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    out: list[tuple[float, float]] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = list(examples[start:start + batch_size])
            batch = {k: v.to(device) for k, v in collate(chunk).items() if k != "ref_logps"}
            with autocast() if autocast else contextlib.nullcontext():
                logps = sequence_logps(model, batch).cpu()
            n = len(chunk)
            out += [(float(logps[i]), float(logps[n + i])) for i in range(n)]
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------- task
class DpoTask:
    def __init__(self, cfg: Any, train_set: Sequence[dict], val_set: Sequence[dict], test_set: Sequence[dict] = (),
                 *, reference: Any, pad_id: int, eval_batch_size: int, eval_max_batches: int | None = None):
        self.cfg = cfg  # the recipe's dpo section: beta, loss, label_smoothing
        self.train_set, self.val_set, self.test_set = train_set, val_set, test_set
        self.reference, self.pad_id = reference, pad_id
        self.eval_batch_size, self.eval_max_batches = eval_batch_size, eval_max_batches
        self._trained: list[torch.Tensor] = []  # (2, B) chosen / rejected rewards of each micro-batch since the last log

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return collate_pairs(examples, self.pad_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Items the loss is a sum over: pairs."""
        return batch["input_ids"].shape[0] // 2

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the model read (both sides of every pair), padding excluded."""
        return int(batch["attention_mask"].sum())

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Response tokens: those whose log-probs the loss sums."""
        return int((batch["labels"] != IGNORE).sum())

    def _pair_losses(self, model, batch) -> tuple[torch.Tensor, ...]:
        """(per-pair losses, chosen rewards, rejected rewards, policy log-probs, reference log-probs)."""
        # the reference first: its activations are freed before the policy's forward
        ref = batch["ref_logps"] if "ref_logps" in batch else self.reference.logps(model, batch)
        logps = sequence_logps(model, batch)
        b = logps.shape[0] // 2
        tokens = (batch["labels"] != IGNORE).sum(1)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:b], logps[b:], ref[:b], ref[b:], beta=self.cfg.beta, loss=self.cfg.loss,
            label_smoothing=self.cfg.label_smoothing, chosen_tokens=tokens[:b], rejected_tokens=tokens[b:])
        return losses, chosen_rewards, rejected_rewards, logps.detach(), ref

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        losses, chosen_rewards, rejected_rewards, _, _ = self._pair_losses(model, batch)
        self._trained.append(torch.stack([chosen_rewards, rejected_rewards]))
        return losses.sum(), torch.tensor(losses.numel())

    def train_metrics(self) -> dict[str, float]:
        """Rewards, margin and accuracy over the pairs trained on since the last call (this process's share)."""
        if not self._trained:
            return {}
        rewards = torch.cat(self._trained, dim=1).float().cpu()
        self._trained.clear()
        return pair_metrics(rewards[0], rewards[1], "train")

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: Sequence[dict], prefix: str,
                 device: torch.device | None = None, autocast: Callable | None = None) -> dict[str, float]:
        """'{prefix}/loss' (mean over pairs), rewards/chosen, rewards/rejected, rewards/margin, accuracy (margin
        > 0, ties half), policy_accuracy (log π(chosen) > log π(rejected), no reference), logps/chosen,
        logps/rejected, pairs. The reference log-probs of each pair are kept with it after the first evaluation:
        the reference does not change during a run, so later evaluations run the policy only."""
        was_training = model.training
        model.eval()
        device = device or next(model.parameters()).device
        if self.eval_max_batches is not None:
            examples = examples[: self.eval_max_batches * self.eval_batch_size]
        losses, chosen, rejected, logps_c, logps_r = [], [], [], [], []
        try:
            for start in range(0, len(examples), self.eval_batch_size):
                chunk = list(examples[start:start + self.eval_batch_size])
                batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
                with autocast() if autocast else contextlib.nullcontext():
                    loss, c, r, logps, ref = self._pair_losses(model, batch)
                b = logps.shape[0] // 2
                if "ref" not in chunk[0]:
                    ref = ref.float().cpu().tolist()
                    for i, e in enumerate(chunk):
                        e["ref"] = (ref[i], ref[b + i])
                losses.append(loss.float().cpu())
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
                logps_c.append(logps[:b].float().cpu())
                logps_r.append(logps[b:].float().cpu())
        finally:
            model.train(was_training)
        if not losses:
            return {f"{prefix}/pairs": 0.0}
        lc, lr = torch.cat(logps_c), torch.cat(logps_r)
        return {f"{prefix}/loss": float(torch.cat(losses).double().mean()),
                **pair_metrics(torch.cat(chosen), torch.cat(rejected), prefix),
                f"{prefix}/policy_accuracy": float((lc > lr).double().mean()),
                f"{prefix}/logps/chosen": float(lc.double().mean()), f"{prefix}/logps/rejected": float(lr.double().mean()),
                f"{prefix}/pairs": float(len(lc))}

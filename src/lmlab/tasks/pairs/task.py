"""The pair_classify task (lmlab.task.Task): prompt + response A + response B → A wins / B wins / tie.

Order bias is handled twice: training sees every pair in both orders (pair.swap_augment) and prediction
averages both orders (pair.swap_tta): p(x) = (p_model(x) + swap(p_model(swap(x)))) / 2, so
P(A wins | A, B) = P(B wins | B, A) exactly. Pairs with equal responses follow pair.identical_responses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.data.pairs import LABEL_NAMES, TIE, PairDataReport, records_to_pairs
from lmlab.errors import LmlabError
from lmlab.recipe.pair import PairConfig, pair_config
from lmlab.recipe.schema import Recipe
from lmlab.tasks.pairs.encode import SWAP, EncodedPair, PairLayout, tokenize_pairs
from lmlab.tasks.pairs.metrics import Baselines, classification_metrics, confusion_matrix


def pair_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 3) logits from a PairClassifier (returns a tensor) or a transformers/peft model (returns .logits)."""
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return getattr(out, "logits", out)


class PairTask:
    def __init__(self, cfg: PairConfig, layout: PairLayout, train_set: Sequence[EncodedPair],
                 val_set: Sequence[EncodedPair], test_set: Sequence[EncodedPair] = (), *, baselines: Baselines,
                 identical_probs: tuple[float, float, float], eval_batch_size: int,
                 eval_max_batches: int | None = None, info: dict[str, Any] | None = None,
                 artifacts: dict[str, Any] | None = None, notes: list[str] | None = None):
        self.cfg, self.layout = cfg, layout
        self.train_set, self.val_set, self.test_set = train_set, val_set, test_set
        self.baselines, self.identical_probs = baselines, identical_probs
        self.eval_batch_size, self.eval_max_batches = eval_batch_size, eval_max_batches
        self.info = info or {}  # flat counts and resolved values, for the ledger's params
        self.artifacts = artifacts or {}  # JSON reports for the ledger
        self.notes = notes or []  # what conversion did, printed at the start of a run

    @property
    def checkpoint_files(self) -> dict[str, Any]:
        """JSON written beside the weights: what prediction needs besides the model (class order, rules)."""
        return {"pair_task.json": {"labels": list(LABEL_NAMES), "pair": self.cfg.model_dump(mode="json"),
                                   "identical_probs": list(self.identical_probs),
                                   "baselines": self.baselines.to_dict()}}

    def collate(self, examples: list[EncodedPair]) -> dict[str, torch.Tensor]:
        return self.layout.collate(examples)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = pair_logits(model, batch)
        labels = batch["labels"]
        return F.cross_entropy(logits.float(), labels, reduction="sum"), torch.tensor(labels.numel())

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Every token feeds the one classification loss of its pair."""
        return self.tokens(batch)

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, examples: Sequence[EncodedPair], device: torch.device | None = None,
                autocast: Callable | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (N, 3) after swap averaging and the equal-responses rule, and per pair whether
        both orders predicted the same winner (None without swap_tta)). Batches are fixed by position, so
        a pair and its swap see identical computations."""
        was_training = model.training
        model.eval()
        device = device or next(model.parameters()).device
        probs, agree = [], []
        try:
            for start in range(0, len(examples), self.eval_batch_size):
                chunk = list(examples[start:start + self.eval_batch_size])
                p = self._probs(model, chunk, device, autocast)
                if self.cfg.swap_tta:
                    q = self._probs(model, [ex.swap() for ex in chunk], device, autocast)[:, SWAP]
                    agree.append(p.argmax(1) == q.argmax(1))
                    p = (p + q) / 2
                probs.append(p)
        finally:
            model.train(was_training)
        out = torch.cat(probs).numpy() if probs else np.zeros((0, 3), dtype=np.float32)
        if self.cfg.identical_responses == "fixed":
            fixed = np.array([ex.identical for ex in examples], dtype=bool)
            out[fixed] = self.identical_probs
        return out, (torch.cat(agree).numpy() if agree else None)

    def _probs(self, model, chunk, device, autocast) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
        with autocast() if autocast else contextlib.nullcontext():
            logits = pair_logits(model, batch)
        return logits.float().softmax(-1).cpu()

    def evaluate(self, model: torch.nn.Module, examples: Sequence[EncodedPair], prefix: str,
                 device: torch.device | None = None, autocast: Callable | None = None) -> dict[str, float]:
        """'{prefix}/accuracy', 'log_loss' (= 'loss', the competition metric), recall and confusion counts,
        the baselines on the same pairs, 'swap_agreement', 'pairs' and 'fixed_rule_pairs'."""
        return {f"{prefix}/{k}": v for k, v in self.report(model, examples, device, autocast)["metrics"].items()}

    def report(self, model: torch.nn.Module, examples: Sequence[EncodedPair], device: torch.device | None = None,
               autocast: Callable | None = None) -> dict[str, Any]:
        """Everything `evaluate` logs plus the confusion matrix as a table and the baselines' fitted values,
        as a JSON-able dict."""
        in_split = len(examples)
        if self.eval_max_batches is not None:
            examples = examples[: self.eval_max_batches * self.eval_batch_size]
        probs, agree = self.predict(model, examples, device, autocast)
        labels = np.array([ex.label for ex in examples], dtype=np.int64)
        a_chars = np.array([ex.a_chars for ex in examples])
        b_chars = np.array([ex.b_chars for ex in examples])
        # coverage: pairs scored ÷ pairs in the split (below 1 when eval.max_batches caps the evaluation)
        metrics: dict[str, float] = {"pairs": float(len(examples)), "coverage": len(examples) / max(in_split, 1)}
        if len(examples):
            metrics.update(classification_metrics(probs, labels))
            metrics["loss"] = metrics["log_loss"]
            metrics.update(self.baselines.scores(labels, a_chars, b_chars))
            if agree is not None:
                metrics["swap_agreement"] = float(agree.mean())
        if self.cfg.identical_responses == "fixed":
            metrics["fixed_rule_pairs"] = float(sum(ex.identical for ex in examples))
        return {
            "metrics": metrics,
            "confusion": {"rows_true_columns_predicted": list(LABEL_NAMES),
                          "counts": confusion_matrix(probs.argmax(1), labels).tolist() if len(examples) else []},
            "baselines": self.baselines.to_dict(),
            "identical_probs": list(self.identical_probs),
        }


def build_pair_task(recipe: Recipe, records_by_split: dict[str, list[dict[str, Any]]], tokenizer) -> PairTask:
    """Convert, check and tokenize each split's records (keys 'train', 'val', optional 'test'); fit the
    baselines and the equal-responses rule on the training split."""
    cfg = pair_config(recipe)
    source = str(recipe.data.path or recipe.data.hf_dataset)
    max_length = recipe.data.max_length
    layout = PairLayout(tokenizer, cfg, max_length)
    encoded: dict[str, list[EncodedPair]] = {}
    reports: dict[str, PairDataReport] = {}
    for name, records in records_by_split.items():
        pairs, reports[name] = records_to_pairs(records, cfg, seed=recipe.run.seed, source=source,
                                                where=f"of the {name} split")
        encoded[name] = tokenize_pairs(pairs, tokenizer, cfg, max_length)
    train = encoded.get("train", [])
    if not train:
        raise LmlabError(f"{source}: the training split has no pairs left after conversion "
                         f"({reports['train'].to_dict() if 'train' in reports else 'no train split'}); check the data")
    identical_probs = resolve_identical_probs(cfg, train)
    baselines = Baselines.fit([e.label for e in train], [e.a_chars for e in train], [e.b_chars for e in train])

    info: dict[str, Any] = {"pair.label_source": reports["train"].label_source,
                            "pair.identical_probs": list(identical_probs)}
    truncated = {name: sum(layout.truncated(e) for e in examples) for name, examples in encoded.items()}
    for name, r in reports.items():
        info[f"data.{name}.pairs"] = r.pairs
        info[f"data.{name}.truncated"] = truncated[name]
        for key in ("empty_responses", "empty_dropped", "identical", "identical_dropped", "invalid_json_dropped",
                    "null_turns", "prefix_moved", "prefix_marker_missing"):
            if getattr(r, key):
                info[f"data.{name}.{key}"] = getattr(r, key)
        for label, count in r.labels.items():
            info[f"data.{name}.label_{label}"] = count
    if cfg.identical_responses == "fixed":  # no signal on which is better: predicted by the rule, not trained on
        info["data.train.identical_not_trained"] = sum(e.identical for e in train)
        train = [e for e in train if not e.identical]
    if recipe.data.truncation == "drop":  # training only: val/test stay whole so runs remain comparable
        kept = [e for e in train if not layout.truncated(e)]
        info["data.train.truncated_dropped"] = len(train) - len(kept)
        train = kept
    if cfg.swap_augment:
        train = train + [e.swap() for e in train]
    info["data.train.items"] = len(train)
    notes = [_describe(name, r, truncated[name], max_length) for name, r in reports.items()]
    if cfg.identical_responses == "fixed" and any(r.identical for r in reports.values()):
        notes.append(f"equal responses: predicted as P(a, b, tie) = {_fmt(identical_probs)}, not trained on")
    notes.append(f"train: {len(train)} items per epoch" + (" (every pair in both orders)" if cfg.swap_augment else ""))
    artifacts = {"pair_data": {name: {**r.to_dict(), "truncated": truncated[name]} for name, r in reports.items()},
                 "pair_baselines": baselines.to_dict()}
    return PairTask(cfg, layout, train, encoded.get("val", []), encoded.get("test", []), baselines=baselines,
                    identical_probs=identical_probs,
                    eval_batch_size=recipe.eval.batch_size or recipe.train.batch_size,
                    eval_max_batches=recipe.eval.max_batches, info=info, artifacts=artifacts, notes=notes)


def resolve_identical_probs(cfg: PairConfig, train: Sequence[EncodedPair]) -> tuple[float, float, float]:
    """pair.identical_probs, else from the training split: tie rate among its equal-response pairs,
    (ties + 1) / (n + 2) when the split has ties at all, else 0; A and B share the rest equally."""
    if cfg.identical_probs is not None:
        return tuple(cfg.identical_probs)  # type: ignore[return-value]
    if not any(e.label == TIE for e in train):
        return (0.5, 0.5, 0.0)
    same = [e for e in train if e.identical]
    tie = (sum(e.label == TIE for e in same) + 1) / (len(same) + 2)
    return ((1 - tie) / 2, (1 - tie) / 2, tie)


def _describe(split: str, r: PairDataReport, truncated: int, max_length: int) -> str:
    labels = " / ".join(f"{k} {v}" for k, v in r.labels.items())
    parts = [f"{split}: {r.pairs} pairs from {r.rows} records ({r.label_source}; {labels})",
             f"{truncated} cut to {max_length} tokens"]
    for key, what in (("empty_responses", "with an empty response"), ("empty_dropped", "dropped for an empty response"),
                      ("identical", "with equal responses"), ("identical_dropped", "dropped for equal responses"),
                      ("invalid_json_dropped", "dropped for invalid JSON"), ("null_turns", "null turns read as empty"),
                      ("prefix_marker_missing", "without the shared-prefix marker")):
        if getattr(r, key):
            parts.append(f"{getattr(r, key)} {what}")
    return ", ".join(parts)


def _fmt(probs: Sequence[float]) -> str:
    return "(" + ", ".join(f"{p:.3g}" for p in probs) + ")"

"""3-class pair metrics (accuracy, log loss, confusion, recall) and the baselines printed beside them.

Baselines are fitted on the training split and scored on the same examples as the model, so a run at
chance is obvious: majority class (predicts the training split's most frequent label; its log loss uses the
training label frequencies) and "longer response wins" (accuracy of the literal rule, equal lengths → tie;
log loss of the rule calibrated on the training split: P(longer wins), P(shorter wins), P(tie)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmlab.data.pairs import LABEL_NAMES, TIE

EPS = 1e-15  # probability clip of the competition's log loss (then rows are renormalised)


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log probability of the true class, probs (N, 3) clipped to [EPS, 1 − EPS]."""
    p = np.clip(probs, EPS, 1 - EPS)
    p = p / p.sum(axis=1, keepdims=True)
    return float(-np.log(p[np.arange(len(labels)), labels]).mean())


def confusion_matrix(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(3, 3) counts, rows = true class, columns = predicted class (order a, b, tie)."""
    m = np.zeros((3, 3), dtype=np.int64)
    np.add.at(m, (labels, pred), 1)
    return m


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, log_loss, recall_<class> (classes present only), confusion_<true>_as_<pred> counts."""
    pred = probs.argmax(axis=1)  # equal probabilities resolve to the first class (a before b before tie)
    m = confusion_matrix(pred, labels)
    out = {"accuracy": float((pred == labels).mean()), "log_loss": log_loss(probs, labels)}
    for k, name in enumerate(LABEL_NAMES):
        if m[k].sum():
            out[f"recall_{name}"] = float(m[k, k] / m[k].sum())
    for t, true in enumerate(LABEL_NAMES):
        for p, guess in enumerate(LABEL_NAMES):
            out[f"confusion_{true}_as_{guess}"] = float(m[t, p])
    return out


@dataclass(frozen=True)
class Baselines:
    prior: np.ndarray  # (3,) smoothed training label frequencies
    longer: np.ndarray  # (3,) P(longer wins), P(shorter wins), P(tie) when lengths differ
    equal_tie: float  # P(tie) when lengths are equal

    @classmethod
    def fit(cls, labels: Sequence[int], a_chars: Sequence[int], b_chars: Sequence[int]) -> Baselines:
        """Laplace-smoothed (+1) frequencies from the training split."""
        labels, a, b = np.asarray(labels), np.asarray(a_chars), np.asarray(b_chars)
        prior = (np.bincount(labels, minlength=3) + 1) / (len(labels) + 3)
        differ = a != b
        longer_won = ((labels == 0) & (a > b)) | ((labels == 1) & (b > a))
        tie = labels == TIE
        counts = np.array([(longer_won & differ).sum(), (differ & ~longer_won & ~tie).sum(), (differ & tie).sum()])
        longer = (counts + 1) / (differ.sum() + 3)
        equal_tie = float(((~differ & tie).sum() + 1) / ((~differ).sum() + 2))
        return cls(prior, longer, equal_tie)

    def scores(self, labels: np.ndarray, a_chars: np.ndarray, b_chars: np.ndarray) -> dict[str, float]:
        n = len(labels)
        majority = np.full(n, int(self.prior.argmax()))
        rule = np.where(a_chars > b_chars, 0, np.where(b_chars > a_chars, 1, TIE))
        lp, sp, tp = self.longer
        rest = (1 - self.equal_tie) / 2
        longer_probs = np.where((a_chars > b_chars)[:, None], [lp, sp, tp],
                                np.where((b_chars > a_chars)[:, None], [sp, lp, tp], [rest, rest, self.equal_tie]))
        return {
            "baseline_majority_accuracy": float((majority == labels).mean()),
            "baseline_majority_log_loss": log_loss(np.tile(self.prior, (n, 1)), labels),
            "baseline_longer_accuracy": float((rule == labels).mean()),
            "baseline_longer_log_loss": log_loss(longer_probs, labels),
        }

    def to_dict(self) -> dict[str, list[float] | float]:
        return {"prior_a_b_tie": self.prior.tolist(), "longer_shorter_tie": self.longer.tolist(),
                "tie_when_equal_length": self.equal_tie}

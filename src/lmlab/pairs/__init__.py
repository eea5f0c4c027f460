"""Pairwise preference classification (task pair_classify): which of two responses people preferred.

Only the recipe section is imported eagerly: lmlab.config imports PairConfig, and must stay light (no torch)
and free of import cycles. The rest loads on first use.
"""

from lmlab.pairs.config import PairConfig, pair_config

_LAZY = {
    "PairClassifier": "lmlab.pairs.models", "build_pair_model": "lmlab.pairs.models",
    "resolve_pretrained": "lmlab.pairs.models", "PairTask": "lmlab.pairs.task", "build_pair_task": "lmlab.pairs.task",
    "check_pair_records": "lmlab.pairs.data",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmlab.pairs' has no attribute {name!r}")


__all__ = ["PairClassifier", "PairConfig", "PairTask", "build_pair_model", "build_pair_task", "check_pair_records",
           "pair_config", "resolve_pretrained"]

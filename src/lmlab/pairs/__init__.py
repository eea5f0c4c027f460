"""Pairwise preference classification (task pair_classify): which of two responses people preferred."""

from lmlab.pairs.config import PairConfig, pair_config
from lmlab.pairs.data import check_pair_records
from lmlab.pairs.models import PairClassifier, build_pair_model, resolve_pretrained
from lmlab.pairs.task import PairTask, build_pair_task

__all__ = ["PairClassifier", "PairConfig", "PairTask", "build_pair_model", "build_pair_task", "check_pair_records",
           "pair_config", "resolve_pretrained"]

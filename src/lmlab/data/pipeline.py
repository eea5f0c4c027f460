"""The one data pipeline, used alike by training (lmlab.training.prepare), inspection (lmlab data inspect) and
evaluation (a run's split rebuilt for eval-json / the judge):

    records → (lm: the text column, empty documents dropped) → audited filters → seeded split → this run's part
            → tokenizer (a parent's, a trained BPE or a pretrained one) → fingerprints of every split
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.data.cache import cached
from lmlab.data.filters import apply_filters
from lmlab.data.pairs import check_pair_records
from lmlab.data.preference import check_preference_columns
from lmlab.data.sources import column, load_records
from lmlab.data.splits import fingerprint, split_records
from lmlab.data.tokenizer import build_tokenizer, load_pretrained
from lmlab.errors import LmlabError
from lmlab.recipe.schema import Recipe

# the tasks that start from a pretrained model's tokenizer, and what to say when none is named
_NEEDS_PRETRAINED = {"sft": "task sft fine-tunes a pretrained model",
                     "pair_classify": "task pair_classify needs a pretrained model",
                     "dpo": "task dpo trains a pretrained model on preferences"}


@dataclass
class SplitData:
    splits: dict[str, list]  # split -> lm: document texts; sft / pair_classify / dpo: records
    tokenizer: Any
    fingerprints: dict[str, str]  # split -> sha256 of its examples in order
    info: dict[str, Any] = field(default_factory=dict)  # counts, logged as params
    filter_report: dict = field(default_factory=dict)  # the audited filters' funnel; {} without filters
    n_empty: int = 0  # lm: empty documents dropped


def source_name(recipe: Recipe) -> str:
    return str(recipe.data.path or recipe.data.hf_dataset)


def load_named_tokenizer(recipe: Recipe, name: str) -> Any:
    """A pretrained tokenizer by name: a folder (beside the recipe or in $LMLAB_MODELS), a `pkg:` model or a hub
    id; the recipe's GGUF file when the name is model.pretrained."""
    return load_pretrained(recipe.resolve_model_path(name),
                           recipe.model.gguf_file if name == recipe.model.pretrained else None)


def split_data(recipe: Recipe, *, tokenizer_dir: Path | None = None, tokenizer: Any = None,
               load_tokenizer: Callable[[str], Any] | None = None,
               read_records: Callable[[Recipe], list] = load_records) -> SplitData:
    """The recipe's data split as training sees it. `tokenizer_dir`: use the tokenizer saved there (a resumed run,
    a parent checkpoint); `tokenizer`: use this one. `load_tokenizer` / `read_records` replace how a named
    tokenizer and the records are read (data inspect turns offline failures into 'unavailable')."""
    load = load_tokenizer or (lambda name: load_named_tokenizer(recipe, name))
    task = recipe.run.task
    if task == "lm":
        records = read_records(recipe)
        col = recipe.data.text_column
        column(records, col, source_name(recipe))  # fails early, naming the column
        kept = [r for r in records if str(r.get(col) or "").strip()]
        record_splits, info, report = curated_splits(recipe, kept)
        splits = {k: column(v, col, source_name(recipe)) if v else [] for k, v in record_splits.items()}
        if tokenizer is None and tokenizer_dir is not None:
            tokenizer = load_pretrained(str(tokenizer_dir))
        elif tokenizer is None and recipe.tokenizer.kind == "bpe":  # trained once per training split and settings
            tokenizer = cached(recipe.run.output_dir, "bpe", {"train": fingerprint(splits["train"]),
                                                              "tokenizer": recipe.tokenizer.model_dump(mode="json")},
                               lambda: build_tokenizer(recipe, splits["train"]))
        elif tokenizer is None:
            name = recipe.tokenizer.name_or_path or recipe.model.pretrained
            if name is None:
                raise LmlabError("tokenizer.name_or_path: set it (or model.pretrained) to load a pretrained tokenizer")
            tokenizer = load(name)
        return SplitData(splits, tokenizer, {k: fingerprint(v) for k, v in splits.items()}, info, report,
                         n_empty=len(records) - len(kept))
    if task not in _NEEDS_PRETRAINED:
        raise LmlabError(f"run.task: '{task}' is not one of lm, sft, pair_classify, dpo")
    if tokenizer is None and tokenizer_dir is not None:
        tokenizer = load_pretrained(str(tokenizer_dir))
    elif tokenizer is None:  # before the records: token-count filters need it
        name = recipe.tokenizer.name_or_path or recipe.model.pretrained
        if name is None:
            raise LmlabError(f"model.pretrained: {_NEEDS_PRETRAINED[task]}; set model.pretrained")
        tokenizer = load(name)
    records = read_records(recipe)
    if task == "pair_classify":
        check_pair_records(recipe, records)  # before splitting: errors name rows in file order
    if task == "dpo":
        check_preference_columns(records, recipe.dpo, chat=recipe.data.template == "chat", source=source_name(recipe))
    splits, info, report = curated_splits(recipe, records, tokenizer)
    return SplitData(splits, tokenizer, {k: fingerprint(v) for k, v in splits.items()}, info, report)


def curated_splits(recipe: Recipe, records: list, tokenizer=None) -> tuple[dict[str, list], dict[str, Any], dict]:
    """Filters (audited, cached), then the seeded split, then this run's part of the training split."""
    info: dict[str, Any] = {"data.records": len(records)}
    report: dict = {}
    if recipe.data.filters:
        cache = Path(recipe.run.output_dir) / "cache" / "filters"
        encode = (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]) if tokenizer else None
        records, rep = apply_filters(records, recipe.data.filters, seed=recipe.run.seed, tokenizer=encode,
                                     cache_dir=cache)
        report = rep.to_dict()
        info["data.filtered.kept"] = len(records)
        if not records:
            funnel = " → ".join([str(rep.steps[0].input)] + [f"{st.name}: {st.kept}" for st in rep.steps])
            last = next(st.name for st in reversed(rep.steps) if st.dropped)
            raise LmlabError(f"data.filters: dropped every example ({funnel}); loosen {last}, which dropped the "
                             "last ones")
    splits = split_records(records, recipe.data.split, recipe.run.seed)
    d = recipe.data
    if d.parts > 1:
        if d.part >= d.parts:
            raise LmlabError(f"data.part: {d.part} is out of range for data.parts {d.parts} (0 … {d.parts - 1})")
        # contiguous shards of the (already shuffled) training split: part k of N is the same on every run
        n = len(splits["train"])
        lo, hi = n * d.part // d.parts, n * (d.part + 1) // d.parts
        splits["train"] = splits["train"][lo:hi]
        info["data.train.part"] = f"{d.part}/{d.parts} ({hi - lo} of {n})"
    return splits, info, report

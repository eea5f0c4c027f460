"""Recipe -> data -> tokenizer -> task and model: everything the training loop needs, built the same way
for a new run and for a resumed one (a resumed run reuses the tokenizer saved in its checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.causal_lm import CausalLMTask
from lmlab.config import Recipe
from lmlab.data.lm import BlockView, collate_blocks, tokenize_documents
from lmlab.data.sources import column, load_records
from lmlab.data.splits import example_hashes, fingerprint, split_records
from lmlab.errors import LmlabError
from lmlab.tokenizer import build_tokenizer, load_pretrained, tokenizer_hash


@dataclass
class Prepared:
    task: Any  # a lmlab.task.Task
    tokenizer: Any
    model: torch.nn.Module
    fingerprints: dict[str, str]  # split -> sha256 of its examples in order
    data_info: dict[str, Any] = field(default_factory=dict)  # counts etc., logged as params
    artifacts: dict[str, Any] = field(default_factory=dict)  # JSON reports logged with the run
    checkpoint_files: dict[str, Any] = field(default_factory=dict)  # JSON files written into every checkpoint
    notes: list[str] = field(default_factory=list)  # pre-flight report lines printed at the start


def prepare(recipe: Recipe, tokenizer_dir: Path | None = None) -> Prepared:
    if tokenizer_dir is None and recipe.model.init_from is not None:
        from lmlab.checkpoint import resolve_init_from

        tokenizer_dir = resolve_init_from(recipe.model.init_from, recipe)  # a child keeps its parent's tokens
    if recipe.run.task == "lm":
        return _prepare_lm(recipe, tokenizer_dir)
    if recipe.run.task == "sft":
        return _prepare_sft(recipe, tokenizer_dir)
    return _prepare_pairs(recipe, tokenizer_dir)


def _prepare_pairs(recipe: Recipe, tokenizer_dir: Path | None) -> Prepared:
    from lmlab.pairs.data import check_pair_records
    from lmlab.pairs.models import build_pair_model, resolve_pretrained
    from lmlab.pairs.task import build_pair_task

    name = recipe.tokenizer.name_or_path or recipe.model.pretrained
    if tokenizer_dir is None and name is None:
        raise LmlabError("model.pretrained: task pair_classify needs a pretrained model; set model.pretrained")
    tokenizer = load_pretrained(str(tokenizer_dir) if tokenizer_dir else resolve_pretrained(recipe, name))
    records = load_records(recipe)
    check_pair_records(recipe, records)  # before splitting: errors name rows in file order
    splits, info, filter_report = curated_splits(recipe, records, tokenizer)
    task = build_pair_task(recipe, {k: v for k, v in splits.items() if v}, tokenizer)
    model = build_pair_model(recipe, tokenizer)
    info.update(task.info)
    info.update({"tokenizer.hash": tokenizer_hash(tokenizer), "tokenizer.vocab_size": len(tokenizer)})
    artifacts = {**task.artifacts, "split_hashes": {k: example_hashes(v) for k, v in splits.items()}}
    if filter_report:
        artifacts["filters"] = filter_report
    return Prepared(task, tokenizer, model, {k: fingerprint(v) for k, v in splits.items()}, info, artifacts,
                    checkpoint_files=task.checkpoint_files, notes=task.notes)


def curated_splits(recipe: Recipe, records: list, tokenizer=None) -> tuple[dict[str, list], dict[str, Any], dict]:
    """Filters (audited, cached), then the seeded split, then this run's part of the training split."""
    from lmlab.data.filters import apply_filters

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
            raise LmlabError("data.filters: dropped every example; loosen the filters (see the funnel above)")
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


def source_name(recipe: Recipe) -> str:
    return str(recipe.data.path or recipe.data.hf_dataset)


def _prepare_lm(recipe: Recipe, tokenizer_dir: Path | None) -> Prepared:
    records = load_records(recipe)
    column(records, recipe.data.text_column, source_name(recipe))  # fails early, naming the column
    n_empty = sum(1 for r in records if not str(r.get(recipe.data.text_column) or "").strip())
    records = [r for r in records if str(r.get(recipe.data.text_column) or "").strip()]  # counted below
    record_splits, split_info, filter_report = curated_splits(recipe, records)
    splits = {k: column(v, recipe.data.text_column, source_name(recipe)) if v else [] for k, v in record_splits.items()}
    tokenizer = load_pretrained(str(tokenizer_dir)) if tokenizer_dir is not None else build_tokenizer(recipe, splits["train"])
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LmlabError("tokenizer: has no EOS token; the lm task separates documents with it")
    model = _build_model(recipe, tokenizer)
    context = _context_length(model.config)
    block = recipe.model.block_size
    if context is not None and block > context:
        raise LmlabError(f"model.block_size: {block} is larger than the model's context ({context}); lower block_size")
    streams = {name: tokenize_documents(split, tokenizer, eos) for name, split in splits.items() if split}
    sets = {name: BlockView(s.ids, block, drop_last=(name == "train")) for name, s in streams.items()}
    if len(sets["train"]) == 0:
        raise LmlabError(f"model.block_size: the training split has {len(streams['train'].ids)} tokens, "
                         f"fewer than one block of {block}; lower block_size or add data")
    eval_bs = recipe.eval.batch_size or recipe.train.batch_size
    task = CausalLMTask(sets["train"], sets.get("val", []), collate_blocks, test_set=sets.get("test", []),
                        eval_batch_size=eval_bs, eval_max_batches=recipe.eval.max_batches,
                        chars={name: s.n_chars for name, s in streams.items()})
    info: dict[str, Any] = {"data.empty_documents_dropped": n_empty, "tokenizer.hash": tokenizer_hash(tokenizer),
                            "tokenizer.vocab_size": len(tokenizer), **split_info}
    for name, s in streams.items():
        info[f"data.{name}.documents"] = s.n_docs
        info[f"data.{name}.tokens"] = len(s.ids)
        info[f"data.{name}.chars"] = s.n_chars
    info["data.train.blocks"] = len(sets["train"])
    info["data.train.tokens_unused"] = len(streams["train"].ids) - 1 - len(sets["train"]) * block
    artifacts = {"split_hashes": {name: example_hashes(split) for name, split in splits.items()}}
    if filter_report:
        artifacts["filters"] = filter_report
    return Prepared(task, tokenizer, model, {name: fingerprint(s) for name, s in splits.items()}, info, artifacts)


def _prepare_sft(recipe: Recipe, tokenizer_dir: Path | None) -> Prepared:
    from functools import partial

    from lmlab.data.packing import (
        collate_packed,
        collate_padded,
        pack_examples,
        packed_attention,
        packing_efficiency,
    )
    from lmlab.data.sft import pad_token_id, tokenize_sft
    from lmlab.data.templates import template_from_config

    name = recipe.tokenizer.name_or_path or recipe.model.pretrained or recipe.model.init_from
    if tokenizer_dir is not None:
        tokenizer = load_pretrained(str(tokenizer_dir))
    elif name is None:
        raise LmlabError("model.pretrained: task sft fine-tunes a pretrained model; set model.pretrained")
    else:
        tokenizer = load_pretrained(recipe.resolve_model_path(name),
                                    recipe.model.gguf_file if name == recipe.model.pretrained else None)
    records = load_records(recipe)
    splits, info, filter_report = curated_splits(recipe, records, tokenizer)
    template = template_from_config(recipe.data, tokenizer)
    examples, notes = {}, []
    artifacts = {"template": template.to_dict(),
                 "split_hashes": {name: example_hashes(recs) for name, recs in splits.items()}}
    for split, recs in splits.items():
        if not recs:
            examples[split] = []
            continue
        examples[split], report = tokenize_sft(recs, template, tokenizer, recipe.data,
                                               source=f"{source_name(recipe)} ({split} split)")
        artifacts[f"preflight_{split}"] = report.to_dict()
        notes += [f"{split}: {line}" for line in report.lines()]
        info[f"data.{split}.examples"] = len(examples[split])
        info[f"data.{split}.truncated"] = report.n_truncated
        info[f"data.{split}.dropped"] = report.n_dropped
    if filter_report:
        artifacts["filters"] = filter_report
    model = _build_model(recipe, tokenizer)
    pad = pad_token_id(tokenizer)
    padded = partial(collate_padded, pad_id=pad)
    train_set, collate = examples["train"], padded
    if recipe.data.packing:
        train_set = pack_examples(train_set, recipe.data.max_length)
        collate = partial(collate_packed, pad_id=pad, attention=packed_attention(model))
        info["data.train.packed_rows"] = len(train_set)
        info["data.train.packing_efficiency"] = round(packing_efficiency(train_set, recipe.data.max_length), 4)
    eval_bs = recipe.eval.batch_size or recipe.train.batch_size
    task = CausalLMTask(train_set, examples["val"], collate, eval_collate=padded, test_set=examples["test"],
                        eval_batch_size=eval_bs, eval_max_batches=recipe.eval.max_batches)
    info.update({"tokenizer.hash": tokenizer_hash(tokenizer), "tokenizer.vocab_size": len(tokenizer)})
    fps = {split: fingerprint(recs) for split, recs in splits.items()}
    return Prepared(task, tokenizer, model, fps, info, artifacts,
                    checkpoint_files={"template.json": template.to_dict()}, notes=notes)


def _build_model(recipe: Recipe, tokenizer) -> torch.nn.Module:
    from lmlab.models import apply_adapter, build_causal_lm

    model = build_causal_lm(recipe, vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id)
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return apply_adapter(model, recipe)


def _context_length(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None

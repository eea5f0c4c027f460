"""Recipe -> data -> tokenizer -> task and model: everything the training loop needs, built the same way
for a new run and for a resumed one (a resumed run reuses the tokenizer saved in its checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lmlab.data.cache import cached
from lmlab.data.lm import BlockView, collate_blocks, tokenize_documents
from lmlab.data.packing import (
    collate_packed,
    collate_padded,
    pack_examples,
    packed_attention,
    packing_efficiency,
)
from lmlab.data.pipeline import source_name, split_data
from lmlab.data.preference import tokenize_preference
from lmlab.data.sft import pad_token_id, tokenize_sft
from lmlab.data.splits import example_hashes
from lmlab.data.templates import template_from_config
from lmlab.data.tokenizer import tokenizer_hash
from lmlab.errors import LmlabError
from lmlab.models.build import apply_adapter, build_causal_lm
from lmlab.models.loading import load_model_for_training
from lmlab.models.pairs import build_pair_model
from lmlab.recipe.schema import Recipe
from lmlab.tasks.base import Task
from lmlab.tasks.causal_lm import CausalLMTask
from lmlab.tasks.pairs.task import build_pair_task
from lmlab.tasks.preference import (
    AdapterDisabled,
    DpoTask,
    FrozenCopy,
    Precomputed,
    collate_pairs,
    precompute_reference,
    weights_fingerprint,
)
from lmlab.workspace.resolve import resolve_init_from


@dataclass
class Prepared:
    task: Task
    tokenizer: Any
    model: torch.nn.Module
    fingerprints: dict[str, str]  # split -> sha256 of its examples in order
    data_info: dict[str, Any] = field(default_factory=dict)  # counts etc., logged as params
    artifacts: dict[str, Any] = field(default_factory=dict)  # JSON reports logged with the run
    checkpoint_files: dict[str, Any] = field(default_factory=dict)  # JSON files written into every checkpoint
    notes: list[str] = field(default_factory=list)  # pre-flight report lines printed at the start


def prepare(recipe: Recipe, tokenizer_dir: Path | None = None) -> Prepared:
    if tokenizer_dir is None and recipe.model.init_from is not None:
        tokenizer_dir = resolve_init_from(recipe).checkpoint  # a child keeps its parent's tokens
    if recipe.run.task == "lm":
        return _prepare_lm(recipe, tokenizer_dir)
    if recipe.run.task == "sft":
        return _prepare_sft(recipe, tokenizer_dir)
    if recipe.run.task == "dpo":
        return _prepare_dpo(recipe, tokenizer_dir)
    return _prepare_pairs(recipe, tokenizer_dir)


def _prepare_pairs(recipe: Recipe, tokenizer_dir: Path | None) -> Prepared:

    data = split_data(recipe, tokenizer_dir=tokenizer_dir)
    splits, tokenizer, info = data.splits, data.tokenizer, data.info
    task = build_pair_task(recipe, {k: v for k, v in splits.items() if v}, tokenizer)
    model = build_pair_model(recipe, tokenizer)
    info.update(task.info)
    info.update({"tokenizer.hash": tokenizer_hash(tokenizer), "tokenizer.vocab_size": len(tokenizer)})
    artifacts = {**task.artifacts, "split_hashes": {k: example_hashes(v) for k, v in splits.items()}}
    if data.filter_report:
        artifacts["filters"] = data.filter_report
    return Prepared(task, tokenizer, model, data.fingerprints, info, artifacts,
                    checkpoint_files=task.checkpoint_files, notes=task.notes)


def _prepare_lm(recipe: Recipe, tokenizer_dir: Path | None) -> Prepared:
    data = split_data(recipe, tokenizer_dir=tokenizer_dir)
    splits, tokenizer, split_info, filter_report = data.splits, data.tokenizer, data.info, data.filter_report
    n_empty = data.n_empty
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LmlabError("tokenizer: has no EOS token; the lm task separates documents with it")
    model = _build_model(recipe, tokenizer)
    context = _context_length(model.config)
    block = recipe.model.block_size
    if context is not None and block > context:
        raise LmlabError(f"model.block_size: {block} is larger than the model's context ({context}); lower block_size")
    # tokenized once per (split, tokenizer): a sweep's trials and reruns read the workspace's data cache
    tok_hash = tokenizer_hash(tokenizer)
    streams = {name: cached(recipe.run.output_dir, "lm-tokens", {"split": data.fingerprints[name], "tokenizer": tok_hash,
                                                                "eos": eos},
                            lambda split=split: tokenize_documents(split, tokenizer, eos))
               for name, split in splits.items() if split}
    sets = {name: BlockView(s.ids, block, drop_last=(name == "train")) for name, s in streams.items()}
    if len(sets["train"]) == 0:
        raise LmlabError(f"model.block_size: the training split has {len(streams['train'].ids)} tokens, "
                         f"fewer than one block of {block}; lower block_size or add data")
    eval_bs = recipe.eval.batch_size or recipe.train.batch_size
    task = CausalLMTask(sets["train"], sets.get("val", []), collate_blocks, test_set=sets.get("test", []),
                        eval_batch_size=eval_bs, eval_max_batches=recipe.eval.max_batches,
                        chars={name: s.n_chars for name, s in streams.items()})
    info: dict[str, Any] = {"data.empty_documents_dropped": n_empty, "tokenizer.hash": tok_hash,
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
    return Prepared(task, tokenizer, model, data.fingerprints, info, artifacts)


def _prepare_sft(recipe: Recipe, tokenizer_dir: Path | None) -> Prepared:
    from functools import partial

    data = split_data(recipe, tokenizer_dir=tokenizer_dir)
    splits, tokenizer, info, filter_report = data.splits, data.tokenizer, data.info, data.filter_report
    template = template_from_config(recipe.data, tokenizer)
    tok_hash = tokenizer_hash(tokenizer)
    examples, notes = {}, []
    artifacts = {"template": template.to_dict(),
                 "split_hashes": {name: example_hashes(recs) for name, recs in splits.items()}}
    for split, recs in splits.items():
        if not recs:
            examples[split] = []
            continue
        where = f"{source_name(recipe)} ({split} split)"
        key = {"split": data.fingerprints[split], "tokenizer": tok_hash, "template": template.to_dict(),
               "data": recipe.data.model_dump(mode="json"), "source": where}
        examples[split], report = cached(recipe.run.output_dir, "sft-tokens", key, lambda recs=recs, where=where:
                                         tokenize_sft(recs, template, tokenizer, recipe.data, source=where))
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
                        eval_batch_size=eval_bs, eval_max_batches=recipe.eval.max_batches, pad_id=pad)
    info.update({"tokenizer.hash": tokenizer_hash(tokenizer), "tokenizer.vocab_size": len(tokenizer)})
    return Prepared(task, tokenizer, model, data.fingerprints, info, artifacts,
                    checkpoint_files={"template.json": template.to_dict()}, notes=notes)


def _prepare_dpo(recipe: Recipe, tokenizer_dir: Path | None) -> Prepared:
    data = split_data(recipe, tokenizer_dir=tokenizer_dir)
    splits, tokenizer, info, filter_report = data.splits, data.tokenizer, data.info, data.filter_report
    template = template_from_config(recipe.data, tokenizer)
    examples, keys, notes = {}, {}, []
    artifacts: dict[str, Any] = {"template": template.to_dict(),
                                 "split_hashes": {name: example_hashes(recs) for name, recs in splits.items()}}
    for split, recs in splits.items():
        if not recs:
            examples[split] = []
            continue
        where = f"{source_name(recipe)} ({split} split)"
        keys[split] = {"split": data.fingerprints[split], "tokenizer": tokenizer_hash(tokenizer), "source": where,
                       "template": template.to_dict(), "data": recipe.data.model_dump(mode="json"),
                       "dpo": recipe.dpo.model_dump(mode="json", include={"prompt_column", "chosen_column",
                                                                          "rejected_column", "shared_prefix_marker",
                                                                          "transcript_roles"})}
        examples[split], report = cached(recipe.run.output_dir, "dpo-pairs", keys[split], lambda recs=recs, where=where:
                                         tokenize_preference(recs, template, tokenizer, recipe.data, recipe.dpo,
                                                             source=where))
        artifacts[f"preflight_{split}"] = report.to_dict()
        notes += [f"{split}: {line}" for line in report.lines()]
        info.update({f"data.{split}.pairs": report.n_pairs, f"data.{split}.dropped": report.n_dropped,
                     f"data.{split}.truncated": report.truncated_chosen + report.truncated_rejected})
    if filter_report:
        artifacts["filters"] = filter_report
    kind = dpo_reference_kind(recipe)
    model = _build_model(recipe, tokenizer)
    pad = pad_token_id(tokenizer)
    eval_bs = recipe.eval.batch_size or recipe.train.batch_size
    reference: Any
    if kind == "frozen_copy":
        reference = FrozenCopy(model)
        size = sum(p.numel() * p.element_size() for p in reference.model.parameters())
        notes.append(f"reference: a frozen copy of the starting model ({size / 2**20:,.1f} MiB more)")
    elif kind == "precomputed":
        reference = Precomputed()
        notes.append(attach_reference_logps(recipe, model, examples, keys, partial(collate_pairs, pad_id=pad), eval_bs))
    else:
        reference = AdapterDisabled()
        notes.append("reference: the same model with its LoRA adapter switched off (no second copy)")
    task = DpoTask(recipe.dpo, examples["train"], examples["val"], examples["test"], reference=reference, pad_id=pad,
                   eval_batch_size=eval_bs, eval_max_batches=recipe.eval.max_batches)
    info.update({"dpo.reference_resolved": kind, "tokenizer.hash": tokenizer_hash(tokenizer),
                 "tokenizer.vocab_size": len(tokenizer)})
    return Prepared(task, tokenizer, model, data.fingerprints, info, artifacts,
                    checkpoint_files={"template.json": template.to_dict()}, notes=notes)


def dpo_reference_kind(recipe: Recipe) -> str:
    """dpo.reference resolved: auto is adapter_disabled for a new LoRA adapter, else precomputed (full fine-tuning,
    or an adapter continued from model.init_from, whose base without it is not the model training starts from)."""
    parent_adapter = recipe.model.init_from is not None and \
        (resolve_init_from(recipe).checkpoint / "adapter_config.json").is_file()
    kind = recipe.dpo.reference
    if kind == "auto":
        return "adapter_disabled" if recipe.adapter.kind != "none" and not parent_adapter else "precomputed"
    if kind == "adapter_disabled" and parent_adapter:
        raise LmlabError("dpo.reference: adapter_disabled would compare against the base model without the adapter "
                         "model.init_from continues, not the model training starts from; use precomputed or auto")
    return kind


def attach_reference_logps(recipe: Recipe, model: torch.nn.Module, examples: dict[str, list[dict]],
                           keys: dict[str, dict], collate: Any, batch_size: int) -> str:
    """Put the starting model's log-probs of every pair into its example (key 'ref'): one forward pass over all
    splits, cached in the workspace by the model's weights, the precision and the pairs (their tokenization keys),
    so a resumed run or a rerun reads them back. Returns the note printed at the start of the run."""
    import os
    import time

    def compute() -> dict[str, list[tuple[float, float]]]:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if recipe.train.precision == "bf16" \
            else None
        model.to(device)
        try:
            return {split: precompute_reference(model, ex, collate, batch_size, device=device, autocast=autocast)
                    for split, ex in examples.items()}
        finally:
            model.to("cpu")

    start = time.perf_counter()
    key = {"weights": weights_fingerprint(model), "precision": recipe.train.precision, "pairs": keys}
    logps = cached(recipe.run.output_dir, "dpo-reference", key, compute)
    for split, ex in examples.items():
        for e, ref in zip(ex, logps[split], strict=True):
            e["ref"] = tuple(ref)
    n = sum(len(v) for v in examples.values())
    return (f"reference: the starting model's log-probs of {n} pairs, computed once before training "
            f"({time.perf_counter() - start:.1f} s; cached in the workspace), no second copy in memory")


def _build_model(recipe: Recipe, tokenizer) -> torch.nn.Module:
    if recipe.model.init_from is not None:  # the parent checkpoint's model: full weights, or base + its adapter
        model = load_model_for_training(resolve_init_from(recipe).checkpoint, recipe)
    else:
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

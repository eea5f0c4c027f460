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
from lmlab.data.splits import fingerprint, split_records
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


def prepare(recipe: Recipe, tokenizer_dir: Path | None = None) -> Prepared:
    if recipe.run.task == "lm":
        return _prepare_lm(recipe, tokenizer_dir)
    raise LmlabError(f"run.task: '{recipe.run.task}' is not available in this build; use 'lm'")


def source_name(recipe: Recipe) -> str:
    return str(recipe.data.path or recipe.data.hf_dataset)


def _prepare_lm(recipe: Recipe, tokenizer_dir: Path | None) -> Prepared:
    records = load_records(recipe)
    docs = column(records, recipe.data.text_column, source_name(recipe))
    n_empty = sum(1 for d in docs if not d.strip())
    docs = [d for d in docs if d.strip()]  # counted and reported below, never silently
    splits = split_records(docs, recipe.data.split, recipe.run.seed)
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
                            "tokenizer.vocab_size": len(tokenizer)}
    for name, s in streams.items():
        info[f"data.{name}.documents"] = s.n_docs
        info[f"data.{name}.tokens"] = len(s.ids)
        info[f"data.{name}.chars"] = s.n_chars
    info["data.train.blocks"] = len(sets["train"])
    info["data.train.tokens_unused"] = len(streams["train"].ids) - 1 - len(sets["train"]) * block
    return Prepared(task, tokenizer, model, {name: fingerprint(s) for name, s in splits.items()}, info)


def _build_model(recipe: Recipe, tokenizer) -> torch.nn.Module:
    from lmlab.models import build_causal_lm

    model = build_causal_lm(recipe, vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id)
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _context_length(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None

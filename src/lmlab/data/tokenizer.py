"""Train a byte-level BPE on the training split, or load a pretrained tokenizer."""

from __future__ import annotations

import hashlib
import json

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmlab.errors import LmlabError
from lmlab.recipe.schema import Recipe


def train_bpe(texts: list[str], vocab_size: int, special_tokens: list[str], min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style): never an unknown token; the first special token is EOS, BOS and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    eos = special_tokens[0]
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos,
                                   clean_up_tokenization_spaces=False)


def load_pretrained(name_or_path: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file) if gguf_file \
            else AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise LmlabError(f"tokenizer: cannot load '{name_or_path}' ({str(e).splitlines()[0]}); "
                         "give a local folder or check the hub id / network") from None


def build_tokenizer(recipe: Recipe, train_texts: list[str] | None) -> PreTrainedTokenizerBase:
    cfg = recipe.tokenizer
    if cfg.kind == "bpe":
        if not train_texts:
            raise LmlabError("tokenizer.kind: bpe needs training text; the training split is empty")
        return train_bpe(train_texts, cfg.vocab_size, cfg.special_tokens, cfg.min_frequency)
    name = cfg.name_or_path or recipe.model.pretrained
    if name is None:
        raise LmlabError("tokenizer.name_or_path: set it (or model.pretrained) to load a pretrained tokenizer")
    path = recipe.resolve_model_path(name)
    return load_pretrained(path, recipe.model.gguf_file if name == recipe.model.pretrained else None)


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's vocabulary, merges and special tokens: equal hash = same tokenization."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:  # slow tokenizer: its vocabulary is what defines it
        payload = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    payload += json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()



"""Test helpers that other lmlab tests and benchmarks reuse: real small models built offline, tiny tokenizers.

Nothing here is needed to train; it exists so tests can use a real pretrained model without the hub.
"""

from __future__ import annotations

from typing import Any

# A few sentences of mixed text for tiny tokenizers: enough to learn some merges, fast to train (~50 ms).
_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nName the capital of France.\n\n### Response:\nThe capital of France is Paris.",
    '### Question: "What is the first line of Canto I?"\n ### Answer: {"references": [{"canto": 1}]}',
    "<|im_start|>user\nHello there, how are you?<|im_end|>\n<|im_start|>assistant\nI am fine, thank you!<|im_end|>",
    "The quick brown fox jumps over the lazy dog. 0123456789 {}[]()\"'.,;:!?-_/\\",
]


def tiny_tokenizer(
    *,
    vocab_size: int = 400,
    add_bos: bool = False,
    chat_template: str | None = None,
    texts: list[str] | None = None,
) -> Any:
    """A byte-level BPE tokenizer trained in memory (never an unknown token).

    Default: GPT-2 style, like lmlab's own BPE: '<|endoftext|>' is EOS, BOS and pad at once (pad = EOS).
    add_bos=True: Llama style, '<s>' BOS prepended by add_special_tokens, '</s>' EOS, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>"] if add_bos else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((texts or _CORPUS) * 3, trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
        out = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
        )
    else:
        eos = specials[0]
        out = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token=eos,
            bos_token=eos,
            pad_token=eos,
            clean_up_tokenization_spaces=False,
        )
    if chat_template is not None:
        out.chat_template = chat_template
    return out


def tiny_llama(vocab_size: int, *, seed: int = 0, attn_implementation: str = "sdpa") -> Any:
    """A 2-layer LlamaForCausalLM (RoPE, grouped-query attention) with random weights, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size: int, *, seed: int = 0, attn_implementation: str = "sdpa") -> Any:
    """A 2-layer GPT2LMHeadModel (learned positions) with random weights, in eval mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=None,
        eos_token_id=None,
    )
    config._attn_implementation = attn_implementation
    return GPT2LMHeadModel(config).eval()


def tiny_sentencepiece_tokenizer(*, vocab_size: int = 500) -> Any:
    """A Llama-2 / Mistral style tokenizer (Metaspace '▁' prefix at the start of a text, byte fallback), trained
    in memory: the kind where tokenizing a completion on its own wrongly adds a leading '▁'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>", *bytes_],
    )
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )

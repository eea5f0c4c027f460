"""Build a causal LM from the recipe (from scratch via transformers configs) or load a pretrained one."""

from __future__ import annotations

import contextlib
import warnings

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from lmlab.errors import LmlabError
from lmlab.recipe.schema import Recipe


def scratch_config(recipe: Recipe, vocab_size: int, eos_id: int):
    m = recipe.model
    context = m.context_length or m.block_size
    if m.arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=context, n_embd=m.d_model, n_layer=m.n_layer, n_head=m.n_head,
            n_inner=m.d_ff, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
            # same function as GPT-2's gelu_new, one fused kernel (PERF_NOTES: most of the gap to nanoGPT)
            activation_function="gelu_pytorch_tanh",
            tie_word_embeddings=m.tie_embeddings, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        )
    d_ff = m.d_ff or 64 * round(8 * m.d_model / 3 / 64) or 4 * m.d_model  # SwiGLU's ~8/3·d, multiple of 64
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.d_model, intermediate_size=d_ff, num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head, num_key_value_heads=m.n_kv_head or m.n_head,
        max_position_embeddings=context, rope_theta=m.rope_theta, attention_dropout=m.dropout,
        tie_word_embeddings=m.tie_embeddings, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def build_causal_lm(recipe: Recipe, vocab_size: int, eos_id: int) -> PreTrainedModel:
    """A fresh model seeded by run.seed, or the pretrained weights named in model.pretrained (model.init_from is
    lmlab.models.loading's: a checkpoint's model)."""
    m = recipe.model
    if m.pretrained is not None:
        check_qlora_device(recipe)
        return load_pretrained_lm(recipe.resolve_model_path(m.pretrained), m.gguf_file,
                                  four_bit=recipe.adapter.kind == "qlora")
    config = scratch_config(recipe, vocab_size, eos_id)
    torch.manual_seed(recipe.run.seed)
    cls = GPT2LMHeadModel if m.arch == "gpt2" else LlamaForCausalLM
    return cls(config)


def load_pretrained_lm(name_or_path: str, gguf_file: str | None = None, *, four_bit: bool = False) -> PreTrainedModel:
    kwargs: dict = {"gguf_file": gguf_file} if gguf_file else {}
    if four_bit:  # QLoRA: nf4 with double quantization, bf16 compute
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32, **kwargs)
    except OSError as e:
        raise LmlabError(f"model.pretrained: cannot load '{name_or_path}' ({str(e).splitlines()[0]}); "
                         "give a local folder or check the hub id / network") from None
    return model


# The loaded model's own shape, under the recipe's model.* keys (first config attribute that is set wins)
_CONFIG_KEYS = {
    "model.n_layer": ("num_hidden_layers", "n_layer"),
    "model.n_head": ("num_attention_heads", "n_head"),
    "model.n_kv_head": ("num_key_value_heads",),
    "model.d_model": ("hidden_size", "n_embd", "d_model"),
    "model.d_ff": ("intermediate_size", "n_inner"),
    "model.context_length": ("max_position_embeddings", "n_positions"),
    "model.tie_embeddings": ("tie_word_embeddings",),
    "model.rope_theta": ("rope_theta",),
    "model.vocab_size": ("vocab_size",),
}


def loaded_model_params(model: torch.nn.Module) -> dict[str, object] | None:
    """What a pretrained (or init_from) model is, for the ledger: arch = its config's model_type, then layers,
    heads, width, MLP width, context, vocabulary from its config. Keys its config does not have are left out
    (never the schema's from-scratch defaults). None for a model without a transformers config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    out: dict[str, object] = {"model.arch": config.model_type}
    for key, names in _CONFIG_KEYS.items():
        value = next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
        if key == "model.rope_theta" and value is None:  # transformers 5 keeps it in rope_parameters
            value = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
        if value is not None:
            out[key] = value
    return out


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters, tied weights counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


@contextlib.contextmanager
def peft_quietly():
    """peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning on every
    LoRA load: not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_adapter(model: PreTrainedModel, recipe: Recipe, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap the model with a peft LoRA adapter (QLoRA: the base was loaded in 4-bit by load_pretrained_lm).
    task_type SEQ_CLS makes peft train and save a classification head in full."""
    a = recipe.adapter
    if a.kind == "none" or hasattr(model, "peft_config"):  # a parent's adapter keeps training as it is
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if a.kind == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.model.gradient_checkpointing)
    config = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=a.target_modules,
                        use_dora=a.dora, modules_to_save=a.train_modules or None, task_type=task_type)
    try:
        with peft_quietly():
            return get_peft_model(model, config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model" (NoMatchingPeftModuleError)
        if "not found in the base model" not in str(e) and type(e).__name__ != "NoMatchingPeftModuleError":
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Conv1D", "Linear4bit")})
        raise LmlabError(f"adapter.target_modules: {a.target_modules} match no module of the model; its linear "
                         f"modules are {', '.join(linear)} (or use 'all-linear')") from None


def check_qlora_device(recipe: Recipe) -> None:
    """QLoRA needs CUDA: on CPU, bitsandbytes 4-bit was seen to stop learning silently after any
    torch.no_grad() forward (an eval pass), so we refuse rather than train a model that learns nothing."""
    if recipe.adapter.kind == "qlora" and not torch.cuda.is_available():
        raise LmlabError("adapter.kind: 'qlora' needs a CUDA GPU (none found); use 'lora' on CPU")

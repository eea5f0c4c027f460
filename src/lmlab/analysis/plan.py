"""Memory planner: predict the peak memory of a training step before running it.

`plan_recipe(recipe, device)` reads the model's shape (the recipe's fields for a scratch model, config.json
for a pretrained one: no weights are loaded) and returns a `MemoryPlan`: weights, gradients, optimizer states,
activations and temporaries at the peak, whether that fits the device, the largest micro-batch that fits and
the accumulation for the recipe's effective batch, and — when it does not fit — the cheapest changes that do.

How the peak is modelled. A training step of lmlab's loop (`train.py`: forward + loss + backward inside
autocast, clip, `optimizer.step()`, `zero_grad(set_to_none=True)`) holds at any moment
    weights + optimizer states + gradients so far + tensors saved for backward + temporaries,
and the peak is the largest of a few moments, each computed below (`_moments`):
  * backward start: every layer's saved tensors + the loss's (N·V) buffers (log-softmax output, its gradient,
    the logits' gradient: 3 × 4 bytes × tokens × vocab — usually the peak of small models with large vocabularies);
  * the LM head's weight gradient; the top and the bottom of the layer stack in backward (activations are freed
    as weight gradients are allocated, so the sum is largest at one end);
  * the embedding's gradient at the end of backward;
  * the optimizer step: weights + gradients + states + the step's temporaries (torch's AdamW on CUDA uses the
    multi-tensor kernels, whose `sqrt(v)` is one temporary as large as the parameter group; on CPU it runs one
    tensor at a time, two temporaries as large as the largest tensor).
What each layer saves for backward is derived from the ops of transformers' GPT-2, Llama and BERT blocks with
sdpa attention in training mode (`_layer_saved`, with the op behind each term), and checked tensor by tensor
against autograd's saved-tensor hooks in tests/analysis/test_plan.py. Units are bytes throughout; N = tokens in the
micro-batch (sequences × sequence length).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lmlab.analysis.devices import Device, GiB, MiB, parse_device
from lmlab.console import Column, Grid
from lmlab.errors import LmlabError
from lmlab.recipe.schema import Recipe

Arch = Literal["gpt2", "llama", "bert"]
Adapter = Literal["lora", "qlora"]

FP32, BF16 = 4, 2  # bytes per element
# bitsandbytes NF4 with double quantisation: 4 bits + an 8-bit absmax per 64 weights + an fp32 per 256 absmaxes
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)

# Transformers model types planned with each block family (same saved tensors up to small extras).
LLAMA_TYPES = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "olmo2", "granite", "phi3", "gemma", "gemma2"}
GPT2_TYPES = {"gpt2"}
BERT_TYPES = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert"}
# Activations whose transformers implementation is one fused kernel (saves its input only); others, like GPT-2's
# `gelu_new` (0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))), save 3 more tensors of the MLP's width.
FUSED_ACTIVATIONS = {"gelu", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "quick_gelu"}

# cuBLAS workspaces counted by torch.cuda.max_memory_allocated (measured on H100: 64 MiB beyond the model)
CUBLAS_WORKSPACES_BYTES = 2 * 32 * 1024**2

# Calibration of the layer-backward temporaries (gradients of the MLP's hidden tensors alive at once), in
# tensors of (N, d_ff) in the compute dtype; fitted on the CPU benchmark (bench/planner_accuracy.py).
MLP_GRAD_TENSORS = {"gpt2": 2, "llama": 3, "bert": 2}


# ---------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model: read from a config.json or from the recipe."""

    arch: Arch
    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    d_ff: int
    context: int  # learned positions (gpt2, bert) or the RoPE cache length (llama)
    n_kv_head: int | None = None  # llama grouped-query attention; default n_head
    head_dim: int | None = None  # default d_model // n_head
    tied_embeddings: bool = True
    activation: str = "gelu_pytorch_tanh"
    resid_dropout: float = 0.0  # dropout on embeddings and residual branches (gpt2 resid/embd, bert hidden)
    attn_dropout: float = 0.0
    attention: Literal["sdpa", "eager"] = "sdpa"
    head: Literal["lm", "classifier"] = "lm"  # classifier: no (tokens × vocab) logits (pair_classify)
    head_params: int = 0  # parameters of a classifier head (pair MLP, `score` layer)
    name: str = ""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    def linears(self) -> list[Linear]:
        """The matmuls of one block, with the tensor each reads (blocks share the shape)."""
        d, ff, q, kv = self.d_model, self.d_ff, self.n_head * self.hd, self.kv_heads * self.hd
        if self.arch == "gpt2":
            return [Linear("c_attn", d, 3 * d, True, "norm1"), Linear("attn.c_proj", d, d, True, "attn_out"),
                    Linear("c_fc", d, ff, True, "norm2"), Linear("mlp.c_proj", ff, d, True, "mlp_act")]
        if self.arch == "llama":
            return [Linear("q_proj", d, q, False, "norm1"), Linear("k_proj", d, kv, False, "norm1"),
                    Linear("v_proj", d, kv, False, "norm1"), Linear("o_proj", q, d, False, "attn_out"),
                    Linear("gate_proj", d, ff, False, "norm2"), Linear("up_proj", d, ff, False, "norm2"),
                    Linear("down_proj", ff, d, False, "mlp_act")]
        return [Linear("query", d, d, True, "norm1"), Linear("key", d, d, True, "norm1"),
                Linear("value", d, d, True, "norm1"), Linear("attention.output.dense", d, d, True, "attn_out"),
                Linear("intermediate.dense", d, ff, True, "norm2"), Linear("output.dense", ff, d, True, "mlp_act")]

    def params(self) -> ParamCounts:
        """Parameter counts, tied weights once (what `model.parameters()` yields)."""
        d, v = self.d_model, self.vocab_size
        linear = sum(lin.d_in * lin.d_out for lin in self.linears())
        bias = sum(lin.d_out for lin in self.linears() if lin.bias)
        norms = {"gpt2": 4 * d, "llama": 2 * d, "bert": 4 * d}[self.arch]  # LayerNorm: weight + bias
        embed = v * d + {"gpt2": self.context * d, "llama": 0, "bert": self.context * d + 2 * d + 2 * d}[self.arch]
        final_norm = {"gpt2": 2 * d, "llama": d, "bert": 0}[self.arch]
        if self.arch == "bert":
            head = d * d + d + self.head_params  # BertModel's pooler + the task head
        elif self.head == "classifier":
            head = self.head_params
        else:
            head = 0 if self.tied_embeddings else v * d
        return ParamCounts(embedding=embed, per_layer=linear + bias + norms, linear_per_layer=linear,
                           n_layer=self.n_layer, final=final_norm + head, lm_head=head if self.head == "lm" else 0)

    def describe(self) -> str:
        kv = f", {self.kv_heads} kv heads" if self.kv_heads != self.n_head else ""
        return (f"{self.name or self.arch}: {self.arch}, {self.n_layer} layers × d_model {self.d_model}, "
                f"{self.n_head} heads{kv}, d_ff {self.d_ff}, vocab {self.vocab_size}")


@dataclass(frozen=True)
class Linear:
    name: str
    d_in: int
    d_out: int
    bias: bool
    reads: str  # norm1 / attn_out / norm2 / mlp_act: which tensor of the block is its input


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    per_layer: int
    linear_per_layer: int  # matmul weights of one block (quantised by QLoRA, autocast-copied under bf16)
    n_layer: int
    final: int  # final norm + untied LM head or classifier head
    lm_head: int  # untied LM head alone (0 when tied: the embedding serves as the head)

    @property
    def total(self) -> int:
        return self.embedding + self.per_layer * self.n_layer + self.final


def default_d_ff(arch: str, d_model: int) -> int:
    """The MLP width lmlab's models.py gives a scratch model with no d_ff: 4·d (gpt2), SwiGLU's ≈8/3·d rounded
    to a multiple of 64 (llama)."""
    if arch == "gpt2":
        return 4 * d_model
    return 64 * round(8 * d_model / 3 / 64) or 4 * d_model


def shape_from_hf_config(cfg: Any, *, head: str = "lm", head_params: int = 0, name: str = "") -> ModelShape:
    """A transformers config (AutoConfig) → ModelShape, for the families the planner knows."""
    kind = getattr(cfg, "model_type", "")
    attn = getattr(cfg, "_attn_implementation", None) or "sdpa"
    attention = "eager" if attn == "eager" else "sdpa"
    if kind == "gptj":  # GPT-J: parallel attention + MLP, rotary; planned as a GPT-2-like block (approximate)
        return ModelShape(
            "gpt2", cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_inner or 4 * cfg.n_embd,
            0, tied_embeddings=False, activation=cfg.activation_function,
            resid_dropout=max(cfg.resid_pdrop, cfg.embd_pdrop), attn_dropout=cfg.attn_pdrop, attention="eager",
            head=head, head_params=head_params, name=name or "gpt-j")
    if kind in GPT2_TYPES:
        return ModelShape(
            "gpt2", cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_inner or 4 * cfg.n_embd,
            cfg.n_positions, tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
            activation=cfg.activation_function, resid_dropout=max(cfg.resid_pdrop, cfg.embd_pdrop),
            attn_dropout=cfg.attn_pdrop, attention=attention, head=head, head_params=head_params, name=name)
    if kind in LLAMA_TYPES:
        return ModelShape(
            "llama", cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.intermediate_size, cfg.max_position_embeddings, n_kv_head=getattr(cfg, "num_key_value_heads", None),
            head_dim=getattr(cfg, "head_dim", None), tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            activation=getattr(cfg, "hidden_act", "silu"), attn_dropout=float(getattr(cfg, "attention_dropout", 0.0)),
            attention=attention, head=head, head_params=head_params, name=name)
    if kind in BERT_TYPES:
        if kind == "distilbert":
            return ModelShape(
                "bert", cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden_dim,
                cfg.max_position_embeddings, activation=cfg.activation, resid_dropout=cfg.dropout,
                attn_dropout=cfg.attention_dropout, attention=attention, head="classifier",
                head_params=head_params, name=name)
        return ModelShape(
            "bert", cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.intermediate_size, cfg.max_position_embeddings, activation=cfg.hidden_act,
            resid_dropout=cfg.hidden_dropout_prob, attn_dropout=cfg.attention_probs_dropout_prob,
            attention=attention, head="classifier", head_params=head_params, name=name)
    raise LmlabError(
        f"model.pretrained: model type '{kind}' is not known to the planner; it plans gpt2, llama-like "
        f"({', '.join(sorted(LLAMA_TYPES))}) and bert-like ({', '.join(sorted(BERT_TYPES))}) models")


# config.json essentials of hub models the shipped recipes name, so that `lmlab plan` answers without network
# (used only when the hub cannot be reached and no local copy exists): model_type + the shape fields
KNOWN_HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2"},
    "gpt2-medium": {"model_type": "gpt2", "n_embd": 1024, "n_layer": 24, "n_head": 16},
    "gpt2-large": {"model_type": "gpt2", "n_embd": 1280, "n_layer": 36, "n_head": 20},
    "gpt2-xl": {"model_type": "gpt2", "n_embd": 1600, "n_layer": 48, "n_head": 25},
    "HuggingFaceTB/SmolLM2-135M": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                                   "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                                   "num_key_value_heads": 3, "max_position_embeddings": 8192,
                                   "tie_word_embeddings": True},
    "HuggingFaceTB/SmolLM2-360M": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 960,
                                   "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
                                   "num_key_value_heads": 5, "max_position_embeddings": 8192,
                                   "tie_word_embeddings": True},
    "HuggingFaceTB/SmolLM2-1.7B": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 2048,
                                   "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
                                   "num_key_value_heads": 32, "max_position_embeddings": 8192,
                                   "tie_word_embeddings": True},
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
                                           "intermediate_size": 5632, "num_hidden_layers": 22,
                                           "num_attention_heads": 32, "num_key_value_heads": 4,
                                           "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "HuggingFaceH4/zephyr-7b-beta": {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
                                     "intermediate_size": 14336, "num_hidden_layers": 32,
                                     "num_attention_heads": 32, "num_key_value_heads": 8,
                                     "max_position_embeddings": 32768, "tie_word_embeddings": False},
    "EleutherAI/gpt-j-6b": {"model_type": "gptj", "vocab_size": 50400, "n_positions": 2048, "n_embd": 4096,
                            "n_layer": 28, "n_head": 16, "rotary_dim": 64, "tie_word_embeddings": False},
    "distilbert-base-uncased": {"model_type": "distilbert"},
    "bert-base-uncased": {"model_type": "bert"},
}
for _base in ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-1.7B"):
    KNOWN_HUB_CONFIGS[_base + "-Instruct"] = KNOWN_HUB_CONFIGS[_base]


def shape_from_pretrained(name_or_path: str, gguf_file: str | None = None, **kwargs: Any) -> ModelShape:
    """Read config.json only (no weights) from a local folder or the hub (cache); for a hub id that cannot
    be reached, fall back on `KNOWN_HUB_CONFIGS`."""
    from transformers import AutoConfig

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        cfg = AutoConfig.from_pretrained(name_or_path, **extra)
    except (OSError, ValueError) as e:
        where = "folder" if Path(name_or_path).exists() else "hub id"
        if where == "hub id" and name_or_path in KNOWN_HUB_CONFIGS:
            known = dict(KNOWN_HUB_CONFIGS[name_or_path])
            cfg = AutoConfig.for_model(known.pop("model_type"), **known)
            return shape_from_hf_config(cfg, name=Path(name_or_path).name, **kwargs)
        raise LmlabError(
            f"model.pretrained: could not read config.json of {where} '{name_or_path}' "
            f"({str(e).splitlines()[0][:160]}); point model.pretrained at a local folder holding config.json "
            f"(or set $LMLAB_MODELS) when the hub cannot be reached") from None
    return shape_from_hf_config(cfg, name=Path(name_or_path).name, **kwargs)


# ----------------------------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class TrainSetup:
    """How the model is trained: what changes memory besides the shape."""

    micro_batch: int  # sequences per forward pass per device (pair bi-encoders: 2 per example)
    seq_len: int
    precision: Literal["fp32", "bf16"] = "fp32"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    sgd_momentum: float = 0.9
    grad_accum: int = 1
    checkpointing: bool = False
    adapter: Adapter | None = None
    lora_r: int = 16
    lora_targets: tuple[str, ...] | None = None  # None = every linear of the blocks (peft's "all-linear")
    zero_stage: int = 0
    world_size: int = 1
    sequences_per_example: int = 1  # pair bi-encoder: A and B are separate sequences; dpo: chosen and rejected
    frozen_reference: bool = False  # dpo.reference frozen_copy: a second, frozen copy of the model's weights

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.sequences_per_example * self.seq_len

    def describe(self) -> str:
        parts = [f"micro-batch {self.micro_batch} × {self.seq_len} tokens"
                 + (f" × {self.sequences_per_example} sequences" if self.sequences_per_example > 1 else ""),
                 self.precision, self.optimizer.replace("adamw", "AdamW").replace("sgd", "SGD"),
                 "activation checkpointing" if self.checkpointing else "no checkpointing",
                 {None: "full fine-tuning", "lora": f"LoRA r={self.lora_r}",
                  "qlora": f"QLoRA r={self.lora_r} (4-bit base)"}[self.adapter]]
        if self.grad_accum > 1:
            parts.append(f"grad_accum {self.grad_accum}")
        if self.frozen_reference:
            parts.append("frozen reference copy")
        if self.world_size > 1 or self.zero_stage:
            parts.append(f"world {self.world_size}, ZeRO-{self.zero_stage}" if self.zero_stage
                         else f"world {self.world_size} (DDP)")
        return ", ".join(parts)


def _is_target(shape: ModelShape, setup: TrainSetup, lin: Linear) -> bool:
    if setup.adapter is None:
        return False
    if setup.lora_targets is None:
        return True
    # peft matches a target name against the end of the module path ('c_proj' hits attn.c_proj and mlp.c_proj)
    return any(lin.name == t or lin.name.endswith("." + t) for t in setup.lora_targets)


def lora_parameters(shape: ModelShape, setup: TrainSetup) -> int:
    """LoRA A (r × in) + B (out × r) on every targeted linear of every block."""
    per_layer = sum(setup.lora_r * (lin.d_in + lin.d_out) for lin in shape.linears() if _is_target(shape, setup, lin))
    return per_layer * shape.n_layer


# ----------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activations:
    """Bytes saved for backward in one micro-batch (all at the end of forward)."""

    per_layer: int  # one block without checkpointing, autocast weight copies excluded
    weight_copies_per_layer: int  # bf16 autocast copies of one block's matmul weights (saved by the matmuls)
    checkpoint_per_layer: int  # what a checkpointed block keeps: its input
    head: int  # embeddings' and final norm's saves, the LM head's input and weight copy, labels, RoPE tables
    log_softmax: int  # the loss's saved (N × V) fp32 log-probabilities
    n_layer: int
    checkpointing: bool

    @property
    def stack(self) -> int:
        """Saved by all blocks at the end of forward."""
        if self.checkpointing:
            return self.n_layer * self.checkpoint_per_layer
        return self.n_layer * (self.per_layer + self.weight_copies_per_layer)

    @property
    def total(self) -> int:
        return self.stack + self.head + self.log_softmax


def activation_bytes(shape: ModelShape, setup: TrainSetup, device_kind: str = "cpu") -> Activations:
    """What autograd saves for backward, op by op (see `_layer_saved`)."""
    per_layer, copies = _layer_saved(shape, setup, device_kind)
    n = setup.tokens
    resid = BF16 if setup.adapter == "qlora" else FP32  # residual stream dtype: fp32 under autocast
    return Activations(per_layer=per_layer, weight_copies_per_layer=copies, checkpoint_per_layer=resid * n * shape.d_model,
                       head=_head_saved(shape, setup, device_kind), log_softmax=FP32 * n * shape.vocab_size if shape.head == "lm" else 0,
                       n_layer=shape.n_layer, checkpointing=setup.checkpointing)


def _layer_saved(shape: ModelShape, setup: TrainSetup, device_kind: str) -> tuple[int, int]:
    """(saved activation bytes, autocast weight-copy bytes) of one block in training mode.

    n = tokens, d = d_model, f = d_ff; a = bytes of a matmul output (4 fp32, 2 under bf16 autocast);
    norms and the residual stream stay fp32 under autocast. A matmul saves its input only when its weight
    needs a gradient (full fine-tuning) or a LoRA adapter reads it; it saves its weight (a bf16 copy under
    autocast) because the block's input needs a gradient.
    """
    n, d, f, h = setup.tokens, shape.d_model, shape.d_ff, shape.n_head
    q_w, kv_w = shape.n_head * shape.hd, shape.kv_heads * shape.hd
    bf16 = setup.precision == "bf16" or setup.adapter == "qlora"
    a = BF16 if bf16 else FP32
    full = setup.adapter is None
    saved = 0

    # Norms. LayerNorm (gpt2 pre-norm, bert post-norm) saves its input (n, d) fp32 and mean + rstd (n) fp32.
    # Llama's RMSNorm is python ops: pow() saves x, rsqrt() its (n, 1) output, and `weight * h` saves
    # h = x·rsqrt (n, d) fp32 when the weight is trained.
    if shape.arch == "llama":
        saved += 2 * (FP32 * n * d + FP32 * n + (FP32 * n * d if full else 0))
    else:
        saved += 2 * (FP32 * n * d + 2 * FP32 * n)

    # Matmul inputs, grouped by the tensor they read. norm1/norm2 are fp32 (norm outputs; bert's block input):
    # in fp32 one tensor serves every matmul reading it; under autocast each matmul casts its own bf16 copy.
    # attn_out is saved by sdpa anyway (flash kernels keep their output); mlp_act is in the compute dtype.
    lins = shape.linears()
    for reads in ("norm1", "norm2", "mlp_act", "attn_out"):
        users = [lin for lin in lins if lin.reads == reads and (full or _is_target(shape, setup, lin))]
        if not users:
            continue
        width = users[0].d_in
        if bf16 and setup.adapter is not None:
            # peft casts a LoRA input to the adapter's fp32 dtype and autocast casts it back to bf16: every
            # adapter saves its own bf16 copy, whatever the tensor it reads (the frozen base saves nothing)
            saved += len(users) * BF16 * n * width
        elif reads in ("norm1", "norm2"):
            saved += len(users) * BF16 * n * width if bf16 else a * n * width
        elif reads == "mlp_act":
            saved += a * n * width
        elif _attention_path(shape, setup, device_kind) != "flash":
            saved += a * n * width  # eager/math: transpose(1, 2).contiguous() is a new (n, d) tensor for o_proj
    # LoRA: B saves A's output (n, r) in the compute dtype for each targeted matmul.
    targets = [lin for lin in lins if _is_target(shape, setup, lin)]
    saved += sum(a * n * setup.lora_r for _ in targets)

    # Attention, by the path torch takes (`_attention_path`). Flash-style sdpa (CPU flash kernel, CUDA flash /
    # memory-efficient) saves q, k, v, its output and the fp32 logsumexp (n × heads); GPT-2's c_attn output is
    # kept whole and q, v are passed to the kernel as two more (n, d) copies (seen with saved-tensor hooks on
    # CPU and CUDA). Torch's math sdpa saves copies of q·√s, k·√s and v and the (B, heads, T, T)
    # probabilities; eager attention saves q, k, v and fp32 probabilities (+ their bf16 copy under
    # autocast). With attention dropout both also keep its mask and output.
    path = _attention_path(shape, setup, device_kind)
    gqa = kv_w < q_w
    if path == "flash":
        saved += a * n * (5 * d if shape.arch == "gpt2" else q_w + 2 * kv_w)
        saved += a * n * q_w + FP32 * n * h
    else:
        if path == "math":
            # contiguous q·√s, k·√s and v, grouped k and v repeated to every head; CPU computes it in fp32
            pa = FP32 if device_kind == "cpu" else a
            saved += 3 * pa * n * q_w
            per_prob = pa
        else:
            pa = a  # eager: dropout acts on the compute-dtype probabilities
            saved += a * n * (3 * d if shape.arch == "gpt2" else q_w + 2 * (q_w if gqa else kv_w))
            per_prob = FP32 + (BF16 if bf16 else 0)  # softmax runs in fp32; under autocast a bf16 copy feeds @v
        if shape.attn_dropout > 0:
            per_prob += _mask_bytes(pa, device_kind) + pa  # dropout's mask and its output (read by probs @ v)
        saved += per_prob * setup.micro_batch * setup.sequences_per_example * h * setup.seq_len**2

    # MLP internals. gpt2/bert: the activation saves its input (n, f); gelu_new saves 3 more (tanh, 1 + tanh,
    # 0.5·x). llama SwiGLU: gate output (saved by silu), silu output and up output (saved by their product).
    if shape.arch == "llama":
        saved += 3 * a * n * f
    elif shape.activation in FUSED_ACTIVATIONS:
        saved += a * n * f
    elif bf16 and device_kind == "cuda":
        # CUDA autocast runs pow() in fp32: x³'s fp32 input copy, tanh and 1 + tanh in fp32, 0.5·x in bf16
        saved += (3 * FP32 + BF16) * n * f
    else:
        saved += 4 * a * n * f

    # Dropout (p > 0) after attention and after the MLP (gpt2, bert) saves its mask of the branch's dtype.
    if shape.resid_dropout > 0 and shape.arch != "llama":
        saved += 2 * _mask_bytes(a, device_kind) * n * d

    # Autocast copies: every matmul weight cast to bf16 once per forward and saved by its matmul
    # (QLoRA's 4-bit matmuls dequantise on the fly and save nothing). LoRA A and B are copied too.
    copies = 0
    if setup.precision == "bf16" and setup.adapter != "qlora":
        copies = BF16 * sum(lin.d_in * lin.d_out for lin in lins)
    if bf16:
        copies += BF16 * sum(setup.lora_r * (lin.d_in + lin.d_out) for lin in targets)
    return saved, copies


def _attention_path(shape: ModelShape, setup: TrainSetup, device_kind: str) -> str:
    """flash: an sdpa kernel with O(T) memory. math: torch's fallback sdpa, which keeps the (B, heads, T, T)
    probabilities — on CPU when attention dropout is on, on CUDA for fp32 grouped-query attention (flash needs
    16-bit inputs, the memory-efficient kernel has no GQA). eager: transformers' own attention."""
    if shape.attention == "eager":
        return "eager"
    fp32 = setup.precision == "fp32" and setup.adapter != "qlora"
    if device_kind == "cpu" and shape.attn_dropout > 0:
        return "math"
    if device_kind == "cuda" and fp32 and shape.kv_heads < shape.n_head:
        return "math"
    return "flash"


def _mask_bytes(a: int, device_kind: str) -> int:
    """Bytes per element of a dropout mask: CUDA's fused kernel keeps a bool mask; CPU's dropout is
    `input * bernoulli_noise` and keeps the noise in the input's dtype."""
    return 1 if device_kind == "cuda" else a


def _head_saved(shape: ModelShape, setup: TrainSetup, device_kind: str) -> int:
    """Saved outside the blocks: embeddings' norm/dropout, final norm, LM head input and weight copy, labels."""
    n, d = setup.tokens, shape.d_model
    bf16 = setup.precision == "bf16" or setup.adapter == "qlora"
    full = setup.adapter is None
    saved = 8 * n  # int64 labels kept by the loss (and the ids by the embedding)
    if shape.arch == "llama":
        saved += FP32 * n * d + FP32 * n + (FP32 * n * d if full else 0)  # final RMSNorm
        saved += 2 * FP32 * setup.seq_len * shape.hd  # RoPE cos and sin tables (T, head_dim)
    else:
        saved += FP32 * n * d + 2 * FP32 * n  # gpt2 ln_f / bert embeddings LayerNorm
    if shape.resid_dropout > 0 and full:
        saved += _mask_bytes(FP32, device_kind) * n * d  # embedding dropout's mask (embeddings are fp32)
    if not full:
        # Adapters leave the embeddings frozen: nothing before the first adapter needs a gradient, so the
        # first block's input norm saves nothing and its matmuls reading it keep no weight copy.
        if shape.arch == "llama":
            saved -= FP32 * n * d + FP32 * n
        else:
            saved -= FP32 * n * d + 2 * FP32 * n
        if setup.precision == "bf16" and setup.adapter != "qlora":
            saved -= BF16 * sum(lin.d_in * lin.d_out for lin in shape.linears() if lin.reads == "norm1")
    if shape.head == "lm":
        if full:
            saved += (BF16 if bf16 else FP32) * n * d  # LM head input: its weight (tied or not) is trained
        if setup.precision == "bf16" and setup.adapter != "qlora":
            saved += BF16 * shape.vocab_size * d  # bf16 copy of the LM head weight
    return saved


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class MemoryPlan:
    """The predicted peak of one training process and what it is made of (bytes)."""

    model: str
    setup: str
    device: str
    usable_bytes: int
    parameters: int
    trainable_parameters: int
    weights: int  # per device (ZeRO-3 shards them)
    gradients: int  # all of them, per device (ZeRO-2/3 shard them)
    optimizer_states: int  # per device (ZeRO-1/2/3 shard them)
    activations: int  # saved for backward at the peak moment (incl. bf16 autocast weight copies)
    temporaries: int  # loss buffers, gradients in flight, optimizer scratch, cuBLAS workspaces at the peak
    peak: int
    peak_at: str
    at_peak: dict[str, int]  # weights / gradients / optimizer_states / activations / temporaries at the peak
    checkpointing: bool
    activations_no_checkpointing: int  # all saved tensors of one micro-batch, without / with checkpointing
    activations_checkpointing: int
    fits: bool
    micro_batch: int
    max_micro_batch: int  # largest that fits (0: none), capped at the effective batch per device
    effective_batch: int
    recommended_micro_batch: int
    grad_accum_for_effective_batch: int
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def grid(self) -> Grid:
        """`lmlab plan --format csv`: each part's bytes (its full size, what of it is alive at the peak), then the
        peak and the usable memory."""
        at = self.at_peak
        activations = self.activations_checkpointing if self.checkpointing else self.activations_no_checkpointing
        parts = [("weights", self.weights, at["weights"]), ("gradients", self.gradients, at["gradients"]),
                 ("optimizer_states", self.optimizer_states, at["optimizer_states"]),
                 ("activations", activations, at["activations"]), ("temporaries", None, at["temporaries"]),
                 ("peak", self.peak, self.peak), ("usable", self.usable_bytes, None)]
        return Grid([Column("part", "part", [p[0] for p in parts]),
                     Column("bytes", "bytes", [p[1] for p in parts], "metric"),
                     Column("at_peak_bytes", "at peak", [p[2] for p in parts], "metric")])

    def render(self) -> str:
        """A plain-text table for the terminal: each part's size and what of it is alive at the peak."""
        share = self.peak / self.usable_bytes if self.usable_bytes else math.inf
        at = self.at_peak
        rows = [
            ("weights", self.weights, at["weights"], ""),
            ("gradients", self.gradients, at["gradients"], "fp32, one per trainable parameter"),
            ("optimizer states", self.optimizer_states, at["optimizer_states"], ""),
            ("activations", self.activations_no_checkpointing if not self.checkpointing
             else self.activations_checkpointing, at["activations"],
             f"saved for backward; {_fmt(self.activations_no_checkpointing)} without / "
             f"{_fmt(self.activations_checkpointing)} with checkpointing"),
            ("temporaries", None, at["temporaries"], "loss buffers, gradients in flight, optimizer scratch"),
        ]
        lines = [f"model   {self.model}",
                 f"        {self.parameters / 1e6:,.1f}M parameters, {self.trainable_parameters / 1e6:,.2f}M trainable",
                 f"setup   {self.setup}",
                 f"device  {self.device}: {_fmt(self.usable_bytes)} usable",
                 "",
                 f"  {'':<18}{'size':>11}{'at peak':>12}"]
        for name, size, now, note in rows:
            size_text = _fmt(size) if size is not None else "-"
            lines.append(f"  {name:<18}{size_text:>11}{_fmt(now):>12}   {note}".rstrip())
        lines.append(f"  {'-' * 41}")
        lines.append(f"  {'peak':<18}{'':>11}{_fmt(self.peak):>12}   at {self.peak_at}; {share:.0%} of usable")
        lines.append("")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"{verdict} at micro-batch {self.micro_batch}")
        if self.max_micro_batch:
            lines.append(f"largest micro-batch that fits: {self.max_micro_batch}; for the effective batch of "
                         f"{self.effective_batch}: train.batch_size={self.recommended_micro_batch} "
                         f"train.grad_accum={self.grad_accum_for_effective_batch}")
        else:
            lines.append("no micro-batch fits, not even 1")
        if self.suggestions:
            lines.append("changes that make it fit, cheapest first:")
            lines += [f"  - {s}" for s in self.suggestions]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / MiB:.1f} MiB"


@dataclass(frozen=True)
class _Memory:
    """The parts of one moment of the step."""

    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    temporaries: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.activations + self.temporaries


def _static(shape: ModelShape, setup: TrainSetup) -> dict[str, int]:
    """Per-device bytes of weights, gradients and optimizer states, and the sizes the moments need."""
    pc = shape.params()
    world, stage = setup.world_size, setup.zero_stage
    embed_w = shape.vocab_size * shape.d_model  # the token embedding matrix, the largest tensor of most LMs
    if setup.adapter is None:
        trainable = pc.total
        largest = max(embed_w, max(lin.d_in * lin.d_out for lin in shape.linears()))
        # lmlab's param groups: matrices decay, embeddings/norms/biases don't; foreach temporaries are per group
        no_decay = pc.embedding + pc.n_layer * (pc.per_layer - pc.linear_per_layer) + pc.final - pc.lm_head
        largest_group = max(trainable - no_decay, no_decay)
    else:
        trainable = lora_parameters(shape, setup) + (shape.head_params if shape.head == "classifier" else 0)
        largest = max([setup.lora_r * max(lin.d_in, lin.d_out) for lin in shape.linears()] + [shape.head_params])
        largest_group = trainable
    if setup.adapter == "qlora":
        linear_total = pc.linear_per_layer * pc.n_layer
        weights = NF4_BYTES_PER_PARAM * linear_total + BF16 * (pc.total - linear_total) + FP32 * trainable
    elif setup.adapter == "lora":
        weights = FP32 * (pc.total + trainable)
    else:
        weights = FP32 * pc.total
    reference = weights if setup.frozen_reference else 0  # a full copy on every device: never sharded
    grads = FP32 * trainable
    states = (2 if setup.optimizer == "adamw" else (1 if setup.sgd_momentum > 0 else 0)) * FP32 * trainable
    ddp_buckets = grads if world > 1 and stage == 0 else 0  # DDP's gradient buckets copy every gradient
    gather = 0
    if stage >= 1:
        states //= world
    if stage >= 2:
        grads //= world
    if stage >= 3:
        weights //= world
        gather = 2 * FP32 * pc.per_layer  # the layer being computed and the next one, gathered in full
    return {"weights": int(weights) + gather + int(reference), "grads": grads, "states": states, "ddp": ddp_buckets,
            "trainable": trainable, "total": pc.total, "largest": largest,
            "largest_group": largest_group // (world if stage >= 1 else 1),
            "embed": embed_w, "layer_grads": FP32 * pc.per_layer if setup.adapter is None else
            FP32 * lora_parameters(shape, setup) // max(shape.n_layer, 1)}


def _moments(shape: ModelShape, setup: TrainSetup, device: Device) -> dict[str, _Memory]:
    """Memory at the moments of a step where the peak can fall (optimizer states exist from step 2 on)."""
    st = _static(shape, setup)
    act = activation_bytes(shape, setup, device.kind)
    n, d, v, f = setup.tokens, shape.d_model, shape.vocab_size, shape.d_ff
    a = BF16 if setup.precision == "bf16" or setup.adapter == "qlora" else FP32
    w, s = st["weights"], st["states"]
    full = setup.adapter is None
    autocast = setup.precision == "bf16" and setup.adapter != "qlora"
    # micro-batches after the first of a step find the previous ones' gradients (zero_grad only after the step)
    g_prev = st["grads"] if setup.grad_accum > 1 else 0
    # DDP's buckets, and on CUDA the cuBLAS workspaces torch allocates through its allocator: one per thread
    # that runs matmuls (forward on the main thread, backward on autograd's device thread), 32 MiB on Hopper
    ddp = st["ddp"] + (CUBLAS_WORKSPACES_BYTES if device.kind == "cuda" else 0)
    lm = shape.head == "lm"
    # Under autocast, the bf16 copies of trained weights stay in autocast's cache until the loop leaves the
    # autocast block after backward; copies of frozen weights are freed as backward passes their layer.
    cached_copies = act.n_layer * act.weight_copies_per_layer if (autocast and full) else 0
    head_copy = BF16 * v * d if (autocast and lm) else 0
    if setup.adapter is None:
        g_head = FP32 * (v * d if lm else shape.head_params)
        g_layers = st["grads"] - g_head
    else:
        g_head, g_layers = 0, st["grads"]
    # the gradient flowing back through a block: (n, d) residual grads, the MLP's hidden grads
    layer_tmp = 2 * FP32 * n * d + MLP_GRAD_TENSORS[shape.arch] * a * n * f
    if full:
        biggest = max(lin.d_in * lin.d_out for lin in shape.linears())
        layer_tmp += (BF16 + FP32 if autocast else FP32) * biggest  # a weight gradient (bf16, cast to fp32)
    if setup.checkpointing:
        layer_tmp += act.per_layer + act.weight_copies_per_layer  # the block recomputed in backward
    bottom_layer = act.checkpoint_per_layer if setup.checkpointing else act.per_layer + act.weight_copies_per_layer

    m: dict[str, _Memory] = {}
    if lm:
        logits_fwd = (BF16 + FP32 if a == BF16 else FP32) * n * v  # logits (+ their fp32 copy) before the loss
        m["end of forward"] = _Memory(w, g_prev, s, act.stack + act.head + act.log_softmax, ddp + logits_fwd)
        # nll backward writes d(log-probs) (n, v) fp32; log_softmax backward writes d(logits) (n, v) fp32
        m["backward start (loss)"] = _Memory(w, g_prev, s, act.stack + act.head + act.log_softmax, ddp + 2 * FP32 * n * v)
        lm_grad = (FP32 + (BF16 if autocast else 0)) * v * d if full else 0
        g_now = max(g_prev, g_head)
        m["backward of the LM head"] = _Memory(w, g_now, s, act.stack + act.head,
                                               ddp + a * n * v + lm_grad + a * n * d)
    else:
        m["end of forward"] = _Memory(w, g_prev, s, act.stack + act.head, ddp)
    g_top = max(g_prev, g_head)
    m["backward, top block"] = _Memory(w, g_top, s, act.stack + head_copy, ddp + layer_tmp)
    g_bottom = max(g_prev, g_head + g_layers)
    # at the bottom block, the blocks above have freed their saves; cached copies (if any) are still there
    bottom_acts = bottom_layer + (cached_copies - (act.weight_copies_per_layer if not setup.checkpointing else 0)
                                  if cached_copies else 0)
    m["backward, bottom block"] = _Memory(w, g_bottom, s, bottom_acts + head_copy * full, ddp + layer_tmp)
    if full:
        # the embedding's dense (V, d) fp32 gradient, added into the (tied) weight's .grad
        m["backward of the embedding"] = _Memory(w, st["grads"], s, cached_copies + head_copy, ddp + FP32 * st["embed"])
    if device.kind == "cuda":  # multi-tensor (foreach) kernels: AdamW's sqrt(v), SGD's grad + wd·param
        step_tmp = FP32 * st["largest_group"]
    else:  # one tensor at a time: sqrt(v) and sqrt(v)/bias_correction for the largest tensor
        step_tmp = (2 if setup.optimizer == "adamw" else 1) * FP32 * st["largest"]
    m["optimizer step"] = _Memory(w, st["grads"], s, 0, ddp + step_tmp)
    return m


def _peak(shape: ModelShape, setup: TrainSetup, device: Device) -> tuple[str, _Memory]:
    return max(_moments(shape, setup, device).items(), key=lambda kv: kv[1].total)


def plan_from_shape(shape: ModelShape, setup: TrainSetup, device: str | Device = "cpu:24gb",
                    *, effective_batch: int | None = None, explore: bool = True) -> MemoryPlan:
    """The plan for one model shape and training setup on one device (a pure function)."""
    dev = parse_device(device) if isinstance(device, str) else device
    if setup.adapter == "qlora" and dev.kind != "cuda":
        raise LmlabError("adapter: 'qlora' needs a CUDA GPU (bitsandbytes 4-bit kernels); plan it with a GPU "
                         "--device or use 'lora' on CPU")
    if setup.zero_stage not in (0, 1, 2, 3):
        raise LmlabError(f"zero_stage: must be 0, 1, 2 or 3 (got {setup.zero_stage})")
    if setup.world_size < 1 or setup.micro_batch < 1:
        raise LmlabError("world_size and micro_batch: must be >= 1")
    at, mem = _peak(shape, setup, dev)
    st = _static(shape, setup)
    per_device_batch = max(1, (effective_batch or setup.micro_batch * setup.grad_accum * setup.world_size)
                           // setup.world_size)
    best = _max_micro_batch(shape, setup, dev, per_device_batch)
    rec = _recommend(best, per_device_batch)
    plan = MemoryPlan(
        model=shape.describe(), setup=setup.describe(), device=f"{dev.name} ({dev.description})",
        usable_bytes=dev.usable_bytes, parameters=st["total"], trainable_parameters=st["trainable"],
        weights=st["weights"], gradients=st["grads"], optimizer_states=st["states"],
        activations=mem.activations, temporaries=mem.temporaries, peak=mem.total, peak_at=at,
        at_peak={"weights": mem.weights, "gradients": mem.gradients, "optimizer_states": mem.optimizer_states,
                 "activations": mem.activations, "temporaries": mem.temporaries},
        checkpointing=setup.checkpointing,
        activations_no_checkpointing=activation_bytes(shape, replace(setup, checkpointing=False), dev.kind).total,
        activations_checkpointing=activation_bytes(shape, replace(setup, checkpointing=True), dev.kind).total,
        fits=mem.total <= dev.usable_bytes, micro_batch=setup.micro_batch, max_micro_batch=best,
        effective_batch=per_device_batch * setup.world_size, recommended_micro_batch=rec[0],
        grad_accum_for_effective_batch=rec[1])
    if rec[0] and per_device_batch % rec[0]:
        plan.notes.append(f"no micro-batch <= {best} divides {per_device_batch}; the effective batch becomes "
                          f"{rec[0] * rec[1] * setup.world_size}")
    if explore and not (plan.fits and best >= setup.micro_batch):
        plan.suggestions = _suggestions(shape, setup, dev, per_device_batch, best)
    return plan


def _fits(shape: ModelShape, setup: TrainSetup, dev: Device, micro: int, per_device_batch: int) -> bool:
    accum = math.ceil(per_device_batch / micro)
    trial = replace(setup, micro_batch=micro, grad_accum=accum)
    return _peak(shape, trial, dev)[1].total <= dev.usable_bytes


def _max_micro_batch(shape: ModelShape, setup: TrainSetup, dev: Device, per_device_batch: int) -> int:
    """Largest micro-batch <= the per-device effective batch that fits. The whole batch in one pass needs no
    gradients kept between micro-batches, so it is tried first; below it memory grows with the micro-batch."""
    if _fits(shape, setup, dev, per_device_batch, per_device_batch):
        return per_device_batch
    lo, hi = 0, per_device_batch - 1  # lo fits (0 = nothing), hi+1 doesn't
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(shape, setup, dev, mid, per_device_batch):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _recommend(best: int, per_device_batch: int) -> tuple[int, int]:
    """(micro-batch, accumulation) for the effective batch: the largest divisor that fits, else the largest."""
    if best == 0:
        return 0, 0
    for micro in range(best, 0, -1):
        if per_device_batch % micro == 0 and micro * 2 > best:  # a divisor not much smaller than the best
            return micro, per_device_batch // micro
    return best, math.ceil(per_device_batch / best)


def _suggestions(shape: ModelShape, setup: TrainSetup, dev: Device, per_device_batch: int, best: int) -> list[str]:
    """Changes that make it fit, cheapest first: those that keep the training result the same (smaller
    micro-batch with accumulation, bf16, checkpointing, ZeRO on the GPUs at hand) before those that change
    what is trained (LoRA, QLoRA) and before more hardware."""
    out: list[str] = []
    if best >= 1:
        micro, accum = _recommend(best, per_device_batch)
        trial = replace(setup, micro_batch=micro, grad_accum=accum)
        out.append(f"train.batch_size={micro} train.grad_accum={accum} (same effective batch): "
                   f"peak {_fmt(_peak(shape, trial, dev)[1].total)}")

    # (label, setup fields, cost rank); the rank orders the options, ties broken by the number of changes
    changes: list[tuple[str, dict[str, Any], int]] = []
    if setup.precision == "fp32":
        changes.append(("train.precision=bf16", {"precision": "bf16"}, 1))
    if not setup.checkpointing:
        changes.append(("model.gradient_checkpointing=true", {"checkpointing": True}, 2))
    if dev.kind == "cuda" and setup.world_size > 1:
        changes += [(f"ZeRO stage {z} over the {setup.world_size} GPUs", {"zero_stage": z}, 3)
                    for z in range(setup.zero_stage + 1, 4)]
    if setup.adapter is None:
        changes.append((f"LoRA (adapter.kind=lora, r={setup.lora_r}, all linear layers)", {"adapter": "lora"}, 4))
    if dev.kind == "cuda" and setup.adapter != "qlora":
        changes.append((f"QLoRA (adapter.kind=qlora, 4-bit base, r={setup.lora_r})",
                        {"adapter": "qlora", "precision": "bf16"}, 5))
    gpus = [(f"{w} GPUs with ZeRO-3", {"world_size": w, "zero_stage": 3}, 6)
            for w in (2, 4, 8, 16) if dev.kind == "cuda" and w > setup.world_size]

    def attempt(trial: TrainSetup) -> tuple[int, int, int] | None:
        """(micro-batch, accumulation, peak) of the best fitting micro-batch, None if none fits."""
        batch = per_device_batch * setup.world_size // trial.world_size or 1
        b = _max_micro_batch(shape, trial, dev, batch)
        if b < 1:
            return None
        micro, accum = _recommend(b, batch)
        return micro, accum, _peak(shape, replace(trial, micro_batch=micro, grad_accum=accum), dev)[1].total

    # Options: each change alone, then the cheap changes accumulated in order (bf16, + checkpointing, + ...),
    # each with the fewest GPUs that makes it fit. Listed cheapest first; one fitting option per cost rank.
    options: list[tuple[int, int, str, TrainSetup]] = []
    for label, kw, rank in changes:
        options.append((rank, 1, label, replace(setup, **kw)))
    trial, labels = setup, []
    for label, kw, rank in changes:
        trial, labels = replace(trial, **kw), [*labels, label]
        if len(labels) > 1:
            options.append((rank, len(labels), " + ".join(labels), trial))
    for label, kw, rank in gpus:
        options.append((rank, 1, label, replace(setup, **kw)))
    seen_ranks: set[int] = set()
    for rank, _, label, trial in sorted(options, key=lambda o: (o[0], o[1])):
        if rank in seen_ranks:
            continue
        # with a micro-batch that fits already, a change is only worth naming if it fits the recipe's
        if best >= 1 and not _fits(shape, trial, dev, setup.micro_batch, per_device_batch):
            continue
        if (fit := attempt(trial)) is not None:
            seen_ranks.add(rank)
            micro, accum, peak = fit
            out.append(f"{label}: fits at micro-batch {micro} (grad_accum {accum}), peak {_fmt(peak)}")
    if not out:
        out.append("nothing tried fits; use a smaller model, shorter sequences or a larger device")
    return out


# ---------------------------------------------------------------------------------------------- recipe
# distributed.strategy → the sharding planned: DeepSpeed ZeRO stages as named, FSDP (full shard) as stage 3
STRATEGY_ZERO_STAGE = {"ddp": 0, "deepspeed_zero1": 1, "deepspeed_zero2": 2, "deepspeed_zero3": 3, "fsdp": 3}

def plan_recipe(recipe: Recipe, device: str = "cpu:24gb", *, world_size: int | None = None, zero_stage: int = 0,
                adapter: Adapter | None = None, lora_r: int | None = None,
                lora_targets: tuple[str, ...] | None = None, micro_batch: int | None = None,
                precision: Literal["fp32", "bf16"] | None = None, checkpointing: bool | None = None) -> MemoryPlan:
    """Plan a recipe on a device. Keyword arguments override what the recipe says (or add what its schema
    does not have yet: adapters, distributed training)."""
    shape = shape_from_recipe(recipe)
    t = recipe.train
    seq_len = recipe.model.block_size if recipe.run.task == "lm" else recipe.data.max_length
    sequences = 2 if (recipe.run.task == "pair_classify" and recipe.pair.architecture == "bi") else 1
    dpo_reference = None
    if recipe.run.task == "dpo":  # chosen and rejected in one forward pass: two sequences per pair
        sequences, dpo_reference = 2, recipe.dpo.reference
        if dpo_reference == "auto":  # as training resolves it for a new adapter or full fine-tuning
            dpo_reference = "adapter_disabled" if (adapter or recipe.adapter.kind) != "none" else "precomputed"
    section = recipe.adapter
    if adapter is None and section.kind != "none":
        adapter, lora_r = section.kind, lora_r or section.r
        if lora_targets is None and section.target_modules != "all-linear":
            lora_targets = tuple(section.target_modules)
    dist = recipe.distributed
    if dist.strategy != "none":
        zero_stage = zero_stage or STRATEGY_ZERO_STAGE.get(dist.strategy, 0)
        world_size = world_size or (dist.nproc or 1) * dist.num_nodes
    setup = TrainSetup(
        micro_batch=micro_batch or t.batch_size, seq_len=seq_len, precision=precision or t.precision,
        optimizer=t.optimizer, sgd_momentum=t.momentum, grad_accum=t.grad_accum,
        checkpointing=recipe.model.gradient_checkpointing if checkpointing is None else checkpointing,
        adapter=adapter, lora_r=lora_r or 16, lora_targets=lora_targets, zero_stage=zero_stage,
        world_size=world_size or 1, sequences_per_example=sequences, frozen_reference=dpo_reference == "frozen_copy")
    effective = t.batch_size * t.grad_accum * (world_size or 1)
    plan = plan_from_shape(shape, setup, device, effective_batch=effective)
    plan.model = f"{recipe.run.name}: {plan.model}"
    if dpo_reference is not None:
        copy_bytes = _static(shape, replace(setup, frozen_reference=True))["weights"] - \
            _static(shape, replace(setup, frozen_reference=False))["weights"]
        plan.notes.append(f"dpo: chosen and rejected in one forward pass (2 sequences per pair); reference "
                          f"{dpo_reference}: " + ("the frozen copy is in the weights" if dpo_reference == "frozen_copy"
                                                  else "no second copy") + f" (a frozen copy takes {_fmt(copy_bytes)})")
    if shape.arch == "bert":
        plan.notes.append("encoder planned with a classification head (no vocabulary logits)")
    return plan


def shape_from_recipe(recipe: Recipe) -> ModelShape:
    """Model shape from config.json (pretrained) or from the recipe's model and tokenizer sections."""
    m = recipe.model
    task = recipe.run.task
    pair = recipe.pair
    if m.pretrained is not None:
        path = recipe.resolve_model_path(m.pretrained)
        if task == "pair_classify":
            arch, hidden = pair.architecture, pair.head_hidden
            if arch == "sequence_classification":
                return shape_from_pretrained(path, m.gguf_file, head="classifier", head_params=0)
            features = 4 if arch == "bi" else 1
            shape = shape_from_pretrained(path, m.gguf_file, head="classifier")
            head = features * shape.d_model * hidden + hidden + hidden * 3 + 3
            return replace(shape, head_params=head, head="classifier")
        return shape_from_pretrained(path, m.gguf_file)
    vocab = recipe.tokenizer.vocab_size
    if recipe.tokenizer.kind == "pretrained" and recipe.tokenizer.name_or_path:
        vocab = _pretrained_vocab(recipe.resolve_model_path(recipe.tokenizer.name_or_path))
    context = m.context_length or m.block_size
    return ModelShape(
        m.arch, vocab, m.d_model, m.n_layer, m.n_head, m.d_ff or default_d_ff(m.arch, m.d_model), context,
        n_kv_head=m.n_kv_head if m.arch == "llama" else None, tied_embeddings=m.tie_embeddings,
        # models.py builds scratch GPT-2s with the fused tanh GELU
        activation="gelu_pytorch_tanh" if m.arch == "gpt2" else "silu",
        resid_dropout=m.dropout if m.arch == "gpt2" else 0.0, attn_dropout=m.dropout,
        name=recipe.run.name)


def _pretrained_vocab(name_or_path: str) -> int:
    """Vocabulary of a pretrained tokenizer: its length (added tokens included), read locally."""
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(name_or_path))
    except (OSError, ValueError) as e:
        raise LmlabError(f"tokenizer.name_or_path: could not read tokenizer '{name_or_path}' "
                         f"({str(e).splitlines()[0][:160]}); point it at a local folder") from None

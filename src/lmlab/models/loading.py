"""The one checkpoint loader: a checkpoint folder's model — full weights, or base model + adapter with the checks
that the adapter fits the base (module names and shapes) and that the base is the one it was trained on
(fingerprint) — for inference (`load_checkpoint`: generate, serve, export, eval, inspect-predictions) and for
training on (`load_model_for_training`: model.init_from)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.data.templates import PromptTemplate, _special_token_strings
from lmlab.errors import LmlabError
from lmlab.models.build import load_pretrained_lm, peft_quietly
from lmlab.recipe.loading import load_recipe
from lmlab.recipe.schema import Recipe
from lmlab.workspace.layout import read_json
from lmlab.workspace.resolve import Which, resolve


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready for inference: model in eval mode, its tokenizer, its template and recipe."""

    path: Path
    run_id: str | None
    recipe: Recipe | None  # None for a plain Hugging Face folder
    model: Any  # a transformers model, or a peft model wrapping one (adapter checkpoints)
    tokenizer: Any
    template: Any | None  # lmlab.data.templates.PromptTemplate; None for task lm (raw text)
    meta: dict[str, Any] = field(default_factory=dict)
    adapter: bool = False
    base: str | None = None  # adapters: where the base model was loaded from
    ledger_uri: str | None = None  # the MLflow ledger holding run_id, when known

    @property
    def label(self) -> str:
        return (self.run_id or "")[:8] or self.path.name


def checkpoint_recipe(path: Path):
    """The recipe a checkpoint was trained with; relative model/data paths resolve like they did in training."""
    if not (path / "recipe.yaml").is_file():
        raise LmlabError(f"{path}: has no recipe.yaml; not an lmlab checkpoint (load it with transformers directly)")
    recipe = load_recipe(path / "recipe.yaml")
    source = read_json(path / "meta.json").get("recipe_source")
    recipe.source_path = source if source and Path(source).is_file() else None
    return recipe


def load_checkpoint(ref: str | os.PathLike, *, output_dir: str | None = None, uri: str | None = None,
                    base: str | None = None, device: str | None = None, four_bit: bool | None = None,
                    which: Which = "best") -> LoadedCheckpoint:
    """Load a run (id or prefix: its best checkpoint, or `which="last"`), a checkpoint folder or a plain Hugging
    Face model folder for inference.

    A LoRA checkpoint holds only the adapter: the base comes from the recipe's model.pretrained (or `base`), is
    checked against the adapter (module names and shapes; the base fingerprint when the checkpoint has one) and
    the adapter is applied with peft. QLoRA adapters go on a 4-bit base on CUDA, else on the full-precision base
    (`four_bit` forces either)."""
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    folder = Path(ref)
    if folder.is_dir() and (folder / "config.json").is_file() and not (folder / "recipe.yaml").is_file():
        return load_hf_folder(folder)  # a plain Hugging Face model, not an lmlab checkpoint
    found = resolve(ref, output_dir=output_dir, uri=uri, which=which)
    path = found.checkpoint
    recipe = checkpoint_recipe(path)
    meta = read_json(path / "meta.json")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    spec = read_json(path / "template.json")
    template = PromptTemplate.from_dict(spec) if spec else None
    model, base_path = load_model(path, recipe, meta, base=base, device=device, four_bit=four_bit,
                                  output_dir=output_dir)
    model.eval()
    return LoadedCheckpoint(path, found.run_id, recipe, model, tokenizer, template, meta, base_path is not None,
                            base_path, found.ledger_uri)


def load_model_for_training(path: Path, recipe: Recipe) -> Any:
    """A parent checkpoint's model to train on (model.init_from): its full weights, or its base + its adapter,
    trainable. `recipe` is the child's (it resolves the base like the parent did, through $LMLAB_MODELS)."""
    parent = checkpoint_recipe(path) if (path / "recipe.yaml").is_file() else recipe
    parent.source_path = parent.source_path or recipe.source_path
    model, _ = load_model(path, parent, read_json(path / "meta.json"), device="cpu", four_bit=False, trainable=True,
                          output_dir=recipe.run.output_dir)
    return model


def load_model(path: Path, recipe: Recipe, meta: Mapping[str, Any], *, base: str | None = None,
               device: str | None = None, four_bit: bool | None = None, trainable: bool = False,
               output_dir: str | None = None) -> tuple[Any, str | None]:
    """(model, base path or None) of a checkpoint folder: full weights, or base + adapter after the fit checks."""
    import torch
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (path / "adapter_config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return model.to(device), None
    base_path = base_model_path(recipe, base, output_dir=output_dir)
    if four_bit is None:
        four_bit = recipe.adapter.kind == "qlora" and torch.cuda.is_available()
    model = load_base(recipe, base_path, four_bit=four_bit, device=device)
    check_adapter_fits(model, path, base_path)
    check_base_fingerprint(model, meta, base_path)
    from peft import PeftModel

    with peft_quietly():
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable), base_path


def base_model_path(recipe: Recipe, base: str | None = None, *, output_dir: str | None = None) -> str:
    """Where an adapter's base model is: `base` if given, else the recipe's model.pretrained (through
    $LMLAB_MODELS), else the checkpoint model.init_from names."""
    if base is not None:
        return recipe.resolve_model_path(base)
    if recipe.model.pretrained is not None:
        return recipe.resolve_model_path(recipe.model.pretrained)
    init = recipe.model.init_from
    if init is None:
        raise LmlabError("model.pretrained: the adapter's recipe names no base model; pass --base FOLDER")
    if init.startswith("run:"):
        return str(resolve(init, output_dir=output_dir or recipe.run.output_dir, field="model.init_from").checkpoint)
    return recipe.resolve_model_path(init)


def load_base(recipe: Recipe, base_path: str, *, four_bit: bool, device: str):
    gguf = recipe.model.gguf_file if recipe.model.pretrained and base_path == recipe.resolve_model_path(
        recipe.model.pretrained) else None
    model = load_pretrained_lm(base_path, gguf, four_bit=four_bit)
    if not four_bit:  # bitsandbytes places 4-bit weights itself
        model.to(device)
    return model


def check_adapter_fits(base_model, adapter_dir: Path, base_name: str) -> None:
    """Refuse an adapter whose modules or shapes are not those of `base_model`: it was trained on another model.
    LoRA A is (r, in_features), B is (out_features, r) for the module it adapts."""
    from safetensors import safe_open

    file = Path(adapter_dir) / "adapter_model.safetensors"
    if not file.is_file():
        raise LmlabError(f"{adapter_dir}: adapter_config.json but no adapter_model.safetensors; the checkpoint is incomplete")
    modules = dict(base_model.named_modules())
    missing, wrong = [], []
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            for part, dim in ((".lora_A.", 1), (".lora_B.", 0)):
                if part not in key:
                    continue
                name = key.split(part)[0].removeprefix("base_model.model.")
                module = modules.get(name)
                if module is None:
                    missing.append(name)
                    continue
                shape = f.get_slice(key).get_shape()
                have = _in_out(module)
                if have is not None and shape[dim] != have[1 - dim]:
                    side = "in" if dim == 1 else "out"
                    wrong.append(f"{name} ({side} {shape[dim]} vs {have[1 - dim]})")
    if missing or wrong:
        trained_on = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        what = (f"{len(missing)} adapted modules do not exist in it (e.g. {missing[0]})" if missing
                else f"{len(wrong)} adapted modules have other sizes (e.g. {wrong[0]})")
        raise LmlabError(f"adapter {adapter_dir} does not fit the base model '{base_name}': {what}; it was trained on "
                         f"'{trained_on}'. Give that base with --base (or fix model.pretrained / $LMLAB_MODELS)")


def _in_out(module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like module; 4-bit layers keep them as attributes too."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(weight, "dim", lambda: 0)() == 2 and type(module).__name__ == "Conv1D":
        return int(weight.shape[0]), int(weight.shape[1])  # GPT-2's Conv1D stores (in, out)
    return None


def base_fingerprint(model) -> str:
    """A short hash that tells pretrained models apart without hashing gigabytes: the input embedding's shape and
    its first 4,096 values (rounded to 1e-4, so float32 and re-saved copies agree). Works on a plain model and on a
    peft model (it looks through the adapter, and through a trained copy of the embeddings to the frozen original).
    Two checkpoints of one model family share a tokenizer and shapes but not these numbers."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = inner.get_input_embeddings()
    emb = getattr(emb, "original_module", emb)
    w = emb.weight.detach()
    sample = torch.round(w.flatten()[:4096].float().cpu() * 1e4).to(torch.int64)
    h = hashlib.sha256(str(tuple(w.shape)).encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def check_base_fingerprint(base_model, meta: Mapping[str, Any], base_name: str) -> None:
    expected = meta.get("base_fingerprint")
    if expected and base_fingerprint(base_model) != expected:
        raise LmlabError(f"the base model '{base_name}' is not the one this adapter was trained on (fingerprint "
                         f"{base_fingerprint(base_model)} vs {expected} recorded in meta.json); give the right base "
                         "with --base, or fix model.pretrained / $LMLAB_MODELS")


def load_hf_folder(path: Path) -> LoadedCheckpoint:
    """A plain Hugging Face causal LM folder, as a LoadedCheckpoint without recipe. Its template is the tokenizer's
    chat template (used for the end-of-turn stop string; prompts are rendered by apply_chat_template)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto" if device == "cuda" else torch.float32)
    except (OSError, ValueError) as e:
        raise LmlabError(f"{path}: cannot load it as a causal language model with its tokenizer ({e})") from None
    model.to(device).eval()
    jinja = tokenizer.chat_template
    jinja = jinja.get("default") if isinstance(jinja, dict) else jinja
    template = PromptTemplate("chat", chat_template=jinja, chat_template_name="tokenizer",
                              special_tokens=_special_token_strings(tokenizer)) if jinja else None
    return LoadedCheckpoint(path, None, None, model, tokenizer, template)

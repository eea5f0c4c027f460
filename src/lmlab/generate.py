"""Generation from a trained run: load its checkpoint (full weights, or a LoRA adapter on its base), render prompts
with the run's saved template, decode with a named sampling preset, stop at EOS and at the template's end of turn.

Loading is here because generation is its first user; `lmlab export` and the JSON check reuse `load_checkpoint`.
The pydantic models at the top are the recipe's `generation:` section; they import nothing heavy so that
`lmlab.config` can import them (torch loads only when a model does).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmlab.errors import LmlabError


# ------------------------------------------------------------------------------------ recipe section
class SamplingPreset(BaseModel):
    """How to decode. temperature 0 = greedy; penalty_alpha > 0 = contrastive search (with top_k candidates)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    temperature: float = Field(0.0, ge=0, description="0 = greedy (argmax); > 0 = sample with this temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="Sampling: keep the smallest token set with this much probability")
    top_k: int = Field(0, ge=0, description="Sampling: keep the k likeliest tokens (0 = off); contrastive: candidates")
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages tokens already in the text (CTRL)")
    max_new_tokens: int = Field(256, gt=0, description="Stop after this many generated tokens")
    penalty_alpha: float = Field(0.0, ge=0, le=1, description="Contrastive search degeneration penalty (0 = off)")
    seed: int = Field(0, description="Seeds sampling, so the same call gives the same text")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings (EOS and the template's end of "
                            "turn always stop)")

    @model_validator(mode="after")
    def _contrastive_needs_candidates(self) -> SamplingPreset:
        if self.penalty_alpha > 0 and self.top_k < 2:
            raise ValueError(f"top_k: contrastive search (penalty_alpha {self.penalty_alpha:g}) compares top_k "
                             f"candidates; set top_k >= 2 (got {self.top_k}), e.g. 4")
        return self

    @property
    def mode(self) -> str:
        if self.penalty_alpha > 0:
            return "contrastive"
        return "sample" if self.temperature > 0 else "greedy"


BUILTIN_PRESETS: dict[str, SamplingPreset] = {
    "greedy": SamplingPreset(),
    "sample": SamplingPreset(temperature=0.7, top_p=0.9, top_k=50),
    "creative": SamplingPreset(temperature=1.0, top_p=0.95, top_k=0, repetition_penalty=1.1),
    "contrastive": SamplingPreset(penalty_alpha=0.6, top_k=4),
}


class GenerationSection(BaseModel):
    """The recipe's `generation:` section: named sampling presets (added to the built-in ones) and the default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    presets: dict[str, SamplingPreset] = Field(
        default_factory=dict, description=f"Named presets; built in: {', '.join(BUILTIN_PRESETS)} (same names override)")
    default_preset: str = Field("greedy", description="Preset `lmlab generate` uses without --preset")

    @model_validator(mode="after")
    def _default_exists(self) -> GenerationSection:
        known = {**BUILTIN_PRESETS, **self.presets}
        if self.default_preset not in known:
            raise ValueError(f"default_preset: '{self.default_preset}' is not a preset; one of {', '.join(known)}")
        return self


def presets_of(recipe: Any) -> dict[str, SamplingPreset]:
    """Built-in presets plus the recipe's own (a recipe without a generation section has only the built-ins)."""
    section = getattr(recipe, "generation", None)
    return {**BUILTIN_PRESETS, **(section.presets if section is not None else {})}


def pick_preset(recipe: Any, name: str | None, overrides: Mapping[str, Any] | None = None) -> SamplingPreset:
    """The named preset (default: the recipe's default_preset) with CLI overrides (None values ignored)."""
    section = getattr(recipe, "generation", None)
    name = name or (section.default_preset if section is not None else "greedy")
    presets = presets_of(recipe)
    if name not in presets:
        raise LmlabError(f"--preset: unknown preset '{name}'; one of {', '.join(presets)} "
                         "(add your own under generation.presets in the recipe)")
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return SamplingPreset.model_validate({**presets[name].model_dump(), **changes})
    except ValueError as e:  # pydantic's ValidationError: name the CLI option of the first bad field
        first = e.errors()[0]
        msg = first["msg"].removeprefix("Value error, ")
        where = str(first["loc"][0]) if first["loc"] else "preset"
        if not first["loc"] and ": " in msg:  # model validators name their field first: 'top_k: ...'
            where, msg = msg.split(": ", 1)
        raise LmlabError(f"--{where.replace('_', '-')}: {msg}") from None


# ------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedCheckpoint:
    """A checkpoint ready for inference: model in eval mode, its tokenizer, its template and recipe."""

    path: Path
    run_id: str | None
    recipe: Any  # lmlab.config.Recipe
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


def is_checkpoint(path: Path) -> bool:
    return any((path / f).is_file() for f in ("meta.json", "adapter_config.json", "config.json"))


def resolve_checkpoint(ref: str | os.PathLike, *, output_dir: str = "lmlab-runs",
                       uri: str | None = None) -> tuple[Path, str | None, str | None]:
    """(checkpoint folder, run id, ledger uri) for a checkpoint folder, a run folder or a run id (or prefix).
    A run resolves to its best checkpoint (by the recipe's eval.best_metric), else its latest."""
    from lmlab.checkpoint import list_checkpoints

    path = Path(ref)
    if path.is_dir():
        if is_checkpoint(path):
            meta = _read_json(path / "meta.json")
            return path, meta.get("run_id"), _ledger_near(path)
        if (path / "checkpoints").is_dir():
            return _best_of_run_dir(path), path.name, _ledger_near(_best_of_run_dir(path))
        raise LmlabError(f"{ref}: not a checkpoint folder (no config.json / adapter_config.json) nor a run folder")
    from lmlab.ledger import default_uri, find_run

    uri = uri or os.environ.get("LMLAB_TRACKING_URI")
    if uri is None:
        if not Path(output_dir).is_dir():
            raise LmlabError(f"{ref}: not a folder, and no workspace '{output_dir}' here to look the run id up in; "
                             "run from the folder holding lmlab-runs, pass --output-dir, or give a checkpoint folder")
        uri = default_uri(output_dir)
    run = find_run(output_dir, str(ref), uri)
    run_id, tags = run.info.run_id, run.data.tags
    run_dir = Path(tags.get("lmlab.run_dir", ""))
    if not tags.get("lmlab.run_dir") or not run_dir.is_dir():
        local = Path(output_dir) / "runs" / run_id
        if not local.is_dir():
            raise LmlabError(f"run {run_id[:8]}: its run folder ({tags.get('lmlab.run_dir')}) is not on this machine; "
                             "give the checkpoint folder instead")
        run_dir = local
    best_tag = tags.get("lmlab.best_checkpoint")
    if best_tag and (run_dir / "checkpoints" / Path(best_tag).name).is_dir():
        return run_dir / "checkpoints" / Path(best_tag).name, run_id, uri
    if not list_checkpoints(run_dir):
        raise LmlabError(f"run {run_id[:8]} saved no checkpoint in {run_dir}; nothing to load")
    return _best_of_run_dir(run_dir), run_id, uri


def _best_of_run_dir(run_dir: Path) -> Path:
    from lmlab.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    if not found:
        raise LmlabError(f"{run_dir}: no checkpoint in {run_dir / 'checkpoints'}")
    best = _read_json(found[-1] / "meta.json").get("best_checkpoint")
    if best and (run_dir / "checkpoints" / Path(best).name).is_dir():
        return run_dir / "checkpoints" / Path(best).name
    return found[-1]


def workspace_of(checkpoint: Path) -> Path | None:
    """The workspace a run's checkpoint lives in (<workspace>/runs/<id>/checkpoints/step-N), else None."""
    parents = Path(checkpoint).resolve().parents
    if len(parents) > 3 and parents[0].name == "checkpoints" and parents[2].name == "runs":
        return parents[3]
    return None


def _ledger_near(checkpoint: Path) -> str | None:
    """The sqlite ledger of the workspace a checkpoint lives in."""
    if os.environ.get("LMLAB_TRACKING_URI"):
        return os.environ["LMLAB_TRACKING_URI"]
    workspace = workspace_of(checkpoint)
    if workspace is not None and (workspace / "mlflow.db").is_file():
        return f"sqlite:///{workspace / 'mlflow.db'}"
    return None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def checkpoint_recipe(path: Path):
    """The recipe a checkpoint was trained with; relative model/data paths resolve like they did in training."""
    from lmlab.config import load_recipe

    if not (path / "recipe.yaml").is_file():
        raise LmlabError(f"{path}: has no recipe.yaml; not an lmlab checkpoint (load it with transformers directly)")
    recipe = load_recipe(path / "recipe.yaml")
    source = _read_json(path / "meta.json").get("recipe_source")
    recipe.source_path = source if source and Path(source).is_file() else None
    return recipe


def load_checkpoint(ref: str | os.PathLike, *, output_dir: str = "lmlab-runs", uri: str | None = None,
                    base: str | None = None, device: str | None = None, four_bit: bool | None = None
                    ) -> LoadedCheckpoint:
    """Load a run (id or prefix, its best checkpoint) or a checkpoint folder for inference.

    A LoRA checkpoint holds only the adapter: the base comes from the recipe's model.pretrained (or `base`), is
    checked against the adapter (module names and shapes; the base fingerprint when the checkpoint has one) and
    the adapter is applied with peft. QLoRA adapters go on a 4-bit base on CUDA, else on the full-precision base
    (`four_bit` forces either)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmlab.data.templates import PromptTemplate

    transformers.utils.logging.disable_progress_bar()
    path, run_id, ledger_uri = resolve_checkpoint(ref, output_dir=output_dir, uri=uri)
    recipe = checkpoint_recipe(path)
    meta = _read_json(path / "meta.json")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    spec = _read_json(path / "template.json")
    template = PromptTemplate.from_dict(spec) if spec else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = (path / "adapter_config.json").is_file()
    base_path = None
    if adapter:
        base_path = base_model_path(recipe, base, output_dir=output_dir)
        if four_bit is None:
            four_bit = recipe.adapter.kind == "qlora" and torch.cuda.is_available()
        model = load_base(recipe, base_path, four_bit=four_bit, device=device)
        check_adapter_fits(model, path, base_path)
        check_base_fingerprint(model, meta, base_path)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        model.to(device)
    model.eval()
    return LoadedCheckpoint(path, run_id, recipe, model, tokenizer, template, meta, adapter, base_path, ledger_uri)


def base_model_path(recipe: Any, base: str | None = None, *, output_dir: str = "lmlab-runs") -> str:
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
        return str(resolve_checkpoint(init.removeprefix("run:"), output_dir=output_dir)[0])
    return recipe.resolve_model_path(init)


def load_base(recipe: Any, base_path: str, *, four_bit: bool, device: str):
    from lmlab.models import load_pretrained_lm

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


# ---------------------------------------------------------------------------------------- prompting
def prompt_record(template: Any, item: str | Mapping[str, Any]) -> Any:
    """What the template renders for one user prompt: a record (dict) as is; a string becomes the instruction
    (alpaca), the single placeholder (prompt_completion) or a user message (chat)."""
    if not isinstance(item, str):
        return item
    fmt = template.format
    if fmt == "alpaca":
        return {template.column("instruction"): item, template.column("input"): ""}
    if fmt == "chat":
        return [{"role": "user", "content": item}]
    if fmt == "prompt_completion":
        from lmlab.data.templates import _placeholders

        names = _placeholders(template.prompt_template or "")
        if len(names) != 1:
            raise LmlabError(f"--prompt: the run's template has {len(names)} placeholders ({', '.join(names)}); "
                             "give records with those keys in a .jsonl file with --prompts")
        return {template.column(names[0]): item}
    return {template.column(template.text_column): item}


def prompt_ids(loaded: LoadedCheckpoint, item: str | Mapping[str, Any]) -> tuple[str, list[int]]:
    """(prompt text, token ids) exactly as training tokenized prompts."""
    from lmlab.data.sft import encode_prompt, special_prefix

    tok, template = loaded.tokenizer, loaded.template
    if template is None or template.format == "text":
        text = item if isinstance(item, str) else template.completion_text(item) if template else str(item)
        prefix = special_prefix(tok) if template is not None else []
        return text, prefix + tok(text, add_special_tokens=False)["input_ids"]
    record = prompt_record(template, item)
    return template.render_for_generation(record), encode_prompt(template, tok, record)


def read_prompts(path: str | os.PathLike) -> list[str | dict[str, Any]]:
    """.txt: one prompt per non-empty line; .json / .jsonl: records (dicts of the template's columns) or strings."""
    p = Path(path)
    if not p.is_file():
        raise LmlabError(f"--prompts: file '{path}' not found")
    text = p.read_text()
    if p.suffix == ".jsonl":
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif p.suffix == ".json":
        items = json.loads(text)
        if not isinstance(items, list):
            raise LmlabError(f"--prompts: {path} must hold a JSON list of prompts or records")
    else:
        items = [line for line in text.splitlines() if line.strip()]
    if not items:
        raise LmlabError(f"--prompts: {path} has no prompts")
    return items


def stop_strings(loaded: LoadedCheckpoint, sampling: SamplingPreset) -> list[str]:
    """The template's end of turn (when it is not the EOS token itself) and the preset's own stop strings."""
    stops = list(sampling.stop)
    end = loaded.template.end_of_turn() if loaded.template is not None else ""
    if end and end != loaded.tokenizer.eos_token and end not in stops:
        stops.append(end)
    return stops


# ---------------------------------------------------------------------------------------- generation
@dataclass
class Generation:
    prompt: str  # the rendered prompt the model saw
    text: str  # what it generated, without EOS / the stop string
    stop_reason: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens)
    n_tokens: int  # generated tokens, the EOS / stop tokens included

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "output": self.text, "stop_reason": self.stop_reason, "n_tokens": self.n_tokens}


def generate(loaded: LoadedCheckpoint, prompts: Sequence[str | Mapping[str, Any]], sampling: SamplingPreset, *,
             batch_size: int = 8) -> list[Generation]:
    """Generate a completion for every prompt (strings or records), in batches of left-padded prompts.
    Same preset (seed included) and batch size give the same texts."""
    return generate_encoded(loaded, [prompt_ids(loaded, p) for p in prompts], sampling, batch_size=batch_size)


def generate_encoded(loaded: LoadedCheckpoint, encoded: Sequence[tuple[str, list[int]]], sampling: SamplingPreset, *,
                     batch_size: int = 8) -> list[Generation]:
    """`generate` for prompts already rendered and tokenized, as (prompt text, token ids): `lmlab serve` renders
    chat messages and raw text itself."""
    import torch

    if not encoded:
        return []
    encoded = list(encoded)
    torch.manual_seed(sampling.seed)
    if sampling.mode == "contrastive":  # one prompt at a time: candidates are the batch
        return [_contrastive(loaded, text, ids, sampling) for text, ids in encoded]
    out: list[Generation] = []
    for start in range(0, len(encoded), batch_size):
        out += _generate_batch(loaded, encoded[start:start + batch_size], sampling)
    return out


def _eos_ids(loaded: LoadedCheckpoint) -> list[int]:
    ids = {loaded.tokenizer.eos_token_id}
    gen = getattr(loaded.model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


def _pad_id(loaded: LoadedCheckpoint) -> int:
    from lmlab.data.sft import pad_token_id

    return pad_token_id(loaded.tokenizer)


def _device(model) -> Any:
    return next(model.parameters()).device


def _generate_batch(loaded: LoadedCheckpoint, encoded: list[tuple[str, list[int]]],
                    sampling: SamplingPreset) -> list[Generation]:
    import torch

    pad, eos = _pad_id(loaded), _eos_ids(loaded)
    width = max(len(ids) for _, ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (_, ids) in enumerate(encoded):  # left padding: every prompt ends where generation starts
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    stops = stop_strings(loaded, sampling)
    device = _device(loaded.model)
    with torch.no_grad():
        out = loaded.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                    generation_config=_generation_config(sampling, eos, pad, stops),
                                    tokenizer=loaded.tokenizer if stops else None)
    return [_finish(loaded, text, out[i, width:].tolist(), eos, stops) for i, (text, _) in enumerate(encoded)]


def _generation_config(sampling: SamplingPreset, eos: list[int], pad: int, stops: list[str]):
    """transformers' GenerationConfig for a greedy or sampling preset (contrastive search is `_contrastive`)."""
    from transformers import GenerationConfig

    settings: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "eos_token_id": eos,
                                "pad_token_id": pad, "repetition_penalty": sampling.repetition_penalty}
    if sampling.mode == "sample":
        settings.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                        top_k=sampling.top_k or None)
    else:
        settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stops:
        settings["stop_strings"] = stops
    return GenerationConfig(**settings)


def _finish(loaded: LoadedCheckpoint, prompt: str, new_ids: list[int], eos: list[int], stops: list[str]) -> Generation:
    """Cut the generated ids at the first EOS and the text at the first stop string; say which ended it.
    Rows that finished early are padded (often with EOS), so the first EOS is where this row stopped."""
    cut = next((i for i, t in enumerate(new_ids) if t in eos), None)
    ids = new_ids if cut is None else new_ids[:cut]
    text = loaded.tokenizer.decode(ids, skip_special_tokens=False)
    if (pos := first_stop(text, stops)) is not None:
        return Generation(prompt, text[:pos], "stop", len(ids))
    if cut is not None:
        return Generation(prompt, text, "eos", cut + 1)
    return Generation(prompt, text, "length", len(ids))


def stream_generate(loaded: LoadedCheckpoint, prompt: tuple[str, list[int]],
                    sampling: SamplingPreset) -> Iterator[str | Generation]:
    """Generate for one encoded prompt (prompt text, ids) while yielding its text as it is decoded: text pieces,
    then the finished Generation, whose text the pieces add up to. Same model.generate call, seed and stop
    criteria as `generate_encoded`, so the tokens are the same; a piece is held back while it could still be the
    start of a stop string (or half of a multi-byte character). Closing the iterator stops the generation."""
    import queue
    import threading

    import torch
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    text, ids = prompt
    if sampling.mode == "contrastive":  # its own loop; one piece
        torch.manual_seed(sampling.seed)
        done = _contrastive(loaded, text, ids, sampling)
        if done.text:
            yield done.text
        yield done
        return
    pad, eos, stops = _pad_id(loaded), _eos_ids(loaded), stop_strings(loaded, sampling)
    tokens: queue.Queue[list[int] | BaseException | None] = queue.Queue()  # None: generation ended
    cancel = threading.Event()

    class NewTokens(BaseStreamer):
        """generate() puts the prompt first, then each step's token (shape (1,)); end() when it stops."""

        prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                tokens.put(value.flatten().tolist())
            self.prompt_seen = True

        def end(self):
            tokens.put(None)

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    def run() -> None:
        device = _device(loaded.model)
        try:
            with torch.no_grad():
                loaded.model.generate(input_ids=torch.tensor([ids], device=device),
                                      attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                                      generation_config=_generation_config(sampling, eos, pad, stops),
                                      tokenizer=loaded.tokenizer if stops else None, streamer=NewTokens(),
                                      stopping_criteria=StoppingCriteriaList([Cancelled()]))
        except BaseException as e:  # handed to the reader, which raises it
            tokens.put(e)

    torch.manual_seed(sampling.seed)
    worker = threading.Thread(target=run, name="lmlab-stream", daemon=True)
    worker.start()
    new: list[int] = []
    sent = ""
    try:
        while (item := tokens.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            new += item
            settled = _settled_text(loaded, new, eos, stops)
            if len(settled) > len(sent):
                yield settled[len(sent):]
                sent = settled
        done = _finish(loaded, text, new, eos, stops)
        if len(done.text) > len(sent):
            yield done.text[len(sent):]
        yield done
    finally:
        cancel.set()
        worker.join()


def _settled_text(loaded: LoadedCheckpoint, new_ids: list[int], eos: list[int], stops: list[str]) -> str:
    """The part of the text so far that no later token can change: cut like `_finish`, minus a tail that may
    still grow into a stop string and a trailing replacement character (an incomplete UTF-8 sequence)."""
    cut = next((i for i, t in enumerate(new_ids) if t in eos), None)
    text = loaded.tokenizer.decode(new_ids if cut is None else new_ids[:cut], skip_special_tokens=False)
    if (pos := first_stop(text, stops)) is not None:
        return text[:pos]
    return text if cut is not None else settled(text, stops)


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of the stop strings starts in `text`, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def settled(text: str, stops: list[str]) -> str:
    """Streamed text that no later token can change: without a trailing replacement character (the first bytes of
    a multi-byte character) and without a tail that may still grow into a stop string."""
    text = text.rstrip("\ufffd")
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - held]


def _contrastive(loaded: LoadedCheckpoint, prompt: str, ids: list[int], sampling: SamplingPreset) -> Generation:
    """Contrastive search (Su et al., 2022; transformers 5 moved it to a hub download, so it lives here): of the
    top_k likeliest next tokens pick argmax (1-α)·p(v) − α·max_j cos(h_v, h_j), h = last hidden states of the
    context tokens j and of the candidate v. One forward of the k candidates per step, on a KV cache."""
    import torch
    import torch.nn.functional as F
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    model, k, alpha = loaded.model, sampling.top_k, sampling.penalty_alpha
    eos, stops = _eos_ids(loaded), stop_strings(loaded, sampling)
    penalty = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty) if sampling.repetition_penalty != 1 else None
    device = _device(model)
    seq = torch.tensor([ids], device=device)
    new: list[int] = []
    with torch.no_grad():
        out = model(input_ids=seq, use_cache=True, output_hidden_states=True)
        cache, context_h = out.past_key_values, out.hidden_states[-1][0]  # (T, d)
        logits = out.logits[:, -1]  # (1, V)
        for _ in range(sampling.max_new_tokens):
            if penalty is not None:
                logits = penalty(seq, logits)
            probs, cand = F.softmax(logits.float(), dim=-1).topk(k)  # (1, k)
            cache.batch_repeat_interleave(k)
            length = seq.shape[1]
            step = model(input_ids=cand.view(k, 1), past_key_values=cache, use_cache=True, output_hidden_states=True,
                         attention_mask=torch.ones((k, length + 1), dtype=torch.long, device=device),
                         position_ids=torch.full((k, 1), length, dtype=torch.long, device=device))
            cand_h = step.hidden_states[-1][:, -1]  # (k, d)
            degeneration = F.cosine_similarity(cand_h[:, None, :].float(), context_h[None].float(), dim=-1).amax(-1)
            best = int(((1 - alpha) * probs[0] - alpha * degeneration).argmax())
            cache = step.past_key_values
            cache.batch_select_indices(torch.tensor([best], device=device))
            token = int(cand[0, best])
            new.append(token)
            seq = torch.cat([seq, cand[:, best:best + 1]], dim=1)
            context_h = torch.cat([context_h, cand_h[best:best + 1]], dim=0)
            logits = step.logits[best:best + 1, -1]
            if token in eos or (stops and any(s in loaded.tokenizer.decode(new[-16:]) for s in stops)):
                break
    return _finish(loaded, prompt, new, eos, stops)


# ------------------------------------------------------------------------------------------- ledger
def log_generations(loaded: LoadedCheckpoint, generations: Sequence[Generation], sampling: SamplingPreset,
                    preset: str) -> str | None:
    """Store the generations with the run in the ledger: `generations.json` (the latest, which `lmlab report`
    shows) and a dated copy `generations/<time>-<preset>.json`. Returns the dated artifact's path, or None when the
    checkpoint has no ledger run to attach them to."""
    if not loaded.run_id or not loaded.ledger_uri:
        return None
    from lmlab.ledger import client

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    artifact = f"generations/{stamp}-{preset}.json"
    payload = {"checkpoint": str(loaded.path), "preset": preset, "sampling": sampling.model_dump(),
               "samples": [g.to_dict() for g in generations]}
    try:
        c = client(loaded.ledger_uri)
        c.log_dict(loaded.run_id, payload, artifact)
        c.log_dict(loaded.run_id, payload, "generations.json")
    except Exception as e:  # e.g. a run deleted from the ledger: the generations themselves are fine
        raise LmlabError(f"ledger: could not log generations to run {loaded.run_id[:8]} ({e}); use --no-log") from None
    return artifact


def generate_side_by_side(refs: Sequence[str], prompts: Sequence[str | Mapping[str, Any]], *, preset: str | None,
                          overrides: Mapping[str, Any] | None = None, output_dir: str = "lmlab-runs",
                          batch_size: int = 8, log: bool = True) -> dict[str, Any]:
    """Run the same prompts through each run (one model in memory at a time) and log each run's generations.
    Returns {"labels": [...], "prompts": [...], "columns": [[Generation, ...] per run], "logged": [...]}."""
    import gc

    labels, columns, logged, shown = [], [], [], None
    for ref in refs:
        loaded = load_checkpoint(ref, output_dir=output_dir)
        sampling = pick_preset(loaded.recipe, preset, overrides)
        gens = generate(loaded, prompts, sampling, batch_size=batch_size)
        shown = shown or [g.prompt for g in gens]
        labels.append(loaded.label)
        columns.append(gens)
        logged.append(log_generations(loaded, gens, sampling, preset or "default") if log else None)
        del loaded
        gc.collect()
    return {"labels": labels, "prompts": shown or [], "columns": columns, "logged": logged}

"""Self-describing, atomically written checkpoint folders and exact resume.

A checkpoint folder `step-0000120/` holds:
  model.safetensors + config.json   (plain `AutoModelForCausalLM.from_pretrained` loads it; LoRA: the adapter)
  tokenizer files
  trainer_state.safetensors + .json optimizer, scheduler and RNG states (exact resume), without pickle: tensors in
                                    safetensors, the structure around them in JSON
  meta.json                         step, epoch, position in the epoch, metrics, fingerprints, lmlab version
  recipe.yaml                       the resolved recipe
  manifest.json                     every file's size and sha256, written last (lmlab.workspace.manifest)
It is written to a temporary sibling, every file fsynced, the manifest written, then renamed into place: a crash
never leaves a half-written checkpoint under a step name, and readers verify the manifest before they load.
Checkpoints from before this format (trainer_state.pt) still load: `load_trainer_state` reads them with
torch.load(weights_only=True), allowing only the numpy types an RNG state holds — never arbitrary pickle.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.workspace.layout import CHECKPOINTS
from lmlab.workspace.manifest import fsync_dir, write_manifest

STATE = "trainer_state"  # trainer_state.safetensors + trainer_state.json
LEGACY_STATE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, *, model, tokenizer, meta: dict[str, Any], recipe_yaml: str,
                    optimizer=None, scheduler=None, files: dict[str, Any] | None = None) -> Path:
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for orphan in root.glob(".tmp-step-*"):  # left by a process killed while saving: never a checkpoint
        shutil.rmtree(orphan, ignore_errors=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if optimizer is not None:
        save_state({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng_state()}, tmp, STATE)
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "saved_at": time.time()}, indent=2, default=str))
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    for name, content in (files or {}).items():  # e.g. template.json: generation and serving reuse it
        (tmp / name).write_text(json.dumps(content, indent=2))
    write_manifest(tmp)  # fsyncs every file, then writes the manifest last
    if final.exists():  # re-saving the same step (e.g. interrupted exactly at an eval step)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    return final


def load_trainer_state(checkpoint: Path) -> dict[str, Any] | None:
    """Optimizer, scheduler and RNG state of a checkpoint, or None when it saved none. Never unpickles code."""
    checkpoint = Path(checkpoint)
    if (checkpoint / f"{STATE}.json").is_file():
        return load_state(checkpoint, STATE)
    legacy = checkpoint / LEGACY_STATE
    if not legacy.exists():
        return None
    # the documented path for checkpoints written before lmlab 0.2: weights_only=True, plus the numpy types an RNG
    # state pickles (an ndarray of the Mersenne Twister state); anything else in the file is refused by torch
    try:
        with torch.serialization.safe_globals(_NUMPY_RNG_TYPES):
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LmlabError(f"{legacy}: holds objects other than tensors and an RNG state; lmlab does not unpickle "
                         "code from a checkpoint. Resume from a checkpoint lmlab wrote, or start a new run") from None


_NUMPY_RNG_TYPES = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


# ------------------------------------------------------------------------- state without pickle
def save_state(obj: Any, folder: Path, name: str) -> None:
    """Write nested dicts / lists / tuples of tensors, numpy arrays and plain values as <name>.safetensors (the
    tensors) + <name>.json (the structure, with each tensor's key): readable without pickle."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors)
    save_file(tensors, str(Path(folder) / f"{name}.safetensors"))
    (Path(folder) / f"{name}.json").write_text(json.dumps(structure))


def load_state(folder: Path, name: str) -> Any:
    from safetensors.torch import load_file

    tensors = load_file(str(Path(folder) / f"{name}.safetensors"))
    return _decode(json.loads((Path(folder) / f"{name}.json").read_text()), tensors)


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone().contiguous()  # clone: safetensors refuses shared storage
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save {type(obj).__name__} in a checkpoint's trainer state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return obj


def load_model_weights(model, checkpoint: Path) -> None:
    """Load a checkpoint's weights into `model` in place: full weights, or a peft adapter."""
    from safetensors.torch import load_file

    adapter = Path(checkpoint) / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(adapter)))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"adapter in {checkpoint} does not match the model: {result.unexpected_keys[:3]}")
        return
    files = sorted(Path(checkpoint).glob("model*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied output weights are saved once; anything else missing means a different architecture
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {checkpoint} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied if not isinstance(tied, dict) else tied.keys())



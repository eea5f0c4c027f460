"""Self-describing, atomically written checkpoint folders and exact resume.

A checkpoint folder `step-0000120/` holds:
  model.safetensors + config.json   (plain `AutoModelForCausalLM.from_pretrained` loads it; LoRA: the adapter)
  tokenizer files
  trainer_state.pt                  optimizer, scheduler and RNG states (exact resume)
  meta.json                         step, epoch, position in the epoch, metrics, fingerprints, lmlab version
  recipe.yaml                       the resolved recipe
It is written to a temporary sibling and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.workspace.layout import CHECKPOINTS


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
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng_state()}, tmp / "trainer_state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "saved_at": time.time()}, indent=2, default=str))
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    for name, content in (files or {}).items():  # e.g. template.json: generation and serving reuse it
        (tmp / name).write_text(json.dumps(content, indent=2))
    if final.exists():  # re-saving the same step (e.g. interrupted exactly at an eval step)
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_trainer_state(checkpoint: Path) -> dict[str, Any] | None:
    path = Path(checkpoint) / "trainer_state.pt"
    if not path.exists():
        return None
    # our own file: it holds numpy RNG state and python tuples, which weights_only refuses
    return torch.load(path, map_location="cpu", weights_only=False)


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



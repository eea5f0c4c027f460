"""lmlab: train, fine-tune, evaluate and compare small-to-mid language models from one YAML recipe.

The public API loads lazily (PEP 562 module __getattr__): `import lmlab` loads no torch, transformers or MLflow;
`lmlab.train` imports the training stack on first use.

    from lmlab import load_recipe, train
    result = train(load_recipe("recipes/headlines-tiny.yaml"))
"""

import os as _os
from importlib import import_module as _import_module

# DeepSpeed (optional extra), which accelerate imports when it is installed, prints a warning on stdout when it
# finds no GPU, polluting `lmlab run --quiet`; with no NVIDIA driver on the machine, tell it CPU up front.
if not _os.path.exists("/proc/driver/nvidia/version"):
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")

__version__ = "0.1.0"

_API = {
    "LmlabError": "lmlab.errors", "RecipeError": "lmlab.errors",
    "Recipe": "lmlab.recipe", "load_recipe": "lmlab.recipe",
    "TrainResult": "lmlab.training.loop", "resume_run": "lmlab.training.loop", "train": "lmlab.training.loop",
}


def __getattr__(name: str):
    if name in _API:
        value = getattr(_import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'lmlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["LmlabError", "Recipe", "RecipeError", "TrainResult", "load_recipe", "resume_run", "train", "__version__"]

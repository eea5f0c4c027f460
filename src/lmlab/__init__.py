"""lmlab: train, fine-tune, evaluate and compare small-to-mid language models from one YAML recipe."""

import os as _os

# DeepSpeed (optional extra), which accelerate imports when it is installed, prints a warning on stdout when it
# finds no GPU, polluting `lmlab run --quiet`; with no NVIDIA driver on the machine, tell it CPU up front.
if not _os.path.exists("/proc/driver/nvidia/version"):
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")

from lmlab.config import Recipe, load_recipe
from lmlab.errors import LmlabError, RecipeError

__version__ = "0.1.0"


# Bound after the submodule import: `import lmlab.train` anywhere would otherwise replace the function
# attribute `lmlab.train` with the module of the same name.
from lmlab.train import TrainResult, resume_run, train  # noqa: E402

__all__ = ["LmlabError", "Recipe", "RecipeError", "TrainResult", "load_recipe", "resume_run", "train", "__version__"]

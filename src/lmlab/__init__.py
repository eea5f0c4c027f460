"""lmlab: train, fine-tune, evaluate and compare small-to-mid language models from one YAML recipe."""

from lmlab.config import Recipe, load_recipe
from lmlab.errors import LmlabError, RecipeError

__version__ = "0.1.0"


def train(recipe: Recipe, **kwargs):
    """Run a recipe end to end; see `lmlab.train.train`. Imported lazily: torch loads only when needed."""
    from lmlab.train import train as _train

    return _train(recipe, **kwargs)


__all__ = ["LmlabError", "Recipe", "RecipeError", "load_recipe", "train", "__version__"]

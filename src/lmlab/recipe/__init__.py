"""The recipe: schema only (pydantic + YAML). Every section, loading with `--set` overrides and YAML line numbers,
and path resolution. Imports nothing of lmlab but `lmlab.errors`, and nothing heavy: the CLI, tests and notebooks
read recipes without loading a model stack. The names below load on first use (building the schema's pydantic
models takes ~0.1 s, which `lmlab --help` need not pay)."""

from importlib import import_module as _import_module

from lmlab.recipe.defaults import DEFAULT_WORKSPACE

_API = {"Recipe": "lmlab.recipe.schema", "Section": "lmlab.recipe.section", "describe_error": "lmlab.recipe.describe",
        "flatten": "lmlab.recipe.loading", "load_recipe": "lmlab.recipe.loading"}


def __getattr__(name: str):
    if name in _API:
        value = getattr(_import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmlab.recipe' has no attribute {name!r}")


__all__ = ["DEFAULT_WORKSPACE", "Recipe", "Section", "describe_error", "flatten", "load_recipe"]

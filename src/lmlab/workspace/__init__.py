"""The workspace: where runs live on disk and in the ledger. `layout` names every folder, file and tag;
`ledger` writes and searches MLflow; `runs` queries runs; `resolve` is the one run/checkpoint resolver."""

from lmlab.recipe.defaults import DEFAULT_WORKSPACE

__all__ = ["DEFAULT_WORKSPACE"]

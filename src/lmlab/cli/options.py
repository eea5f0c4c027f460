"""Options shared by several commands, defined once."""

from __future__ import annotations

import enum
from typing import Annotated

import typer

from lmlab.console import FORMATS
from lmlab.recipe.defaults import DEFAULT_WORKSPACE

SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a recipe field: --set train.lr=3e-4")]
OutputDir = Annotated[str, typer.Option(help="Workspace whose sqlite ledger to read")]
Uri = Annotated[str | None, typer.Option(help="MLflow tracking URI (default: $LMLAB_TRACKING_URI or the "
                                            "workspace's sqlite)")]
Name = Annotated[str | None, typer.Option(help="Runs whose name matches this glob, e.g. 'alpaca-*'")]
RunRef = Annotated[str, typer.Argument(help="Run id (or unique prefix) or a checkpoint / run folder")]
OutputDirOpt = Annotated[str, typer.Option("--output-dir", help="Workspace whose ledger resolves run ids")]
BaseOpt = Annotated[str | None, typer.Option("--base", help="Adapter runs: load the base model from here "
                                                "instead of the recipe's model.pretrained")]
StorageOpt = Annotated[str | None, typer.Option("--storage", help="Object storage holding runs: an fsspec URL such "
                                                 "as s3://bucket/prefix (default: $LMLAB_STORAGE); endpoint from "
                                                 "AWS_ENDPOINT_URL, credentials from the AWS environment / profile")]


def with_storage(command):
    """For a command with a `storage: StorageOpt` parameter that reads runs (generate, serve, export, eval, ...):
    while it runs, `--storage URL` stands in for $LMLAB_STORAGE, so a run found neither in the workspace nor in its
    ledger is pulled from there by the one resolver. Restored afterwards (the CLI may run in-process: tests,
    notebooks)."""
    import functools

    @functools.wraps(command)
    def run(*args, **kwargs):
        url = kwargs.get("storage")
        if not url:
            return command(*args, **kwargs)
        import os

        from lmlab.recipe.storage import STORAGE_ENV

        before = os.environ.get(STORAGE_ENV)
        os.environ[STORAGE_ENV] = url
        try:
            return command(*args, **kwargs)
        finally:
            if before is None:
                os.environ.pop(STORAGE_ENV, None)
            else:
                os.environ[STORAGE_ENV] = before

    return run


# one output layer (lmlab.console.emit) behind every listing command: runs, compare, diff, plan
OutputFormat = enum.Enum("OutputFormat", {f: f for f in FORMATS}, type=str)  # typer shows an Enum as a choice
FormatOpt = Annotated[OutputFormat, typer.Option("--format", help="table (a rich table on a "
                                        "terminal, plain columns in a pipe), csv (full keys, raw values) or json "
                                        "(one object per run: ids, status, params, metrics, paths)")]

__all__ = ["FormatOpt", "OutputFormat", "DEFAULT_WORKSPACE", "BaseOpt", "Name", "OutputDir", "OutputDirOpt", "RunRef", "SetOpt", "StorageOpt", "Uri", "with_storage"]

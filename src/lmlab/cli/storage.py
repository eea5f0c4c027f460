"""`lmlab pull` and `lmlab push`: bring a run's checkpoint and ledger record from object storage into the workspace,
or upload a local run after the fact (lmlab.workspace.storage)."""

from __future__ import annotations

from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.cli.options import OutputDirOpt, RunRef, StorageOpt
from lmlab.console import console
from lmlab.errors import LmlabError
from lmlab.recipe.defaults import DEFAULT_WORKSPACE


@app.command()
def pull(
    run: Annotated[str, typer.Argument(help="Run id (or unique prefix) in the storage")],
    storage: StorageOpt = None,
    best: Annotated[bool, typer.Option("--best", help="The run's best checkpoint (the default)")] = False,
    last: Annotated[bool, typer.Option("--last", help="The run's newest checkpoint")] = False,
    step: Annotated[int | None, typer.Option("--step", min=0, help="The checkpoint of this step")] = None,
    output_dir: OutputDirOpt = DEFAULT_WORKSPACE,
):
    """Fetch a run's checkpoint (verified against its manifest; one that fails is skipped for the next newest) and
    its ledger record from storage into the workspace, for generate / serve / export / eval and `lmlab runs`."""
    from lmlab.workspace.storage import pull as pull_run
    from lmlab.workspace.storage import storage_url

    if sum((best, last, step is not None)) > 1:
        raise LmlabError("lmlab pull: give one of --best, --last, --step N")
    url = _url(storage_url(storage))
    which = step if step is not None else ("last" if last else "best")
    pulled = pull_run(url, run, output_dir=output_dir, which=which)
    for note in pulled.notes:
        console.print(f"  {note}", markup=False)
    got = "downloaded" if pulled.downloaded else "already here"
    console.print(f"{pulled.run_id} {pulled.checkpoint.name if pulled.checkpoint else ''} {got}: {pulled.checkpoint}",
                  markup=False, soft_wrap=True)


@app.command()
def push(
    run: RunRef,
    storage: StorageOpt = None,
    output_dir: OutputDirOpt = DEFAULT_WORKSPACE,
):
    """Upload a local run to storage after the fact: every checkpoint that verifies (files first, manifest last;
    ones storage holds already are skipped) and its ledger record. Default storage: the run's own run.storage."""
    from lmlab.recipe.loading import load_recipe
    from lmlab.workspace import layout
    from lmlab.workspace.resolve import resolve_run_dir
    from lmlab.workspace.storage import push as push_run
    from lmlab.workspace.storage import storage_url

    run_id, run_dir, ledger = resolve_run_dir(run, output_dir=output_dir, field="lmlab push")
    recorded = layout.list_checkpoints(run_dir)
    options = {}
    if recorded and (recorded[-1] / "recipe.yaml").is_file():  # the run's own storage and its options
        saved = load_recipe(recorded[-1] / "recipe.yaml").run
        storage = storage or saved.storage
        options = saved.storage_options if storage == saved.storage else {}
    url = _url(storage_url(storage))
    uploaded, notes = push_run(url, run_id, run_dir, ledger_uri=ledger, options=options)
    for note in notes:
        console.print(f"  {note}", markup=False)
    console.print(f"{run_id}: {len(uploaded)} checkpoint(s) uploaded ({', '.join(uploaded) or 'storage had them'})"
                  f"{' and the ledger record' if ledger else ''}", markup=False, soft_wrap=True)


def _url(url: str | None) -> str:
    if url is None:
        raise LmlabError("no storage given: pass --storage URL (e.g. s3://bucket/prefix) or set LMLAB_STORAGE")
    return url

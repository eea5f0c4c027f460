"""`lmlab playground`: chat with one to three models side by side in the browser and rate their answers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.cli.options import BaseOpt, OutputDirOpt, StorageOpt, with_storage
from lmlab.console import console, err_console
from lmlab.recipe.defaults import DEFAULT_WORKSPACE


@app.command()
@with_storage
def playground(
    runs: Annotated[list[str] | None, typer.Argument(help="1 to 3 models: run ids (or unique prefixes), run or "
                                                         "checkpoint folders, plain Hugging Face model folders")] = None,
    gguf: Annotated[list[Path] | None, typer.Option("--gguf", help="A GGUF file as one more column (repeatable); "
                                                    "needs pip install 'lmlab\\[llama]'")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --auth")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 = any free one")] = 7860,
    auth: Annotated[list[str] | None, typer.Option("--auth", help="USER:PASSWORD a tester logs in with "
                                                   "(repeatable); their user name is stored with their ratings")] = None,
    rater: Annotated[str | None, typer.Option(help="Name stored with ratings when there is no --auth (default: "
                                                   "your user name)")] = None,
    preset: Annotated[str | None, typer.Option(help="Sampling preset the page starts from (default: the first "
                                                    "run's generation.default_preset)")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Fold LoRA adapters into their bases (faster tokens)")] = False,
    base: BaseOpt = None,
    ctx: Annotated[int, typer.Option("--ctx", min=0, help="--gguf: context length; 0 = the file's own")] = 0,
    max_tokens_cap: Annotated[int, typer.Option(min=1, help="Most new tokens one answer may ask for")] = 1024,
    output_dir: OutputDirOpt = DEFAULT_WORKSPACE,
    storage: StorageOpt = None,
):
    """A web page that sends one conversation to every model and streams their answers side by side, with the
    runs' sampling presets and sliders; ratings go to <output-dir>/feedback.jsonl and each run's ledger."""
    from lmlab.errors import LmlabError
    from lmlab.serve.access import MAX_COLUMNS, check_access, parse_auth

    refs, files = list(runs or []), list(gguf or [])
    if not 1 <= len(refs) + len(files) <= MAX_COLUMNS:
        raise LmlabError(f"lmlab playground: give 1 to {MAX_COLUMNS} models (runs, folders or --gguf files); "
                         f"got {len(refs) + len(files)}")
    users = parse_auth(auth or [])
    check_access(host, users)  # before anything loads
    from lmlab.serve.app import bind_socket, serve_forever
    from lmlab.serve.playground import create_playground, load_columns
    from lmlab.workspace.feedback import feedback_path

    sock = bind_socket(host, port)  # a busy port fails before the models load
    columns = load_columns(refs, files, output_dir=output_dir, base=base, merge=merge, preset=preset, n_ctx=ctx,
                           on_load=lambda ref: err_console.print(f"loading {ref} …", markup=False, soft_wrap=True))
    if all(c.error for c in columns):
        raise LmlabError("lmlab playground: no model loaded: " + "; ".join(c.problem for c in columns))
    for c in columns:
        if c.error:
            err_console.print(f"note: not loaded: {c.problem}; its column shows why", markup=False, soft_wrap=True)
        for note in getattr(c.backend, "notes", []):
            err_console.print(f"note: {note}", markup=False, soft_wrap=True)
    log = feedback_path(output_dir).resolve()
    server = create_playground(columns, feedback_log=log, rater=rater, host=host, auth=users,
                               max_tokens_cap=max_tokens_cap)
    bound, bound_port = sock.getsockname()[:2]
    shown = f"[{bound}]" if ":" in bound else bound
    console.print(f"playground at http://{shown}:{bound_port}/ (ratings: {log})", markup=False, highlight=False,
                  soft_wrap=True)
    serve_forever(server, sock)

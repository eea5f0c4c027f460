"""`lmlab serve`: a run (or a Hugging Face model folder) behind an OpenAI-compatible HTTP API."""

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
def serve(
    run: Annotated[str | None, typer.Argument(help="Run id (or unique prefix), run or checkpoint folder, or a plain "
                                                   "Hugging Face model folder (or --gguf FILE instead)")] = None,
    gguf: Annotated[Path | None, typer.Option("--gguf", help="Serve this GGUF file (lmlab export --gguf) through "
                                              "llama-cpp-python: pip install 'lmlab[llama]'")] = None,
    ctx: Annotated[int, typer.Option("--ctx", min=0, help="--gguf: context length; 0 = the file's own")] = 0,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 = every interface")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 = any free one")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LMLAB_SERVE_API_KEY", show_envvar=True,
                                                help="Require 'Authorization: Bearer KEY' on every request")] = None,
    model_name: Annotated[str | None, typer.Option(help="Model id clients see (default: run name and id "
                                                        "prefix, or the folder's name)")] = None,
    preset: Annotated[str | None, typer.Option(help="Sampling preset requests start from (default: the "
                                                    "recipe's generation.default_preset)")] = None,
    max_tokens_cap: Annotated[int, typer.Option(min=1, help="Refuse requests asking for more new tokens")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Refuse request bodies larger than this")] = 1 << 20,
    merge: Annotated[bool, typer.Option("--merge", help="Fold a LoRA adapter into its base (faster tokens)")] = False,
    base: BaseOpt = None,
    output_dir: OutputDirOpt = DEFAULT_WORKSPACE,
    storage: StorageOpt = None,
):
    """Serve a model over an OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions."""
    from lmlab.errors import LmlabError
    from lmlab.serve.app import base_url, bind_socket, create_app, serve_forever
    from lmlab.serve.backends import load_backend

    if api_key is not None and not api_key.strip():
        raise LmlabError("--api-key: empty; give a key, or leave the option (and LMLAB_SERVE_API_KEY) unset")
    if (run is None) == (gguf is None):
        raise LmlabError("lmlab serve: give a run / model folder, or --gguf FILE (one of the two)")
    sock = bind_socket(host, port)  # a busy port fails before the model loads
    if gguf is not None:
        from lmlab.serve.gguf_backend import LlamaCppBackend

        backend = LlamaCppBackend.load(gguf, n_ctx=ctx, preset=preset, model_name=model_name)
        if merge or base:
            backend.notes.append("--merge / --base do not apply to a GGUF file (it holds the merged model)")
    else:
        backend = load_backend(run, output_dir=output_dir, base=base, merge=merge, preset=preset,
                               model_name=model_name)
    for note in backend.notes:
        err_console.print(f"note: {note}", markup=False, soft_wrap=True)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"note: listening on {host} without --api-key: anyone who reaches this port can use "
                          "the model", markup=False, soft_wrap=True)
    server = create_app(backend, api_key=api_key, max_tokens_cap=max_tokens_cap, max_body_bytes=max_body_bytes)
    console.print(f"serving {backend.model_id} at {base_url(sock)}", markup=False, highlight=False, soft_wrap=True)
    serve_forever(server, sock)

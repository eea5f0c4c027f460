"""The typer application every command module registers on (nothing else lives here, so command modules and
cli/__init__ import it without a cycle)."""

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, fine-tune, evaluate and compare language models from one YAML recipe.")

"""The `lmlab` command: thin typer commands over the library, one module per command group, registered here
(hatch's layout). User mistakes print one line and exit non-zero. Nothing in lmlab imports this package.

Command modules import the library inside each command, so `lmlab --help`, `validate`, `runs` and `diff` never
load torch."""

from __future__ import annotations

import sys

from lmlab.cli import compare, data, feedback, finetune, plan, playground, serve, storage, sweep, train  # noqa: F401  (each registers its commands)
from lmlab.cli.app import app
from lmlab.console import err_console
from lmlab.errors import LmlabError, RecipeError

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except RecipeError as e:
        for line in str(e).splitlines():
            _error(line)
        sys.exit(e.exit_code)
    except LmlabError as e:
        _error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


def _error(message: str) -> None:
    """One error line; the message is printed as it is (a field like data.filters[0] is not rich markup)."""
    from rich.text import Text

    err_console.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)

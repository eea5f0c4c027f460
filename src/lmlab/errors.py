"""User-facing errors: the CLI prints these as one line each and exits non-zero, with no traceback."""

from __future__ import annotations


class LmlabError(Exception):
    """A mistake the user can fix (bad recipe, missing file, unknown run id). Message says what and how."""

    exit_code = 2


class RecipeError(LmlabError):
    """Every problem found in a recipe, reported at once; each item is 'field.path: problem (fix)'."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in problems))


class ServiceUnavailable(LmlabError):
    """A service lmlab calls (an LLM judge's endpoint) failed after its retries: not the input's fault; the same
    command may work later."""


class TrainingFailed(LmlabError):
    """The run stopped for a reason recorded in the ledger (NaN loss, ...); checkpoints kept."""

    exit_code = 3

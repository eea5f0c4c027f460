"""Loading a recipe: YAML (or a dict) → `--set a.b=value` overrides → validation, every problem reported at once,
each with the YAML line where it can be found. Also the one formatter of pydantic errors (`describe_error`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmlab.errors import RecipeError
from lmlab.recipe.describe import describe_error
from lmlab.recipe.filters import FILTER_KINDS
from lmlab.recipe.schema import Recipe


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None,
                *, data: dict | None = None) -> Recipe:
    """Load a recipe from YAML (or a dict), apply `a.b=value` overrides, validate everything at once."""
    source = str(path) if path is not None else "<recipe>"
    text = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(["recipe file not found; check the path"], source)
        text = p.read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise RecipeError([yaml_problem(e, text)], source) from None
        if not isinstance(raw, dict):
            raise RecipeError(["the top level must be a mapping of sections (run:, data:, model:, ...)"], source)
    else:
        raw = dict(data or {})
    problems: list[str] = []
    for key, value in _normalize_overrides(overrides):
        try:
            _set_path(raw, key, value)
        except ValueError as e:
            problems.append(f"--set {key}: {e}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        problems += [describe_error(err, root=Recipe, text=text, drop=FILTER_KINDS) for err in e.errors()]
        raise RecipeError(problems, source) from None
    if problems:
        raise RecipeError(problems, source)
    if path is not None:
        recipe.source_path = str(Path(path).resolve())
    return recipe


# PyYAML errors about a construct that was never closed: its context mark is where it opened
_UNCLOSED = ("while scanning a quoted scalar", "while parsing a flow")


def yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """One line naming the line to fix. PyYAML marks where it noticed a problem, which for an unclosed quote or
    bracket is a later line (often one past the end of the file) and for a key missing its ':' the line after."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
    if mark is None:
        return f"not valid YAML ({problem})"
    lines = text.splitlines()
    noticed = min(mark.line, max(len(lines) - 1, 0))  # 0-based; a mark at the end of the file is its last line
    context, opened = getattr(e, "context", None) or "", getattr(e, "context_mark", None)
    if opened is not None and opened.line < mark.line and context.startswith(_UNCLOSED):
        what = context.split(" ", 2)[2]  # "a quoted scalar", "a flow sequence", "a flow mapping"
        return f"line {opened.line + 1}: not valid YAML ({what} opens here and is not closed; {problem})"
    if problem == "mapping values are not allowed here" and noticed > 0:
        before = lines[noticed - 1].strip()
        if before and ":" not in before and not before.startswith(("#", "-")):
            return (f"line {noticed}: not valid YAML ('{before}' is not 'key: value': without its ':' the next line "
                    "is read as part of it)")
    return f"line {noticed + 1}: not valid YAML ({problem})"


def _normalize_overrides(overrides: list[str] | dict | None) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    out = []
    for item in overrides:
        if "=" not in item:
            out.append((item, _MISSING))
            continue
        key, value = item.split("=", 1)
        out.append((key.strip(), _value(value)))
    return out


def _value(text: str) -> Any:
    """A --set value as YAML reads it (3e-4, true, [a, b]); text that is not valid YAML on its own (a prompt
    template such as 'Q: {question} A: ') is taken as the string it is."""
    if not text.strip():
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


_MISSING = object()


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    if value is _MISSING:
        raise ValueError("expected key=value, e.g. --set train.lr=3e-4")
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"'{part}' is not a section")
        node = child
    node[parts[-1]] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out

"""The one formatter of pydantic validation errors: each error becomes one line naming the field (and the YAML
line where there is a file) and the fix. Recipes, filter specs, CLI options and serve's request bodies all use it."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from typing import Any

import yaml
from pydantic import BaseModel


def unfold(err: Mapping[str, Any], drop: Collection[str] = ()) -> tuple[tuple, str, str]:
    """(location, kind, message) of one pydantic error: pydantic's internal location parts (validator names, the
    tags of discriminated unions in `drop`) removed, and our validators' 'field: message' convention folded into
    the location ('vocab_size: must be ...' raised by a section → loc + ('vocab_size',))."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in drop)))
    kind, msg = err["type"], err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        field, sep, rest = msg.partition(": ")
        if sep and field.isidentifier():
            loc, msg = (*loc, field), rest
    return loc, kind, msg


def first_error(e: Any) -> tuple[str, str]:
    """(field, message) of a ValidationError's first error: what a CLI option or an HTTP parameter reports."""
    loc, _, msg = unfold(e.errors()[0])
    return (str(loc[-1]) if loc else ""), msg


def field_names(root: type[BaseModel], loc: tuple) -> list[str]:
    """Known field names at the parent of `loc` in the model `root`, for did-you-mean suggestions."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", {})
        field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return [f.alias or n for n, f in model.model_fields.items() if not f.exclude]


def yaml_line(text: str, loc: tuple, partial: bool = False) -> int | None:
    """1-based line of the YAML node at `loc`; with `partial`, of its nearest existing parent."""
    if not text:
        return None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                return line if partial else None
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line if partial else None
    return line


def describe_error(err: Mapping[str, Any], *, root: type[BaseModel] | None = None, text: str = "",
                   prefix: str = "", drop: Collection[str] = (), show_input: bool = True) -> str:
    """One pydantic error as one line: '[line N: ]path: problem; fix'. `root`: the model validated (for
    did-you-mean on unknown keys); `text`: its YAML source (for line numbers); `prefix`: prepended to the path;
    `show_input`: end type errors with '(got …)'."""
    loc, kind, msg = unfold(err, drop)
    path = ".".join([prefix] * bool(prefix) + [str(p) for p in loc]) or "(top level)"
    got = err.get("input")
    line = yaml_line(text, loc, partial=kind in ("missing", "value_error"))
    where = f"line {line}: " if line else ""
    if kind == "extra_forbidden":
        known = field_names(root, loc) if root is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        return f"{where}{path}: unknown key; {hint}"
    if kind == "missing":
        return f"{where}{path}: required; add it{' to the recipe' if root is not None else ''}"
    if kind == "value_error":
        return f"{where}{path}: {msg}"
    shown = f" (got {repr(got) if not isinstance(got, dict) else 'a mapping'})" if show_input else ""
    return f"{where}{path}: {msg[0].lower() + msg[1:]}{shown}"

"""Docs that run: every `lmlab ...` line in the code blocks of README.md (and docs/*.md) parses against the real
CLI — command names, options, option values, argument counts — so the README and the CLI cannot drift apart.

Placeholders are the README's own: RUN, RUN2, A, B, DIR, URL, NAME, KEY, <run-id> stay strings (they go to string
arguments); RECIPE becomes a real recipe; `RUN...` means one or more; `[--x y]` is optional and `[--a|--b]` a
choice: each line is parsed without its optional parts and once with each alternative of each part."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import typer.main
from helpers.recipes import REPO

from lmlab.cli import app

# typer carries its own copy of click: take its classes from what typer exports, not from `import click`
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)```")
PLACEHOLDERS = {"RECIPE": "recipes/headlines-tiny.yaml"}


def command_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each `lmlab ...` line inside a fenced code block; `\\` continuations joined."""
    out, inside, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            continue
        text = line.strip().removeprefix("$ ")
        if pending:
            text, pending = pending + " " + text, ""
        elif not text.startswith("lmlab "):
            continue
        else:
            start = number
        if text.endswith("\\"):
            pending = text[:-1].rstrip()
            continue
        out.append((start, text))
    return out


def _groups(text: str) -> list[tuple[int, int]]:
    """(start, end) of each top-level [...] outside quotes."""
    spans, depth, quote, begin = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth, begin = depth + 1, i if depth == 0 else begin
        elif ch == "]" and depth:
            depth -= 1
            if depth == 0:
                spans.append((begin, i + 1))
    return spans


def variants(text: str) -> list[str]:
    """The line without its optional parts, and with each alternative of each optional part."""
    spans = _groups(text)

    def without(keep: int | None = None, alternative: str = "") -> str:
        parts, last = [], 0
        for n, (a, b) in enumerate(spans):
            parts.append(text[last:a])
            if n == keep:
                parts.append(" " + alternative + " ")
            last = b
        return "".join(parts) + text[last:]

    out = [without()]
    for n, (a, b) in enumerate(spans):
        out += [without(n, alt.strip()) for alt in text[a + 1:b - 1].split("|")]
    return out


def argv(text: str) -> list[str]:
    """The arguments lmlab gets: up to a pipe or redirection, placeholders filled in."""
    words = shlex.split(text, comments=True)
    assert words[0] == "lmlab"
    words = words[:next((i for i, w in enumerate(words) if w in ("|", ">", ">>", "2>", "<", "&&", ";")), len(words))]
    return [PLACEHOLDERS.get(re.sub(r"\.\.\.$", "", w), re.sub(r"^([A-Z][A-Z0-9_]*)\.\.\.$", r"\1", w))
            for w in words[1:]]


def parse(args: list[str]):
    """(command, context): subcommands resolved and every option and argument parsed as `lmlab` would, without
    running anything."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("lmlab", list(args))
    while hasattr(cmd, "resolve_command"):  # a group
        name, sub, rest = cmd.resolve_command(ctx, ctx._protected_args + ctx.args)
        assert sub is not None, f"no command {name}"
        cmd, ctx = sub, sub.make_context(name, rest, parent=ctx)
    return cmd, ctx


def check_recipes(cmd, ctx) -> None:
    """A recipe argument gets recipe files: a README line that passes another file there (an option missing its
    flag, e.g. `--html out.html` when --html took no value) parses but fails when run."""
    for p in cmd.params:
        if p.param_type_name == "argument" and "recipe" in p.name:
            values = ctx.params.get(p.name)
            for v in values if isinstance(values, (list, tuple)) else [values]:
                if v is None:
                    continue
                assert str(v).endswith((".yaml", ".yml")), f"{p.name} got {v!s}, not a recipe file"
                if str(v).startswith("recipes/"):
                    assert (REPO / v).is_file(), f"{v} does not exist"


LINES = [(doc, number, text) for doc in DOCS for number, text in command_lines(doc)]


def test_the_readme_has_commands():
    readme = [text for doc, _, text in LINES if doc.name == "README.md"]
    assert len(readme) >= 25 and any(t.startswith("lmlab runs") for t in readme)


@pytest.mark.parametrize("doc, number, text", LINES, ids=[f"{d.name}:{n}" for d, n, _ in LINES])
def test_documented_command_parses(doc, number, text):
    for variant in variants(text):
        try:
            cmd, ctx = parse(argv(variant))
        except ClickException as e:
            pytest.fail(f"{doc.name}:{number}: `{variant.split('#')[0].strip()}`: {e.format_message()}")
        check_recipes(cmd, ctx)


@pytest.mark.parametrize("text, problem", [
    ("lmlab runz", "No such command 'runz'"),
    ("lmlab runs --format xml", "'xml' is not one of"),
    ("lmlab compare RUN --top 3", "No such option: --top"),
    ("lmlab plan RECIPE --zero 7", "less than or equal to 3"),
])
def test_a_drifted_line_fails(text, problem):
    with pytest.raises(ClickException, match=problem):
        parse(argv(text))


def test_a_file_passed_as_a_recipe_fails():
    cmd, ctx = parse(argv("lmlab data inspect RECIPE out.html"))  # the old README line: --html took no value
    with pytest.raises(AssertionError, match="recipes got out.html"):
        check_recipes(cmd, ctx)


def test_optional_parts_and_alternatives_are_each_parsed():
    assert variants("lmlab compare RUN... [--markdown|--csv]  # x") == [
        "lmlab compare RUN...   # x", "lmlab compare RUN...  --markdown   # x", "lmlab compare RUN...  --csv   # x"]
    assert argv("lmlab generate RUN --prompt \"...\" -p '[x]'  # c") == ["generate", "RUN", "--prompt", "...", "-p", "[x]"]
    assert variants("lmlab run --set 'a=[1,2]'") == ["lmlab run --set 'a=[1,2]'"]  # brackets inside quotes
    assert argv("lmlab runs --format json | jq '.[0]' > out.json") == ["runs", "--format", "json"]

"""Prompts for generation: a user prompt (or record) rendered with the run's own template and tokenized exactly as
training tokenized prompts; prompt files; the stop strings a template implies."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmlab.data.sft import encode_prompt, special_prefix
from lmlab.data.templates import _placeholders
from lmlab.errors import LmlabError
from lmlab.models.loading import LoadedCheckpoint
from lmlab.recipe.generation import SamplingPreset


def prompt_record(template: Any, item: str | Mapping[str, Any]) -> Any:
    """What the template renders for one user prompt: a record (dict) as is; a string becomes the instruction
    (alpaca), the single placeholder (prompt_completion) or a user message (chat)."""
    if not isinstance(item, str):
        return item
    fmt = template.format
    if fmt == "alpaca":
        return {template.column("instruction"): item, template.column("input"): ""}
    if fmt == "chat":
        return [{"role": "user", "content": item}]
    if fmt == "prompt_completion":

        names = _placeholders(template.prompt_template or "")
        if len(names) != 1:
            raise LmlabError(f"--prompt: the run's template has {len(names)} placeholders ({', '.join(names)}); "
                             "give records with those keys in a .jsonl file with --prompts")
        return {template.column(names[0]): item}
    return {template.column(template.text_column): item}


def prompt_ids(loaded: LoadedCheckpoint, item: str | Mapping[str, Any]) -> tuple[str, list[int]]:
    """(prompt text, token ids) exactly as training tokenized prompts."""

    tok, template = loaded.tokenizer, loaded.template
    if template is None or template.format == "text":
        text = item if isinstance(item, str) else template.completion_text(item) if template else str(item)
        prefix = special_prefix(tok) if template is not None else []
        return text, prefix + tok(text, add_special_tokens=False)["input_ids"]
    record = prompt_record(template, item)
    return template.render_for_generation(record), encode_prompt(template, tok, record)


def read_prompts(path: str | os.PathLike) -> list[str | dict[str, Any]]:
    """.txt: one prompt per non-empty line; .json / .jsonl: records (dicts of the template's columns) or strings."""
    p = Path(path)
    if not p.is_file():
        raise LmlabError(f"--prompts: file '{path}' not found")
    text = p.read_text()
    if p.suffix == ".jsonl":
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif p.suffix == ".json":
        items = json.loads(text)
        if not isinstance(items, list):
            raise LmlabError(f"--prompts: {path} must hold a JSON list of prompts or records")
    else:
        items = [line for line in text.splitlines() if line.strip()]
    if not items:
        raise LmlabError(f"--prompts: {path} has no prompts")
    return items


def stop_strings(loaded: LoadedCheckpoint, sampling: SamplingPreset) -> list[str]:
    """The template's end of turn (when it is not the EOS token itself) and the preset's own stop strings."""
    stops = list(sampling.stop)
    end = loaded.template.end_of_turn() if loaded.template is not None else ""
    if end and end != loaded.tokenizer.eos_token and end not in stops:
        stops.append(end)
    return stops

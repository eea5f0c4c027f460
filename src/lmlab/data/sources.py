"""Read examples (one dict per example) from a local file or a Hugging Face dataset."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from lmlab.data.persona import load_persona_chat
from lmlab.errors import LmlabError
from lmlab.recipe.schema import Recipe


def load_records(recipe: Recipe) -> list[dict[str, Any]]:
    """All examples of the recipe's data source, in file order, capped at data.max_examples."""
    cfg = recipe.data
    if cfg.path is not None:
        path = recipe.resolve_data_path()
        records = read_file(path, cfg.format, one_document_per_line=cfg.one_document_per_line)
    else:
        records = _read_hub(cfg.hf_dataset, cfg.hf_config, cfg.hf_split)
    if cfg.max_examples is not None:
        records = records[: cfg.max_examples]
    if not records:
        raise LmlabError(f"data: no examples in {cfg.path or cfg.hf_dataset}; check the file")
    return records


def read_file(path: Path, fmt: str = "auto", *, one_document_per_line: bool = False) -> list[dict[str, Any]]:
    fmt = _format_of(path) if fmt == "auto" else fmt
    if fmt == "persona_chat":  # Synthetic-Persona-Chat CSV(s) -> {"id", "messages"} records; see lmlab.data.persona

        return load_persona_chat(path)[0]
    if fmt == "text":
        text = read_text(path)
        if one_document_per_line:
            return [{"text": line} for line in text.splitlines() if line.strip()]
        return [{"text": text}]
    if fmt == "csv":
        return read_csv(path)
    if fmt == "jsonl":
        records = []
        for lineno, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LmlabError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
        return records
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise LmlabError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: take the single list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise LmlabError(f"{path}: expected a JSON list of objects (or one object holding one list)")
        data = lists[0]
    return data


def read_text(path: Path) -> str:
    """The file as UTF-8 text; a byte that is not UTF-8 is one error naming its line and column."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise LmlabError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); re-save the "
                         "file as UTF-8") from None


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header, as dicts; a row whose field count differs from the header's is one error
    naming its line (a ragged file would otherwise shift or drop values silently)."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise LmlabError(f"{path}:1: not valid CSV ({e})") from None
    rows = []
    try:
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise LmlabError(f"{path}:{reader.line_num}: {len(row)} field(s), the header has {len(header)}; "
                                 "fix the row (quote values that hold commas or line breaks)")
            rows.append(dict(zip(header, row, strict=True)))
    except csv.Error as e:
        raise LmlabError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return rows


def _format_of(path: Path) -> str:
    ext = path.suffix.lower()
    formats = {".txt": "text", ".md": "text", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
    if ext not in formats:
        raise LmlabError(f"data.format: cannot tell the format of '{path.name}'; set data.format to text, csv, json or jsonl")
    return formats[ext]


def _read_hub(name: str | None, config: str | None, split: str) -> list[dict[str, Any]]:
    """Hugging Face hub dataset (needs network or a local HF cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown id, missing split: the library's message is the useful part
        raise LmlabError(f"data.hf_dataset: could not load '{name}' split '{split}': {str(e).splitlines()[0]}") from None
    return [dict(row) for row in ds]


def column(records: list[dict[str, Any]], name: str, source: str) -> list[str]:
    """The values of one column as strings; a clear error if the column is missing."""
    if name not in records[0]:
        cols = ", ".join(map(str, records[0].keys()))
        raise LmlabError(f"{source}: no column '{name}' (columns: {cols}); set data.text_column")
    out = []
    for r in records:
        v = r.get(name)
        out.append("" if v is None else str(v))
    return out

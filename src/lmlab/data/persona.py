"""Synthetic-Persona-Chat CSVs -> multi-turn chat records with a persona system message.

Each CSV row holds `user 1 personas`, `user 2 personas` (one persona sentence per line) and
`Best Generated Conversation` (one turn per line, prefixed `User 1:` / `User 2:`). A row becomes

    {"id": "<file name>:<row>", "messages": [{"role": "system", "content": <persona>},
                                             {"role": "user", "content": ...},
                                             {"role": "assistant", "content": ...}, ...]}

where `<row>` counts data rows from 0 (the header is not a row; rows span several lines in the file).

The generated text is not always clean, and nothing is dropped without a count in `PersonaChatReport`:
- a line without a `User N:` prefix continues the turn before it (recipes, lists, stage directions);
- consecutive turns of one speaker are joined into one message, so roles alternate;
- lines of only punctuation (`* * *`) separate nothing and are dropped;
- a prefix wrapped in markdown emphasis (`*User 1:*`, `* * User 1: * *`) is read as `User 1:` (the text
  after it is kept as is, so a stray `*` is left for the `balanced_markup` filter to judge);
- a row with no turns, only one speaker, an empty turn, or words before its first `User N:` turn is
  malformed: it is skipped and listed by reason with its row id.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmlab.errors import LmlabError

Speaker = Literal["User 1", "User 2"]
PersonaMode = Literal["assistant", "both", "none"]

COLUMNS = ("user 1 personas", "user 2 personas", "Best Generated Conversation")
# 'User 1: hi', '*User 1:* hi', '* * User 1: * * hi', '* User 1: hi *' -> speaker, text
_TURN = re.compile(r"^(?P<lead>[\s*]*)(?P<speaker>User [12])\s*:(?P<text>.*)$")
_LEADING_STAR = re.compile(r"^[ \t]*\*")
_TRAILING_STAR = re.compile(r"\*[ \t]*$")
_WORD = re.compile(r"\w")


@dataclass
class PersonaChatReport:
    files: list[str] = field(default_factory=list)
    rows: int = 0  # data rows read, header excluded
    conversations: int = 0  # records returned
    malformed: dict[str, list[str]] = field(default_factory=dict)  # reason -> row ids ('file.csv:row')
    merged_turns: int = 0  # turns joined into the same speaker's turn before them
    continuation_lines: int = 0  # lines without a 'User N:' prefix, appended to the turn before them
    separator_lines: int = 0  # lines of only punctuation ('* * *'), dropped
    decorated_prefixes: int = 0  # '*User 1:*'-style prefixes read as 'User 1:'
    no_persona: int = 0  # kept conversations whose requested persona text was empty (no system message)

    @property
    def skipped(self) -> int:
        return sum(len(ids) for ids in self.malformed.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": list(self.files), "rows": self.rows, "conversations": self.conversations,
            "skipped": self.skipped, "malformed": {k: list(v) for k, v in self.malformed.items()},
            "merged_turns": self.merged_turns, "continuation_lines": self.continuation_lines,
            "separator_lines": self.separator_lines, "decorated_prefixes": self.decorated_prefixes,
            "no_persona": self.no_persona,
        }

    def lines(self) -> list[str]:
        out = [f"persona chat: {self.rows} rows -> {self.conversations} conversations ({self.skipped} malformed, skipped)"]
        for reason, ids in self.malformed.items():
            shown = ", ".join(ids[:5]) + (f", ... (+{len(ids) - 5})" if len(ids) > 5 else "")
            out.append(f"  {len(ids)} x {reason}: {shown}")
        out.append(
            f"  repaired: {self.merged_turns} same-speaker turns merged, {self.continuation_lines} continuation "
            f"lines joined, {self.separator_lines} separator lines dropped, {self.decorated_prefixes} "
            f"decorated 'User N:' prefixes read"
        )
        if self.no_persona:
            out.append(f"  {self.no_persona} conversations without persona text (no system message)")
        return out


def load_persona_chat(
    path: str | os.PathLike[str],
    *,
    assistant: Speaker = "User 2",
    persona: PersonaMode = "assistant",
) -> tuple[list[dict[str, Any]], PersonaChatReport]:
    """Read one Synthetic-Persona-Chat CSV, or every *.csv in a folder (sorted by name).

    `assistant`: which speaker the model learns to be; the other becomes `user`.
    `persona`: system message = the assistant's persona sentences ('assistant'), both personas under
    'Your persona:' / "The user's persona:" headings ('both'), or no system message ('none').
    """
    if assistant not in ("User 1", "User 2"):
        raise LmlabError(f"assistant: must be 'User 1' or 'User 2', got {assistant!r}")
    if persona not in ("assistant", "both", "none"):
        raise LmlabError(f"persona: must be 'assistant', 'both' or 'none', got {persona!r}")
    report = PersonaChatReport()
    records = []
    for file in _csv_files(Path(path)):
        report.files.append(str(file))
        for row_number, row in _rows(file):
            report.rows += 1
            row_id = f"{file.name}:{row_number}"
            record, problem = _record(row, row_id, assistant, persona, report)
            if problem is not None:
                report.malformed.setdefault(problem, []).append(row_id)
            else:
                records.append(record)
    report.conversations = len(records)
    return records, report


def _csv_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files:
            raise LmlabError(f"data.path: folder '{path}' has no .csv files; point it at Synthetic-Persona-Chat_*.csv")
        return files
    if not path.is_file():
        raise LmlabError(f"data.path: '{path}' not found; point it at a Synthetic-Persona-Chat CSV or its folder")
    return [path]


def _rows(file: Path) -> Iterator[tuple[int, list[str]]]:
    with file.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != COLUMNS:
            raise LmlabError(
                f"data.path: '{file.name}' does not look like Synthetic-Persona-Chat (header {header}, "
                f"expected {list(COLUMNS)}); check the file"
            )
        yield from enumerate(reader)


def _record(row: list[str], row_id: str, assistant: Speaker, persona: PersonaMode,
            report: PersonaChatReport) -> tuple[dict[str, Any], None] | tuple[None, str]:
    if len(row) != len(COLUMNS):
        return None, f"expected {len(COLUMNS)} columns"
    personas = {"User 1": _persona_text(row[0]), "User 2": _persona_text(row[1])}
    turns, problem = parse_turns(row[2], report)
    if problem is not None:
        return None, problem
    user = "User 1" if assistant == "User 2" else "User 2"
    messages = [
        {"role": "assistant" if speaker == assistant else "user", "content": text} for speaker, text in turns
    ]
    if persona == "assistant":
        system = personas[assistant]
    elif persona == "both":
        system = "\n\n".join(
            f"{heading}\n{personas[who]}" for heading, who in (("Your persona:", assistant), ("The user's persona:", user))
            if personas[who]
        )
    else:
        system = None
    if system:
        messages.insert(0, {"role": "system", "content": system})
    elif persona != "none":
        report.no_persona += 1
    return {"id": row_id, "messages": messages}, None


def _persona_text(cell: str) -> str:
    return "\n".join(line.strip() for line in cell.splitlines() if line.strip())


def parse_turns(conversation: str, report: PersonaChatReport | None = None) -> tuple[list[tuple[str, str]], str | None]:
    """'User 1: hi\\nUser 2: hello' -> ([('User 1', 'hi'), ('User 2', 'hello')], None), or ([], problem).

    Repairs (counted in `report`) and problems are listed in the module docstring.
    """
    report = report if report is not None else PersonaChatReport()
    turns: list[tuple[str, list[str]]] = []
    merged = continuation = separators = decorated = 0
    preamble = False
    for line in conversation.splitlines():
        match = _TURN.match(line)
        if match:
            speaker, text = match["speaker"], _undecorate(match["lead"].count("*"), match["text"])
            decorated += "*" in match["lead"]
            if turns and turns[-1][0] == speaker:
                merged += 1
                turns[-1][1].append(text)
            else:
                turns.append((speaker, [text]))
        elif not line.strip():
            if turns:
                turns[-1][1].append("")  # paragraph break inside a turn; trailing ones are stripped below
        elif not _WORD.search(line):
            separators += 1
        elif not turns:
            preamble = True
        else:
            continuation += 1
            turns[-1][1].append(line)
    if not turns:
        return [], "no 'User N:' turns" if conversation.strip() else "empty conversation"
    if preamble:
        return [], "text before the first 'User N:' turn"
    if len({speaker for speaker, _ in turns}) < 2:
        return [], "only one speaker"
    joined = [(speaker, "\n".join(lines).strip()) for speaker, lines in turns]
    if any(not text for _, text in joined):
        return [], "empty turn"
    report.merged_turns += merged
    report.continuation_lines += continuation
    report.separator_lines += separators
    report.decorated_prefixes += decorated
    return joined, None


def _undecorate(stars: int, text: str) -> str:
    """Remove the emphasis that wrapped a 'User N:' label: as many `*` as stood before the label, taken
    first right after the colon ('*User 1:* hi'), then from the end of the line ('* User 1: hi *')."""
    for pattern in (_LEADING_STAR, _TRAILING_STAR):
        while stars and pattern.search(text):
            text = pattern.sub("", text, count=1)
            stars -= 1
    return text.strip()

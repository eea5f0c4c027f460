"""Records (one dict per row) → preference pairs (prompt, A, B, label), with every bad row counted or refused.

Labels come from one `winner` column (a / b / tie), from three one-hot columns (arena data), or from
chosen/rejected columns (no ties), which are put in a random A/B order seeded by run.seed and the pair's text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from lmlab.errors import LmlabError
from lmlab.recipe.pair import PairConfig, pair_config
from lmlab.recipe.schema import Recipe

A_WINS, B_WINS, TIE = 0, 1, 2
LABEL_NAMES = ("a", "b", "tie")
WINNER_VALUES = {"a": A_WINS, "model_a": A_WINS, "b": B_WINS, "model_b": B_WINS, "tie": TIE, "tie (bothbad)": TIE}
_EXAMPLES = 3  # bad values quoted in an error message


@dataclass(frozen=True)
class Pair:
    prompt: str
    a: str
    b: str
    label: int  # A_WINS, B_WINS or TIE
    row: int  # index in the records converted (the file row when converted before splitting)

    @property
    def identical(self) -> bool:
        return self.a == self.b


@dataclass
class PairDataReport:
    """What conversion did to one split's rows; every dropped or altered row is counted here."""

    label_source: str
    rows: int = 0
    pairs: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    empty_responses: int = 0  # pairs with at least one empty response (kept unless dropped below)
    empty_dropped: int = 0
    identical: int = 0  # pairs whose responses are equal (kept unless dropped below)
    identical_dropped: int = 0
    invalid_json_dropped: int = 0
    null_turns: int = 0  # JSON null turns read as empty text
    prefix_moved: int = 0  # shared transcript start moved into the prompt
    prefix_marker_missing: int = 0  # shared_prefix_marker set but not found in the shared start
    chosen_as_a: int = 0  # chosen_rejected: pairs where the chosen response was put first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def records_to_pairs(records: list[dict[str, Any]], cfg: PairConfig, *, seed: int, source: str,
                     where: str = "") -> tuple[list[Pair], PairDataReport]:
    """Convert rows to pairs. `source` names the data (file or hub id) in errors, where records are numbered
    from 1 in the order given; `where` says which records those are ('of the val split'). Raises LmlabError listing every kind of bad value,
    each with its count and first examples."""
    if not records:
        return [], PairDataReport(label_source=cfg.labels)
    kind = label_source(cfg, records[0], source)
    check_columns(cfg, kind, records[0], source)
    report = PairDataReport(label_source=kind, rows=len(records))
    bad: dict[str, list[tuple[int, Any]]] = {}  # problem -> [(row, value)]
    pairs: list[Pair] = []
    text_columns = text_columns_of(cfg, kind)
    for i, rec in enumerate(records):
        missing = [c for c in (*text_columns, *label_columns_of(cfg, kind)) if c not in rec]
        if missing:
            bad.setdefault(f"column '{missing[0]}' is missing; every row needs it", []).append((i, None))
            continue
        texts, invalid = {}, None
        for col in text_columns:
            text, nulls = _read_text(rec[col], cfg.json_lists, cfg.turn_separator)
            if text is None:
                invalid = col
                break
            texts[col] = text
            report.null_turns += nulls
        if invalid is not None:
            if cfg.invalid_json == "drop":
                report.invalid_json_dropped += 1
                continue
            bad.setdefault(f"column '{invalid}' is not a JSON list of turns (pair.json_lists is true)", []).append(
                (i, rec[invalid]))
            continue
        label, error = _read_label(rec, cfg, kind)
        if error is not None:
            bad.setdefault(error, []).append((i, _label_value(rec, cfg, kind)))
            continue
        if kind == "chosen_rejected":
            chosen, rejected = texts[cfg.chosen_column], texts[cfg.rejected_column]
            chosen_first = _coin(seed, chosen, rejected)
            a, b = (chosen, rejected) if chosen_first else (rejected, chosen)
            columns = (cfg.chosen_column, cfg.rejected_column)[:: 1 if chosen_first else -1]
            label = A_WINS if chosen_first else B_WINS
            report.chosen_as_a += chosen_first
        else:
            a, b = texts[cfg.response_a_column], texts[cfg.response_b_column]
            columns = (cfg.response_a_column, cfg.response_b_column)
        prompt_parts = [texts[c].strip() for c in cfg.prompt_columns]
        if cfg.shared_prefix_marker:
            shared, a, b = split_shared_prefix(a, b, cfg.shared_prefix_marker)
            if shared:
                report.prefix_moved += 1
                prompt_parts.append(shared.strip())
            else:
                report.prefix_marker_missing += 1
        prompt = cfg.turn_separator.join(p for p in prompt_parts if p)
        a, b = a.strip(), b.strip()
        if not a or not b:
            report.empty_responses += 1
            if cfg.empty_responses == "drop":
                report.empty_dropped += 1
                continue
            if cfg.empty_responses == "error":
                bad.setdefault(f"column '{columns[0] if not a else columns[1]}' is empty (pair.empty_responses is 'error'); fix the rows or "
                               "set pair.empty_responses to keep or drop", []).append((i, ""))
                continue
        if a == b:
            report.identical += 1
            if cfg.identical_responses == "drop":
                report.identical_dropped += 1
                continue
        pairs.append(Pair(prompt, a, b, label, i))
    if bad:
        lines = []
        for problem, rows in bad.items():
            shown = ", ".join(f"record {r + 1}" + ("" if v is None else f": {_short(v)}") for r, v in rows[:_EXAMPLES])
            lines.append(f"{source}: {problem}; {len(rows)} of {len(records)} records{' ' + where if where else ''} "
                         f"(e.g. {shown})")
        raise LmlabError("\n".join(lines))
    report.pairs = len(pairs)
    counts = Counter(p.label for p in pairs)
    report.labels = {name: counts.get(k, 0) for k, name in enumerate(LABEL_NAMES)}
    return pairs, report


def check_pair_records(recipe: Recipe, records: list[dict[str, Any]]) -> PairDataReport:
    """Convert all records once before splitting, so an error names records in file order (1-based);
    returns the whole data's report. Raises LmlabError like `records_to_pairs`."""
    source = str(recipe.data.path or recipe.data.hf_dataset)
    return records_to_pairs(records, pair_config(recipe), seed=recipe.run.seed, source=source)[1]


def label_source(cfg: PairConfig, first: dict[str, Any], source: str) -> str:
    """The label format: as configured, or for 'auto' the first whose columns the first row has."""
    if cfg.labels != "auto":
        return cfg.labels
    if cfg.winner_column in first:
        return "winner"
    if all(c in first for c in cfg.one_hot_columns):
        return "one_hot"
    if cfg.chosen_column in first and cfg.rejected_column in first:
        return "chosen_rejected"
    raise LmlabError(
        f"{source}: cannot find labels: no column '{cfg.winner_column}', no one-hot columns "
        f"{', '.join(cfg.one_hot_columns)}, no '{cfg.chosen_column}'/'{cfg.rejected_column}' (columns: "
        f"{_columns(first)}); set pair.labels and its column names"
    )


def text_columns_of(cfg: PairConfig, kind: str) -> list[str]:
    responses = [cfg.chosen_column, cfg.rejected_column] if kind == "chosen_rejected" \
        else [cfg.response_a_column, cfg.response_b_column]
    return list(dict.fromkeys([*cfg.prompt_columns, *responses]))


def label_columns_of(cfg: PairConfig, kind: str) -> list[str]:
    return {"winner": [cfg.winner_column], "one_hot": list(cfg.one_hot_columns)}.get(kind, [])


def check_columns(cfg: PairConfig, kind: str, first: dict[str, Any], source: str) -> None:
    """A clear error for each configured column the data lacks, naming the field that sets it."""
    fields = {c: "pair.prompt_columns" for c in cfg.prompt_columns}
    if kind == "chosen_rejected":
        fields.update({cfg.chosen_column: "pair.chosen_column", cfg.rejected_column: "pair.rejected_column"})
    else:
        fields.update({cfg.response_a_column: "pair.response_a_column", cfg.response_b_column: "pair.response_b_column"})
    fields.update({c: "pair.winner_column" for c in label_columns_of(cfg, kind) if kind == "winner"})
    fields.update({c: "pair.one_hot_columns" for c in label_columns_of(cfg, kind) if kind == "one_hot"})
    missing = [f"no column '{c}' (set {f})" for c, f in fields.items() if c not in first]
    if missing:
        raise LmlabError(f"{source}: {'; '.join(missing)}; the data has columns: {_columns(first)}")


def split_shared_prefix(a: str, b: str, marker: str) -> tuple[str, str, str]:
    """('shared start up to and including the last marker in it', rest of a, rest of b); ('', a, b) when the
    shared start holds no marker. hh-rlhf transcripts share everything up to the final 'Assistant:'."""
    shared = os.path.commonprefix([a, b])
    cut = shared.rfind(marker)
    if cut < 0:
        return "", a, b
    cut += len(marker)
    return a[:cut], a[cut:], b[cut:]


def _read_text(value: Any, json_lists: bool, separator: str) -> tuple[str | None, int]:
    """(text, null turns); text None = not a JSON list where one was declared."""
    if not json_lists:
        return _plain(value), 0
    turns = value
    if isinstance(value, str):
        try:
            turns = json.loads(value)
        except json.JSONDecodeError:
            return None, 0
    if not isinstance(turns, list):
        return None, 0
    nulls = sum(t is None for t in turns)
    return separator.join(_plain(t) for t in turns if t is not None), nulls


def _plain(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # pandas/HF empty cells
        return ""
    return value if isinstance(value, str) else str(value)


def _read_label(rec: dict[str, Any], cfg: PairConfig, kind: str) -> tuple[int, str | None]:
    """(label, None) or (-1, problem description naming the column and the fix)."""
    if kind == "winner":
        value = WINNER_VALUES.get(_plain(rec[cfg.winner_column]).strip().lower())
        if value is None:
            return -1, (f"column '{cfg.winner_column}' has values outside {{{', '.join(WINNER_VALUES)}}}; "
                        "fix those rows or point pair.winner_column at the label column")
        return value, None
    if kind == "one_hot":
        bits = [_bit(rec[c]) for c in cfg.one_hot_columns]
        if None in bits or sum(bits) != 1:  # type: ignore[arg-type]
            return -1, (f"columns {', '.join(cfg.one_hot_columns)} must hold 0/1 with exactly one 1 per row; "
                        "fix those rows or check pair.one_hot_columns")
        return bits.index(1), None
    return -1, None  # chosen_rejected: decided by the caller


def _bit(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return int(value) if value in (0, 1) else None
    text = _plain(value).strip().lower()
    return {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}.get(text)


def _label_value(rec: dict[str, Any], cfg: PairConfig, kind: str) -> Any:
    if kind == "winner":
        return rec.get(cfg.winner_column)
    return [rec.get(c) for c in cfg.one_hot_columns]


def _coin(seed: int, chosen: str, rejected: str) -> bool:
    """Whether the chosen response goes first: seeded, and a function of the pair alone, so a pair keeps its
    order whichever split it lands in."""
    digest = hashlib.blake2b(f"{seed}\0{chosen}\0{rejected}".encode(), digest_size=8).digest()
    return bool(digest[0] & 1)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _columns(first: dict[str, Any]) -> str:
    return ", ".join(map(str, first.keys()))

"""Preference pairs for task dpo: records (prompt + chosen + rejected) → two SFT examples per pair that share one
prompt, tokenized with the run's template exactly as SFT tokenizes (loss only on the response, EOS appended and a
target, pads masked by position, truncation counted), plus a report of every pair dropped and why.

Accepted rows (column names from the `dpo:` section):
- prompt / chosen / rejected as text: JSON, JSONL, CSV, and `lmlab feedback export` rows
  `{"prompt", "chosen", "rejected", ...}` (extra keys are ignored);
- alpaca data with chosen / rejected (rasbt's instruction-data-with-preference.json): the prompt comes from
  instruction / input through the alpaca template;
- chat data: the prompt a string (one user turn) or a list of {role, content} messages; chosen / rejected text,
  or lists of messages (TRL's conversational format; a prompt both lists share moves to the prompt);
- whole transcripts sharing their start (hh-rlhf): with dpo.shared_prefix_marker the shared start up to the last
  'Assistant:' is the prompt; a chat template reads it as turns ('Human:' → user, 'Assistant:' → assistant).

A pair example is {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "row"} with labels aligned as
`lmlab.tasks.base` wants (labels[t] is the target of position t; -100 = no loss).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lmlab.data.pairs import split_shared_prefix
from lmlab.data.sft import PreflightReport, tokenize_sft
from lmlab.data.templates import PromptTemplate
from lmlab.errors import LmlabError

_SHOW_ROWS = 5

# reasons a pair is dropped before tokenization, in report order
EMPTY_CHOSEN = "empty chosen response"
EMPTY_REJECTED = "empty rejected response"
IDENTICAL = "chosen equals rejected (no preference to learn)"
NOT_ONE_ANSWER = "response is not one assistant message"


@dataclass
class PreferenceReport:
    """What conversion and tokenization did to one split's pairs; `lines()` is printed before training."""

    template: str
    max_length: int
    n_records: int
    n_pairs: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> pairs
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)  # first few record numbers per reason
    prefix_moved: int = 0  # shared transcript start moved into the prompt
    prefix_marker_missing: int = 0  # shared_prefix_marker set but not found in the shared start
    truncated_chosen: int = 0
    truncated_rejected: int = 0
    truncated_rows: list[int] = field(default_factory=list)
    n_tokens: int = 0  # both sides of every pair
    n_loss_tokens: int = 0
    max_tokens: int = 0
    chosen: dict[str, Any] = field(default_factory=dict)  # the SFT pre-flight report of each side
    rejected: dict[str, Any] = field(default_factory=dict)
    _notes: list[str] = field(default_factory=list)  # EOS / pad lines of the SFT report

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("_notes")
        return out

    def lines(self) -> list[str]:
        out = [f"dpo data: {self.n_records} records → {self.n_pairs} pairs (template {self.template}, "
               f"max_length {self.max_length})"]
        if self.dropped:
            parts = [f"{n} {reason} (rows {_rows(self.dropped_rows.get(reason, []), n)})"
                     for reason, n in self.dropped.items()]
            out.append(f"  dropped {self.n_dropped} pairs: " + "; ".join(parts))
        if self.prefix_marker_missing:
            out.append(f"  {self.prefix_marker_missing} pairs share no start ending in dpo.shared_prefix_marker: "
                       "their whole transcripts are the responses")
        if self.truncated_chosen or self.truncated_rejected:
            out.append(f"  truncated to max_length: {self.truncated_chosen} chosen, {self.truncated_rejected} "
                       f"rejected (rows {_rows(self.truncated_rows, max(self.truncated_chosen, self.truncated_rejected))}"
                       "); their log-probs cover the kept tokens only; data.truncation: drop drops them")
        if self.n_pairs:
            pct = 100 * self.n_loss_tokens / max(self.n_tokens, 1)
            out.append(f"  tokens (both sides): {self.n_tokens:,}, response {self.n_loss_tokens:,} ({pct:.0f}%); "
                       f"longest sequence {self.max_tokens}")
        return out + self._notes


def check_preference_columns(records: Sequence[Mapping[str, Any]], cfg: Any, *, chat: bool,
                             source: str) -> None:
    """One clear error when a column the `dpo:` section names is in no record (a column missing in some rows
    only reads as an empty response: those pairs are dropped and counted)."""
    if not records:
        raise LmlabError(f"{source}: no records to build preference pairs from")
    present = dict.fromkeys(k for r in records[:1000] for k in r)
    problems = [f"no column '{col}' (set dpo.{name})" for name, col in
                (("chosen_column", cfg.chosen_column), ("rejected_column", cfg.rejected_column)) if col not in present]
    if not problems and chat and cfg.prompt_column not in present and cfg.shared_prefix_marker is None \
            and not isinstance(records[0].get(cfg.chosen_column), list):
        problems.append(f"no column '{cfg.prompt_column}' (set dpo.prompt_column, or dpo.shared_prefix_marker "
                        "for transcripts that share their start)")
    if problems:
        raise LmlabError(f"{source}: {'; '.join(problems)}; the data has columns: {', '.join(map(str, present))}")


def tokenize_preference(records: Sequence[Mapping[str, Any]], template: PromptTemplate, tokenizer: Any,
                        data_cfg: Any, cfg: Any, *, source: str) -> tuple[list[dict[str, Any]], PreferenceReport]:
    """Convert and tokenize one split's records. `data_cfg` is the recipe's `data` section (max_length,
    truncation, add_eos), `cfg` its `dpo` section. Raises LmlabError for a missing column, bad chat messages,
    and when no pair is left."""
    if data_cfg.train_on_prompt:
        raise LmlabError("data.train_on_prompt: task dpo scores the responses only; set it to false")
    chat = template.format == "chat"
    check_preference_columns(records, cfg, chat=chat, source=source)
    report = PreferenceReport(template.name, data_cfg.max_length, len(records))
    chosen_recs, rejected_recs, rows = [], [], []
    for row, record in enumerate(records):
        try:
            made = _sides(record, template, cfg, report)
        except LmlabError as e:
            raise LmlabError(f"{source}, row {row}: {e}") from None
        if isinstance(made, str):
            _drop(report, made, row)
            continue
        chosen_recs.append(made[0])
        rejected_recs.append(made[1])
        rows.append(row)
    if not rows:
        raise LmlabError(f"{source}: no preference pair left ({_reasons(report)}); check the "
                         f"{cfg.chosen_column} / {cfg.rejected_column} columns")

    sides = {}
    for name, recs in (("chosen", chosen_recs), ("rejected", rejected_recs)):
        sides[name] = tokenize_sft(recs, template, tokenizer, data_cfg, source=f"{source} ({name} responses)",
                                   what="preference pair")
    (chosen, c_rep), (rejected, r_rep) = sides["chosen"], sides["rejected"]
    for rep in (c_rep, r_rep):  # the SFT reports number the records passed; the user knows the split's rows
        _renumber(rep, rows)
    by_index = {side: {ex["row"]: ex for ex in examples} for side, examples in (("c", chosen), ("r", rejected))}
    examples = []
    for i, row in enumerate(rows):
        c, r = by_index["c"].get(i), by_index["r"].get(i)
        if c is None or r is None:
            _drop(report, _tokenization_reason(row, c_rep if c is None else r_rep), row)
            continue
        examples.append({"chosen_ids": c["input_ids"], "chosen_labels": last_turn_only(c["labels"]),
                         "rejected_ids": r["input_ids"], "rejected_labels": last_turn_only(r["labels"]), "row": row})
        for side in ("chosen", "rejected"):
            report.n_tokens += len(examples[-1][f"{side}_ids"])
            report.n_loss_tokens += sum(x != -100 for x in examples[-1][f"{side}_labels"])
            report.max_tokens = max(report.max_tokens, len(examples[-1][f"{side}_ids"]))
    report.truncated_chosen, report.truncated_rejected = c_rep.n_truncated, r_rep.n_truncated
    report.truncated_rows = sorted({*c_rep.truncated_rows, *r_rep.truncated_rows})[:_SHOW_ROWS]
    report.chosen, report.rejected = c_rep.to_dict(), r_rep.to_dict()
    report._notes = _eos_lines(c_rep, r_rep)
    report.n_pairs = len(examples)
    if not examples:
        raise LmlabError(f"{source}: no preference pair left after tokenization ({_reasons(report)}); "
                         "raise data.max_length")
    return examples, report


def last_turn_only(labels: list[int]) -> list[int]:
    """Labels of the final response alone: SFT trains every assistant turn of a chat, but a preference is about
    the last one, the earlier turns are the prompt. The final response (with its EOS) is the last unbroken run of
    targets: a user turn, never a target, separates it from earlier assistant turns."""
    end = next((t for t in range(len(labels) - 1, -1, -1) if labels[t] != -100), None)
    if end is None:
        return labels
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return [-100] * start + labels[start:]


# ------------------------------------------------------------------------------------------- conversion
def _sides(record: Mapping[str, Any], template: PromptTemplate, cfg: Any,
           report: PreferenceReport) -> tuple[dict, dict] | str:
    """The record as two SFT records (chosen, rejected) sharing one prompt, or the reason it is dropped."""
    chosen_raw, rejected_raw = record.get(cfg.chosen_column), record.get(cfg.rejected_column)
    prompt_messages: list[dict[str, str]] = []
    if isinstance(chosen_raw, list) and isinstance(rejected_raw, list):  # conversations: split off what they share
        shared = _common_prefix(chosen_raw, rejected_raw)
        prompt_messages = [dict(m) for m in chosen_raw[:shared]]
        chosen, rejected = _answer(chosen_raw[shared:]), _answer(rejected_raw[shared:])
        if chosen is None or rejected is None:
            return NOT_ONE_ANSWER
    else:
        chosen, rejected = _text(chosen_raw), _text(rejected_raw)
    transcript = ""
    if cfg.shared_prefix_marker:
        transcript, chosen, rejected = split_shared_prefix(chosen, rejected, cfg.shared_prefix_marker)
        if transcript:
            report.prefix_moved += 1
        else:
            report.prefix_marker_missing += 1
    chosen, rejected = chosen.strip(), rejected.strip()
    if not chosen:
        return EMPTY_CHOSEN
    if not rejected:
        return EMPTY_REJECTED
    if chosen == rejected:
        return IDENTICAL
    if prompt_messages and template.format != "chat":
        raise LmlabError(f"columns '{cfg.chosen_column}' / '{cfg.rejected_column}' hold conversations; read them "
                         "with data.template: chat")
    if template.format == "chat":
        prompt = record.get(cfg.prompt_column)
        messages = _prompt_messages(prompt, cfg.prompt_column) + prompt_messages
        if transcript:
            messages += parse_transcript(transcript, cfg.transcript_roles)
        key = template.column(template.messages_column)
        return ({key: [*messages, {"role": "assistant", "content": chosen}]},
                {key: [*messages, {"role": "assistant", "content": rejected}]})
    base = dict(record)
    if transcript:
        base[cfg.prompt_column] = transcript
    completion = template.column(template.completion_column or "output")
    return {**base, completion: chosen}, {**base, completion: rejected}


def parse_transcript(text: str, roles: Mapping[str, str]) -> list[dict[str, str]]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: more?\\n\\nAssistant:' → chat messages (the final empty
    assistant turn, which the response fills, is left out). Speakers not in `roles` stay inside the turn."""
    names = "|".join(re.escape(name) for name in roles)
    parts = re.split(rf"(?:^|\n\n)({names}):", text)
    messages = []
    if parts[0].strip():  # text before the first speaker: a system message
        messages.append({"role": "system", "content": parts[0].strip()})
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": roles[speaker], "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def _prompt_messages(prompt: Any, column: str) -> list[dict[str, str]]:
    if prompt is None or (isinstance(prompt, float) and math.isnan(prompt)):
        return []
    if isinstance(prompt, str):
        if prompt.lstrip().startswith("[{"):  # a conversation stored as JSON text (CSV files)
            import json

            try:
                prompt = json.loads(prompt)
            except json.JSONDecodeError:
                return [{"role": "user", "content": prompt}]
        else:
            return [{"role": "user", "content": prompt}] if prompt.strip() else []
    if isinstance(prompt, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise LmlabError(f"column '{column}': expected text or a list of {{role, content}} messages, "
                     f"got {type(prompt).__name__}")


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _answer(messages: list) -> str | None:
    """The response of a conversation's unshared tail: exactly one assistant message (its text), else None."""
    if len(messages) != 1 or not isinstance(messages[0], Mapping) or messages[0].get("role") != "assistant":
        return None
    return _text(messages[0].get("content"))


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # missing cells read as empty
        return ""
    if isinstance(value, list):  # a conversation where text was expected: its last message
        return _answer(value[-1:]) or ""
    return value if isinstance(value, str) else str(value)


# -------------------------------------------------------------------------------------------- reporting
def _drop(report: PreferenceReport, reason: str, row: int) -> None:
    report.dropped[reason] = report.dropped.get(reason, 0) + 1
    rows = report.dropped_rows.setdefault(reason, [])
    if len(rows) < _SHOW_ROWS:
        rows.append(row)


def _tokenization_reason(row: int, rep: PreflightReport) -> str:
    """Why a pair lost a side in tokenization: the SFT reason recorded for its row, else the side's first."""
    for reason, rows in rep.dropped_rows.items():
        if row in rows:
            return reason
    return next(iter(rep.dropped), "dropped in tokenization")


def _renumber(rep: PreflightReport, rows: list[int]) -> None:
    rep.dropped_rows = {reason: [rows[i] for i in found] for reason, found in rep.dropped_rows.items()}
    rep.truncated_rows = [rows[i] for i in rep.truncated_rows]
    rep.missing_eos_rows = [rows[i] for i in rep.missing_eos_rows]


def _reasons(report: PreferenceReport) -> str:
    return ", ".join(f"{n} {r}" for r, n in report.dropped.items()) or f"{report.n_records} records"


def _eos_lines(c_rep: PreflightReport, r_rep: PreflightReport) -> list[str]:
    """The SFT report's EOS / pad / BOS lines (the same for both sides but the counts): chosen's, and a warning
    of the rejected side's when it has one."""
    skip = ("  dropped", "  truncated", "  tokens")
    lines = [line.replace("WARNING: ", "WARNING: chosen: ") for line in c_rep.lines()[1:] if not line.startswith(skip)]
    lines += [line.replace("WARNING: ", "WARNING: rejected: ") for line in r_rep.lines()[1:]
              if line.startswith("  WARNING")]
    return lines


def _rows(rows: list[int], total: int) -> str:
    return ", ".join(map(str, rows)) + (", …" if total > len(rows) else "")

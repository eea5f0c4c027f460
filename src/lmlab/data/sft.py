"""SFT examples: records → token ids with aligned labels (loss on completions only), plus pre-flight checks.

An example is `{"input_ids": [...], "labels": [...], "row": i}` where `labels[t]` is the target for position t
(the next token when that token bears loss, else -100; the last position is always -100), as `lmlab.task`
wants. Prompt and completion are tokenized separately and concatenated, so the mask boundary is always a
token boundary and the prompt tokens are exactly those generation will send (`encode_prompt`).

The pad = EOS trap: SmolLM2 (and lmlab's own BPE) ship `pad_token_id == eos_token_id`. A collator that masks
labels by *token id* (`labels[labels == pad_id] = -100`) then also masks every EOS, and the model never learns to
stop. Here the EOS closing each completion is a target in `labels`, and padding is masked by *position* only
(`packing.collate_padded`); the report counts the examples whose EOS is a target so the fix is visible.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lmlab.data.templates import CHAT_ROLES, PromptTemplate, Segment
from lmlab.errors import LmlabError

IGNORE = -100
_SHOW_ROWS = 5  # row numbers listed per problem in the report

# reasons an example is dropped, in report order
EMPTY_COMPLETION = "empty completion"
NO_ASSISTANT = "no assistant message"
PROMPT_TOO_LONG = "prompt fills max_length (no completion token fits)"
TOO_LONG = "longer than max_length (truncation: drop)"


@dataclass
class PreflightReport:
    """What tokenization found and did; `lines()` is what a run prints before training."""

    template: str
    max_length: int
    truncation: str
    n_records: int
    n_examples: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)  # first few row numbers per reason
    n_truncated: int = 0
    truncated_rows: list[int] = field(default_factory=list)
    eos_token: str | None = None
    eos_token_id: int | None = None
    pad_token: str | None = None
    pad_token_id: int | None = None  # None: the tokenizer has none and padding uses EOS
    pad_is_eos: bool = False
    add_eos: bool = True
    eos_appended: int = 0
    eos_already_present: int = 0
    eos_is_target: int = 0  # examples whose final loss-bearing token is EOS
    missing_eos: int = 0  # examples that never learn to stop (truncated, or add_eos off)
    missing_eos_rows: list[int] = field(default_factory=list)
    double_bos: int = 0  # examples that started with BOS twice (the duplicate is removed)
    end_of_turn: str = ""  # chat: the template's end-of-turn text, when it is not EOS
    n_tokens: int = 0
    n_loss_tokens: int = 0
    max_tokens: int = 0

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [
            f"sft data: {self.n_records} records → {self.n_examples} examples "
            f"(template {self.template}, max_length {self.max_length})"
        ]
        if self.dropped:
            parts = [
                f"{n} {reason} (rows {_rows(self.dropped_rows.get(reason, []), n)})"
                for reason, n in self.dropped.items()
            ]
            out.append(f"  dropped {self.n_dropped}: " + "; ".join(parts))
        if self.n_truncated:
            out.append(
                f"  truncated {self.n_truncated} to max_length (rows {_rows(self.truncated_rows, self.n_truncated)}); "
                "set data.truncation: drop to drop them instead"
            )
        if self.n_examples:
            pct = 100 * self.n_loss_tokens / max(self.n_tokens, 1)
            out.append(
                f"  tokens: {self.n_tokens:,}, loss-bearing {self.n_loss_tokens:,} ({pct:.0f}%); "
                f"longest example {self.max_tokens}"
            )
        eos = f"'{self.eos_token}' (id {self.eos_token_id})"
        if self.add_eos:
            out.append(
                f"  EOS {eos}: appended to {self.eos_appended}, already present in {self.eos_already_present}; "
                f"a loss target in {self.eos_is_target}/{self.n_examples} examples"
            )
        if self.pad_token_id is None:
            out.append(
                f"  pad: tokenizer has none; padding uses EOS {eos}, masked by position so EOS stays a target"
            )
        elif self.pad_is_eos:
            out.append(
                f"  pad = EOS {eos}: pads are masked by position (attention_mask), never by token id, "
                "so EOS stays a target"
            )
        if self.missing_eos:
            why = "add_eos is off" if not self.add_eos else "truncation cut it off"
            out.append(
                f"  WARNING: {self.missing_eos} examples have no EOS target ({why}; rows "
                f"{_rows(self.missing_eos_rows, self.missing_eos)}): the model may not learn to stop"
                + ("; set data.add_eos: true" if not self.add_eos else "; raise data.max_length")
            )
        if self.double_bos:
            out.append(
                f"  double BOS in {self.double_bos} examples (text starts with BOS and the tokenizer adds "
                "another): removed the duplicate"
            )
        if self.end_of_turn:
            out.append(
                f"  chat template ends assistant turns with '{self.end_of_turn}', not EOS: EOS appended after "
                "the last assistant turn; generation should also stop on that text"
            )
        return out


# -------------------------------------------------------------------------------------------- public
def tokenize_sft(
    records: Sequence[Mapping[str, Any]],
    template: PromptTemplate,
    tokenizer: Any,
    cfg: Any,
    *,
    source: str | None = None,
    what: str = "SFT example",
) -> tuple[list[dict[str, Any]], PreflightReport]:
    """Tokenize SFT records (a list of dicts) with `template`. `cfg` is the recipe's `DataConfig` (max_length,
    truncation, train_on_prompt, add_eos). `source` names the file in error messages, `what` the examples
    (preference training tokenizes each side of its pairs here).

    Raises LmlabError for missing columns, template placeholders absent from the data, unknown chat roles, a
    tokenizer without EOS when add_eos is on, and when no example is left."""
    where = source or "the data"
    check_columns(records, template, source=source)
    eos_id = tokenizer.eos_token_id
    if cfg.add_eos and eos_id is None:
        raise LmlabError(
            "data.add_eos: the tokenizer has no EOS token; give it one or set data.add_eos: false"
        )
    report = PreflightReport(
        template=template.name,
        max_length=cfg.max_length,
        truncation=cfg.truncation,
        n_records=len(records),
        eos_token=tokenizer.eos_token,
        eos_token_id=eos_id,
        pad_token=tokenizer.pad_token,
        pad_token_id=tokenizer.pad_token_id,
        pad_is_eos=tokenizer.pad_token_id is not None and tokenizer.pad_token_id == eos_id,
        add_eos=cfg.add_eos,
    )

    # 1. render every record into segments; drop (and count) the ones with nothing to learn
    rendered: list[tuple[int, list[Segment]]] = []
    for row, record in enumerate(records):
        try:
            if template.format == "chat":
                messages = template.messages(record)
                if not any(m["role"] == "assistant" for m in messages):
                    _drop(report, NO_ASSISTANT, row)
                    continue
                if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
                    _drop(report, EMPTY_COMPLETION, row)
                    continue
                segments = template.chat_segments(messages)
            else:
                segments = template.segments(record)
                if not template.completion_text(record).strip():
                    _drop(report, EMPTY_COMPLETION, row)
                    continue
        except LmlabError as e:
            raise LmlabError(f"{where}, row {row}: {e}") from None
        rendered.append((row, segments))

    # 2. tokenize all segments in one batch per kind (fast tokenizers work in Rust, in parallel)
    first = [segs[0].text for _, segs in rendered]
    rest = [s.text for _, segs in rendered for s in segs[1:]]
    first_ids = _encode(tokenizer, first)
    rest_ids = _encode_continuation(tokenizer, rest)
    prefix = [] if template.format == "chat" else special_prefix(tokenizer)
    bos_id = tokenizer.bos_token_id
    end_of_turn_is_eos = True

    # 3. assemble ids + per-token loss flags, add EOS, fix double BOS, truncate, align labels
    examples: list[dict[str, Any]] = []
    k = 0
    for j, (row, segments) in enumerate(rendered):
        ids = list(prefix) + first_ids[j]
        flags = [segments[0].trainable] * len(ids)
        last_trainable_end = len(ids) if segments[0].trainable else 0
        for seg in segments[1:]:
            seg_ids = rest_ids[k]
            k += 1
            ids += seg_ids
            flags += [seg.trainable] * len(seg_ids)
            if seg.trainable:
                last_trainable_end = len(ids)
        eos_state = ""
        if cfg.add_eos:
            if last_trainable_end and ids[last_trainable_end - 1] == eos_id:
                eos_state = "present"
            else:
                # after the completion (or the last assistant turn: earlier turns must look exactly as the
                # template renders them at generation time)
                ids.insert(last_trainable_end, eos_id)
                flags.insert(last_trainable_end, True)
                eos_state = "appended"
        double_bos = bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id
        if double_bos:
            del ids[0], flags[0]
        # a completion token can be learned only from position 1 on, and only if it fits in max_length
        first_target = next((t for t in range(1, len(ids)) if flags[t]), None)
        if first_target is None or first_target >= cfg.max_length:
            _drop(report, PROMPT_TOO_LONG, row)
            continue
        if cfg.train_on_prompt:
            flags = [True] * len(ids)
        if len(ids) > cfg.max_length:
            if cfg.truncation == "drop":
                _drop(report, TOO_LONG, row)
                continue
            ids, flags = ids[: cfg.max_length], flags[: cfg.max_length]
            report.n_truncated += 1
            if len(report.truncated_rows) < _SHOW_ROWS:
                report.truncated_rows.append(row)
        labels = [ids[t + 1] if flags[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
        targets = [x for x in labels if x != IGNORE]
        if eos_id is not None and targets and targets[-1] == eos_id:
            report.eos_is_target += 1
        else:
            report.missing_eos += 1
            if len(report.missing_eos_rows) < _SHOW_ROWS:
                report.missing_eos_rows.append(row)
        report.eos_appended += eos_state == "appended"
        report.eos_already_present += eos_state == "present"
        report.double_bos += double_bos
        if eos_state == "appended" and template.format == "chat":
            end_of_turn_is_eos = False
        report.n_tokens += len(ids)
        report.n_loss_tokens += len(targets)
        report.max_tokens = max(report.max_tokens, len(ids))
        examples.append({"input_ids": ids, "labels": labels, "row": row})

    report.n_examples = len(examples)
    if template.format == "chat" and not end_of_turn_is_eos:
        report.end_of_turn = template.end_of_turn()
    if not examples:
        reasons = ", ".join(f"{n} {r}" for r, n in report.dropped.items()) or "no records"
        fix = (
            "raise data.max_length"
            if PROMPT_TOO_LONG in report.dropped or TOO_LONG in report.dropped
            else "check the completion column"
        )
        raise LmlabError(f"{where}: no {what} left after tokenization ({reasons}); {fix}")
    return examples, report


def check_columns(
    records: Sequence[Mapping[str, Any]], template: PromptTemplate, *, source: str | None = None
) -> None:
    """Every column the template needs is in every record; chat roles are known. Reports all problems at once."""
    where = source or "the data"
    if not records:
        raise LmlabError(f"{where}: no records to build SFT examples from")
    present = Counter(k for r in records for k in r)
    available = ", ".join(present) or "none"
    problems = []
    for name in template.required_columns():
        col = template.column(name)
        missing = [i for i, r in enumerate(records) if r.get(col) is None]
        if not missing:
            continue
        mapped = f" (mapped from template name '{name}')" if col != name else ""
        if len(missing) == len(records):
            if template.format == "prompt_completion" and name != template.completion_column:
                problems.append(
                    f"data.prompt_template: placeholder {{{name}}} is not a column of {where} (columns: {available}); "
                    f"use one of those names or map it with data.columns: {{{name}: <column>}}"
                )
            else:
                problems.append(
                    f"{where}: column '{col}'{mapped} not found (columns: {available}); the {template.format} template "
                    f"needs it: rename the column or map it with data.columns: {{{name}: <column>}}"
                )
        else:
            problems.append(
                f"{where}: column '{col}'{mapped} is missing or null in {len(missing)} of {len(records)} rows "
                f"(first: row {missing[0]}); fill it or filter those rows out"
            )
    if not problems and template.format == "chat":
        problems += _check_roles(records, template, where)
    if problems:
        raise LmlabError("\n".join(problems))


def special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before text when add_special_tokens=True (e.g. [BOS] for Llama, [] for GPT-2)."""
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k : k + len(plain)] == plain:
            return with_special[:k]
    return []


def encode_prompt(
    template: PromptTemplate,
    tokenizer: Any,
    record_or_messages: Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> list[int]:
    """Token ids of the generation prompt for a record (or chat messages), tokenized exactly as in training."""
    text = template.render_for_generation(record_or_messages)
    prefix = [] if template.format == "chat" else special_prefix(tokenizer)
    ids = prefix + _encode(tokenizer, [text])[0]
    bos_id = tokenizer.bos_token_id
    if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        del ids[0]
    return ids


def mask_segments(example: Mapping[str, Any], tokenizer: Any) -> list[tuple[str, bool]]:
    """The example's text as (text, loss_bearing) runs, for `data preview`: token t bears loss when
    labels[t-1] is not -100."""
    ids, labels = example["input_ids"], example["labels"]
    bearing = [False] + [lab != IGNORE for lab in labels[:-1]]
    runs: list[tuple[str, bool]] = []
    start = 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or bearing[t] != bearing[start]:
            runs.append((tokenizer.decode(ids[start:t], skip_special_tokens=False), bearing[start]))
            start = t
    return runs


def show_mask(
    example: Mapping[str, Any], tokenizer: Any, open_mark: str = "[[", close_mark: str = "]]"
) -> str:
    """Plain-text preview: loss-bearing runs wrapped in [[...]]."""
    return "".join(
        f"{open_mark}{text}{close_mark}" if bearing else text
        for text, bearing in mask_segments(example, tokenizer)
    )


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad, else EOS (safe: padding is masked by position), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


# ------------------------------------------------------------------------------------------- helpers
def _drop(report: PreflightReport, reason: str, row: int) -> None:
    report.dropped[reason] = report.dropped.get(reason, 0) + 1
    rows = report.dropped_rows.setdefault(reason, [])
    if len(rows) < _SHOW_ROWS:
        rows.append(row)


def _rows(rows: list[int], total: int) -> str:
    shown = ", ".join(map(str, rows))
    return shown + (", …" if total > len(rows) else "")


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _encode_continuation(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Encode text that continues a sequence. SentencePiece tokenizers add a prefix space ('▁') at the start of
    every call; encoding after a newline and removing it avoids that (transformers does the same for chats)."""
    if not texts:
        return []
    newline = tokenizer.encode("\n", add_special_tokens=False)
    with_newline = _encode(tokenizer, ["\n" + t for t in texts])
    out, redo = [], []
    for i, ids in enumerate(with_newline):
        if ids[: len(newline)] == newline:
            out.append(ids[len(newline) :])
        else:
            out.append([])
            redo.append(i)
    for i, ids in zip(redo, _encode(tokenizer, [texts[i] for i in redo]), strict=True):
        out[i] = ids
    return out


def _check_roles(records: Sequence[Mapping[str, Any]], template: PromptTemplate, where: str) -> list[str]:
    col = template.column(template.messages_column)
    unknown: Counter[str] = Counter()
    first_row: dict[str, int] = {}
    for i, r in enumerate(records):
        messages = r.get(col)
        if not isinstance(messages, list):
            continue  # strings (JSON in csv) and malformed values are reported by template.messages per row
        for m in messages:
            role = m.get("role") if isinstance(m, Mapping) else None
            if role is not None and role not in CHAT_ROLES:
                unknown[role] += 1
                first_row.setdefault(role, i)
    return [
        f"{where}: column '{col}' has unknown chat role '{role}' in {n} messages (first: row {first_row[role]}); "
        f"roles must be one of {', '.join(CHAT_ROLES)}: rename it in the data"
        for role, n in unknown.items()
    ]

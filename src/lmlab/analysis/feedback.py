"""What the feedback log (lmlab.workspace.feedback) adds up to: a preference data set (`lmlab feedback export`) and
win rates per pair of models (`lmlab feedback summary`).

A preference row is one verdict's winner against one other answer to the same conversation:
{"prompt", "chosen", "rejected"} (what the pair classifier's chosen_rejected labels and preference training read),
plus "messages" (the whole conversation, for trainers that want chat turns) and where each answer came from.
"prompt" is the conversation as one prompt item: the last user message after the system message(s) and a blank
line, the way `lmlab serve` prompts a run whose template is not chat. Ties, all-bad verdicts and thumbs carry no
chosen / rejected pair and are left out, counted; so are answers that continued different conversations (in a
multi-turn chat each model sees its own earlier answers), since their prompts differ."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.data.templates import last_user_prompt
from lmlab.workspace.feedback import RatedAnswer, Rating, read_ratings


@dataclass
class Export:
    rows: list[dict[str, Any]]
    verdicts: int = 0  # ratings comparing answers (thumbs are not verdicts)
    left_out: Counter = field(default_factory=Counter)  # reason -> verdicts (or pairs) left out

    def left_out_line(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in self.left_out.items() if n) or "none"


def preference_rows(ratings: list[Rating]) -> Export:
    out = Export([])
    for r in ratings:
        if r.verdict in ("up", "down"):
            continue
        out.verdicts += 1
        if r.verdict != "better":
            out.left_out["ties" if r.verdict == "tie" else "all bad"] += 1
            continue
        chosen = r.answers[r.winner]
        for i, rejected in enumerate(r.answers):
            if i == r.winner:
                continue
            if rejected.messages != chosen.messages:
                out.left_out["pairs whose answers continued different conversations"] += 1
                continue
            out.rows.append(preference_row(r, chosen, rejected))
    return out


def preference_row(r: Rating, chosen: RatedAnswer, rejected: RatedAnswer) -> dict[str, Any]:
    messages = [m.model_dump() for m in chosen.messages]
    return {"prompt": last_user_prompt(messages), "chosen": chosen.answer, "rejected": rejected.answer,
            "messages": messages, "chosen_model": chosen.label, "rejected_model": rejected.label,
            "chosen_run_id": chosen.run_id, "rejected_run_id": rejected.run_id, "rater": r.rater, "time": r.time,
            "note": r.note}


def export_preferences(log: str | Path, out: str | Path) -> Export:
    """Write the log's preference rows to `out` (JSONL, overwritten) and return what was written and left out."""
    result = preference_rows(read_ratings(log))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in result.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return result


# ------------------------------------------------------------------------------------------ summary
@dataclass
class PairRecord:
    """Verdicts between two models (a before b in name order)."""

    a: str
    b: str
    a_wins: int = 0
    b_wins: int = 0
    ties: int = 0
    all_bad: int = 0

    @property
    def verdicts(self) -> int:
        return self.a_wins + self.b_wins + self.ties + self.all_bad

    @property
    def a_win_rate(self) -> float | None:
        """(a's wins + half the ties) / decided-or-tied verdicts; all-bad verdicts say nothing about the order."""
        n = self.a_wins + self.b_wins + self.ties
        return (self.a_wins + self.ties / 2) / n if n else None


@dataclass
class ModelRecord:
    model: str
    up: int = 0
    down: int = 0
    wins: int = 0
    losses: int = 0


@dataclass
class Summary:
    pairs: list[PairRecord]
    models: list[ModelRecord]
    ratings: int


def summarize(ratings: list[Rating]) -> Summary:
    """Win rates per model pair and each model's tallies. A verdict over three answers counts for every pair it
    decides: the winner beat each of the others; a tie or all-bad is one for each pair."""
    pairs: dict[tuple[str, str], PairRecord] = {}
    models: dict[str, ModelRecord] = {}

    def model(name: str) -> ModelRecord:
        return models.setdefault(name, ModelRecord(name))

    def pair(x: str, y: str) -> PairRecord:
        a, b = sorted((x, y))
        return pairs.setdefault((a, b), PairRecord(a, b))

    for r in ratings:
        labels = [a.label for a in r.answers]
        if r.verdict in ("up", "down"):
            setattr(model(labels[0]), r.verdict, getattr(model(labels[0]), r.verdict) + 1)
            continue
        for i, x in enumerate(labels):
            if r.verdict == "better":
                model(x).wins += i == r.winner
                model(x).losses += i != r.winner
            else:
                model(x)
            for y in labels[i + 1:]:
                if x == y:  # one model in two columns: no pair to decide
                    continue
                p = pair(x, y)
                if r.verdict == "tie":
                    p.ties += 1
                elif r.verdict == "all_bad":
                    p.all_bad += 1
                elif labels[r.winner] == p.a:
                    p.a_wins += 1
                elif labels[r.winner] == p.b:
                    p.b_wins += 1  # else: the winner was a third answer; it says nothing about x against y
    return Summary(sorted(pairs.values(), key=lambda p: (p.a, p.b)), sorted(models.values(), key=lambda m: m.model),
                   len(ratings))

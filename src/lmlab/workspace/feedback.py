"""The workspace's feedback log: what people said about generated answers (`lmlab playground`), one JSON object per
line in <workspace>/feedback.jsonl, appended and never rewritten; and the per-run counts in the ledger
(feedback/up, feedback/down, feedback/wins, feedback/losses) that `lmlab compare` shows.

A rating is a thumb on one answer (up / down) or a verdict on two or three answers to the same turn (better: the
`winner`'th answer beat the others; tie; all_bad). Every rating keeps who gave it, when, the sampling settings,
each answer's model (run id, checkpoint step) and the conversation it answered."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmlab.errors import LmlabError
from lmlab.recipe.describe import unfold
from lmlab.workspace.layout import FEEDBACK_FILE
from lmlab.workspace.ledger import client

THUMBS = ("up", "down")
Verdict = Literal["up", "down", "better", "tie", "all_bad"]
COUNTS = ("feedback/up", "feedback/down", "feedback/wins", "feedback/losses")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class RatedAnswer(BaseModel):
    """One answer as it was rated, and where it came from."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The model id the page showed: run name and id prefix, or a folder / file name")
    run_id: str | None = Field(None, description="The ledger run, when the model is an lmlab run")
    step: int | None = Field(None, description="The checkpoint's training step")
    checkpoint: str | None = Field(None, description="The checkpoint folder or GGUF file it was loaded from")
    messages: list[Message] = Field(min_length=1, description="The conversation it answered (up to a user turn)")
    answer: str
    tokens: int | None = Field(None, ge=0, description="Generated tokens, EOS / stop tokens included")
    finish: Literal["eos", "stop_string", "length"] | None = Field(None, description="What ended the answer")

    @property
    def label(self) -> str:
        """How summaries name it: the model id, and the step when known (two checkpoints of one run differ)."""
        return f"{self.model}@{self.step}" if self.step is not None else self.model


class Rating(BaseModel):
    """One line of the feedback log."""

    model_config = ConfigDict(extra="forbid")

    time: str = Field(description="UTC, ISO 8601")
    rater: str = Field(min_length=1)
    verdict: Verdict = Field(description="up / down: a thumb on answers[0]; better: answers[winner] beat the "
                             "others; tie; all_bad")
    winner: int | None = Field(None, ge=0)
    note: str = ""
    sampling: dict[str, Any] = Field(default_factory=dict)
    answers: list[RatedAnswer] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> Rating:
        n = len(self.answers)
        if self.verdict in THUMBS and n != 1:
            raise ValueError(f"answers: a thumb ({self.verdict}) rates one answer (got {n})")
        if self.verdict not in THUMBS and n < 2:
            raise ValueError(f"answers: a verdict ({self.verdict}) compares two or more answers (got {n})")
        if (self.verdict == "better") != (self.winner is not None):
            raise ValueError("winner: give the winning answer's index exactly when the verdict is 'better'")
        if self.winner is not None and self.winner >= n:
            raise ValueError(f"winner: {self.winner} is not an answer's index (0 … {n - 1})")
        return self

    def counts(self) -> list[tuple[int, str]]:
        """(index of an answer, the ledger count this rating adds one to for it); ties and all-bad add nothing."""
        if self.verdict in THUMBS:
            return [(0, f"feedback/{self.verdict}")]
        if self.verdict == "better":
            return [(i, "feedback/wins" if i == self.winner else "feedback/losses") for i in range(len(self.answers))]
        return []


def feedback_path(workspace: str | Path) -> Path:
    return Path(workspace) / FEEDBACK_FILE


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


_append_lock = threading.Lock()


def append_rating(path: str | Path, rating: Rating) -> None:
    """Add one line to the log (the folder is created). One write per line under a lock, so lines never mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(rating.model_dump(mode="json"), ensure_ascii=False) + "\n"
    with _append_lock, open(path, "a", encoding="utf-8") as f:
        f.write(line)


def read_ratings(path: str | Path) -> list[Rating]:
    """Every rating in the log, in order. A missing file or a line that is not a rating is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"{path}: no feedback log; rate answers in `lmlab playground` first (or give --log FILE)")
    ratings = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ratings.append(Rating.model_validate_json(line))
            except ValidationError as e:
                raise LmlabError(f"{path}: line {number}: {problem(e)}; fix or delete that line") from None
    return ratings


def problem(e: ValidationError) -> str:
    """A rating's first validation error as 'answers[0].answer: Field required' ('not JSON (...)' for bad JSON)."""
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return f"not JSON ({err.get('ctx', {}).get('error', err['msg'])})"
    loc, _, msg = unfold(err)
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return f"{where or 'rating'}: {msg}"


def add_counts(uri: str, run_id: str, keys: list[str]) -> dict[str, float]:
    """Add one to each of `keys` (feedback/...) in a ledger run; returns the run's new counts. The metric's step is
    the count itself, so its history reads as a tally and its latest value is the total."""
    from mlflow.entities import Metric

    c = client(uri)
    current = c.get_run(run_id).data.metrics
    totals = {k: current.get(k, 0.0) for k in COUNTS}
    for key in keys:
        totals[key] += 1
    stamp = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, totals[k], stamp, int(totals[k])) for k in dict.fromkeys(keys)])
    return totals

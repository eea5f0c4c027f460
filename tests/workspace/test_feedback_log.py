"""The feedback log: ratings appended as JSON lines and read back; every malformed line is one error naming the file,
the line and the field; counts added to a ledger run."""

from __future__ import annotations

import json

import pytest

from lmlab.errors import LmlabError
from lmlab.workspace.feedback import Rating, add_counts, append_rating, feedback_path, read_ratings


def answer(text: str, model: str = "m1", **over) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "answer": text, **over}


def rating(**over) -> dict:
    return {"time": "2025-01-01T00:00:00Z", "rater": "ann", "verdict": "better", "winner": 1,
            "answers": [answer("Red.", "m1"), answer("Blue.", "m2")], **over}


def test_ratings_round_trip_in_order(tmp_path):
    log = feedback_path(tmp_path / "ws")
    first, second = Rating(**rating()), Rating(**rating(verdict="up", winner=None, answers=[answer("Red.")]))
    append_rating(log, first)
    append_rating(log, second)
    assert log == tmp_path / "ws" / "feedback.jsonl" and len(log.read_text().splitlines()) == 2
    assert read_ratings(log) == [first, second]
    assert first.counts() == [(0, "feedback/losses"), (1, "feedback/wins")] and second.counts() == [(0, "feedback/up")]
    assert Rating(**rating(verdict="tie", winner=None)).counts() == []


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not JSON (key must be a string"),
    ("[1, 2]", "rating: Input should be an object"),
    (json.dumps(rating(rater="")), "rater: String should have at least 1 character"),
    (json.dumps(rating(winner=None)), "winner: give the winning answer's index exactly when the verdict is 'better'"),
    (json.dumps(rating(winner=2)), "winner: 2 is not an answer's index (0 … 1)"),
    (json.dumps(rating(verdict="down", winner=None)), "answers: a thumb (down) rates one answer (got 2)"),
    (json.dumps(rating(answers=[answer("x"), {"model": "m2", "messages": [], "answer": "y"}])),
     "answers[1].messages: List should have at least 1 item after validation, not 0"),
    (json.dumps(rating(answers=[answer("x"), answer("y", finish="tired")])),
     "answers[1].finish: Input should be 'eos', 'stop_string' or 'length'"),
])
def test_a_bad_line_is_one_error_naming_file_line_and_field(tmp_path, line, problem):
    log = tmp_path / "feedback.jsonl"
    log.write_text(json.dumps(rating()) + "\n\n" + line + "\n")
    with pytest.raises(LmlabError) as e:
        read_ratings(log)
    assert str(e.value).startswith(f"{log}: line 3: {problem}") and str(e.value).endswith("fix or delete that line")


def test_a_missing_log_says_how_to_make_one(tmp_path):
    with pytest.raises(LmlabError, match=r"feedback.jsonl: no feedback log; rate answers in `lmlab playground` first"):
        read_ratings(tmp_path / "feedback.jsonl")


def test_counts_add_up_in_the_ledger_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("x", artifact_location=tmp_path.as_uri())).info.run_id
    add_counts(uri, run_id, ["feedback/wins"])
    totals = add_counts(uri, run_id, ["feedback/wins", "feedback/up"])
    assert totals == {"feedback/up": 1.0, "feedback/down": 0.0, "feedback/wins": 2.0, "feedback/losses": 0.0}
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "feedback/wins")] == [(1, 1.0), (2, 2.0)]
    assert {k: v for k, v in c.get_run(run_id).data.metrics.items()} == {"feedback/wins": 2.0, "feedback/up": 1.0}

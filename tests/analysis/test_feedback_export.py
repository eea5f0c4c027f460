"""Feedback log → preference rows (ties, all-bad verdicts and diverged conversations left out, counted) and win rates
per model pair, on a hand-written log whose every number can be counted by eye."""

from __future__ import annotations

import json

from lmlab.analysis.feedback import export_preferences, preference_rows, summarize
from lmlab.workspace.feedback import Rating, append_rating

Q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def ans(model: str, text: str, messages=Q, step=None) -> dict:
    return {"model": model, "step": step, "messages": messages, "answer": text}


def rating(verdict: str, *answers: dict, winner=None, note="") -> Rating:
    return Rating(time="2025-01-01T00:00:00Z", rater="ann", verdict=verdict, winner=winner, note=note,
                  answers=list(answers))


LOG = [
    rating("better", ans("a", "Red."), ans("b", "The sky is blue and ..."), winner=0, note="b rambles"),
    rating("better", ans("a", "Red!"), ans("b", "Blue."), winner=1),
    rating("tie", ans("a", "Red."), ans("b", "Red.")),
    rating("all_bad", ans("a", ""), ans("b", "...")),
    rating("up", ans("a", "Red.")),
    rating("down", ans("b", "...")),
    # three columns: c wins over a and over b; a against b is not decided by it
    rating("better", ans("a", "Red."), ans("b", "Blue."), ans("c", "Green."), winner=2),
    # a second turn: each model saw its own first answer, so the prompts differ and no pair can be made
    rating("better", ans("a", "Teal.", Q + [{"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}]),
           ans("b", "Navy.", Q + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]),
           winner=0),
]


def test_preference_rows_pair_each_winner_with_each_loser_on_one_prompt():
    out = preference_rows(LOG)
    assert out.verdicts == 6
    assert [(r["prompt"], r["chosen"], r["rejected"], r["chosen_model"], r["rejected_model"]) for r in out.rows] == [
        ("Be brief.\n\nName a colour.", "Red.", "The sky is blue and ...", "a", "b"),
        ("Be brief.\n\nName a colour.", "Blue.", "Red!", "b", "a"),
        ("Be brief.\n\nName a colour.", "Green.", "Red.", "c", "a"),
        ("Be brief.\n\nName a colour.", "Green.", "Blue.", "c", "b"),
    ]
    assert out.rows[0]["messages"] == Q and out.rows[0]["note"] == "b rambles" and out.rows[0]["rater"] == "ann"
    assert out.left_out_line() == "1 ties, 1 all bad, 1 pairs whose answers continued different conversations"


def test_export_writes_jsonl_and_a_step_tells_checkpoints_apart(tmp_path):
    log = tmp_path / "feedback.jsonl"
    append_rating(log, rating("better", ans("run-1", "x", step=100), ans("run-1", "y", step=200), winner=1))
    out = export_preferences(log, tmp_path / "sub" / "prefs.jsonl")
    (row,) = [json.loads(line) for line in (tmp_path / "sub" / "prefs.jsonl").read_text().splitlines()]
    assert (row["chosen"], row["rejected"], row["chosen_model"], row["rejected_model"]) == (
        "y", "x", "run-1@200", "run-1@100")
    assert out.left_out_line() == "none"


def test_summary_counts_wins_ties_and_thumbs_per_pair_and_model():
    s = summarize(LOG)
    assert s.ratings == 8
    got = {(p.a, p.b): (p.a_wins, p.b_wins, p.ties, p.all_bad, p.a_win_rate) for p in s.pairs}
    # a-b: a won twice (first and last verdicts), b once, one tie (half a win each) and one all-bad (not rated)
    assert got == {("a", "b"): (2, 1, 1, 1, 2.5 / 4), ("a", "c"): (0, 1, 0, 0, 0.0), ("b", "c"): (0, 1, 0, 0, 0.0)}
    assert {m.model: (m.up, m.down, m.wins, m.losses) for m in s.models} == {
        "a": (1, 0, 2, 2), "b": (0, 1, 1, 3), "c": (0, 0, 1, 0)}

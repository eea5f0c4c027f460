"""pair_classify data: label formats, JSON turns, bad rows, token budgets and the baselines (no model needed)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lmlab.data.pairs import A_WINS, B_WINS, TIE, records_to_pairs, split_shared_prefix
from lmlab.errors import LmlabError
from lmlab.recipe.pair import PairConfig
from lmlab.tasks.pairs.encode import allocate
from lmlab.tasks.pairs.metrics import Baselines, classification_metrics

SRC = "arena.csv"


def convert(records, **cfg):
    return records_to_pairs(records, PairConfig(**cfg), seed=0, source=SRC)


def arena_row(prompt, a, b, winner):
    onehot = {"a": (1, 0, 0), "b": (0, 1, 0), "tie": (0, 0, 1)}[winner]
    return {"id": "1", "model_a": "m1", "model_b": "m2", "prompt": json.dumps(prompt), "response_a": json.dumps(a),
            "response_b": json.dumps(b), "winner_model_a": str(onehot[0]), "winner_model_b": str(onehot[1]),
            "winner_tie": str(onehot[2])}


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_arena_csv_one_hot_labels_and_json_turns_decoded_and_joined(tmp_path):
    from lmlab.data.sources import read_file

    rows = [arena_row(["Hi", "And 2+2?"], ["Hello!", "4"], ["Hey", None], "a"),
            arena_row(["Name a color"], ["Red"], ["Blue"], "tie"),
            arena_row(["Say \"ok\" ü"], ["ok"], ["no"], "b")]
    records = read_file(write_csv(tmp_path / "arena.csv", rows))  # strings, as a CSV reader gives them
    pairs, report = convert(records, json_lists=True)
    assert report.label_source == "one_hot"
    assert [p.label for p in pairs] == [A_WINS, TIE, B_WINS]
    assert pairs[0].prompt == "Hi\n\nAnd 2+2?" and pairs[0].a == "Hello!\n\n4" and pairs[0].b == "Hey"
    assert pairs[2].prompt == 'Say "ok" ü'
    assert report.null_turns == 1 and report.labels == {"a": 1, "b": 1, "tie": 1}


def test_winner_column_accepts_documented_values():
    recs = [{"prompt": "p", "response_a": "x", "response_b": "y", "winner": w}
            for w in ["a", "B", "tie", "model_a", "model_b", "tie (bothbad)"]]
    pairs, report = convert(recs)
    assert report.label_source == "winner"
    assert [p.label for p in pairs] == [A_WINS, B_WINS, TIE, A_WINS, B_WINS, TIE]


def test_label_values_outside_the_set_are_counted_with_examples():
    recs = [{"prompt": "p", "response_a": "x", "response_b": "y", "winner": w} for w in ["a", "left", "b", "", "c"]]
    with pytest.raises(LmlabError) as e:
        convert(recs)
    msg = str(e.value)
    assert msg.startswith("arena.csv: column 'winner' has values outside {a, model_a, b, model_b, tie, tie (bothbad)}")
    assert "3 of 5 records" in msg and "record 2: 'left'" in msg and "record 4: ''" in msg


def test_one_hot_rows_need_exactly_one_one():
    recs = [arena_row(["p"], ["x"], ["y"], "a"), {**arena_row(["p"], ["x"], ["y"], "a"), "winner_tie": "1"}]
    with pytest.raises(LmlabError, match=r"exactly one 1 per row.*1 of 2 records.*record 2"):
        convert(recs, json_lists=True)


def test_missing_columns_name_the_field_that_sets_them():
    recs = [{"question": "p", "response_a": "x", "answer_b": "y", "winner": "a"}]
    with pytest.raises(LmlabError) as e:
        convert(recs)
    assert str(e.value) == ("arena.csv: no column 'prompt' (set pair.prompt_columns); no column 'response_b' "
                            "(set pair.response_b_column); the data has columns: question, response_a, answer_b, winner")


def test_no_label_columns_at_all_is_explained():
    with pytest.raises(LmlabError, match="cannot find labels: no column 'winner'.*set pair.labels"):
        convert([{"prompt": "p", "response_a": "x", "response_b": "y"}])


def test_text_that_is_not_a_json_list_errors_or_is_dropped_and_counted():
    recs = [arena_row(["p"], ["x"], ["y"], "a"), {**arena_row(["p"], ["x"], ["y"], "b"), "response_b": "plain text"},
            {**arena_row(["p"], ["x"], ["y"], "b"), "prompt": '{"not": "a list"}'}]
    with pytest.raises(LmlabError) as e:
        convert(recs, json_lists=True)
    assert "column 'response_b' is not a JSON list of turns" in str(e.value) and "record 2: 'plain text'" in str(e.value)
    assert "column 'prompt' is not a JSON list" in str(e.value)  # every kind of problem, at once
    pairs, report = convert(recs, json_lists=True, invalid_json="drop")
    assert len(pairs) == 1 and report.invalid_json_dropped == 2


def test_chosen_rejected_get_a_seeded_order_that_does_not_depend_on_the_split():
    recs = [{"instruction": f"q{i}", "input": "" if i % 2 else "ctx", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(400)]
    pairs, report = convert(recs, prompt_columns=["instruction", "input"])
    assert report.label_source == "chosen_rejected"
    for p in pairs:  # the chosen response is the winner wherever it was put
        assert (p.a if p.label == A_WINS else p.b).startswith("good")
    assert 160 < report.chosen_as_a < 240  # a fair coin
    assert pairs[0].prompt == "q0\n\nctx" and pairs[1].prompt == "q1"
    again, _ = records_to_pairs(recs[200:], PairConfig(prompt_columns=["instruction", "input"]), seed=0, source=SRC)
    assert [p.label for p in again] == [p.label for p in pairs[200:]]
    other, _ = records_to_pairs(recs, PairConfig(prompt_columns=["instruction", "input"]), seed=1, source=SRC)
    assert [p.label for p in other] != [p.label for p in pairs]


def test_shared_transcript_start_moves_into_the_prompt():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: Sure, here is how."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: Surely not."
    shared, a, b = split_shared_prefix(chosen, rejected, "\n\nAssistant:")
    assert shared.endswith("help?\n\nAssistant:") and a == " Sure, here is how." and b == " Surely not."
    pairs, report = convert([{"chosen": chosen, "rejected": rejected}], prompt_columns=[],
                            shared_prefix_marker="\n\nAssistant:")
    assert report.prefix_moved == 1 and pairs[0].prompt.startswith("Human: hi") and {pairs[0].a, pairs[0].b} == {
        "Sure, here is how.", "Surely not."}


def test_empty_responses_follow_the_documented_rule():
    recs = [{"prompt": "p", "response_a": "x", "response_b": "  ", "winner": "a"},
            {"prompt": "p", "response_a": "x", "response_b": "y", "winner": "b"}]
    pairs, report = convert(recs)
    assert len(pairs) == 2 and report.empty_responses == 1
    pairs, report = convert(recs, empty_responses="drop")
    assert len(pairs) == 1 and report.empty_dropped == 1
    with pytest.raises(LmlabError, match=r"column 'response_b' is empty .*1 of 2 records \(e.g. record 1"):
        convert(recs, empty_responses="error")


def test_identical_responses_are_counted_and_can_be_dropped():
    recs = [{"prompt": "p", "response_a": "same ", "response_b": "same", "winner": "tie"},
            {"prompt": "p", "response_a": "x", "response_b": "y", "winner": "b"}]
    pairs, report = convert(recs)
    assert report.identical == 1 and pairs[0].identical and not pairs[1].identical
    pairs, report = convert(recs, identical_responses="drop")
    assert len(pairs) == 1 and report.identical_dropped == 1


def test_pair_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="identical_probs: P\\(A\\) and P\\(B\\) must be equal"):
        PairConfig(identical_probs=(0.5, 0.3, 0.2))
    with pytest.raises(ValueError, match="one_hot_columns: needs three different columns"):
        PairConfig(one_hot_columns=("w", "w", "t"))


def test_budget_fills_unused_share_and_treats_a_and_b_alike():
    w = (0.2, 0.4, 0.4)
    assert allocate((10, 500, 500), w, 100) == [10, 45, 45]  # short prompt's share goes to the responses
    assert allocate((500, 500, 500), w, 100) == [20, 40, 40]
    assert allocate((500, 30, 500), w, 100) == [23, 30, 46]
    assert allocate((5, 6, 7), w, 100) == [5, 6, 7]
    for lengths in [(50, 70, 300), (0, 90, 13), (1000, 3, 999)]:
        p, a, b = allocate(lengths, w, 97)
        p2, b2, a2 = allocate((lengths[0], lengths[2], lengths[1]), w, 97)
        assert (p, a, b) == (p2, a2, b2) and p + a + b <= 97


def test_metrics_and_baselines_on_a_small_example():
    labels = np.array([0, 1, 2, 0])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.0, 1.0, 0.0]])
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == 0.5
    expected = -(np.log(0.7) + np.log(0.8) + np.log(0.2) + np.log(1e-15)) / 4
    assert m["log_loss"] == pytest.approx(expected, rel=1e-6)
    assert m["recall_a"] == 0.5 and m["recall_b"] == 1.0 and m["recall_tie"] == 0.0
    assert m["confusion_a_as_b"] == 1 and m["confusion_tie_as_a"] == 1
    # training split: A longer in 3 pairs and won 2 of them; one equal-length tie
    base = Baselines.fit(labels=[0, 0, 1, 2], a_chars=[10, 9, 8, 5], b_chars=[1, 2, 3, 5])
    assert base.prior.tolist() == pytest.approx([3 / 7, 2 / 7, 2 / 7])
    assert base.longer.tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6]) and base.equal_tie == pytest.approx(2 / 3)
    s = base.scores(np.array([0, 0]), np.array([3, 3]), np.array([1, 9]))  # A longer and won; B longer and lost
    assert s["baseline_longer_accuracy"] == 0.5 and s["baseline_majority_accuracy"] == 1.0
    assert s["baseline_longer_log_loss"] == pytest.approx(-(np.log(3 / 6) + np.log(2 / 6)) / 2)
    assert s["baseline_majority_log_loss"] == pytest.approx(-np.log(3 / 7))


def test_check_before_splitting_names_records_in_file_order():
    from types import SimpleNamespace

    from lmlab.data.pairs import check_pair_records

    recipe = SimpleNamespace(data=SimpleNamespace(path="prefs.jsonl", hf_dataset=None), run=SimpleNamespace(seed=0),
                             pair=PairConfig(prompt_columns=[]))
    recs = [{"response_a": "x", "response_b": "y", "winner": w} for w in ["a", "b", "tie", "A wins"]]
    with pytest.raises(LmlabError, match=r"^prefs.jsonl: column 'winner' .* 1 of 4 records \(e.g. record 4: 'A wins'\)$"):
        check_pair_records(recipe, recs)
    assert check_pair_records(recipe, recs[:3]).labels == {"a": 1, "b": 1, "tie": 1}

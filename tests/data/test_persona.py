"""Synthetic-Persona-Chat loading: the real shared files, and crafted rows for every repair and problem."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers.recipes import DATA as SHARED_DATA  # noqa: E402

from lmlab.data.filters import apply_filters
from lmlab.data.persona import PersonaChatReport, load_persona_chat, parse_turns
from lmlab.errors import LmlabError

DATA = SHARED_DATA / "synthetic_persona_chat"
VALID = DATA / "Synthetic-Persona-Chat_valid.csv"
TEST = DATA / "Synthetic-Persona-Chat_test.csv"
needs_data = pytest.mark.skipif(not VALID.is_file(), reason=f"shared data set not found at {DATA}")

VALID_ROW0_PERSONA_2 = ("I am a boy.\nI can move objects with my mind.\nI had to have a transplant.\n"
                        "I was born with my heart outside my body.")
VALID_ROW0_PERSONA_1 = ("I love to bake cookies.\nI have a dogs.\nThe county wide bake sale is where i feel most "
                        "at home.\nKnitting is my passion.")


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user 1 personas", "user 2 personas", "Best Generated Conversation"])
        writer.writerows(rows)
    return path


def roles(record: dict) -> list[str]:
    return [m["role"] for m in record["messages"]]


# ------------------------------------------------------------------------------------ the real files
@needs_data
def test_valid_split_row_0_becomes_a_persona_chat():
    records, report = load_persona_chat(VALID)
    assert (report.rows, report.conversations, report.skipped) == (1000, 999, 1)
    assert report.malformed == {"text before the first 'User N:' turn": ["Synthetic-Persona-Chat_valid.csv:483"]}
    first = records[0]
    assert first["id"] == "Synthetic-Persona-Chat_valid.csv:0"
    assert first["messages"][:4] == [
        {"role": "system", "content": VALID_ROW0_PERSONA_2},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is your favorite thing to do?"},
    ]
    assert len(first["messages"]) == 26  # system + 25 turns


@needs_data
def test_folder_reads_both_splits_and_every_conversation_alternates_roles():
    records, report = load_persona_chat(DATA)
    assert [Path(f).name for f in report.files] == ["Synthetic-Persona-Chat_test.csv", "Synthetic-Persona-Chat_valid.csv"]
    assert (report.rows, report.conversations, len(records)) == (1968, 1965, 1965)
    assert report.malformed == {
        "no 'User N:' turns": ["Synthetic-Persona-Chat_test.csv:320"],
        "empty conversation": ["Synthetic-Persona-Chat_test.csv:510"],
        "text before the first 'User N:' turn": ["Synthetic-Persona-Chat_valid.csv:483"],
    }
    assert (report.merged_turns, report.continuation_lines, report.separator_lines, report.decorated_prefixes) \
        == (70, 136, 29, 99)
    for record in records:
        r = roles(record)
        assert r[0] == "system" and r[1] == "user", record["id"]
        assert all(a != b for a, b in zip(r[1:], r[2:], strict=False)), record["id"]
        assert all(m["content"] and m["content"] == m["content"].strip() for m in record["messages"])
    first_test = records[0]
    assert first_test["id"] == "Synthetic-Persona-Chat_test.csv:0"
    assert first_test["messages"][1] == {"role": "user", "content": "Hi, I'm [User 1's name]. What's your name?"}


@needs_data
def test_assistant_can_be_user_1_and_persona_can_be_both_or_none():
    records, _ = load_persona_chat(VALID, assistant="User 1", persona="both")
    assert records[0]["messages"][:3] == [
        {"role": "system", "content": f"Your persona:\n{VALID_ROW0_PERSONA_1}\n\n"
                                      f"The user's persona:\n{VALID_ROW0_PERSONA_2}"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Hello!"},
    ]
    records, _ = load_persona_chat(VALID, persona="none")
    assert roles(records[0])[:3] == ["user", "assistant", "user"]


@needs_data
def test_loaded_chats_go_through_the_filters():
    records, _ = load_persona_chat(VALID)
    specs = [{"kind": "balanced_markup", "field": "messages"},
             {"kind": "median_length_drop", "field": "messages.assistant", "lo": 5, "hi": 15, "seed": 0}]
    kept, report = apply_filters(records, specs, seed=0)
    assert report.funnel == [("input", 999), ("balanced_markup(messages)", 999),
                             ("median_length_drop(messages.assistant)", 343)]
    assert report.steps[1].reasons == {"median in (5, 15) words, drawn": 599, "median <= 5 words": 57}
    assert len(kept) == 343


# ------------------------------------------------------------------------------------- crafted rows
def test_parse_turns_repairs_and_counts():
    report = PersonaChatReport()
    conversation = "\n".join([
        "* * *",                                  # separator: dropped
        "User 1: Hi!",
        "User 1: Anyone there?",                  # same speaker: merged
        "",
        "*User 2:* Here. Recipe:",                # decorated prefix
        "1 cup of flour",                         # continuation
        "",
        "2 eggs",                                 # continuation after a paragraph break
        "",
        "* User 1: Thanks! *",                    # decorated prefix wrapping the whole line
        "User 2: *waves* Bye",                    # an action, not decoration: kept
    ])
    turns, problem = parse_turns(conversation, report)
    assert problem is None
    assert turns == [
        ("User 1", "Hi!\nAnyone there?"),
        ("User 2", "Here. Recipe:\n1 cup of flour\n\n2 eggs"),
        ("User 1", "Thanks!"),
        ("User 2", "*waves* Bye"),
    ]
    assert (report.merged_turns, report.continuation_lines, report.separator_lines, report.decorated_prefixes) \
        == (1, 2, 1, 2)


@pytest.mark.parametrize("conversation, problem", [
    ("", "empty conversation"),
    ("Hi!\nHello!", "no 'User N:' turns"),
    ("Hi there!\nUser 2: Hello", "text before the first 'User N:' turn"),
    ("User 1: Hi\nUser 1: Hello?", "only one speaker"),
    ("User 1: Hi\nUser 2:\nUser 1: Hello?", "empty turn"),
])
def test_parse_turns_names_the_problem_of_a_malformed_conversation(conversation, problem):
    report = PersonaChatReport()
    assert parse_turns(conversation, report) == ([], problem)
    assert report.merged_turns == 0  # repairs are counted only for conversations that are kept


def test_malformed_rows_are_skipped_with_their_ids_and_counted(tmp_path):
    path = write_csv(tmp_path / "chats.csv", [
        ["I am A.", "I am B.", "User 1: Hi\nUser 2: Hello"],
        ["I am A.", "I am B.", "User 1: Hi"],
        ["I am A.", "", "User 1: Hi\nUser 2: Hey"],
        ["I am A.", "I am B.", ""],
    ])
    records, report = load_persona_chat(path)
    assert records == [
        {"id": "chats.csv:0", "messages": [{"role": "system", "content": "I am B."},
                                           {"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "Hello"}]},
        {"id": "chats.csv:2", "messages": [{"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "Hey"}]},
    ]
    assert report.to_dict() == {
        "files": [str(path)], "rows": 4, "conversations": 2, "skipped": 2,
        "malformed": {"only one speaker": ["chats.csv:1"], "empty conversation": ["chats.csv:3"]},
        "merged_turns": 0, "continuation_lines": 0, "separator_lines": 0, "decorated_prefixes": 0,
        "no_persona": 1,
    }
    assert report.lines() == [
        "persona chat: 4 rows -> 2 conversations (2 malformed, skipped)",
        "  1 x only one speaker: chats.csv:1",
        "  1 x empty conversation: chats.csv:3",
        "  repaired: 0 same-speaker turns merged, 0 continuation lines joined, 0 separator lines dropped, "
        "0 decorated 'User N:' prefixes read",
        "  1 conversations without persona text (no system message)",
    ]


def test_wrong_files_and_arguments_are_user_errors(tmp_path):
    with pytest.raises(LmlabError, match=r"^data.path: '.*nope.csv' not found"):
        load_persona_chat(tmp_path / "nope.csv")
    with pytest.raises(LmlabError, match=r"^data.path: folder '.*' has no .csv files"):
        load_persona_chat(tmp_path)
    other = tmp_path / "other.csv"
    other.write_text("text,label\nhi,1\n")
    with pytest.raises(LmlabError, match=r"^data.path: 'other.csv' does not look like Synthetic-Persona-Chat"):
        load_persona_chat(other)
    good = write_csv(tmp_path / "ok.csv", [["a", "b", "User 1: x\nUser 2: y"]])
    with pytest.raises(LmlabError, match=r"^assistant: must be 'User 1' or 'User 2', got 'User 3'$"):
        load_persona_chat(good, assistant="User 3")  # type: ignore[arg-type]

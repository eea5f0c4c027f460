"""Preference pairs for task dpo: every accepted shape of data becomes the same two SFT-tokenized sides sharing one
prompt (loss on the response only, EOS a target), and every bad pair is counted with its row or refused with one
line naming the column and the fix."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_tokenizer
from helpers.recipes import DATA

from lmlab.data.preference import parse_transcript, tokenize_preference
from lmlab.data.sources import read_file
from lmlab.data.templates import template_from_config
from lmlab.errors import LmlabError
from lmlab.recipe.dpo import DpoConfig
from lmlab.recipe.schema import DataConfig

PREFERENCE = DATA / "rasbt_instruction_data" / "instruction-data-with-preference.json"
HH = DATA / "hh_rlhf_harmless_test" / "harmless-base-test.jsonl"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def pairs(records, tok, *, dpo: dict | None = None, **data):
    cfg = DataConfig(path="x", **{"template": "alpaca", "max_length": 256, **data})
    return tokenize_preference(records, template_from_config(cfg, tok), tok, cfg, DpoConfig(**(dpo or {})),
                               source="prefs.json")


def response(ex: dict, side: str) -> list[int]:
    """The tokens a side's loss is on (labels are the next token at each position)."""
    return [t for t in ex[f"{side}_labels"] if t != -100]


def prompt_of(ex: dict, side: str) -> list[int]:
    labels = ex[f"{side}_labels"]
    first = next(t for t, y in enumerate(labels) if y != -100)
    return ex[f"{side}_ids"][: first + 1]


def test_alpaca_preference_data(tok):
    records = json.loads(PREFERENCE.read_text())
    examples, report = pairs(records, tok, max_length=1024)  # the tiny tokenizer needs ~4x SmolLM2's tokens
    identical = [i for i, r in enumerate(records) if r["chosen"].strip() == r["rejected"].strip()]
    assert len(identical) == 6 and report.n_pairs == len(records) - 6 == len(examples)
    assert report.dropped == {"chosen equals rejected (no preference to learn)": 6}
    assert report.dropped_rows["chosen equals rejected (no preference to learn)"] == identical[:5]
    ex = examples[0]
    assert ex["row"] == 0 and prompt_of(ex, "chosen") == prompt_of(ex, "rejected")  # one prompt, two responses
    assert tok.decode(response(ex, "chosen")) == records[0]["chosen"] + tok.eos_token  # loss on response + EOS only
    assert tok.decode(response(ex, "rejected")) == records[0]["rejected"] + tok.eos_token
    assert "### Instruction:\n" + records[0]["instruction"] in tok.decode(prompt_of(ex, "chosen"))
    lines = "\n".join(report.lines())
    assert "1100 records → 1094 pairs" in lines and "6 chosen equals rejected" in lines
    assert "a loss target in 1094/1094" in lines and "pad = EOS" in lines  # the SFT pre-flight checks apply


def test_hh_rlhf_transcripts_split_at_the_last_assistant_turn(tok):
    records = read_file(HH)[:20]
    marker = {"shared_prefix_marker": "\n\nAssistant:"}
    chat, report = pairs(records, tok, dpo=marker, template="chat", chat_template="chatml", max_length=1024)
    assert report.prefix_moved == 20 and report.n_pairs == 20
    last = records[0]["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert tok.decode(response(chat[0], "chosen")) == last + "<|im_end|>" + tok.eos_token
    shown = tok.decode(prompt_of(chat[0], "rejected"))
    assert shown.startswith("<|im_start|>user\nwhat are some pranks with a pen i can do?<|im_end|>\n"
                            "<|im_start|>assistant\nAre you looking for practical joke ideas?<|im_end|>")
    assert shown.endswith("<|im_start|>assistant\n") and "Human:" not in shown
    text, _ = pairs(records, tok, dpo=marker, template="prompt_completion", prompt_template="{prompt} ",
                    max_length=1024)
    assert tok.decode(prompt_of(text[0], "chosen")).endswith("\n\nAssistant: ")  # the transcript, as written
    assert tok.decode(response(text[0], "chosen")) == last + tok.eos_token


def test_parse_transcript():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and Assistant: you?\n\nAssistant:"
    assert parse_transcript(text, {"Human": "user", "Assistant": "assistant"}) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and Assistant: you?"}]


def test_playground_feedback_export_rows(tmp_path, tok):
    """`lmlab feedback export` writes {"prompt", "chosen", "rejected", "messages", ...} JSONL: the prompt is the
    last user message (system first); `messages` the whole conversation."""
    rows = [{"prompt": "Name a color.", "chosen": "Blue.", "rejected": "I cannot.", "rater": "ana",
             "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
             "chosen_run_id": "a" * 32, "rejected_run_id": "b" * 32},
            {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hi!", "rater": "bo",
             "messages": [{"role": "user", "content": "Say hi."}]}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_file(path)
    examples, report = pairs(records, tok, template="chat", chat_template="chatml")
    assert report.n_pairs == 1 and report.dropped_rows == {"chosen equals rejected (no preference to learn)": [1]}
    assert tok.decode(prompt_of(examples[0], "chosen")) == \
        "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"
    whole, _ = pairs(records, tok, dpo={"prompt_column": "messages"}, template="chat", chat_template="chatml")
    assert tok.decode(prompt_of(whole[0], "chosen")).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert tok.decode(response(whole[0], "rejected")) == "I cannot.<|im_end|>" + tok.eos_token


def test_conversational_lists_and_csv_with_own_column_names(tmp_path, tok):
    user = {"role": "user", "content": "2+2?"}
    convo = [{"chosen": [user, {"role": "assistant", "content": "4"}],
              "rejected": [user, {"role": "assistant", "content": "5"}]}]  # TRL's implicit-prompt format
    examples, _ = pairs(convo, tok, template="chat", chat_template="chatml")
    assert tok.decode(prompt_of(examples[0], "chosen")) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(response(examples[0], "chosen")) == "4<|im_end|>" + tok.eos_token
    csv = tmp_path / "prefs.csv"
    csv.write_text("question,good,bad\nWhat is up?,The sky.,Nothing.\n")
    examples, report = pairs(read_file(csv), tok, dpo={"chosen_column": "good", "rejected_column": "bad"},
                             template="prompt_completion", prompt_template="Q: {question}\nA: ")
    assert report.n_pairs == 1
    assert tok.decode(examples[0]["chosen_ids"]) == "Q: What is up?\nA: The sky." + tok.eos_token


def test_bad_pairs_are_counted_with_their_rows(tok):
    long = "word " * 400
    records = [{"instruction": "ok", "chosen": "yes", "rejected": "no"},
               {"instruction": "ok", "chosen": "  ", "rejected": "no"},       # empty chosen
               {"instruction": "ok", "chosen": "yes", "rejected": None},      # missing (null) rejected
               {"instruction": "ok", "chosen": "same", "rejected": "same "},  # identical after stripping
               {"instruction": long, "chosen": "yes", "rejected": "no"},      # the prompt leaves no room: response cut away
               {"instruction": "ok", "chosen": "fine", "rejected": "bad"}]
    examples, report = pairs(records, tok, max_length=64)
    assert [e["row"] for e in examples] == [0, 5]
    assert report.dropped == {"empty chosen response": 1, "empty rejected response": 1,
                              "chosen equals rejected (no preference to learn)": 1,
                              "prompt fills max_length (no completion token fits)": 1}
    assert report.dropped_rows["prompt fills max_length (no completion token fits)"] == [4]
    assert "dropped 4 pairs" in report.lines()[1]


def test_bad_input_is_one_clear_error(tok):
    with pytest.raises(LmlabError, match=r"prefs.json: no column 'rejected' \(set dpo.rejected_column\); the data "
                                         r"has columns: instruction, output, chosen"):
        pairs([{"instruction": "a", "output": "b", "chosen": "c"}], tok)
    with pytest.raises(LmlabError, match=r"no preference pair left \(2 chosen equals rejected"):
        pairs([{"instruction": "a", "chosen": "x", "rejected": "x"}] * 2, tok)
    with pytest.raises(LmlabError, match=r"no preference pair left after tokenization \(1 prompt fills max_length"):
        pairs([{"instruction": "word " * 400, "chosen": "x", "rejected": "y"}], tok, max_length=32)
    with pytest.raises(LmlabError, match=r"no column 'prompt' \(set dpo.prompt_column"):
        pairs([{"question": "a", "chosen": "x", "rejected": "y"}], tok, template="chat", chat_template="chatml")
    with pytest.raises(LmlabError, match=r"row 0: column 'prompt': expected text or a list"):
        pairs([{"prompt": {"a": 1}, "chosen": "x", "rejected": "y"}], tok, template="chat", chat_template="chatml")
    with pytest.raises(LmlabError, match="data.train_on_prompt: task dpo scores the responses only"):
        pairs([{"instruction": "a", "chosen": "x", "rejected": "y"}], tok, train_on_prompt=True)

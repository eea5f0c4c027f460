"""LLM-as-judge: strict score parsing, the answer cache (a second run makes zero endpoint calls), partial results
kept when the endpoint fails midway and `--resume`, and clear errors for a down, slow or wrong endpoint.

Endpoint behaviour is scripted with a small local HTTP server speaking OpenAI's chat-completions format (what is
under test is the client side); the round trip with a real `lmlab serve` process as the judge is at the end."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
from helpers.fake_judge import FakeJudge
from helpers.toy import ANSWERS
from typer.testing import CliRunner

from lmlab.errors import LmlabError
from lmlab.evaluation.judge import (
    JudgeCache,
    JudgeEndpointError,
    judge_prompt,
    judge_run,
    parse_score,
    state_path,
)
from lmlab.models.loading import load_checkpoint
from lmlab.recipe.judge import PROMPTS, JudgeConfig


@pytest.mark.parametrize("answer, score, problem", [
    ("85", 85, ""), (" 85.\n", 85, ""), ("Score: 100", 100, ""), ("0", 0, ""), ("85/100", 85, ""),
    ("eighty", None, "no number"), ("", None, "no number"), ("150", None, "out of range"),
    ("-5", None, "out of range"), ("7.5", None, "not an integer"), ("between 70 and 80", None, "several numbers"),
])
def test_scores_parse_strictly(answer, score, problem):
    assert parse_score(answer) == (score, problem)


def test_the_prompt_is_pinned_and_holds_input_reference_and_response():
    text = judge_prompt("v1", input="Name a colour.", reference="Blue.", response="Red.")
    assert "`Name a colour.`" in text and "`Blue.`" in text and "`Red.`" in text
    assert text.endswith("Respond with the integer number only.")
    with pytest.raises(LmlabError, match="prompt_version"):
        judge_prompt("v9", input="", reference="", response="")


@pytest.fixture
def fake():
    made = []

    def make(answer, delay=0.0):
        made.append(FakeJudge(answer, delay))
        return made[-1]

    yield make
    for f in made:
        f.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def question_of(text: str) -> str:
    return re.search(r'Question: "(\w+)"', text).group(1)


def cfg(url: str, **over) -> JudgeConfig:
    return JudgeConfig(**{"base_url": url, "model": "fake-judge", "api_key_env": "", "split": "train", "retries": 0,
                          "timeout_s": 10, **over})


@pytest.fixture
def loaded(toy_run):  # noqa: F811
    _, result = toy_run
    return load_checkpoint(result.best_checkpoint or result.last_checkpoint)


# ------------------------------------------------------------------------------------------------ tests
def test_judge_scores_aggregates_and_counts_unparseable_answers(loaded, fake, tmp_path):
    scripted = {"one": "90", "two": "Score: 70", "three": "seventy", "four": "250"}
    judge = fake(lambda p: scripted[question_of(p)])
    report = judge_run(loaded, cfg(judge.url, concurrency=3), cache_path=tmp_path / "c.sqlite", log=False)
    n = len(report.items)
    distinct = {(i.input, i.response) for i in report.items}
    assert judge.calls == report.calls == len(distinct) == 4 < n  # the split repeats 4 questions: each asked once
    by_q = {question_of(judge_prompt("v1", input=i.input, reference=i.reference, response=i.response)): i
            for i in report.items}
    assert by_q["one"].score == 90 and by_q["two"].score == 70
    assert by_q["three"].score is None and by_q["three"].problem == "no number"
    assert by_q["four"].score is None and by_q["four"].problem == "out of range"
    scored = [i.score for i in report.items if i.score is not None]
    assert report.mean == pytest.approx(sum(scored) / len(scored))
    assert len(report.unparseable) == n - len(scored) > 0
    assert sum(report.histogram().values()) == len(scored)
    text = "\n".join(report.lines())
    assert f"unparseable answers: {n - len(scored)} of {n}" in text and "not scored 0" in text
    # the prompt the judge saw holds the example's input, its reference and the model's response
    item = report.items[0]
    assert item.input in judge.prompts[0] or any(item.input in p for p in judge.prompts)
    assert any(f"`{item.reference}`" in p and f"`{item.response}`" in p for p in judge.prompts)


def test_a_second_run_is_answered_from_the_cache_with_zero_calls(loaded, fake, tmp_path):
    judge = fake(lambda p: "60")
    first = judge_run(loaded, cfg(judge.url), cache_path=tmp_path / "c.sqlite", log=False)
    assert first.calls == judge.calls == 4 and first.cache_hits == 0
    judge.close()  # the endpoint is gone: a cached re-run must not need it
    second = judge_run(loaded, cfg(judge.url), cache_path=tmp_path / "c.sqlite", log=False)
    assert second.calls == 0 and second.cache_hits == len(second.items)
    assert [i.score for i in second.items] == [i.score for i in first.items] == [60] * len(first.items)
    # another judge model or prompt version is another question: not answered from this cache
    other = fake(lambda p: "40")
    third = judge_run(loaded, cfg(other.url, model="another-judge"), cache_path=tmp_path / "c.sqlite", log=False)
    assert third.calls == other.calls == 4 and {i.score for i in third.items} == {40}


def test_endpoint_failing_midway_keeps_partial_results_and_resume_finishes(loaded, fake, tmp_path):
    answered = []

    def flaky(prompt):
        if len(answered) >= 3:
            return 503  # down after three answers
        answered.append(prompt)
        return "75"

    judge = fake(flaky)
    c = cfg(judge.url, concurrency=1)
    with pytest.raises(JudgeEndpointError) as err:
        judge_run(loaded, c, cache_path=tmp_path / "c.sqlite", log=False)
    msg = str(err.value)
    saved = json.loads(state_path(loaded, c).read_text())
    n = len(saved["items"])
    kept = [i for i in saved["items"] if i["answer"] is not None]
    asked = {question_of(p) for p in answered}
    assert len(asked) == 3 and {question_of(i["input"]) for i in kept} == asked  # 3 of the 4 questions answered
    assert "HTTP 503" in msg and f"kept {len(kept)} of {n}" in msg and "--resume" in msg and 0 < len(kept) < n
    healthy = fake(lambda p: "75")
    report = judge_run(loaded, cfg(healthy.url, concurrency=1), resume=True, cache_path=tmp_path / "c.sqlite",
                       log=False)
    assert healthy.calls == report.calls == 1 and report.cache_hits == 0  # only the question never answered
    assert [i.score for i in report.items] == [75] * n
    # resumed generations are the saved ones, not new ones
    assert [i.response for i in report.items] == [i["response"] for i in saved["items"]]


def test_unreachable_slow_and_refusing_endpoints_are_clear_errors(loaded, fake, tmp_path):
    with pytest.raises(JudgeEndpointError, match="cannot connect"):
        judge_run(loaded, cfg(closed_port_url()), cache_path=tmp_path / "c.sqlite", log=False)
    slow = fake(lambda p: "50", delay=3)
    started = time.monotonic()
    with pytest.raises(JudgeEndpointError, match=r"no answer within judge.timeout_s = 0.5 s"):
        judge_run(loaded, cfg(slow.url, timeout_s=0.5, concurrency=2), cache_path=tmp_path / "c2.sqlite", log=False)
    assert time.monotonic() - started < 30  # gives up: never a hang
    failing = fake(lambda p: 500)
    with pytest.raises(JudgeEndpointError, match="HTTP 500"):
        judge_run(loaded, cfg(failing.url, retries=1, concurrency=1), cache_path=tmp_path / "c3.sqlite", log=False)
    assert failing.calls == 2  # the first try and one retry (with backoff), then it stops asking
    # nothing failed was cached
    assert JudgeCache(tmp_path / "c3.sqlite").get("anything") is None


def test_settings_errors_name_the_field_before_any_generation(loaded, monkeypatch, tmp_path):
    with pytest.raises(LmlabError, match=r"judge.base_url and judge.model: not set"):
        judge_run(loaded, JudgeConfig(), cache_path=tmp_path / "c.sqlite", log=False)
    monkeypatch.delenv("LMLAB_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(LmlabError, match=r"judge.api_key_env: environment variable LMLAB_TEST_JUDGE_KEY is not set"):
        judge_run(loaded, JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m", api_key_env="LMLAB_TEST_JUDGE_KEY"),
                  log=False)


def test_prompt_versions_are_all_formattable():
    for version, text in PROMPTS.items():
        assert {"{input}", "{reference}", "{response}"} <= set(re.findall(r"\{\w+\}", text)), version


def test_cli_judges_logs_to_the_run_and_compare_shows_the_mean(toy_run, fake, tmp_path, monkeypatch):  # noqa: F811
    from lmlab.cli import app

    root, result = toy_run
    monkeypatch.chdir(root)
    monkeypatch.setenv("LMLAB_JUDGE_CACHE", str(tmp_path / "cache.sqlite"))
    judge = fake(lambda p: {"one": "80", "two": "60", "three": "40", "four": "20"}[question_of(p)])
    args = ["eval", result.run_id, "--judge", "--judge-url", judge.url, "--judge-model", "fake-judge",
            "--api-key-env", "", "--split", "train", "--retries", "0"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "mean score" in out.output and f"endpoint calls: {judge.calls}" in out.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "endpoint calls: 0" in again.output
    from lmlab.analysis.compare import compare, select_runs

    table = compare(select_runs([result.run_id]))
    col = next(c for c in table.columns if c.key == "judge/train/mean")
    printed = float(re.search(r"mean score ([\d.]+)", out.output).group(1))
    assert col.values[0] == pytest.approx(printed, abs=0.05) and 20 <= printed <= 80
    bad = CliRunner().invoke(app, ["eval", result.run_id, "--judge", "--judge-url", judge.url])
    assert bad.exit_code != 0


def test_cli_without_what_to_evaluate_is_a_one_line_error(toy_run):  # noqa: F811
    from lmlab.cli import app

    _, result = toy_run
    out = CliRunner().invoke(app, ["eval", str(result.best_checkpoint or result.last_checkpoint)])
    assert out.exit_code != 0 and isinstance(out.exception, LmlabError) and "--judge" in str(out.exception)


# ----------------------------------------------------------------------- round trip: lmlab serve as the judge
@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory, toy_run):  # noqa: F811
    """A tiny Llama fine-tuned (in ~15 s) to answer v1 judge prompts about the toy's questions with an integer:
    90 when the response is the reference answer, 10 otherwise. Served by `lmlab serve`, it stands in for a real
    judge model behind an OpenAI-compatible endpoint."""
    import torch
    from helpers import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab import load_recipe, train
    from lmlab.evaluation.judge import input_text

    _, toy = toy_run
    template = load_checkpoint(toy.best_checkpoint or toy.last_checkpoint).template
    rows = []
    for q, ref in ANSWERS.items():
        for resp in ANSWERS.values():
            prompt = judge_prompt("v1", input=input_text(template, {"input": q, "output": ref}), reference=ref,
                                  response=resp)
            rows.append({"prompt": prompt, "score": "90" if resp == ref else "10"})
    root = tmp_path_factory.mktemp("judge")
    tok = tiny_tokenizer(vocab_size=700, texts=[r["prompt"] + " 90 10" for r in rows])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    (root / "judge.jsonl").write_text("\n".join(json.dumps(r) for r in rows * 6) + "\n")
    recipe = {
        "run": {"name": "tiny-judge", "task": "sft", "seed": 1, "output_dir": str(root / "lmlab-runs")},
        "data": {"path": str(root / "judge.jsonl"), "template": "prompt_completion",
                 "prompt_template": "{prompt}\nScore: {score}", "max_length": 512,
                 "split": {"train": 0.9, "val": 0.1}},
        "model": {"pretrained": str(root / "base")},
        "tokenizer": {"kind": "pretrained"},
        "train": {"lr": 5e-3, "batch_size": 8, "max_steps": 150, "warmup_steps": 0, "weight_decay": 0.0,
                  "log_every": 50, "schedule": "constant"},
        "eval": {"every_steps": 150},
        "ledger": {"enabled": False},
    }
    result = train(load_recipe(data=recipe), quiet=True)
    return result.best_checkpoint or result.last_checkpoint


def test_round_trip_with_lmlab_serve_as_the_judge(toy_run, tiny_judge, tmp_path):  # noqa: F811
    import openai
    from helpers.serving import running_server

    root, toy = toy_run
    loaded = load_checkpoint(toy.run_id, output_dir=str(root / "lmlab-runs"))
    cache = tmp_path / "cache.sqlite"
    with running_server(tiny_judge, extra_args=["--model-name", "tiny-judge"]) as url:
        c = JudgeConfig(base_url=url, model="tiny-judge", api_key_env="", split="train", retries=0, concurrency=2)
        report = judge_run(loaded, c, cache_path=cache)
        direct = openai.OpenAI(base_url=url, api_key="none")
        distinct = {(i.input, i.reference, i.response): i for i in report.items}
        for (inp, ref, resp), item in distinct.items():  # what the judge says when asked directly
            said = direct.chat.completions.create(
                model="tiny-judge", temperature=0, max_tokens=c.max_tokens,
                messages=[{"role": "user", "content": judge_prompt("v1", input=inp, reference=ref, response=resp)}])
            assert item.answer == said.choices[0].message.content
    assert report.calls == len(distinct) and report.cache_hits == 0
    assert len(report.scores) == len(report.items) and not report.unparseable  # the tiny judge answers integers
    assert report.mean == pytest.approx(sum(report.scores) / len(report.scores))
    # logged to the toy run's ledger: metrics and the per-example table
    from lmlab.analysis.compare import read_artifact

    table = json.loads(read_artifact(loaded.ledger_uri, loaded.run_id, "judge/train.json"))
    assert table["metrics"]["judge/train/mean"] == pytest.approx(report.mean)
    assert [e["score"] for e in table["examples"]] == [i.score for i in report.items]
    assert table["prompt"] == PROMPTS["v1"] and table["judge_model"] == "tiny-judge"
    # the judge is gone: the same evaluation is answered from the cache, zero endpoint calls
    again = judge_run(loaded, c, cache_path=cache, log=False)
    assert again.calls == 0 and [i.score for i in again.items] == [i.score for i in report.items]
    # ...but anything new needs it, and fails clearly, keeping the generations for --resume
    with pytest.raises(JudgeEndpointError, match=r"cannot connect.*kept 0 of \d+ judgments.*--resume"):
        judge_run(loaded, c, cache_path=tmp_path / "fresh.sqlite", log=False)
    assert len(json.loads(state_path(loaded, c).read_text())["items"]) == len(report.items)

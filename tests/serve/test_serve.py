"""`lmlab serve`: one server process for the module, driven by the official openai client (answers equal
lmlab.generate's, streams equal non-streamed text, limits and keys refused as OpenAI errors); in-process checks of
the body limit, error shapes, server-sent events and a plain Hugging Face folder with the tokenizer's chat
template. The toy run (tiny Llama that answers four questions with JSON) is test_generate's."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from helpers.serving import ServerProcess, running_server
from helpers.toy import ANSWERS, make_base, toy_recipe

from lmlab.errors import LmlabError
from lmlab.generation.decoding import generate, stream_generate
from lmlab.generation.prompts import prompt_ids, stop_strings
from lmlab.models.loading import LoadedCheckpoint, load_checkpoint
from lmlab.recipe.generation import SamplingPreset
from lmlab.serve.app import bind_socket, create_app
from lmlab.serve.backends import TransformersBackend, load_backend

KEY = "sk-test-7f3a"
CAP = 64  # the server's --max-tokens-cap
GREEDY16 = SamplingPreset(max_new_tokens=16)


@pytest.fixture(scope="module")
def toy(toy_run):  # noqa: F811
    return load_checkpoint(toy_run[1].best_checkpoint)


@pytest.fixture(scope="module", autouse=True)
def processes(toy_run, tmp_path_factory):  # noqa: F811
    """Both `lmlab serve` processes of this module, started as soon as the toy run is trained, so that the
    in-process tests run while they import torch (~10 s): the server the openai client talks to (`<run id prefix>`
    resolved through the workspace's ledger, an API key, a small cap) and one given a reference that does not
    exist."""
    root, result = toy_run
    started = {"server": ServerProcess(result.run_id[:10], output_dir=root / "lmlab-runs",
                                       extra_args=["--api-key", KEY, "--max-tokens-cap", str(CAP)]),
               "bad": ServerProcess("nope", output_dir=tmp_path_factory.mktemp("empty") / "nowhere")}
    yield started
    for process in started.values():
        process.stop()


@pytest.fixture(scope="module")
def server(processes, toy_run):  # noqa: F811
    return processes["server"].wait_ready(180), f"toy-{toy_run[1].run_id[:8]}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


def ask(client, content, **kw):
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return client.chat.completions.create(model="gpt-4o", messages=messages, **kw)


def chat_stream(client, content, **kw) -> tuple[str, str, object]:
    """(joined deltas, finish_reason of the last choice chunk, usage) of a streamed chat completion."""
    text, finish, usage = [], None, None
    for chunk in ask(client, content, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


# ------------------------------------------------------------------------------------------------- in process
@pytest.fixture(scope="module")
def app_client(toy):
    backend = TransformersBackend(toy, "toy", SamplingPreset(max_new_tokens=16))
    return TestClient(create_app(backend, max_body_bytes=4000, max_tokens_cap=CAP))


def test_body_over_the_limit_is_413(app_client):
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    r = app_client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413
    assert r.json() == {"error": {"message": "request body is larger than this server's limit of 4000 bytes "
                                             "(lmlab serve --max-body-bytes)", "type": "invalid_request_error",
                                  "param": None, "code": "request_too_large"}}
    # without Content-Length (chunked upload) the limit holds too
    chunks = iter([b'{"messages": [{"role": "user", "content": "', b"y" * 3000, b"z" * 3000, b'"}]}'])
    r = app_client.post("/v1/chat/completions", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413
    under = {"prompt": "one", "max_tokens": 1, "user": "u" * 3900}  # unknown OpenAI fields are ignored
    assert len(json.dumps(under)) < 4000 and app_client.post("/v1/completions", json=under).status_code == 200


@pytest.mark.parametrize("body, message, param", [
    (b'{"messages": [{"role": "user", "content": "one"}', "request body is not valid JSON (", None),
    (b"", "request body: missing; send a JSON object", None),
    (b'{"model": "x"}', "messages: Field required", "messages"),
    (b'{"messages": "one"}', "messages: Input should be a valid list", "messages"),
    (b'{"messages": []}', "messages: List should have at least 1 item", "messages"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role: Input should be 'system'",
     "messages[0].role"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     "messages[0].content: only text content parts are supported (got 'image_url')", "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": "one"}], "stop": 5}',
     "stop: must be a string or a list of strings", "stop"),
    (b'{"messages": [{"role": "user", "content": "one"}], "max_tokens": "many"}',
     "max_tokens: Input should be a valid integer", "max_tokens"),
    (b'[{"role": "user", "content": "one"}]', "request body: Input should be a valid dictionary", None),
])
def test_malformed_requests_are_400_in_openai_shape(app_client, body, message, param):
    r = app_client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["message"].startswith(message) and "\n" not in error["message"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


def test_unknown_route_and_prompt_problems(app_client):
    r = app_client.post("/v1/embeddings", json={})
    assert r.status_code == 404 and r.json()["error"]["message"] == "POST /v1/embeddings: Not Found"
    too_long = "one two three four " * 200  # the toy model has 256 positions
    for stream in (False, True):  # a stream refused before its first byte is still a 400
        r = app_client.post("/v1/completions", json={"prompt": too_long, "stream": stream})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "this model's context is 256 tokens" in r.json()["error"]["message"]
    r = app_client.post("/v1/completions", json={"prompt": ["a", "b"]})
    assert r.status_code == 400 and r.json()["error"]["message"] == "prompt: one prompt per request (got 2)"
    r = app_client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("messages: no user message")


def test_server_sent_events_format(app_client):
    with app_client.stream("POST", "/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "one"}], "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ANSWERS["one"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "stop"]


def test_stream_holds_back_a_possible_stop_string(toy):
    """A piece that might still become the stop string is not sent: stop '1}' must not leak its '1'."""
    prompt = prompt_ids(toy, "one")
    sampling = SamplingPreset(max_new_tokens=16, stop=["1}"])
    pieces = list(stream_generate(toy, prompt, sampling))
    *texts, done = pieces
    assert "".join(texts) == done.text == generate(toy, ["one"], sampling)[0].text == '{"n": '
    assert done.stop_reason == "stop" and not any("1" in t for t in texts)


# a chat template that renders a user turn like the toy's training prompts and ends assistant turns with '":'
QUOTED_CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}### Question: \"{{ m['content'] }}\"\n ### Answer: "
               "{% elif m['role'] == 'assistant' %}{{ m['content'] }}\": {% endif %}{% endfor %}")


def test_chat_run_uses_its_template_and_stops_at_its_end_of_turn(toy):
    from lmlab.data.templates import PromptTemplate

    template = PromptTemplate("chat", chat_template=QUOTED_CHAT, chat_template_name="custom")
    loaded = LoadedCheckpoint(toy.path, None, toy.recipe, toy.model, toy.tokenizer, template)
    assert template.end_of_turn() == '":'
    backend = TransformersBackend(loaded, "chat-toy", SamplingPreset(max_new_tokens=16))
    messages = [{"role": "user", "content": "two"}]
    assert backend.chat_prompt(messages) == prompt_ids(toy, "two")  # same text, same ids as training's prompt
    http = TestClient(create_app(backend))
    whole = http.post("/v1/chat/completions", json={"messages": messages}).json()["choices"][0]
    with http.stream("POST", "/v1/chat/completions", json={"messages": messages, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    # the toy says '{"n": 2}'; the end of turn '":' cuts it, streamed or not
    assert (whole["message"]["content"], whole["finish_reason"]) == ('{"n', "stop")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == '{"n'
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_busy_port_is_a_one_line_error():
    taken = bind_socket("127.0.0.1", 0)
    port = taken.getsockname()[1]
    with pytest.raises(LmlabError, match=f"--host 127.0.0.1 --port {port}: cannot listen there .*choose another"):
        bind_socket("127.0.0.1", port)
    taken.close()


def test_bad_reference_is_a_one_line_error(processes):
    """The real process: `lmlab serve nope` prints one `error: ...` line, exits 2; the helper reports its stderr."""
    with pytest.raises(RuntimeError, match="lmlab serve nope: exited with status 2 before it was ready; its stderr:"
                       ) as e:
        processes["bad"].wait_ready(120)
    errors = [line for line in str(e.value).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in str(e.value)
    assert errors[0].startswith("error: nope: not a folder, and no workspace") and "nowhere" in errors[0]


def test_running_server_reports_a_process_that_dies_with_its_stderr():
    with pytest.raises(RuntimeError, match=r"lmlab serve x: exited with status 1 before it was ready; its stderr:"
                                           r"\n(.|\n)*Fatal Python error"):
        with running_server("x", env={"PYTHONHOME": "/nonexistent"}, timeout=30):  # Python cannot even start
            pass


# ----------------------------------------------------------------------------------- plain Hugging Face folder
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    from helpers import tiny_llama, tiny_tokenizer

    folder = tmp_path_factory.mktemp("plain") / "tiny-chat"
    tok = tiny_tokenizer(chat_template=CHAT)
    tiny_llama(len(tok), seed=4).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def reference_greedy(folder, ids, n):
    """Plain transformers, no lmlab: greedy continuation of `ids`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    assert tok.eos_token_id not in out  # the comparison below assumes the run does not stop early
    return tok.decode(out)


def test_plain_folder_chat_uses_the_tokenizers_chat_template(plain):
    from transformers import AutoTokenizer

    backend = load_backend(plain)
    assert backend.model_id == "tiny-chat" and backend.loaded.recipe is None
    assert stop_strings(backend.loaded, backend.default_sampling) == ["<|im_end|>"]  # its end of turn stops
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    text, ids = backend.chat_prompt(messages)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert ids == AutoTokenizer.from_pretrained(plain)(text, add_special_tokens=False)["input_ids"]
    want = reference_greedy(plain, ids, 8).split("<|im_end|>")[0]
    http = TestClient(create_app(backend))
    r = http.post("/v1/chat/completions", json={"model": "any", "messages": messages, "max_tokens": 8}).json()
    assert r["choices"][0]["message"]["content"] == want and r["model"] == "tiny-chat"
    assert r["usage"]["prompt_tokens"] == len(ids)
    with http.stream("POST", "/v1/chat/completions",
                     json={"messages": messages, "max_tokens": 8, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == r["choices"][0]["finish_reason"]


def test_plain_folder_completion_is_raw_text(plain):
    from transformers import AutoTokenizer

    backend = load_backend(plain, model_name="served-as")
    ids = AutoTokenizer.from_pretrained(plain)("The quick brown")["input_ids"]
    r = TestClient(create_app(backend)).post("/v1/completions", json={"prompt": "The quick brown", "max_tokens": 6})
    body = r.json()
    assert body["choices"][0]["text"] == reference_greedy(plain, ids, 6)
    assert (body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]) == ("length", 6)
    assert body["model"] == "served-as" and body["usage"]["prompt_tokens"] == len(ids)


# ---------------------------------------------------------------------------------------------- LoRA --merge
def test_merge_folds_the_adapter_and_answers_the_same(tmp_path):
    from lmlab import load_recipe, train

    base = make_base(tmp_path / "base")
    recipe = toy_recipe(tmp_path, base, adapter={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                        train__max_steps=6, eval__every_steps=6)
    ckpt = train(load_recipe(data=recipe), quiet=True).best_checkpoint
    adapter, merged = load_backend(ckpt), load_backend(ckpt, merge=True)
    assert type(adapter.loaded.model).__name__ == "PeftModelForCausalLM"
    assert type(merged.loaded.model).__name__ == "LlamaForCausalLM" and merged.notes[0].startswith("--merge: LoRA")
    sampling = SamplingPreset(max_new_tokens=8)
    assert merged.chat([{"role": "user", "content": "one"}], sampling) == adapter.chat(
        [{"role": "user", "content": "one"}], sampling)
    with pytest.raises(LmlabError, match="a LoRA adapter without its lmlab recipe"):
        (ckpt / "recipe.yaml").unlink()
        load_backend(ckpt)


# ---------------------------------------------------------------------------------- through the openai client
def test_models_lists_the_served_model(client, server):
    _, model_id = server
    assert [m.id for m in client.models.list()] == [model_id]
    assert client.models.retrieve(model_id).owned_by == "lmlab"
    with pytest.raises(openai.NotFoundError, match="serves 'toy-"):
        client.models.retrieve("gpt-4o")


def test_chat_answer_equals_greedy_generate(client, server, toy):
    want = generate(toy, ["one"], GREEDY16)[0]
    r = ask(client, "one", max_tokens=16)
    assert r.choices[0].message.content == want.text == ANSWERS["one"]
    assert r.choices[0].finish_reason == "stop" and r.model == server[1]  # the served id, not the one asked for
    assert r.usage.prompt_tokens == len(prompt_ids(toy, "one")[1])
    assert r.usage.completion_tokens == want.n_tokens and r.usage.total_tokens == r.usage.prompt_tokens + want.n_tokens


def test_chat_on_a_prompt_completion_run_answers_the_last_user_message_after_the_system(client, toy):
    item = "Reply in JSON.\n\ntwo"  # system, blank line, last user message; the earlier turns are dropped
    want = generate(toy, [item], GREEDY16)[0]
    r = ask(client, [{"role": "system", "content": "Reply in JSON."}, {"role": "user", "content": "four"},
                     {"role": "assistant", "content": ANSWERS["four"]}, {"role": "user", "content": "two"}],
            max_tokens=16)
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(prompt_ids(toy, item)[1]) != len(prompt_ids(toy, "two")[1])


def test_text_completion_sends_the_prompt_as_is(client, toy):
    prompt, ids = prompt_ids(toy, "three")
    assert prompt == '### Question: "three"\n ### Answer: '
    r = client.completions.create(model="x", prompt=prompt, max_tokens=16)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (ANSWERS["three"], "stop")
    assert r.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("kw, text, finish", [
    ({}, ANSWERS["two"], "stop"),  # EOS
    ({"stop": ": "}, '{"n"', "stop"),  # a request stop string, cut like the non-streamed text
    ({"max_tokens": 3}, None, "length"),
])
def test_stream_equals_the_non_streamed_text(client, kw, text, finish):
    whole = ask(client, "two", **kw)
    streamed, streamed_finish, usage = chat_stream(client, "two", **kw)
    assert streamed == whole.choices[0].message.content
    assert streamed_finish == whole.choices[0].finish_reason == finish
    assert usage.completion_tokens == whole.usage.completion_tokens
    if text is not None:
        assert streamed == text
    if finish == "length":
        assert usage.completion_tokens == 3 and ANSWERS["two"].startswith(streamed) and streamed


def test_completion_stream(client, toy):
    prompt, _ = prompt_ids(toy, "four")
    pieces = list(client.completions.create(model="x", prompt=prompt, max_tokens=16, stream=True))
    assert "".join(c.choices[0].text for c in pieces) == ANSWERS["four"]
    assert pieces[-1].choices[0].finish_reason == "stop" and len(pieces) > 2  # several pieces, not one blob


def test_limits_and_unsupported_options_are_bad_requests(client):
    with pytest.raises(openai.BadRequestError, match=f"max_tokens: {CAP + 1} is more than this server's cap of "
                                                     f"{CAP} tokens") as e:
        ask(client, "one", max_tokens=CAP + 1)
    assert e.value.body["param"] == "max_tokens" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match=f"max_completion_tokens: 100 .* cap of {CAP}"):
        ask(client, "one", max_completion_tokens=100, stream=True)
    with pytest.raises(openai.BadRequestError, match="n: only n=1 is supported"):
        ask(client, "one", n=2)
    with pytest.raises(openai.BadRequestError, match=r"temperature: Input should be less than or equal to 2"):
        ask(client, "one", temperature=3)


def test_a_wrong_or_missing_api_key_is_refused(server):
    url, _ = server
    wrong = openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        wrong.models.list()
    keyless = urllib.request.Request(f"{url}/chat/completions", method="POST",
                                     data=b'{"messages": [{"role": "user", "content": "one"}]}')
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(keyless, timeout=30)
    error = json.loads(e.value.read())["error"]
    assert e.value.code == 401 and error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]

"""`lmlab serve`: one model behind an OpenAI-compatible HTTP API, so any OpenAI client (openai-python, curl, chat
UIs, an LLM-judge harness) can use it: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, both
with `stream: true` as server-sent events.

The HTTP app (`create_app`) talks to a `Backend`: `TransformersBackend` here, for an lmlab run / checkpoint (its
saved template, stop strings and sampling presets) or a plain Hugging Face model folder; another backend (e.g. a
GGUF file on llama.cpp) plugs in by implementing the same four methods.

How a request becomes a prompt:
- chat, run with a chat template: the messages are rendered by the run's template, exactly as in training.
- chat, run whose template is not chat (alpaca, prompt_completion, text; or a task-lm run without a template): the
  last user message is the prompt item, as `lmlab generate --prompt` treats a string; system messages, if any,
  are prepended to it with a blank line ("SYSTEM\\n\\nUSER"). Earlier turns are dropped.
- chat, plain Hugging Face folder: the tokenizer's chat template
  (`apply_chat_template(messages, add_generation_prompt=True)`); without one, the rule above.
- completions: the prompt text as is (after the tokenizer's BOS, when it adds one); no template.
EOS and the template's end of turn always stop, as in `lmlab generate`; request `stop` strings add to the preset's.
Sampling starts from the run's default preset (or --preset); a request's max_tokens / temperature / top_p / seed /
stop override it, and so do top_k / repetition_penalty (as vLLM accepts them) and penalty_alpha (contrastive search,
lmlab's). Without `seed` the preset's seed is used, so the same request gives the same text. The last choice carries
lmlab's `finish_detail` beside OpenAI's finish_reason: eos, stop_string or length.
"""

from __future__ import annotations

import itertools
import json
import queue
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from lmlab.errors import LmlabError
from lmlab.recipe.describe import first_error, unfold
from lmlab.recipe.generation import SamplingPreset
from lmlab.serve.backends import Backend, Completion, RequestError

DEFAULT_MAX_TOKENS_CAP = 1024
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB


# ------------------------------------------------------------------------------------------ backends


# ------------------------------------------------------------------------------------------- loading


# ------------------------------------------------------------------------------------------ requests
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _Request(BaseModel):
    """Fields both endpoints share. Other OpenAI fields (user, logit_bias, presence_penalty, ...) are accepted and
    ignored; `model` may name anything (responses name the served model)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # beyond OpenAI's fields, as vLLM accepts them (openai-python: extra_body); penalty_alpha is lmlab's
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    penalty_alpha: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # torch.manual_seed's range
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("must be a string or a list of strings")
        if any(s == "" for s in stops):
            raise ValueError("an empty stop string would stop before the first token")
        return stops

    def max_tokens_asked(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """OpenAI's list of content parts: text parts are joined with newlines; anything else is refused."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported (got {kind!r})")
            texts.append(part["text"])
        return "\n".join(texts)

    def as_dict(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content or ""}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def max_tokens_asked(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_Request):
    prompt: str

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_text(cls, value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(p, str) for p in value):
            if len(value) != 1:
                raise ValueError(f"one prompt per request (got {len(value)})")
            return value[0]
        if isinstance(value, list):
            raise ValueError("token-id prompts are not supported; send text")
        return value


def request_sampling(default: SamplingPreset, body: _Request, max_tokens_cap: int) -> SamplingPreset:
    """The backend's default preset with the request's overrides, checked against the server's limits."""
    if body.n not in (None, 1):
        raise RequestError(f"n: only n=1 is supported (got {body.n}); send {body.n} requests (with different "
                           "seeds when sampling)", param="n")
    asked, param = body.max_tokens_asked()
    if asked is not None and asked > max_tokens_cap:
        raise RequestError(f"{param}: {asked} is more than this server's cap of {max_tokens_cap} tokens "
                           "(lmlab serve --max-tokens-cap)", param=param)
    budget = asked if asked is not None else min(default.max_new_tokens, max_tokens_cap)
    changes: dict[str, Any] = {"max_new_tokens": budget}
    changes.update({k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p),
                                      ("top_k", body.top_k), ("repetition_penalty", body.repetition_penalty),
                                      ("penalty_alpha", body.penalty_alpha), ("seed", body.seed))
                    if v is not None})
    if body.stop:
        changes["stop"] = [*default.stop, *(s for s in body.stop if s not in default.stop)]
    try:
        return SamplingPreset.model_validate({**default.model_dump(), **changes})
    except ValidationError as e:
        name, msg = first_error(e)
        raise RequestError(f"{name or 'request'}: {msg}", param=name or "request") from None


# ------------------------------------------------------------------------------------------ the app
def create_app(backend: Backend, *, api_key: str | None = None, max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The OpenAI-compatible app around one backend. api_key: every request needs `Authorization: Bearer KEY`
    (else 401). Bodies over max_body_bytes get 413, max_tokens over max_tokens_cap 400; every error is OpenAI's
    {"error": {"message", "type", "param", "code"}}. Endpoints are sync: FastAPI runs them in its thread pool,
    and a lock lets one generation at a time use the model."""
    app = FastAPI(title="lmlab serve", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()
    started = int(time.time())

    @app.exception_handler(RequestError)
    def _refused(request: Request, e: RequestError):
        return error_response(e.status, e.message, param=e.param, code=e.code)

    @app.exception_handler(LmlabError)
    def _user_error(request: Request, e: LmlabError):
        return error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    def _http(request: Request, e: HTTPException):
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                              code="unknown_url" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    def _crash(request: Request, e: Exception):
        return error_response(500, f"the server failed: {type(e).__name__}: {e}", kind="server_error")

    def card() -> dict[str, Any]:
        return {"id": backend.model_id, "object": "model", "created": started, "owned_by": "lmlab"}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str):
        if model_id != backend.model_id:
            raise RequestError(f"model '{model_id}' is not served here; this server serves '{backend.model_id}'",
                               param="model", code="model_not_found", status=404)
        return card()

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatRequest):
        sampling = request_sampling(backend.default_sampling, body, max_tokens_cap)
        messages = [m.as_dict() for m in body.messages]
        reply = _Reply("chat", backend.model_id)
        if body.stream:
            return _event_stream(lock, lambda: backend.chat_stream(messages, sampling), reply, body.stream_options)
        with lock:
            done = backend.chat(messages, sampling)
        return reply.whole(done)

    @app.post("/v1/completions")
    def completions(body: CompletionRequest):
        sampling = request_sampling(backend.default_sampling, body, max_tokens_cap)
        reply = _Reply("text", backend.model_id)
        if body.stream:
            return _event_stream(lock, lambda: backend.complete_stream(body.prompt, sampling), reply,
                                 body.stream_options)
        with lock:
            done = backend.complete(body.prompt, sampling)
        return reply.whole(done)

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """pydantic's errors as one line: 'messages[0].role: Input should be ...'; (message, param of the first)."""
    parts, first_param = [], None
    for err in errors:
        loc, _, msg = unfold(err, drop=("body",))
        if err["type"] == "json_invalid":
            return f"request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})", None
        if not loc and err["type"] == "missing":
            return "request body: missing; send a JSON object", None
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
        first_param = first_param or param
        part = f"{param or 'request body'}: {msg}"
        if part not in parts:
            parts.append(part)
    return "; ".join(parts), first_param


@dataclass
class _Reply:
    """OpenAI's response and chunk shapes for one request: chat.completion(.chunk) or text_completion."""

    kind: Literal["chat", "text"]
    model_id: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.kind == "chat" else "text_completion"
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model_id}

    def _choice(self, text: str | None, done: Completion | None, *, chunk: bool) -> dict[str, Any]:
        """One choice; `done` (the last one) adds finish_reason and lmlab's finish_detail (eos / stop_string /
        length), which OpenAI clients keep as an extra field."""
        finish = {"finish_reason": done.finish_reason if done else None}
        if done is not None:
            finish["finish_detail"] = done.finish_detail
        if self.kind == "text":
            return {"index": 0, "text": text or "", "logprobs": None, **finish}
        if chunk:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None, **finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, **finish}

    def whole(self, done: Completion) -> dict[str, Any]:
        return {**self._envelope(False), "choices": [self._choice(done.text, done, chunk=False)],
                "usage": _usage(done)}

    def chunk(self, text: str | None, done: Completion | None = None) -> dict[str, Any]:
        return {**self._envelope(True), "choices": [self._choice(text, done, chunk=True)]}

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role (and empty content), as OpenAI's do."""
        if self.kind != "chat":
            return None
        out = self.chunk("")
        out["choices"][0]["delta"]["role"] = "assistant"
        return out

    def usage_chunk(self, done: Completion) -> dict[str, Any]:
        return {**self._envelope(True), "choices": [], "usage": _usage(done)}


def _usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _event_stream(lock: threading.Lock, start: Callable[[], Iterator[str | Completion]], reply: _Reply,
                  options: StreamOptions | None) -> StreamingResponse:
    """Server-sent events: the chunks, a last one with finish_reason (then usage, if asked), `data: [DONE]`.
    The first piece is awaited here, so a refused request (prompt too long, ...) is still an HTTP 400; an error
    after the first byte is sent as an `error` event, which OpenAI clients raise."""
    pieces = _locked_stream(lock, start)
    try:
        first = next(pieces)
    except StopIteration:
        raise RuntimeError("the backend's stream ended without a result") from None

    def events() -> Iterator[str]:
        done = None
        try:
            opening = reply.first_chunk()
            if opening is not None:
                yield _sse(opening)
            for item in itertools.chain([first], pieces):
                if isinstance(item, Completion):
                    done = item
                elif item:
                    yield _sse(reply.chunk(item))
            if done is None:
                raise RuntimeError("the backend's stream ended without a result")
        except Exception as e:  # headers are sent: report in-band
            kind = "invalid_request_error" if isinstance(e, (RequestError, LmlabError)) else "server_error"
            yield _sse({"error": {"message": str(e), "type": kind, "param": None, "code": None}})
            return
        finally:
            pieces.close()
        yield _sse(reply.chunk(None, done))
        if options is not None and options.include_usage:
            yield _sse(reply.usage_chunk(done))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


_END = object()


def _locked_stream(lock: threading.Lock, start: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """Run a backend stream in its own thread, holding the model lock, and read its pieces from the returned
    iterator. The producer, not the HTTP response, owns the lock: a client that vanishes before or during the
    response cannot leave the model locked. Closing the reader makes the producer stop after its next piece."""
    items: queue.Queue[Any] = queue.Queue()
    reader_gone = threading.Event()

    def produce() -> None:
        pieces = None
        with lock:
            try:
                pieces = start()
                for item in pieces:
                    items.put(item)
                    if reader_gone.is_set():
                        break
            except BaseException as e:  # handed to the reader, which raises it
                items.put(e)
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
                items.put(_END)

    threading.Thread(target=produce, name="lmlab-serve-stream", daemon=True).start()

    def read() -> Iterator[Any]:
        try:
            while (item := items.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader_gone.set()

    return read()


class Guard:
    """ASGI middleware in front of every route: the API key (401), then the body size (413), before FastAPI parses
    anything. The body is read here (up to the limit) and handed on, so chunked uploads are limited too."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key is not None:
            given = headers.get(b"authorization", b"")
            if not given:
                await _send_error(send, 401, "missing API key: send the header 'Authorization: Bearer KEY'",
                                  "invalid_api_key")
                return
            if not secrets.compare_digest(given, b"Bearer " + self.api_key.encode()):
                await _send_error(send, 401, "invalid API key", "invalid_api_key")
                return
        too_large = (f"request body is larger than this server's limit of {self.max_body_bytes} bytes "
                     "(lmlab serve --max-body-bytes)")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await _send_error(send, 413, too_large, "request_too_large")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await _send_error(send, 413, too_large, "request_too_large")
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # disconnect notices while streaming
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


async def _send_error(send: Callable, status: int, message: str, code: str) -> None:
    response = error_response(status, message, code=code)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


# ------------------------------------------------------------------------------------------ running
def bind_socket(host: str, port: int) -> socket.socket:
    """Listen on host:port (0 = any free port) before the model loads, so a busy port fails at once; connections
    that arrive while it loads wait in the backlog."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:  # gaierror included
        raise LmlabError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                         "choose another --port (0 picks a free one)") from None
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def serve_forever(app: FastAPI, sock: socket.socket) -> None:
    """Run the app with uvicorn on a bound socket until SIGINT / SIGTERM (open streams get 5 s to finish)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])

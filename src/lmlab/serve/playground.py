"""`lmlab playground`: one web page that chats with one to three models side by side and records what people think
of their answers.

The page (playground.html, one static file: no JavaScript build step, no UI library to install) talks to
- each model's OpenAI-compatible API: `lmlab serve`'s own app (serve.app.create_app), mounted at /models/<i>/v1, so
  answers come from the same backends, prompt templates and sampling as `lmlab serve` and `lmlab generate`;
- GET /api/session: the columns (model, run, step, template, sampling presets, ledger counts, or why a model could
  not be loaded) and who is rating;
- POST /api/feedback: a rating, appended to the workspace's feedback log and counted in each run's ledger
  (lmlab.workspace.feedback).

It listens on loopback unless told otherwise; any other address needs HTTP basic auth (--auth USER:PASSWORD, one
per tester), and the user name a tester logs in with is stored with their ratings."""

from __future__ import annotations

import getpass
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmlab.errors import LmlabError
from lmlab.recipe.generation import BUILTIN_PRESETS, SamplingPreset, presets_of
from lmlab.serve.access import MAX_COLUMNS, BasicAuth, basic_user, check_access
from lmlab.serve.app import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_TOKENS_CAP,
    Guard,
    create_app,
    error_response,
    validation_message,
)
from lmlab.serve.backends import Backend, load_backend
from lmlab.workspace.feedback import COUNTS, Message, RatedAnswer, Rating, Verdict, add_counts, append_rating
from lmlab.workspace.feedback import now as utc_now
from lmlab.workspace.feedback import problem as rating_problem
from lmlab.workspace.layout import ledger_uri
from lmlab.workspace.ledger import client

PAGE = Path(__file__).with_name("playground.html")


# ------------------------------------------------------------------------------------------ columns
@dataclass
class Column:
    """One model on the page: its backend and where it came from, or why it could not be loaded."""

    ref: str  # what was asked for: run id, folder, GGUF file
    backend: Backend | None = None
    error: str | None = None
    run_id: str | None = None
    step: int | None = None
    checkpoint: str | None = None
    ledger_uri: str | None = None
    template: str = ""  # how prompts are rendered, in words
    presets: dict[str, SamplingPreset] = field(default_factory=dict)
    default_preset: str = "greedy"

    @property
    def model(self) -> str:
        return self.backend.model_id if self.backend is not None else self.ref

    @property
    def problem(self) -> str:
        """The load error, naming the model unless it already does."""
        return self.error if self.error is None or self.ref in self.error else f"{self.ref}: {self.error}"

    def describe(self) -> dict[str, Any]:
        return {"ref": self.ref, "model": self.model, "error": self.error, "run_id": self.run_id, "step": self.step,
                "checkpoint": self.checkpoint, "template": self.template, "default_preset": self.default_preset,
                "presets": {k: p.model_dump() for k, p in self.presets.items()}}


def load_column(ref: str | Path, *, gguf: bool = False, output_dir: str, base: str | None = None,
                merge: bool = False, preset: str | None = None, n_ctx: int = 0) -> Column:
    """Load one model for the page. Any failure becomes the column's message (the page shows it in the column)."""
    ref = str(ref)
    try:
        return _load_gguf(ref, preset, n_ctx, output_dir) if gguf else _load_run(ref, output_dir, base, merge, preset)
    except LmlabError as e:
        return Column(ref, error=str(e))
    except Exception as e:  # a broken file, an unreadable folder: the other columns still work
        return Column(ref, error=f"{type(e).__name__}: {e}")


def _load_run(ref: str, output_dir: str, base: str | None, merge: bool, preset: str | None) -> Column:
    backend = load_backend(ref, output_dir=output_dir, base=base, merge=merge, preset=preset)
    loaded = backend.loaded
    if loaded.template is not None and loaded.recipe is not None:
        template = f"template {loaded.template.format}"
    elif loaded.template is not None:
        template = "the tokenizer's chat template"
    else:
        template = "raw text (no template)"
    recipe_default = loaded.recipe.generation.default_preset if loaded.recipe is not None else "greedy"
    return Column(ref, backend, run_id=loaded.run_id, step=loaded.meta.get("step"), checkpoint=str(loaded.path),
                  ledger_uri=loaded.ledger_uri, template=template, presets=presets_of(loaded.recipe),
                  default_preset=preset or recipe_default)


def _load_gguf(ref: str, preset: str | None, n_ctx: int, output_dir: str) -> Column:
    from lmlab.serve.gguf_backend import LlamaCppBackend

    backend = LlamaCppBackend.load(ref, n_ctx=n_ctx, preset=preset)
    meta = backend.llm.metadata
    run_id = meta.get("lmlab.run_id") or None
    step = meta.get("lmlab.step")
    from_run, _ = backend.run_template
    presets = {"file": backend.default_sampling,  # the run's default preset, as the file states it
               **{k: p for k, p in BUILTIN_PRESETS.items() if p.mode != "contrastive"}}  # llama.cpp has none
    return Column(ref, backend, run_id=run_id, step=int(step) if step is not None else None, checkpoint=ref,
                  ledger_uri=ledger_uri(output_dir) if run_id else None,
                  template="the run's template (GGUF)" if from_run else "the file's chat template (GGUF)",
                  presets=presets, default_preset=preset or "file")


def load_columns(refs: Sequence[str], ggufs: Sequence[str | Path] = (), *, output_dir: str,
                 on_load: Callable[[str], None] = lambda ref: None, **options: Any) -> list[Column]:
    """The page's columns, in the order given (runs / folders first, then GGUF files); one to three."""
    wanted = [(str(r), False) for r in refs] + [(str(g), True) for g in ggufs]
    if not 1 <= len(wanted) <= MAX_COLUMNS:
        raise LmlabError(f"lmlab playground: give 1 to {MAX_COLUMNS} models (runs, folders or --gguf files); "
                         f"got {len(wanted)}")
    columns = []
    for ref, gguf in wanted:
        on_load(ref)
        opts = {k: v for k, v in options.items() if k in (("preset", "n_ctx") if gguf else ("base", "merge", "preset"))}
        columns.append(load_column(ref, gguf=gguf, output_dir=output_dir, **opts))
    return columns


# ------------------------------------------------------------------------------------------ ratings
class AnswerIn(BaseModel):
    """One rated answer as the page sends it: the column, the conversation it answered, the answer."""

    model_config = ConfigDict(extra="forbid")

    column: int = Field(ge=0)
    messages: list[Message] = Field(min_length=1)
    answer: str
    tokens: int | None = Field(None, ge=0)
    finish: Literal["eos", "stop_string", "length"] | None = None


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdict: Verdict
    winner: int | None = Field(None, ge=0, description="better: the index in `answers` of the better one")
    note: str = Field("", max_length=10_000)
    sampling: dict[str, Any] = Field(default_factory=dict)
    answers: list[AnswerIn] = Field(min_length=1, max_length=MAX_COLUMNS)


def ledger_counts(column: Column) -> dict[str, float] | None:
    """The run's feedback counts in its ledger; None when the model is not a ledger run or the ledger is
    unreadable."""
    if not (column.run_id and column.ledger_uri):
        return None
    try:
        metrics = client(column.ledger_uri).get_run(column.run_id).data.metrics
    except Exception:
        return None
    return {k: metrics.get(k, 0.0) for k in COUNTS}


# ------------------------------------------------------------------------------------------ the app
def create_playground(columns: Sequence[Column], *, feedback_log: str | Path, rater: str | None = None,
                      host: str = "127.0.0.1", auth: dict[str, str] | None = None,
                      max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP) -> FastAPI:
    """The playground app. `host` is where it will listen: beyond loopback it refuses to run without `auth`
    ({user: password}; every request then needs HTTP basic auth, and the user name rates). Without auth the
    ratings are `rater`'s (default: the OS user)."""
    check_access(host, auth)
    if not columns:
        raise LmlabError("lmlab playground: no models to show")
    columns = list(columns)
    local_rater = rater or _os_user()
    feedback_log = Path(feedback_log)
    lock = threading.Lock()  # one rating at a time: log line and ledger counts stay in step
    app = FastAPI(title="lmlab playground", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(LmlabError)
    def _user_error(request: Request, e: LmlabError):
        return error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return error_response(400, message, param=param)

    def rater_of(request: Request) -> str:
        user = basic_user(dict(request.scope["headers"])) if auth else None
        return user[0] if user else local_rater

    @app.get("/")
    def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    @app.get("/api/session")
    def session(request: Request):
        return {"rater": rater_of(request), "feedback_log": str(feedback_log), "max_tokens_cap": max_tokens_cap,
                "columns": [{**c.describe(), "index": i, "counts": ledger_counts(c)} for i, c in enumerate(columns)]}

    @app.post("/api/feedback")
    def feedback(body: FeedbackIn, request: Request):
        answers = []
        for i, a in enumerate(body.answers):
            if a.column >= len(columns) or columns[a.column].backend is None:
                raise LmlabError(f"answers[{i}].column: {a.column} is not a column with a loaded model")
            c = columns[a.column]
            answers.append(RatedAnswer(model=c.model, run_id=c.run_id, step=c.step, checkpoint=c.checkpoint,
                                       messages=a.messages, answer=a.answer, tokens=a.tokens, finish=a.finish))
        try:
            rating = Rating(time=utc_now(), rater=rater_of(request), verdict=body.verdict, winner=body.winner,
                            note=body.note.strip(), sampling=body.sampling, answers=answers)
        except ValidationError as e:
            raise LmlabError(rating_problem(e)) from None
        with lock:
            append_rating(feedback_log, rating)
            counts, problems = {}, []
            keys: dict[int, list[str]] = {}  # column -> counts to add one to
            for i, key in rating.counts():
                keys.setdefault(body.answers[i].column, []).append(key)
            for col, col_keys in keys.items():
                c = columns[col]
                if not (c.run_id and c.ledger_uri):
                    continue
                try:
                    counts[col] = add_counts(c.ledger_uri, c.run_id, col_keys)
                except Exception as e:  # the rating is in the log; say the ledger missed it
                    problems.append(f"{c.model}: ledger not updated ({type(e).__name__}: {e})")
        return {"saved": str(feedback_log), "rater": rating.rater, "counts": counts, "problems": problems}

    for i, c in enumerate(columns):
        if c.backend is not None:
            app.mount(f"/models/{i}", create_app(c.backend, max_tokens_cap=max_tokens_cap))
    app.add_middleware(Guard, api_key=None, max_body_bytes=DEFAULT_MAX_BODY_BYTES)  # ratings too: 413 over 1 MiB
    if auth:
        app.add_middleware(BasicAuth, users=auth)  # added last = runs first: no login, no body read
    return app


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (some containers)
        return "local"

"""LLM-as-judge: score a run's generations 0–100 with a judge model behind any OpenAI-compatible chat endpoint
(OpenAI, Gemini's compatible endpoint, Ollama, vLLM, llama.cpp's server, or `lmlab serve`).

The flow of `lmlab eval RUN --judge`:
1. rebuild the split the run held out (same filters, seed and part) and generate a response for every example with
   the run's template and a sampling preset; the generations are written to the run's `judge/` folder at once;
2. ask the judge, through a pinned and versioned prompt holding the input, the reference output and the model's
   response, for an integer score; `concurrency` requests at a time, each with a timeout and retries with
   exponential backoff (the `openai` client's);
3. parse the answer strictly: exactly one integer in 0..100; anything else is *unparseable* and counted with its
   reason, never scored as zero;
4. cache every answer by (prompt version, judge model, prompt text = input + reference + response) in a sqlite
   file in the workspace, so a re-run asks the endpoint nothing it has asked before;
5. when the endpoint fails midway the judgments made so far stay in the state file and the cache; `--resume`
   reuses the generations and continues.
The mean, distribution and per-example table go to the run's ledger (`judge/<split>/mean` shows in `lmlab compare`).

`JudgeConfig` is the recipe's `judge:` section; like the other inference sections it imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError, ServiceUnavailable
from lmlab.evaluation.json_check import checkpoint_split
from lmlab.generation.decoding import generate
from lmlab.models.loading import LoadedCheckpoint
from lmlab.recipe.generation import pick_preset
from lmlab.recipe.judge import PROMPTS, JudgeConfig
from lmlab.workspace.layout import workspace_of
from lmlab.workspace.ledger import client


# ----------------------------------------------------------------------------------------------- prompt
def judge_prompt(version: str, *, input: str, reference: str, response: str) -> str:
    if version not in PROMPTS:
        raise LmlabError(f"judge.prompt_version: unknown '{version}'; one of {', '.join(PROMPTS)}")
    return PROMPTS[version].format(input=input, reference=reference, response=response)


def input_text(template: Any, record: Mapping[str, Any]) -> str:
    """The example's input as a reader sees it: the rendered prompt (alpaca's scaffold included, as in the book's
    judge), or for chat the conversation before the answer as 'role: content' lines (no special tokens)."""
    if template.format == "chat":
        messages = template.messages(record)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return template.prompt_text(record).strip()


# ---------------------------------------------------------------------------------------------- parsing
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)?")
_OUT_OF_100 = re.compile(r"\s*(?:/|out of)\s*100\b", re.IGNORECASE)


def parse_score(answer: str) -> tuple[int | None, str]:
    """(score, '') for an answer holding exactly one integer in 0..100 ('85', ' 85.', 'Score: 85', '85/100',
    '85 out of 100'); else (None, why): 'no number', 'several numbers', 'not an integer', 'out of range'."""
    numbers = _NUMBER.findall(_OUT_OF_100.sub("", answer))
    if not numbers:
        return None, "no number"
    if len(numbers) > 1:
        return None, "several numbers"
    text = numbers[0]
    if "." in text or "," in text:
        return None, "not an integer"
    value = int(text)
    if not 0 <= value <= 100:
        return None, "out of range"
    return value, ""


# ------------------------------------------------------------------------------------------------ cache
class JudgeCache:
    """Judge answers by sha256(prompt version, judge model, prompt text); a sqlite file shared by every run of a
    workspace (several processes may use it at once)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, prompt_version TEXT, "
                         "judge_model TEXT, answer TEXT, created REAL)")
        self._db.commit()

    @staticmethod
    def key(prompt_version: str, judge_model: str, prompt: str) -> str:
        return hashlib.sha256(json.dumps([prompt_version, judge_model, prompt]).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT answer FROM judgments WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, prompt_version: str, judge_model: str, answer: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?)",
                             (key, prompt_version, judge_model, answer, time.time()))
            self._db.commit()

    def close(self) -> None:
        self._db.close()


# ------------------------------------------------------------------------------------------- the client
class JudgeEndpointError(ServiceUnavailable):
    """The judge endpoint failed after its retries (down, too slow, refusing the key or the request)."""


def make_client(cfg: JudgeConfig) -> Any:
    """An `openai.OpenAI` client for the judge endpoint (timeouts and retries with backoff are the client's)."""
    import openai

    missing = cfg.missing_endpoint()
    if missing:
        raise LmlabError(f"{' and '.join(missing)}: not set; give the judge endpoint in the recipe's judge: section "
                         "or as --judge-url URL --judge-model NAME")
    if cfg.missing_key():
        raise LmlabError(f"judge.api_key_env: environment variable {cfg.api_key_env} is not set; export it, or "
                         "set judge.api_key_env: '' (--api-key-env '') for an endpoint that needs no key")
    key = os.environ[cfg.api_key_env] if cfg.api_key_env else "none"
    return openai.OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=cfg.retries)


def ask(client: Any, cfg: JudgeConfig, prompt: str) -> str:
    """One judge answer (text). Endpoint failures, after the client's retries, become JudgeEndpointError."""
    import openai

    try:
        out = client.chat.completions.create(model=cfg.model, messages=[{"role": "user", "content": prompt}],
                                             temperature=cfg.temperature, max_tokens=cfg.max_tokens)
    except openai.APITimeoutError:
        raise JudgeEndpointError(f"judge endpoint {cfg.base_url}: no answer within judge.timeout_s = "
                                 f"{cfg.timeout_s:g} s ({cfg.retries} retries)") from None
    except openai.APIConnectionError as e:
        cause = e.__cause__ or e
        raise JudgeEndpointError(f"judge endpoint {cfg.base_url}: cannot connect ({type(cause).__name__}: {cause}) "
                                 f"after {cfg.retries} retries") from None
    except openai.AuthenticationError:
        raise JudgeEndpointError(f"judge endpoint {cfg.base_url}: the API key was refused (401); check "
                                 f"${cfg.api_key_env or '(no key sent)'}") from None
    except openai.APIStatusError as e:
        raise JudgeEndpointError(f"judge endpoint {cfg.base_url}: HTTP {e.status_code} for model '{cfg.model}': "
                                 f"{_short(e.message)}") from None
    choices = getattr(out, "choices", None)
    if not choices:
        raise JudgeEndpointError(f"judge endpoint {cfg.base_url}: the answer has no choices (not an OpenAI-compatible "
                                 "chat completion)")
    return choices[0].message.content or ""


def _short(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "…"


# --------------------------------------------------------------------------------------------- results
@dataclass
class JudgeItem:
    index: int
    input: str
    reference: str
    response: str
    stop_reason: str
    answer: str | None = None  # the judge's raw answer; None = not judged yet
    score: int | None = None
    problem: str = ""  # why the answer is unparseable ('' when it parsed)
    cached: bool = False

    @property
    def judged(self) -> bool:
        return self.answer is not None


@dataclass
class JudgeReport:
    split: str
    judge_model: str
    prompt_version: str
    items: list[JudgeItem]
    calls: int = 0  # endpoint requests this run made
    cache_hits: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> list[int]:
        return [i.score for i in self.items if i.score is not None]

    @property
    def unparseable(self) -> list[JudgeItem]:
        return [i for i in self.items if i.judged and i.score is None]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.scores) if self.scores else None

    def histogram(self) -> dict[str, int]:
        """Scores in bins of ten: '0-9' … '90-100' (100 counts in the last bin)."""
        bins = Counter(min(s // 10, 9) for s in self.scores)
        return {f"{b * 10}-{b * 10 + 9 if b < 9 else 100}": bins.get(b, 0) for b in range(10)}

    def metrics(self) -> dict[str, float]:
        p = f"judge/{self.split}"
        out = {f"{p}/n": float(len(self.items)), f"{p}/scored": float(len(self.scores)),
               f"{p}/unparseable": float(len(self.unparseable))}
        if self.scores:
            out |= {f"{p}/mean": self.mean, f"{p}/median": float(statistics.median(self.scores))}
        return out

    def lines(self) -> list[str]:
        n, scored = len(self.items), len(self.scores)
        head = (f"judge {self.judge_model} (prompt {self.prompt_version}) on {n} {self.split} examples: "
                + (f"mean score {self.mean:.1f} / 100 over {scored} scored" if scored else "no answer could be scored"))
        out = [head]
        bad = self.unparseable
        if bad:
            why = Counter(i.problem for i in bad)
            out.append(f"unparseable answers: {len(bad)} of {n} (" + ", ".join(f"{k}: {v}" for k, v in why.items())
                       + f"), e.g. {bad[0].answer!r}; they are left out of the mean, not scored 0")
        if scored:
            out.append("distribution: " + "  ".join(f"{k}: {v}" for k, v in self.histogram().items() if v))
        out.append(f"endpoint calls: {self.calls}, cached answers reused: {self.cache_hits}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "judge_model": self.judge_model, "prompt_version": self.prompt_version,
                "prompt": PROMPTS[self.prompt_version], "metrics": self.metrics(), "histogram": self.histogram(),
                "calls": self.calls, "cache_hits": self.cache_hits, "settings": self.settings,
                "examples": [asdict(i) for i in self.items]}


# ------------------------------------------------------------------------------------------------ state
def state_path(loaded: LoadedCheckpoint, cfg: JudgeConfig) -> Path:
    """Where generations and judgments of this checkpoint are kept between attempts: the run folder's judge/
    (or the checkpoint folder's, for a loose checkpoint)."""
    ckpt = Path(loaded.path)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.model or "judge")
    return run_dir / "judge" / f"{cfg.split}-{cfg.prompt_version}-{safe}.json"


def _identity(loaded: LoadedCheckpoint, cfg: JudgeConfig, sampling: Any) -> dict[str, Any]:
    """What must match for saved generations to be reused by --resume."""
    return {"checkpoint": str(Path(loaded.path).resolve()), "split": cfg.split, "max_examples": cfg.max_examples,
            "sampling": sampling.model_dump()}


def _save(path: Path, identity: Mapping[str, Any], items: Sequence[JudgeItem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"identity": dict(identity), "items": [asdict(i) for i in items]}, indent=1))
    tmp.replace(path)


def _load(path: Path, identity: Mapping[str, Any]) -> list[JudgeItem] | None:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("identity") != dict(identity):
        return None
    return [JudgeItem(**i) for i in saved["items"]]


# ------------------------------------------------------------------------------------------------- run
def judge_items(items: list[JudgeItem], cfg: JudgeConfig, *, cache: JudgeCache, client: Any,
                on_done: Callable[[JudgeItem], None] | None = None) -> tuple[int, int]:
    """Judge every item not judged yet: cached answers first, then each distinct prompt once, `cfg.concurrency`
    endpoint requests at a time. Returns (calls made, items answered from the cache). On an endpoint failure the
    items judged so far keep their answers (and are in the cache); the first failure is raised once the requests
    in flight have finished."""
    todo: dict[str, tuple[str, list[JudgeItem]]] = {}  # key -> (prompt, items asking it)
    hits = 0
    for item in items:
        if item.judged:
            continue
        prompt = judge_prompt(cfg.prompt_version, input=item.input, reference=item.reference, response=item.response)
        key = JudgeCache.key(cfg.prompt_version, cfg.model or "", prompt)
        answer = cache.get(key)
        if answer is not None:
            _record(item, answer, cached=True)
            hits += 1
            if on_done:
                on_done(item)
        else:
            todo.setdefault(key, (prompt, []))[1].append(item)
    calls = 0
    lock = threading.Lock()
    stop = threading.Event()

    def one(key: str, prompt: str, asking: list[JudgeItem]) -> None:
        nonlocal calls
        if stop.is_set():
            return
        with lock:
            calls += 1
        try:
            answer = ask(client, cfg, prompt)
        except BaseException:
            stop.set()  # ask nothing more; what is in flight finishes
            raise
        cache.put(key, cfg.prompt_version, cfg.model or "", answer)
        with lock:
            for item in asking:
                _record(item, answer, cached=False)
                if on_done:
                    on_done(item)

    with ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="judge") as pool:
        futures = [pool.submit(one, key, prompt, asking) for key, (prompt, asking) in todo.items()]
        wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.done() and f.exception() is not None for f in futures):
            stop.set()
            for f in futures:
                f.cancel()
            wait(futures)
            raise next(f.exception() for f in futures if not f.cancelled() and f.exception() is not None)
    return calls, hits


def _record(item: JudgeItem, answer: str, *, cached: bool) -> None:
    item.answer, item.cached = answer, cached
    item.score, item.problem = parse_score(answer)


def judge_run(loaded: LoadedCheckpoint, cfg: JudgeConfig, *, resume: bool = False, log: bool = True,
              cache_path: str | os.PathLike | None = None, client: Any = None,
              progress: Callable[[str], None] | None = None) -> JudgeReport:
    """Generate for `cfg.split` of the checkpoint's data and score every response with the judge endpoint.

    `cache_path`: the judgment cache (default: judge-cache.sqlite in the checkpoint's workspace). With `resume`
    the generations and answers saved by an earlier attempt on the same checkpoint, split and preset are reused."""

    say = progress or (lambda _msg: None)
    template = loaded.template
    if template is None or template.format == "text":
        raise LmlabError("eval --judge: the run has no prompt/completion template (task lm or text); the judge "
                         "compares a response with a reference output, so it needs a fine-tuning run")
    client = client if client is not None else make_client(cfg)  # settings errors before any generation
    sampling = pick_preset(loaded.recipe, cfg.preset,
                           {"max_new_tokens": cfg.max_new_tokens} if cfg.max_new_tokens else None)
    identity = _identity(loaded, cfg, sampling)
    path = state_path(loaded, cfg)
    items = _load(path, identity) if resume else None
    if resume and items is None:
        say(f"--resume: no saved attempt for this checkpoint, split and preset in {path}; starting afresh")
    if items is None:
        records = checkpoint_split(loaded.recipe, loaded.tokenizer, cfg.split)
        if not records:
            raise LmlabError(f"judge.split: the run's {cfg.split} split is empty; pick another split")
        records = records[:cfg.max_examples] if cfg.max_examples else records
        say(f"generating {len(records)} responses ({cfg.split} split)")
        gens = generate(loaded, records, sampling, batch_size=cfg.batch_size)
        items = [JudgeItem(i, input_text(template, r), template.completion_text(r).strip(), g.text.strip(),
                           g.stop_reason) for i, (r, g) in enumerate(zip(records, gens, strict=True))]
        _save(path, identity, items)
    else:
        say(f"--resume: {sum(i.judged for i in items)} of {len(items)} already judged ({path})")
    cache = JudgeCache(cache_path or default_cache_path(loaded))
    last_save = [time.monotonic()]

    def checkpoint_progress(_item: JudgeItem) -> None:  # keep partial results on disk as they come
        if time.monotonic() - last_save[0] > 2:
            _save(path, identity, items)
            last_save[0] = time.monotonic()

    settings = cfg.model_dump() | {"preset": cfg.preset or "default", "sampling": sampling.model_dump()}
    try:
        calls, hits = judge_items(items, cfg, cache=cache, client=client, on_done=checkpoint_progress)
    except JudgeEndpointError as e:
        _save(path, identity, items)
        done = sum(i.judged for i in items)
        raise JudgeEndpointError(f"{e}; kept {done} of {len(items)} judgments (and the generations) in {path}; "
                                 "fix the endpoint and continue with `lmlab eval RUN --judge --resume`") from None
    finally:
        cache.close()
    _save(path, identity, items)
    report = JudgeReport(cfg.split, cfg.model or "", cfg.prompt_version, items, calls, hits, settings)
    if log and loaded.run_id and loaded.ledger_uri:
        log_report(loaded, report)
    return report


def judge_trial(run_id: str, output_dir: str) -> dict[str, float]:
    """A sweep trial's score when the sweep optimizes judge/<split>/<stat> (`lmlab sweep` passes this to
    plan_sweep): judge the run's best checkpoint with its recipe's judge: section, as `lmlab eval RUN --judge
    --resume` would (generations and answers of an interrupted attempt reused), log the report to the run and
    return its judge/ metrics."""
    from lmlab.models.loading import load_checkpoint

    loaded = load_checkpoint(run_id, output_dir=output_dir)
    return judge_run(loaded, loaded.recipe.judge, resume=True).metrics()


def default_cache_path(loaded: LoadedCheckpoint) -> Path:
    """judge-cache.sqlite in the workspace holding the checkpoint (<workspace>/runs/<id>/checkpoints/step-N),
    else beside the checkpoint."""
    if os.environ.get("LMLAB_JUDGE_CACHE"):
        return Path(os.environ["LMLAB_JUDGE_CACHE"])

    workspace = workspace_of(loaded.path)
    return (workspace or Path(loaded.path).resolve().parent) / "judge-cache.sqlite"


def log_report(loaded: LoadedCheckpoint, report: JudgeReport) -> None:
    """Metrics judge/<split>/{mean,median,n,scored,unparseable}, tags naming the judge, and the per-example table
    as the artifact judge/<split>.json."""
    from mlflow.entities import Metric, RunTag

    c = client(loaded.ledger_uri)
    step, now = int(loaded.meta.get("step", 0)), int(time.time() * 1000)
    tags = [RunTag(f"judge.{report.split}.model", report.judge_model),
            RunTag(f"judge.{report.split}.prompt_version", report.prompt_version)]
    c.log_batch(loaded.run_id, metrics=[Metric(k, float(v), now, step) for k, v in report.metrics().items()], tags=tags)
    c.log_dict(loaded.run_id, report.to_dict() | {"checkpoint": str(loaded.path)}, f"judge/{report.split}.json")

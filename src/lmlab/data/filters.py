"""Audited data filters: the recipe's `data.filters`, applied in order, each reporting what it dropped.

A record is one example as a dict. A *field path* selects text from it:

- `output`             the string in `record["output"]` (a list of strings gives all of them; null gives none)
- `meta.title`         nested mappings are walked with dots
- `messages`           every message's `content` of a chat example (`messages`: list of {role, content})
- `messages.assistant` the contents of the assistant turns only (likewise `.user`, `.system`)

Every filter returns, per step, how many examples came in, were kept and were dropped, the count of each
drop reason and the first few dropped examples (text truncated), so nothing disappears without a number.
Results are cached per step under `cache_dir`, keyed by a fingerprint of that step's input records and the
step's spec, so re-running a recipe does not redo a slow dedupe or a user predicate.

Randomness: `median_length_drop` draws one uniform number per example from sha256(seed, the example's
content), not from a stream. An example's fate therefore depends only on the seed and its own content:
shuffling the data or adding examples never changes whether another example is kept. (Two identical
examples share one fate; dedupe them first if that matters.)
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.recipe.filters import (
    BalancedMarkupFilter,
    ExactDedupeFilter,
    FilterSpec,
    MedianLengthDropFilter,
    NearDedupeFilter,
    PredicateFilter,
    RegexFilter,
    TokenCountFilter,
    WordCountFilter,
    _LengthBounds,
    parse_filters,
)

Record = dict[str, Any]
Tokenizer = Callable[[str], Sequence[int]]  # text -> token ids, e.g. lambda t: tok.encode(t, add_special_tokens=False)

SAMPLES_PER_FILTER = 3
SAMPLE_CHARS = 160
_CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------- specs


# ------------------------------------------------------------------------------------------ report
@dataclass
class DroppedSample:
    index: int  # position in the list given to apply_filters
    reason: str
    detail: str
    text: str  # the selected text, truncated to SAMPLE_CHARS

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "reason": self.reason, "detail": self.detail, "text": self.text}


@dataclass
class FilterStepReport:
    name: str
    kind: str
    input: int
    kept: int
    reasons: dict[str, int]  # reason -> examples dropped for it; sums to `dropped`
    samples: list[DroppedSample]
    cached: bool = False

    @property
    def dropped(self) -> int:
        return self.input - self.kept

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "input": self.input, "kept": self.kept,
            "dropped": self.dropped, "reasons": dict(self.reasons),
            "samples": [s.to_dict() for s in self.samples], "cached": self.cached,
        }


@dataclass
class FilterReport:
    input: int
    steps: list[FilterStepReport] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.steps[-1].kept if self.steps else self.input

    @property
    def dropped(self) -> int:
        return self.input - self.kept

    @property
    def funnel(self) -> list[tuple[str, int]]:
        """[('input', n), (filter name, examples left after it), ...]"""
        return [("input", self.input)] + [(s.name, s.kept) for s in self.steps]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the run's ledger."""
        return {
            "input": self.input, "kept": self.kept, "dropped": self.dropped,
            "funnel": [{"name": n, "examples": k} for n, k in self.funnel],
            "filters": [s.to_dict() for s in self.steps],
        }

    def lines(self) -> list[str]:
        """Human summary: one line per filter, its reasons, and its dropped samples."""
        share = f"{100 * self.dropped / self.input:.1f}%" if self.input else "0%"
        out = [f"filters: {self.input} -> {self.kept} examples ({self.dropped} dropped, {share})"]
        for i, s in enumerate(self.steps, 1):
            cached = "  (cached)" if s.cached else ""
            out.append(f"  {i}. {s.name}: {s.input} -> {s.kept} (-{s.dropped}){cached}")
            for reason, n in s.reasons.items():
                out.append(f"       {n} x {reason}")
            for sample in s.samples:
                out.append(f"       e.g. #{sample.index} [{sample.detail}] {json.dumps(sample.text, ensure_ascii=False)}")
        return out


# ---------------------------------------------------------------------------------- field paths
def select_texts(record: Record, path: str) -> list[str] | None:
    """Texts at `path` in `record`; None when the path does not exist (see the module docstring)."""
    node: Any = record
    parts = path.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, list) and all(isinstance(m, dict) for m in node):
            # chat messages: the remaining part names a role
            rest = ".".join(parts[i:])
            return [_text(m.get("content")) for m in node if m.get("role") == rest]
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if node is None:
        return []
    if isinstance(node, list):
        if all(isinstance(m, dict) for m in node):
            return [_text(m.get("content")) for m in node]
        return [_text(v) for v in node]
    return [_text(node)]


def _text(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def _texts_of_all(records: Sequence[Record], path: str, where: str) -> list[list[str]]:
    """select_texts for every record; a path missing from a record, or a role in no message, is an error."""
    out = []
    for i, record in enumerate(records):
        texts = select_texts(record, path)
        if texts is None:
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            raise LmlabError(
                f"{where}.field: '{path}' not found in example {i} (its keys: {keys}); fix the field path"
            )
        out.append(texts)
    head, _, role = path.partition(".")
    if role and records and not any(out) and _is_chat(records[0].get(head)):
        roles = sorted({m.get("role") for r in records for m in r.get(head) or [] if isinstance(m, dict)} - {None})
        raise LmlabError(f"{where}.field: no message has role '{role}' (roles seen: {', '.join(roles)}); fix the role")
    return out


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


# ------------------------------------------------------------------------------------------ filters
@dataclass
class _Drop:
    position: int  # position in this step's input
    reason: str  # category, counted in the report
    detail: str  # this example's specifics, shown with samples


@dataclass
class _Context:
    seed: int
    tokenizer: Tokenizer | None
    where: str  # 'data.filters[i]', for error messages
    record_hashes: list[str]  # sha256 of each record of this step's input


def _run_length(spec: _LengthBounds, records: Sequence[Record], ctx: _Context, unit: str,
                count: Callable[[str], int]) -> list[_Drop]:
    drops = []
    for pos, texts in enumerate(_texts_of_all(records, spec.field, ctx.where)):
        counts = [count(t) for t in texts]
        values = counts if spec.per == "text" else [sum(counts)]
        per = "a text has" if spec.per == "text" else "has"
        if spec.min is not None and values and min(values) < spec.min:
            drops.append(_Drop(pos, f"{per} fewer than {spec.min} {unit}", f"{min(values)} {unit}"))
        elif spec.max is not None and values and max(values) > spec.max:
            drops.append(_Drop(pos, f"{per} more than {spec.max} {unit}", f"{max(values)} {unit}"))
    return drops


def _run_median(spec: MedianLengthDropFilter, records: Sequence[Record], ctx: _Context) -> list[_Drop]:
    seed = spec.seed if spec.seed is not None else ctx.seed
    drops = []
    for pos, texts in enumerate(_texts_of_all(records, spec.field, ctx.where)):
        median = statistics.median([len(t.split()) for t in texts]) if texts else 0
        p = spec.drop_probability(median)
        if p > 0 and example_uniform(seed, ctx.record_hashes[pos]) < p:
            reason = f"median <= {spec.lo:g} words" if p == 1.0 else f"median in ({spec.lo:g}, {spec.hi:g}) words, drawn"
            drops.append(_Drop(pos, reason, f"median {median:g} words, p_drop {p:.2f}"))
    return drops


def example_uniform(seed: int, record_hash: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, example content): the example's own 'coin'."""
    digest = hashlib.sha256(f"{seed}:{record_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


_FENCED = re.compile(r"```.*?```", re.DOTALL)


def unbalanced_marks(text: str, marks: Sequence[str]) -> dict[str, int]:
    """{mark: count} for each mark that occurs an odd number of times (`*`, `"` outside ``` blocks)."""
    outside_code = _FENCED.sub(" ", text)
    odd = {}
    for mark in marks:
        n = text.count(mark) if mark == "```" else outside_code.count(mark)
        if n % 2:
            odd[mark] = n
    return odd


def _run_markup(spec: BalancedMarkupFilter, records: Sequence[Record], ctx: _Context) -> list[_Drop]:
    drops = []
    for pos, texts in enumerate(_texts_of_all(records, spec.field, ctx.where)):
        for text in texts:
            odd = unbalanced_marks(text, spec.marks)
            if odd:
                first = next(iter(odd))
                detail = ", ".join(f"{n} x {m}" for m, n in odd.items())
                drops.append(_Drop(pos, f"unbalanced {first}", detail))
                break
    return drops


def _run_regex(spec: RegexFilter, records: Sequence[Record], ctx: _Context) -> list[_Drop]:
    pattern = re.compile(spec.pattern)
    drops = []
    for pos, texts in enumerate(_texts_of_all(records, spec.field, ctx.where)):
        match = next((m for m in map(pattern.search, texts) if m), None)
        if spec.action == "drop" and match:
            drops.append(_Drop(pos, f"matches /{spec.pattern}/", f"matched {match.group(0)[:40]!r}"))
        elif spec.action == "keep" and not match:
            drops.append(_Drop(pos, f"does not match /{spec.pattern}/", "no match"))
    return drops


def _run_dedupe_exact(spec: ExactDedupeFilter, records: Sequence[Record], ctx: _Context,
                      original: Sequence[int]) -> list[_Drop]:
    if spec.fields is None:
        keys = ctx.record_hashes
    else:
        per_field = [_texts_of_all(records, f, ctx.where) for f in spec.fields]
        keys = [_sha256(_canonical([texts[pos] for texts in per_field])) for pos in range(len(records))]
    first: dict[str, int] = {}
    drops = []
    for pos, key in enumerate(keys):
        if key in first:
            drops.append(_Drop(pos, "exact duplicate", f"of #{original[first[key]]}"))
        else:
            first[key] = pos
    return drops


def _run_dedupe_near(spec: NearDedupeFilter, records: Sequence[Record], ctx: _Context,
                     original: Sequence[int]) -> list[_Drop]:
    from datasketch import MinHash, MinHashLSH

    seed = spec.seed if spec.seed is not None else ctx.seed
    # datasketch draws the permutations from the seed: build them once, not per example
    template = MinHash(num_perm=spec.num_perm, seed=seed)
    lsh = MinHashLSH(threshold=spec.threshold, num_perm=spec.num_perm)
    kept: dict[int, Any] = {}
    drops = []
    for pos, texts in enumerate(_texts_of_all(records, spec.field, ctx.where)):
        words = re.findall(r"\w+", " ".join(texts).lower())
        shingles = {" ".join(words[i:i + spec.ngram]) for i in range(max(1, len(words) - spec.ngram + 1))}
        mh = MinHash(num_perm=spec.num_perm, seed=seed, permutations=template.permutations, scheme=template.scheme)
        mh.update_batch([s.encode() for s in shingles])
        # LSH proposes candidates; confirm with the estimated Jaccard so `threshold` means what it says
        scored = [(mh.jaccard(kept[c]), c) for c in lsh.query(mh)]
        best = max((s for s in scored if s[0] >= spec.threshold), default=None, key=lambda s: (s[0], -s[1]))
        if best is not None:
            drops.append(_Drop(pos, "near duplicate", f"of #{original[best[1]]}, jaccard ~{best[0]:.2f}"))
        else:
            kept[pos] = mh
            lsh.insert(pos, mh)
    return drops


def _run_predicate(spec: PredicateFilter, records: Sequence[Record], ctx: _Context,
                   function: Callable[[Record], bool]) -> list[_Drop]:
    drops = []
    for pos, record in enumerate(records):
        result = function(record)
        if not (isinstance(result, bool) or type(result).__name__ == "bool_"):
            raise LmlabError(
                f"{ctx.where}.path: {spec.path} returned {type(result).__name__} for example {pos}; "
                "it must return True (keep) or False (drop)"
            )
        if not result:
            drops.append(_Drop(pos, f"{spec.path} returned False", "predicate False"))
    return drops


def load_predicate(path: str, where: str = "data.filters[?]") -> Callable[[Record], bool]:
    """Import 'package.module:function'; errors say what is missing."""
    module_name, _, function_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise LmlabError(f"{where}.path: cannot import module '{module_name}' ({e}); check it is on PYTHONPATH") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise LmlabError(f"{where}.path: module '{module_name}' has no function '{function_name}'; check the name")
    return function


def _code_identity(function: Callable[..., Any]) -> str:
    """sha256 of the source of the function's module, so editing the predicate invalidates its cache."""
    try:
        source_file = inspect.getsourcefile(function)
        if source_file:
            return _sha256(Path(source_file).read_bytes())
        return _sha256(inspect.getsource(function))
    except (OSError, TypeError):
        return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', '?')}"


_TOKENIZER_PROBE = 'The quick brown fox: "*waves*" -- 1234 ünïcödé\n```x = 1```'


def tokenizer_identity(tokenizer: Tokenizer) -> str:
    """Name + sha256 of the ids it gives a fixed probe text: different tokenizers, different cache keys.

    Also checks that the tokenizer returns a list of ids: a Hugging Face tokenizer *called* on text returns
    a dict-like BatchEncoding, whose len() would count its keys, not tokens.
    """
    ids = tokenizer(_TOKENIZER_PROBE)
    try:
        is_ids = not isinstance(ids, str | bytes) and all(isinstance(i, int) or type(i).__name__.startswith("int")
                                                          for i in ids)  # numpy ints too
    except TypeError:  # not iterable, e.g. a tokenizers.Encoding
        is_ids = False
    if not is_ids:
        raise LmlabError(
            f"tokenizer: must turn text into a list of token ids, got {type(ids).__name__}; "
            "pass e.g. lambda text: tok.encode(text, add_special_tokens=False)"
        )
    name = getattr(tokenizer, "name_or_path", None) or getattr(tokenizer, "__qualname__", type(tokenizer).__name__)
    return f"{name}:{_sha256(_canonical([int(i) for i in ids]))[:16]}"


# ---------------------------------------------------------------------------------------- applying
def apply_filters(
    records: Sequence[Record],
    specs: Sequence[FilterSpec | dict[str, Any]],
    *,
    seed: int,
    tokenizer: Tokenizer | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[Record], FilterReport]:
    """Apply `specs` in order; return the kept records (same objects, same order) and the audit report.

    `seed` is the run's seed, used by filters whose own `seed` is unset. `tokenizer` (text -> ids) is
    needed only by `token_count` filters. With `cache_dir`, each step's result is stored as JSON under a key
    made of the step input's fingerprint, the spec (without its name), the effective seed, and the
    tokenizer's or predicate's identity; a step whose key is found is not recomputed.
    """
    specs = parse_filters(specs)
    where = [f"data.filters[{i}]" for i in range(len(specs))]
    # resolve everything a step needs before running any step: a missing tokenizer fails in seconds, not after a dedupe
    predicates: dict[int, Callable[[Record], bool]] = {}
    for i, spec in enumerate(specs):
        if isinstance(spec, TokenCountFilter) and tokenizer is None:
            raise LmlabError(
                f"{where[i]}: token_count needs a tokenizer and none is available here; "
                "pass tokenizer= (text -> ids) or use kind: word_count"
            )
        if isinstance(spec, PredicateFilter):
            predicates[i] = load_predicate(spec.path, where[i])
    tok_id = tokenizer_identity(tokenizer) if tokenizer is not None and any(
        isinstance(s, TokenCountFilter) for s in specs) else None

    hashes = [_sha256(_canonical(r)) for r in records]
    positions = list(range(len(records)))  # original indices of the records still in
    report = FilterReport(input=len(records))
    cache = Path(cache_dir) if cache_dir is not None else None
    for i, spec in enumerate(specs):
        step_records = [records[p] for p in positions]
        step_hashes = [hashes[p] for p in positions]
        key = _step_key(spec, step_hashes, seed, tok_id, predicates.get(i))
        stored = _read_cache(cache, key, len(step_records))
        if stored is None:
            ctx = _Context(seed=seed, tokenizer=tokenizer, where=where[i], record_hashes=step_hashes)
            drops = _run_step(spec, step_records, ctx, positions, predicates.get(i))
            _write_cache(cache, key, drops, len(step_records))
        else:
            drops = stored
        report.steps.append(_step_report(spec, step_records, positions, drops, cached=stored is not None))
        dropped = {d.position for d in drops}
        positions = [p for pos, p in enumerate(positions) if pos not in dropped]
    return [records[p] for p in positions], report


def _run_step(spec: FilterSpec, records: Sequence[Record], ctx: _Context, original: Sequence[int],
              predicate: Callable[[Record], bool] | None) -> list[_Drop]:
    if isinstance(spec, WordCountFilter):
        return _run_length(spec, records, ctx, "words", lambda t: len(t.split()))
    if isinstance(spec, TokenCountFilter):
        assert ctx.tokenizer is not None
        tokenizer = ctx.tokenizer
        return _run_length(spec, records, ctx, "tokens", lambda t: len(tokenizer(t)))
    if isinstance(spec, MedianLengthDropFilter):
        return _run_median(spec, records, ctx)
    if isinstance(spec, BalancedMarkupFilter):
        return _run_markup(spec, records, ctx)
    if isinstance(spec, RegexFilter):
        return _run_regex(spec, records, ctx)
    if isinstance(spec, ExactDedupeFilter):
        return _run_dedupe_exact(spec, records, ctx, original)
    if isinstance(spec, NearDedupeFilter):
        return _run_dedupe_near(spec, records, ctx, original)
    assert isinstance(spec, PredicateFilter) and predicate is not None
    return _run_predicate(spec, records, ctx, predicate)


def _step_report(spec: FilterSpec, records: Sequence[Record], original: Sequence[int], drops: list[_Drop],
                 cached: bool) -> FilterStepReport:
    reasons = Counter(d.reason for d in drops)
    paths = [spec.field] if hasattr(spec, "field") else getattr(spec, "fields", None) or []
    samples = []
    for d in drops[:SAMPLES_PER_FILTER]:
        record = records[d.position]
        texts = [t for path in paths for t in select_texts(record, path) or []]
        text = "\n".join(texts) if paths else _canonical(record)
        if len(text) > SAMPLE_CHARS:
            text = text[:SAMPLE_CHARS - 3] + "..."
        samples.append(DroppedSample(original[d.position], d.reason, d.detail, text))
    return FilterStepReport(
        name=spec.label(), kind=spec.kind, input=len(records), kept=len(records) - len(drops),
        reasons=dict(reasons.most_common()), samples=samples, cached=cached,
    )


# ------------------------------------------------------------------------------------------- cache
def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def _sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def fingerprint(records: Sequence[Record]) -> str:
    """sha256 over the records in order (canonical JSON of each): equal data, equal fingerprint."""
    return _sha256("\n".join(_sha256(_canonical(r)) for r in records))


def _step_key(spec: FilterSpec, record_hashes: Sequence[str], seed: int, tok_id: str | None,
              predicate: Callable[[Record], bool] | None) -> str:
    seeded = isinstance(spec, MedianLengthDropFilter | NearDedupeFilter) and spec.seed is None
    parts = {
        "version": _CACHE_VERSION,
        "input": _sha256("\n".join(record_hashes)),
        "spec": spec.model_dump(mode="json", exclude={"name"}),
        "seed": seed if seeded else None,  # only filters that use the run's seed depend on it
        "tokenizer": tok_id if isinstance(spec, TokenCountFilter) else None,
        "code": _code_identity(predicate) if predicate is not None else None,
    }
    return _sha256(_canonical(parts))


def _read_cache(cache: Path | None, key: str, n_input: int) -> list[_Drop] | None:
    if cache is None:
        return None
    path = cache / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        drops = [_Drop(int(p), str(r), str(d)) for p, r, d in data["drops"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: recompute and overwrite
    if data.get("input") != n_input:
        return None
    return drops


def _write_cache(cache: Path | None, key: str, drops: list[_Drop], n_input: int) -> None:
    if cache is None:
        return
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{key}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    # dropped positions (relative to the step's input) with their reasons; kept = the rest, in order
    tmp.write_text(json.dumps({"input": n_input, "drops": [[d.position, d.reason, d.detail] for d in drops]}))
    os.replace(tmp, path)

"""`lmlab diff A B`: why two runs may differ, most likely causes first.

Everything a run records is compared, in this order: the resolved recipe (defaults included), the data
(split fingerprints and per-example hashes, tokenizer, truncation counts, filter funnel), the code (git
commit, uncommitted patch), the environment (package versions, device, dtype, threads), the seeds; then
what follows from them (derived sizes) and what came out (metrics). Two runs with equal recorded inputs say so in one line.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from lmlab.analysis.compare import (
    DERIVED,
    THROUGHPUT,
    is_bookkeeping,
    is_recipe_key,
    param,
    read_artifact,
    read_json_artifact,
    recipe_default,
)
from lmlab.console import Column, Grid, duration
from lmlab.data.splits import example_hashes  # noqa: F401  (diff compares these per split)
from lmlab.workspace.runs import RunRow

SECTIONS = ("config", "data", "code", "environment", "seed", "derived", "metrics")
SEED_KEYS = ("run.seed", "data.split.seed")
# within the config, the sections most likely to move a metric come first
CONFIG_ORDER = ("model", "adapter", "train", "data", "tokenizer", "eval")
ENV_ORDER = ("pkg.", "device", "gpu", "dtype", "threads", "gpu_count", "python", "cpu", "cpu_count", "platform")
SPLIT_HASHES = "split_hashes.json"


def count_example_changes(a: list[str], b: list[str]) -> tuple[int, int]:
    """(examples only in A, examples only in B), as multisets: a duplicated example counts twice."""
    ca, cb = Counter(a), Counter(b)
    return sum((ca - cb).values()), sum((cb - ca).values())


@dataclass
class Difference:
    section: str  # one of SECTIONS
    key: str
    a: str
    b: str
    note: str = ""

    def line(self) -> str:
        text = f"{self.key}: {self.a} → {self.b}" if (self.a or self.b) else self.key
        return text + (f"  ({self.note})" if self.note else "")


@dataclass
class RunDiff:
    a: RunRow
    b: RunRow
    differences: list[Difference] = field(default_factory=list)

    @property
    def input_differences(self) -> list[Difference]:
        return [d for d in self.differences if d.section != "metrics"]

    def section(self, name: str) -> list[Difference]:
        return [d for d in self.differences if d.section == name]

    def lines(self) -> list[str]:
        out = [_identity("A", self.a), _identity("B", self.b)]
        if not self.input_differences:
            out.append("no differences in recorded inputs")
            if self.section("metrics"):  # same inputs, different results: say where to look
                out.append("metrics (not explained by recorded inputs: nondeterministic kernels, or an input "
                           "lmlab does not record)")
                out += [f"  {d.line()}" for d in self.section("metrics")]
            return out
        for name in SECTIONS:
            found = self.section(name)
            if found:
                out.append(name)
                out += [f"  {d.line()}" for d in found]
        return out

    def text(self) -> str:
        return "\n".join(self.lines()) + "\n"

    def ordered(self) -> list[Difference]:
        """The differences section by section, in the order the text lists them."""
        return [d for name in SECTIONS for d in self.section(name)]

    def grid(self) -> Grid:
        """One row per difference (`lmlab diff --format csv`)."""
        ds = self.ordered()
        return Grid([Column(name, name, [getattr(d, name) for d in ds]) for name in ("section", "key", "a", "b", "note")])

    def to_dict(self) -> dict:
        """`lmlab diff --format json`: both runs' identities, whether recorded inputs differ, every difference."""
        def who(r: RunRow) -> dict:
            rec = r.record()
            return {k: rec[k] for k in ("run_id", "name", "status", "start_time", "duration_s", "paths")}

        return {"a": who(self.a), "b": who(self.b), "inputs_differ": bool(self.input_differences),
                "differences": [asdict(d) for d in self.ordered()]}


def _identity(label: str, r: RunRow) -> str:
    started = datetime.fromtimestamp(r.start_time).strftime("%Y-%m-%d %H:%M:%S")
    took = f", took {duration(r.duration_s)}" if r.duration_s is not None else ""
    reason = r.tags.get("lmlab.failure_reason")
    status = r.status + (f": {reason}" if reason and r.status != "FINISHED" else "")
    return f"{label} {r.run_id} {r.name} started {started}{took}, {status}"


def _show(v: Any) -> str:
    return "(not recorded)" if v is None else str(v)


# ------------------------------------------------------------------------------------------------ diff
def diff_runs(a: RunRow, b: RunRow, uri: str | None = None) -> RunDiff:
    """All recorded differences between runs a and b. `uri` lets it read artifacts (patches, split hashes,
    filter reports); without it only params, tags and metrics are compared."""
    out = RunDiff(a, b)
    out.differences += _config(a, b)
    out.differences += _data(a, b, uri)
    out.differences += _code(a, b, uri)
    out.differences += _environment(a, b)
    out.differences += _seed(a, b)
    out.differences += _metrics(a, b)
    return out


def _changed(a: dict, b: dict, keys) -> list[tuple[str, Any, Any]]:
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def _recipe_changed(a: RunRow, b: RunRow, keys) -> list[Difference]:
    """Recipe fields that differ, a field one run did not record counting as its default (and saying so)."""
    out = []
    for k in keys:
        x, y = param(a, k), param(b, k)
        if x == y:
            continue
        absent = [who for who, r in (("A", a), ("B", b)) if k not in r.params and recipe_default(k) is not None]
        note = f"default; not recorded by {' and '.join(absent)}" if absent else ""
        out.append(Difference("config", k, _show(x), _show(y), note))
    return out


def _config(a: RunRow, b: RunRow) -> list[Difference]:
    keys = [k for k in dict.fromkeys([*a.params, *b.params])
            if is_recipe_key(k) and not is_bookkeeping(k) and k not in SEED_KEYS]
    rank = {s: i for i, s in enumerate(CONFIG_ORDER)}
    keys.sort(key=lambda k: rank.get(k.split(".")[0], len(rank)))
    out = _recipe_changed(a, b, keys)
    derived = [k for k in dict.fromkeys([*a.params, *b.params]) if k.startswith("derived.") and k != "derived.device"]
    derived.sort(key=lambda k: DERIVED.index(k) if k in DERIVED else len(DERIVED))
    # consequences of the causes above (a LoRA rank changes the trainable count): listed after them
    out += [Difference("derived", k, _show(x), _show(y)) for k, x, y in _changed(a.params, b.params, derived)]
    known = {*keys, *derived, *SEED_KEYS, "derived.device"}
    other = [k for k in dict.fromkeys([*a.params, *b.params])
             if k not in known and not is_recipe_key(k) and not k.startswith(("data.", "tokenizer."))]
    out += [Difference("config", k, _show(x), _show(y)) for k, x, y in _changed(a.params, b.params, other)]
    return out


def _data(a: RunRow, b: RunRow, uri: str | None) -> list[Difference]:
    out: list[Difference] = []
    pa, pb = a.params, b.params
    prefix = "data.fingerprint."
    splits = [k.removeprefix(prefix) for k in dict.fromkeys([*pa, *pb]) if k.startswith(prefix)]
    changed = [s for s in splits if pa.get(prefix + s) != pb.get(prefix + s)]
    hashes_a = read_json_artifact(uri, a.run_id, SPLIT_HASHES) if changed and uri else None
    hashes_b = read_json_artifact(uri, b.run_id, SPLIT_HASHES) if changed and uri else None
    for s in changed:
        fa, fb = pa.get(prefix + s), pb.get(prefix + s)
        ha, hb = (hashes_a or {}).get(s), (hashes_b or {}).get(s)
        if ha is not None and hb is not None:
            only_a, only_b = count_example_changes(ha, hb)
            if only_a == 0 and only_b == 0:
                note = f"same {len(ha)} examples in a different order"
            else:
                note = f"{only_a} of {len(ha)} examples only in A, {only_b} of {len(hb)} only in B"
        else:
            note = "fingerprint differs; per-example hashes (split_hashes.json) not recorded, so not counted"
        out.append(Difference("data", f"{s} split", _short(fa), _short(fb), note))
    if pa.get("tokenizer.hash") != pb.get("tokenizer.hash"):  # (tokenizer.vocab_size is a config line)
        out.append(Difference("data", "tokenizer.hash", _short(pa.get("tokenizer.hash")),
                              _short(pb.get("tokenizer.hash"))))
    counts = [k for k in dict.fromkeys([*pa, *pb])
              if k.startswith("data.") and not k.startswith(prefix) and not is_recipe_key(k)]
    counts.sort(key=lambda k: (not any(w in k for w in ("truncated", "dropped")), k))  # truncation first
    out += [Difference("data", k, _show(x), _show(y)) for k, x, y in _changed(pa, pb, counts)]
    if uri and ("data.filtered.kept" in pa or "data.filtered.kept" in pb):
        fa, fb = (read_json_artifact(uri, r.run_id, "filters.json") for r in (a, b))
        funnel_a, funnel_b = _funnel(fa), _funnel(fb)
        if funnel_a != funnel_b:
            out.append(Difference("data", "filter funnel", funnel_a or "(none)", funnel_b or "(none)"))
    return out


def _short(v: Any) -> str:
    s = _show(v)
    return s[:12] if re.fullmatch(r"[0-9a-f]{32,}", s) else s


def _funnel(report: dict | None) -> str:
    if not report:
        return ""
    return " → ".join(f"{step['name']} {step['examples']}" for step in report.get("funnel", []))


def _code(a: RunRow, b: RunRow, uri: str | None) -> list[Difference]:
    out = []
    ta, tb = a.tags, b.tags
    if ta.get("git.commit") != tb.get("git.commit"):
        out.append(Difference("code", "git.commit", _short_commit(ta.get("git.commit")),
                              _short_commit(tb.get("git.commit"))))
    dirty_a, dirty_b = ta.get("git.dirty") == "true", tb.get("git.dirty") == "true"
    if not (dirty_a or dirty_b):
        return out
    patch_a = read_artifact(uri, a.run_id, "git.patch") if uri and dirty_a else None
    patch_b = read_artifact(uri, b.run_id, "git.patch") if uri and dirty_b else None
    if dirty_a != dirty_b:
        files = _patch_files(patch_a if dirty_a else patch_b)
        who = "A" if dirty_a else "B"
        note = f"{who} ran with uncommitted changes" + (f" to {', '.join(files)}" if files else "") + " (git.patch)"
        out.append(Difference("code", "git.dirty", ta.get("git.dirty", "(not recorded)"),
                              tb.get("git.dirty", "(not recorded)"), note))
    elif patch_a != patch_b:
        files = sorted(set(_patch_files(patch_a)) | set(_patch_files(patch_b)))
        out.append(Difference("code", "uncommitted changes differ (git.patch)", "", "",
                              f"files: {', '.join(files)}" if files else ""))
    return out


def _short_commit(c: str | None) -> str:
    return c[:10] if c else "(not a git repository)"


def _patch_files(patch: str | None) -> list[str]:
    if not patch:
        return []
    files = re.findall(r"^diff --git a/(\S+) b/", patch, flags=re.M)
    if "# untracked:" in patch:
        files += [f"{line} (untracked)" for line in patch.split("# untracked:", 1)[1].split() if line]
    return files


def _environment(a: RunRow, b: RunRow) -> list[Difference]:
    keys = [k for k in dict.fromkeys([*a.tags, *b.tags]) if k.startswith("env.")]

    def rank(k: str) -> tuple[int, str]:
        name = k.removeprefix("env.")
        return next((i for i, p in enumerate(ENV_ORDER) if name == p or (p.endswith(".") and name.startswith(p))),
                    len(ENV_ORDER)), name

    keys.sort(key=rank)
    out = []
    for k, x, y in _changed(a.tags, b.tags, keys):
        name = k.removeprefix("env.")
        label = f"{name.removeprefix('pkg.')} version" if name.startswith("pkg.") else name
        out.append(Difference("environment", label, _show(x), _show(y)))
    return out


def _seed(a: RunRow, b: RunRow) -> list[Difference]:
    out = _recipe_changed(a, b, SEED_KEYS)
    for d in out:
        d.section = "seed"
        if d.key == "data.split.seed":  # None means "run.seed": show what the split actually used
            d.note = "; ".join(n for n in (d.note, f"split seed {_effective_split_seed(a)} vs "
                                                     f"{_effective_split_seed(b)}") if n)
    return out


def _effective_split_seed(r: RunRow) -> str:
    s = param(r, "data.split.seed")
    return param(r, "run.seed") or "?" if s in (None, "None") else s


def _metrics(a: RunRow, b: RunRow) -> list[Difference]:
    ma, mb = a.metrics, b.metrics
    finals = [k for k in dict.fromkeys([*ma, *mb]) if k.startswith("final/")]
    keys = finals or [k for k in dict.fromkeys([*ma, *mb]) if k.startswith("val/") or k == "train/loss"]
    keys = [k for k in keys if k.removeprefix("final/") not in THROUGHPUT]
    keys.sort(key=lambda k: ("loss" not in k, "/best/" not in k, k))
    out = []
    for k in keys:
        x, y = ma.get(k), mb.get(k)
        if x is not None and y is not None and (x == y or math.isclose(x, y, rel_tol=1e-12, abs_tol=0.0)):
            continue
        if x is None or y is None:
            out.append(Difference("metrics", k, _fmt(x), _fmt(y)))
            continue
        note = f"{y - x:+.4g}" + (f", {100 * (y - x) / abs(x):+.2g}%" if x else "")
        out.append(Difference("metrics", k, _fmt(x), _fmt(y), note))
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "(not recorded)"
    return f"{v:.6g}" if abs(v) < 1e6 else f"{v:,.0f}"

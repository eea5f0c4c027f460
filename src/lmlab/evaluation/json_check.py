"""Evaluate a trained checkpoint on its own data: the held-out loss of a run's split, and the structured-output
check for JSON tasks (does a generation parse, match a JSON Schema, equal the reference, field by field).

`JsonEvalConfig` is the recipe's `eval.json` section; like the generation section it imports nothing heavy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.data.packing import collate_padded
from lmlab.data.pipeline import split_data
from lmlab.data.sft import pad_token_id
from lmlab.data.splits import fingerprint
from lmlab.errors import LmlabError
from lmlab.generation.decoding import generate
from lmlab.models.loading import LoadedCheckpoint
from lmlab.recipe.evaluation import JsonEvalConfig
from lmlab.recipe.generation import SamplingPreset
from lmlab.recipe.schema import Recipe
from lmlab.tasks.causal_lm import CausalLMTask
from lmlab.workspace.ledger import client


# ----------------------------------------------------------------------------------------- data split
def checkpoint_split(recipe: Recipe, tokenizer: Any, split: str) -> list[dict[str, Any]]:
    """The records of one split of a run's data, rebuilt exactly as training built them (same filters, seeded
    split and part). Raises LmlabError naming the file when the data is not on this machine."""
    splits = split_data(recipe, tokenizer=tokenizer).splits
    if split not in splits:
        raise LmlabError(f"--split: '{split}' is not a split; one of {', '.join(splits)}")
    return splits[split]


def split_fingerprint_matches(meta: Mapping[str, Any], split: str, records: Sequence[Any]) -> bool | None:
    """Whether a rebuilt split is the one the checkpoint trained/evaluated on (None: the checkpoint did not say)."""

    recorded = meta.get("fingerprints", {}).get(split)
    return None if recorded is None else recorded == fingerprint(list(records))


# ------------------------------------------------------------------------------------------- the check
@dataclass
class JsonItem:
    text: str
    reference: str
    parsed: bool
    schema_ok: bool | None  # None: no schema given
    exact: bool  # parsed output == parsed reference
    fields: dict[str, bool]  # per top-level reference field: equal to the reference's value
    stop_reason: str | None = None  # from generation: eos, stop, length
    error: str = ""  # why it did not parse / match the schema


@dataclass
class JsonReport:
    split: str
    items: list[JsonItem] = field(default_factory=list)
    schema: bool = False

    @property
    def n(self) -> int:
        return len(self.items)

    def _rate(self, values: Sequence[bool]) -> float:
        return sum(values) / len(values) if values else 0.0

    @property
    def parse_rate(self) -> float:
        return self._rate([i.parsed for i in self.items])

    @property
    def schema_rate(self) -> float | None:
        return self._rate([bool(i.schema_ok) for i in self.items]) if self.schema else None

    @property
    def exact_rate(self) -> float:
        return self._rate([i.exact for i in self.items])

    @property
    def eos_rate(self) -> float | None:
        """Share of generations that ended on their own (EOS or the template's end of turn), not at the budget."""
        reasons = [i.stop_reason for i in self.items if i.stop_reason is not None]
        return self._rate([r in ("eos", "stop") for r in reasons]) if reasons else None

    @property
    def parsed_and_ended_rate(self) -> float:
        """Share that parse as JSON *and* ended at EOS: the output a JSON task can use as is."""
        return self._rate([i.parsed and i.stop_reason in ("eos", "stop", None) for i in self.items])

    @property
    def field_rates(self) -> dict[str, float]:
        names = dict.fromkeys(k for i in self.items for k in i.fields)
        return {k: self._rate([i.fields[k] for i in self.items if k in i.fields]) for k in names}

    def metrics(self) -> dict[str, float]:
        p = f"json/{self.split}"
        out = {f"{p}/parse_rate": self.parse_rate, f"{p}/exact_rate": self.exact_rate,
               f"{p}/parsed_and_ended_rate": self.parsed_and_ended_rate, f"{p}/examples": float(self.n)}
        if self.schema_rate is not None:
            out[f"{p}/schema_rate"] = self.schema_rate
        if self.eos_rate is not None:
            out[f"{p}/ended_rate"] = self.eos_rate
        out.update({f"{p}/field/{k}": v for k, v in self.field_rates.items()})
        return out

    def lines(self) -> list[str]:
        pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
        out = [f"{self.split}: {self.n} generations",
               f"  parse as JSON          {pct(self.parse_rate)}"]
        if self.eos_rate is not None:
            out.append(f"  ended at EOS           {pct(self.eos_rate)}")
            out.append(f"  parse and end at EOS   {pct(self.parsed_and_ended_rate)}")
        if self.schema_rate is not None:
            out.append(f"  match the JSON Schema  {pct(self.schema_rate)}")
        out.append(f"  equal the reference    {pct(self.exact_rate)}")
        for k, v in self.field_rates.items():
            out.append(f"    field {k!r}: {pct(v)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "metrics": self.metrics(),
                "items": [vars(i) for i in self.items]}


def load_schema(schema: Mapping[str, Any] | str | None, base: Path | None = None) -> dict[str, Any] | None:
    """A JSON Schema from a mapping or a .json file (relative to `base`), checked to be a valid schema."""
    if schema is None:
        return None
    if isinstance(schema, str):
        path = Path(schema)
        if not path.is_absolute() and base is not None and (base / path).is_file():
            path = base / path
        if not path.is_file():
            raise LmlabError(f"eval.json.json_schema: file '{schema}' not found")
        try:
            schema = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LmlabError(f"eval.json.json_schema: {path} is not JSON ({e})") from None
    validator = _validator_class()
    try:
        validator.check_schema(schema)
    except Exception as e:  # jsonschema.SchemaError
        raise LmlabError(f"eval.json.json_schema: not a valid JSON Schema ({getattr(e, 'message', e)})") from None
    return dict(schema)


def _validator_class():
    try:
        import jsonschema
    except ImportError:
        raise LmlabError("eval.json.json_schema: checking a JSON Schema needs the 'jsonschema' package; "
                         "pip install jsonschema==4.26.0") from None
    return jsonschema.Draft202012Validator


def check_json(texts: Sequence[str], references: Sequence[str], *, schema: Mapping[str, Any] | None = None,
               fields: Sequence[str] | None = None, stop_reasons: Sequence[str] | None = None,
               split: str = "val") -> JsonReport:
    """Score generated texts against reference completions (JSON text). Exact match and per-field match compare
    parsed values (so key order and spacing do not matter); a reference that is not JSON is compared as text."""
    validator = _validator_class()(schema) if schema is not None else None
    report = JsonReport(split=split, schema=schema is not None)
    for k, (text, ref) in enumerate(zip(texts, references, strict=True)):
        ref_value, ref_ok = _parse(ref)
        value, ok = _parse(text)
        error = "" if ok else f"not JSON: {value}"
        schema_ok = None
        if validator is not None:
            schema_ok = ok and validator.is_valid(value)
            if ok and not schema_ok:
                error = f"schema: {next(iter(validator.iter_errors(value))).message}"
        exact = (ok and ref_ok and value == ref_value) or (not ref_ok and text.strip() == ref.strip())
        names = fields if fields is not None else (list(ref_value) if ref_ok and isinstance(ref_value, dict) else [])
        per_field = {n: bool(ok and isinstance(value, dict) and ref_ok and isinstance(ref_value, dict)
                             and n in value and value[n] == ref_value.get(n)) for n in names}
        report.items.append(JsonItem(text, ref, ok, schema_ok, exact, per_field,
                                     stop_reasons[k] if stop_reasons is not None else None, error))
    return report


def _parse(text: str) -> tuple[Any, bool]:
    try:
        return json.loads(text), True
    except (json.JSONDecodeError, TypeError) as e:
        return str(e), False


def eval_json(loaded: LoadedCheckpoint, cfg: JsonEvalConfig | None = None, *, log: bool = True) -> JsonReport:
    """Greedy-generate for every example of `cfg.split` of the checkpoint's data and check the outputs as JSON.
    The metrics (json/<split>/...) and the per-example details are logged to the run when it has a ledger."""

    cfg = cfg or JsonEvalConfig()
    template = loaded.template
    if template is None or template.format == "text":
        raise LmlabError("eval-json: the run has no prompt/completion template (task lm or text); "
                         "the JSON check needs prompts and reference completions")
    records = checkpoint_split(loaded.recipe, loaded.tokenizer, cfg.split)
    if not records:
        raise LmlabError(f"--split: the run's {cfg.split} split is empty; pick another split")
    records = records[:cfg.max_examples] if cfg.max_examples else records
    base = Path(loaded.recipe.source_path).parent if loaded.recipe.source_path else None
    schema = load_schema(cfg.json_schema, base)
    sampling = SamplingPreset(max_new_tokens=cfg.max_new_tokens)  # greedy: the check measures the model, not luck
    gens = generate(loaded, records, sampling, batch_size=cfg.batch_size)
    refs = [template.completion_text(r) for r in records]
    report = check_json([g.text for g in gens], refs, schema=schema, fields=cfg.fields,
                        stop_reasons=[g.stop_reason for g in gens], split=cfg.split)
    if log and loaded.run_id and loaded.ledger_uri:
        import time

        from mlflow.entities import Metric

        c = client(loaded.ledger_uri)
        step, now = int(loaded.meta.get("step", 0)), int(time.time() * 1000)
        c.log_batch(loaded.run_id, metrics=[Metric(k, float(v), now, step) for k, v in report.metrics().items()])
        c.log_dict(loaded.run_id, {**report.to_dict(), "checkpoint": str(loaded.path)}, f"json_eval/{cfg.split}.json")
    return report


# ------------------------------------------------------------------------------------------- loss
def heldout_loss(model: Any, examples: Sequence[Mapping[str, Any]], tokenizer: Any, *, batch_size: int = 8,
                 max_batches: int | None = None) -> dict[str, float]:
    """Completion loss (mean NLL per loss-bearing token) of tokenized SFT examples, padded batches, as training
    evaluates it."""
    from functools import partial

    collate = partial(collate_padded, pad_id=pad_token_id(tokenizer))
    task = CausalLMTask([], examples, collate, eval_batch_size=batch_size, eval_max_batches=max_batches)
    return task.evaluate(model, examples, "val", device=next(model.parameters()).device)

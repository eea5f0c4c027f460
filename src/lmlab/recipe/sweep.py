"""The recipe's `sweep:` section: what `lmlab sweep` searches (the space), with what (an Optuna sampler and
pruner) and for what (a logged metric, minimized or maximized); `--grid a.b=1,2` on the command line builds the
same section. Also the checks a sweep runs before its first trial: every field path exists, every value the space
can produce passes the schema (alone and with the recipe), every derived value evaluates; all problems at once.

    sweep:
      name: lora-rank-lr
      metric: val/loss
      direction: minimize
      trials: 24
      sampler: tpe                      # grid | random | tpe
      pruner: median                    # none | median | hyperband, on the metric at each eval
      params:
        train.lr: {log_uniform: [1.0e-5, 1.0e-3]}
        adapter.r: {choice: [8, 16, 32, 64]}   # or just [8, 16, 32, 64]
        adapter.alpha: {expr: "2 * adapter.r"}
"""

from __future__ import annotations

import ast
import difflib
import itertools
import operator
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from lmlab.errors import RecipeError
from lmlab.recipe.section import Section

Scalar = bool | int | float | str | None


class ParamSpec(Section):
    """One searched field: exactly one of choice, uniform, log_uniform, int, expr."""

    choice: list[Scalar] | None = Field(None, description="Values to try (a grid axis)")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]: a float drawn uniformly")
    log_uniform: tuple[float, float] | None = Field(None, description="[low, high]: a float drawn uniformly in log "
                                                    "space (learning rates)")
    int_range: tuple[int, int] | None = Field(None, alias="int", description="[low, high]: an integer, both included")
    step: float | None = Field(None, gt=0, description="uniform / int: only multiples of this step from low")
    expr: str | None = Field(None, description="Derived from other fields, e.g. '2 * adapter.r' (+ - * / // % **, "
                             "min, max, round, int, float)")

    @model_validator(mode="before")
    @classmethod
    def _list_is_choice(cls, value: Any) -> Any:
        return {"choice": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> ParamSpec:
        given = [k for k in ("choice", "uniform", "log_uniform", "int_range", "expr") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("choice: give exactly one of choice, uniform, log_uniform, int, expr "
                             f"(got {', '.join(given) or 'none'})")
        if self.choice is not None and not self.choice:
            raise ValueError("choice: is empty; give at least one value")
        if self.choice is not None and len(set(map(repr, self.choice))) != len(self.choice):
            raise ValueError("choice: lists a value twice")
        for name in ("uniform", "log_uniform", "int_range"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name}: low must be below high (got {list(bounds)})")
        if self.log_uniform is not None and self.log_uniform[0] <= 0:
            raise ValueError(f"log_uniform: low must be > 0 (got {self.log_uniform[0]:g})")
        if self.step is not None and self.uniform is None and self.int_range is None:
            raise ValueError("step: only uniform and int take a step")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "log_uniform", "int_range", "expr") if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """The values a check tries: every choice, or a range's two ends."""
        if self.choice is not None:
            return list(self.choice)
        low, high = self.uniform or self.log_uniform or self.int_range  # type: ignore[misc]
        return [low, high]

    def describe(self) -> str:
        if self.expr is not None:
            return f"= {self.expr}"
        if self.choice is not None:
            return "{" + ", ".join(map(str, self.choice)) + "}"
        low, high = self.uniform or self.log_uniform or self.int_range  # type: ignore[misc]
        return f"{self.kind.removesuffix('_range')}[{low:g}, {high:g}]" + (f" step {self.step:g}" if self.step else "")


class SweepConfig(Section):
    name: str | None = Field(None, description="The sweep (and its Optuna study); default '<run.name>-sweep'. "
                             "Running the same name again continues it")
    metric: str = Field("val/loss", description="Logged metric to optimize; its best value over a trial's evals "
                        "is the trial's result. judge/<split>/mean (or median): each trial, once trained, is scored "
                        "by the recipe's judge: section (the LLM judge of `lmlab eval --judge`)")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="Lower or higher metric is better "
                                                       "(default maximize for a judge/ metric)")
    trials: int | None = Field(None, gt=0, description="Trials in all (all workers and machines together); "
                               "default: the whole grid, else 20")
    sampler: Literal["grid", "random", "tpe"] | None = Field(
        None, description="grid (every combination, each enqueued in Optuna), or Optuna's RandomSampler or "
        "TPESampler; default grid when every param is a "
        "choice, else tpe")
    pruner: Literal["none", "median", "hyperband"] = Field(
        "none", description="Stop hopeless trials at an eval: Optuna's MedianPruner or HyperbandPruner")
    startup_trials: int = Field(4, ge=0, description="Trials that finish before the pruner (and TPE) start to act")
    warmup_evals: int = Field(0, ge=0, description="median: evals of a trial before it may be pruned")
    seed: int | None = Field(None, description="Sampler seed; default run.seed")
    params: dict[str, ParamSpec] = Field(default_factory=dict, description="Field path → values to search")

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "/\\:*?\"' ")):
            raise ValueError(f"'{value}' is not a usable sweep name; use letters, digits, '-', '_' and '.'")
        return value

    def sampler_name(self) -> str:
        if self.sampler is not None:
            return self.sampler
        return "grid" if self.params and all(p.kind in ("choice", "expr") for p in self.params.values()) else "tpe"

    def searched(self) -> dict[str, ParamSpec]:
        """The params the sampler draws (derived ones excluded), in the order given."""
        return {k: p for k, p in self.params.items() if p.kind != "expr"}

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the choices, first param slowest."""
        keys = list(self.searched())
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(self.params[k].candidates()
                                                                                      for k in keys))]

    def n_trials(self) -> int:
        if self.sampler_name() == "grid":
            return min(self.trials or len(self.grid()), len(self.grid()))
        return self.trials or 20


# ------------------------------------------------------------------------------------------ command line
def parse_grid(items: list[str]) -> dict[str, ParamSpec]:
    """`--grid train.lr=1e-4,5e-5` → {'train.lr': choice [0.0001, 5e-05]}; one line per malformed item."""
    out, problems = {}, []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            problems.append(f"--grid {item}: expected field=value1,value2,... e.g. --grid train.lr=1e-4,5e-5")
            continue
        parts = [scalar(v) for v in values.split(",")]
        if any(p == "" for p in parts):
            problems.append(f"--grid {item}: has an empty value; drop the extra comma")
            continue
        try:
            out[key] = ParamSpec(choice=parts)
        except ValueError as e:
            problems.append(f"--grid {key}: {_pydantic_message(e)}")
    if problems:
        raise RecipeError(problems)
    return out


def scalar(text: str) -> Scalar:
    """A command-line value: YAML's reading, with numbers YAML 1.1 leaves as text ('1e-4') made numbers."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        for convert in (int, float):
            try:
                return convert(value)
            except ValueError:
                pass
        return value.strip()
    return value if isinstance(value, bool | int | float | str) or value is None else text.strip()


def _pydantic_message(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if errors is None:
        return str(e)
    msg = errors()[0]["msg"].removeprefix("Value error, ")
    return msg.partition(": ")[2] if ": " in msg and msg.partition(": ")[0].isidentifier() else msg


# ------------------------------------------------------------------------------------------ derived values
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_CALLS = {"min": min, "max": max, "round": round, "int": int, "float": float}


def expr_names(expr: str) -> list[str]:
    """The dotted field paths an expression reads ('2 * adapter.r' → ['adapter.r']); ValueError if it is not a
    plain arithmetic expression."""
    tree = _parse(expr)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute | ast.Name) and not _inside_attribute(node, tree):
            if isinstance(node, ast.Name) and node.id in _CALLS and _is_callee(node, tree):
                continue
            names.append(_dotted(node))
    return list(dict.fromkeys(names))


def evaluate_expr(expr: str, values: dict[str, Any]) -> Any:
    """The value of `expr` with field paths read from `values` ({'adapter.r': 16})."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS \
                and not node.keywords:
            return _CALLS[node.func.id](*(ev(a) for a in node.args))
        if isinstance(node, ast.Attribute | ast.Name):
            name = _dotted(node)
            if name not in values:
                raise ValueError(f"'{name}' is neither a searched param nor a field of the recipe")
            return values[name]
        raise ValueError(f"'{ast.unparse(node)}' is not allowed; use numbers, field paths, + - * / // % ** "
                         "and min, max, round, int, float")

    value = ev(_parse(expr))
    return int(value) if isinstance(value, float) and value.is_integer() and _all_int(values) else value


def _all_int(values: dict[str, Any]) -> bool:
    return all(isinstance(v, int) for v in values.values())


def _parse(expr: str) -> ast.Expression:
    try:
        return ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"'{expr}' is not an expression ({e.msg})") from None


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise ValueError(f"'{ast.unparse(node)}' is not a field path")


def _inside_attribute(node: ast.AST, tree: ast.AST) -> bool:
    return any(isinstance(p, ast.Attribute) and p.value is node for p in ast.walk(tree))


def _is_callee(node: ast.AST, tree: ast.AST) -> bool:
    return any(isinstance(p, ast.Call) and p.func is node for p in ast.walk(tree))


# ------------------------------------------------------------------------------------------ up-front checks
def field_problem(root: type[BaseModel], path: str) -> str | None:
    """None if `path` names a leaf field of the recipe schema (or a key of a dict-valued field), else why not."""
    model: Any = root
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = {(f.alias or n): f for n, f in model.model_fields.items() if not f.exclude}
        field = fields.get(part)
        if field is None:
            near = difflib.get_close_matches(part, list(fields), n=1)
            where = ".".join(parts[:i]) or "the recipe"
            hint = f"; did you mean '{'.'.join([*parts[:i], near[0]])}'?" if near else f" in {where}"
            return f"unknown field{hint}"
        ann = field.annotation
        sub = next((c for c in (ann, *getattr(ann, "__args__", ())) if isinstance(c, type)
                    and issubclass(c, BaseModel)), None)
        if sub is None:
            if i < len(parts) - 1 and not _is_dict(ann):
                return f"'{'.'.join(parts[:i + 1])}' is a value, not a section"
            return None
        model = sub
    return "is a section; name one of its fields, e.g. " + f"{path}.{next(iter(model.model_fields))}"


def _is_dict(annotation: Any) -> bool:
    return annotation is dict or getattr(annotation, "__origin__", None) is dict


MAX_COMBINATIONS = 256  # derived values are checked on every combination of their inputs up to this many


def check_space(sweep: SweepConfig, load: Any, base: dict[str, Any], root: type[BaseModel]) -> list[str]:
    """Every problem with `sweep`'s space, one line each. `load(values)` validates the recipe with these field
    values set (raising RecipeError); `base` holds the recipe's own flattened values (what an expr may read)."""
    problems: list[str] = []
    bad: set[str] = set()
    for key in sweep.params:
        problem = field_problem(root, key)
        if problem:
            problems.append(f"sweep.params.{key}: {problem}")
            bad.add(key)
    if sweep.sampler == "grid":
        for key, spec in sweep.params.items():
            if spec.kind not in ("choice", "expr"):
                problems.append(f"sweep.params.{key}: sampler grid needs choices, not a {spec.kind.removesuffix('_range')}"
                                " range; list values or use sampler tpe / random")
    searched = {k: p for k, p in sweep.searched().items() if k not in bad}
    for key, spec in searched.items():  # each value alone
        for value in spec.candidates():
            problems += _rejected(load, {key: value}, f"sweep.params.{key}: {value!r}")
    for key, spec in sweep.params.items():
        if spec.expr is None or key in bad:
            continue
        try:
            names = expr_names(spec.expr)
        except ValueError as e:
            problems.append(f"sweep.params.{key}: {e}")
            continue
        derived = [n for n in names if n in sweep.params and sweep.params[n].expr is not None]
        if derived:
            problems.append(f"sweep.params.{key}: reads the derived {', '.join(derived)}; derive from searched "
                            "params or recipe fields only")
            continue
        axes = [searched[n].candidates() if n in searched else [base.get(n)] for n in names]
        missing = [n for n in names if n not in searched and n not in base]
        if missing:
            problems.append(f"sweep.params.{key}: '{missing[0]}' is neither a searched param nor a field of the "
                            "recipe")
            continue
        for combo in itertools.islice(itertools.product(*axes), MAX_COMBINATIONS):
            inputs = dict(zip(names, combo, strict=True))
            try:
                value = evaluate_expr(spec.expr, inputs)
            except (ValueError, ArithmeticError, TypeError) as e:
                problems.append(f"sweep.params.{key}: {e}")
                break
            where = ", ".join(f"{n}={v!r}" for n, v in inputs.items() if n in searched)
            found = _rejected(load, {**{n: v for n, v in inputs.items() if n in searched}, key: value},
                              f"sweep.params.{key}: {value!r}" + (f" (with {where})" if where else ""))
            if found:
                problems += found
                break
    return list(dict.fromkeys(problems))


def _rejected(load: Any, values: dict[str, Any], what: str) -> list[str]:
    try:
        load(values)
    except RecipeError as e:
        # the recipe's own line numbers would point at the value the sweep replaces: left out
        return [f"{what} is rejected: {re.sub(r'^line [0-9]+: ', '', p)}" for p in e.problems]
    return []


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """A space file: a YAML mapping with a `sweep:` section (or the section's fields at the top level)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(["sweep file not found; check the path"], str(path))
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError([f"not valid YAML ({getattr(e, 'problem', e)})"], str(path)) from None
    if not isinstance(raw, dict):
        raise RecipeError(["expected a mapping with a sweep: section"], str(path))
    return raw.get("sweep", raw)

"""The recipe's `data.filters` specs: audited data filters, one pydantic model per kind (lmlab.data.filters runs
them)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from lmlab.errors import LmlabError
from lmlab.recipe.describe import describe_error


class _Filter(BaseModel):
    """Base of every filter spec: unknown keys are errors (like lmlab.config.Section)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    name: str | None = Field(None, description="Label in reports; default: kind(field)")

    def label(self) -> str:
        if self.name:
            return self.name
        target = getattr(self, "field", None) or getattr(self, "path", None)
        fields = getattr(self, "fields", None)
        if fields:
            target = ", ".join(fields)
        return f"{self.kind}({target})" if target else str(self.kind)  # type: ignore[attr-defined]


class _LengthBounds(_Filter):
    field: str = Field(..., min_length=1, description="Field path, e.g. output or messages.assistant")
    min: int | None = Field(None, ge=0, description="Drop examples with fewer than this many")
    max: int | None = Field(None, ge=0, description="Drop examples with more than this many")
    per: Literal["example", "text"] = Field(
        "example", description="example: count all selected texts together; text: every selected text "
        "(e.g. each assistant turn) must be within the bounds on its own"
    )

    @model_validator(mode="after")
    def _some_bound(self) -> _LengthBounds:
        if self.min is None and self.max is None:
            raise ValueError("min: set `min`, `max` or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min: {self.min} is larger than max ({self.max}); swap or fix them")
        return self


class WordCountFilter(_LengthBounds):
    """Keep examples whose text has between `min` and `max` words (whitespace-separated)."""

    kind: Literal["word_count"] = "word_count"


class TokenCountFilter(_LengthBounds):
    """Keep examples whose text has between `min` and `max` tokens of the run's tokenizer."""

    kind: Literal["token_count"] = "token_count"


class MedianLengthDropFilter(_Filter):
    """Drop short examples with a probability that falls linearly from 1 at `lo` words to 0 at `hi` words.

    The length is the median word count of the selected texts (for chat: of the assistant turns), so one
    long turn does not rescue a conversation of one-word replies. An example with no selected text has
    length 0.
    """

    kind: Literal["median_length_drop"] = "median_length_drop"
    field: str = Field("messages.assistant", min_length=1, description="Field path whose texts' median length counts")
    lo: float = Field(..., ge=0, description="At or below this many words an example is always dropped")
    hi: float = Field(..., description="At or above this many words an example is always kept")
    seed: int | None = Field(None, description="Seed of the per-example draw; default run.seed")

    @model_validator(mode="after")
    def _lo_below_hi(self) -> MedianLengthDropFilter:
        if self.hi <= self.lo:
            raise ValueError(f"hi: must be > lo ({self.lo:g}), got {self.hi:g}; raise hi or lower lo")
        return self

    def drop_probability(self, median_words: float) -> float:
        """1.0 at <= lo words, falling linearly to 0.0 at >= hi words."""
        if median_words <= self.lo:
            return 1.0
        if median_words >= self.hi:
            return 0.0
        return (self.hi - median_words) / (self.hi - self.lo)


Mark = Literal["*", '"', "```"]


class BalancedMarkupFilter(_Filter):
    """Drop examples where a selected text has an odd number of a mark: `*actions*`, `"quotes"`, code fences.

    `*` and `"` are counted outside fenced code blocks, so `a * b` in a code sample is not a defect.
    """

    kind: Literal["balanced_markup"] = "balanced_markup"
    field: str = Field(..., min_length=1, description="Field path, e.g. messages.assistant")
    marks: list[Mark] = Field(
        default_factory=lambda: ["*", '"', "```"], min_length=1, description="Marks that must come in pairs"
    )


class RegexFilter(_Filter):
    """keep: keep only examples where `pattern` matches a selected text; drop: drop those examples."""

    kind: Literal["regex"] = "regex"
    field: str = Field(..., min_length=1, description="Field path the pattern is searched in")
    pattern: str = Field(..., min_length=1, description="Python regular expression, searched (not anchored)")
    action: Literal["keep", "drop"] = Field(..., description="keep matching examples, or drop them")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"not a valid regular expression ({e}); check brackets and escapes") from None
        return pattern


class ExactDedupeFilter(_Filter):
    """Keep the first of examples whose selected fields are identical (by sha256)."""

    kind: Literal["dedupe_exact"] = "dedupe_exact"
    fields: list[str] | None = Field(
        None, min_length=1, description="Field paths that must all match; default: the whole example"
    )


class NearDedupeFilter(_Filter):
    """Keep the first of examples whose texts are near-duplicates (MinHash LSH on word n-grams).

    A later example is dropped when LSH finds an earlier kept one and their estimated Jaccard similarity
    of lower-cased word `ngram`-grams is at least `threshold`.
    """

    kind: Literal["dedupe_near"] = "dedupe_near"
    field: str = Field(..., min_length=1, description="Field path compared (its texts joined)")
    threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity at which a text is a duplicate")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations: more = closer estimate, slower")
    ngram: int = Field(3, ge=1, description="Words per shingle")
    seed: int | None = Field(None, description="MinHash seed; default run.seed")


class PredicateFilter(_Filter):
    """Keep examples for which a user function `module:function` (record dict -> bool) returns True."""

    kind: Literal["predicate"] = "predicate"
    path: str = Field(..., description="Import path 'package.module:function' of a function(record) -> bool")

    @field_validator("path")
    @classmethod
    def _module_colon_function(cls, path: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", path):
            raise ValueError(f"must look like 'package.module:function', got {path!r}")
        return path


FilterSpec = Annotated[
    Union[  # noqa: UP007 - a discriminated union reads best spelled out
        WordCountFilter,
        TokenCountFilter,
        MedianLengthDropFilter,
        BalancedMarkupFilter,
        RegexFilter,
        ExactDedupeFilter,
        NearDedupeFilter,
        PredicateFilter,
    ],
    Field(discriminator="kind"),
]


_SPECS = TypeAdapter(list[FilterSpec])


# kind -> spec model, e.g. for listing a kind's keys in error messages
FILTER_KINDS: dict[str, type[BaseModel]] = {m.model_fields["kind"].default: m for m in get_args(get_args(FilterSpec)[0])}


def parse_filters(raw: Sequence[FilterSpec | dict[str, Any]]) -> list[FilterSpec]:
    """Validate filter specs given as dicts (or already-built specs); errors name `data.filters[i].key`."""
    try:
        return _SPECS.validate_python([s.model_dump() if isinstance(s, BaseModel) else s for s in raw])
    except ValidationError as e:
        raise LmlabError("; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: Any) -> str:
    """One pydantic error as 'data.filters[i].key: problem; fix' (an unknown key lists the keys of its kind)."""
    loc = err["loc"]  # (index, kind tag, key...) inside the union
    if err["type"] == "extra_forbidden" and len(loc) > 1 and loc[1] in FILTER_KINDS:
        return (f"data.filters[{loc[0]}].{loc[-1]}: unknown key for {loc[1]}; known keys: "
                f"{', '.join(FILTER_KINDS[loc[1]].model_fields)}")
    inner = {**err, "loc": tuple(loc[1:])}  # the spec's own keys, after its position in the list
    return describe_error(inner, prefix=f"data.filters[{loc[0]}]" if loc else "data.filters", drop=FILTER_KINDS,
                          show_input=False)

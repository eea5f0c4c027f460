"""The recipe's `eval.json` section: settings of the structured-output (JSON) check."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class JsonEvalConfig(BaseModel):
    """`eval.json`: generate for every example of a split and check the output as JSON."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    split: Literal["train", "val", "test"] = Field("val", description="Which split's prompts to generate for")
    json_schema: dict[str, Any] | str | None = Field(
        None, description="JSON Schema every output must match: a mapping, or a .json file relative to the recipe")
    fields: list[str] | None = Field(
        None, description="Top-level fields compared with the reference one by one; default: every reference field")
    max_examples: int | None = Field(None, gt=0, description="Check only the first N examples of the split")
    max_new_tokens: int = Field(256, gt=0, description="Generation budget per example (greedy decoding)")
    batch_size: int = Field(8, gt=0, description="Prompts generated together")

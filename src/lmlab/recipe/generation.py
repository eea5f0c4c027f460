"""The recipe's `generation:` section: sampling presets (built in and named in the recipe) and picking one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmlab.errors import LmlabError
from lmlab.recipe.describe import first_error


class SamplingPreset(BaseModel):
    """How to decode. temperature 0 = greedy; penalty_alpha > 0 = contrastive search (with top_k candidates)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    temperature: float = Field(0.0, ge=0, description="0 = greedy (argmax); > 0 = sample with this temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="Sampling: keep the smallest token set with this much probability")
    top_k: int = Field(0, ge=0, description="Sampling: keep the k likeliest tokens (0 = off); contrastive: candidates")
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages tokens already in the text (CTRL)")
    max_new_tokens: int = Field(256, gt=0, description="Stop after this many generated tokens")
    penalty_alpha: float = Field(0.0, ge=0, le=1, description="Contrastive search degeneration penalty (0 = off)")
    seed: int = Field(0, description="Seeds sampling, so the same call gives the same text")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings (EOS and the template's end of "
                            "turn always stop)")

    @model_validator(mode="after")
    def _contrastive_needs_candidates(self) -> SamplingPreset:
        if self.penalty_alpha > 0 and self.top_k < 2:
            raise ValueError(f"top_k: contrastive search (penalty_alpha {self.penalty_alpha:g}) compares top_k "
                             f"candidates; set top_k >= 2 (got {self.top_k}), e.g. 4")
        return self

    @property
    def mode(self) -> str:
        if self.penalty_alpha > 0:
            return "contrastive"
        return "sample" if self.temperature > 0 else "greedy"


BUILTIN_PRESETS: dict[str, SamplingPreset] = {
    "greedy": SamplingPreset(),
    "sample": SamplingPreset(temperature=0.7, top_p=0.9, top_k=50),
    "creative": SamplingPreset(temperature=1.0, top_p=0.95, top_k=0, repetition_penalty=1.1),
    "contrastive": SamplingPreset(penalty_alpha=0.6, top_k=4),
    # the default of runs trained from scratch (Recipe._scratch_models_sample): greedy decoding loops on them
    "varied": SamplingPreset(temperature=0.8, top_p=0.95, top_k=50, repetition_penalty=1.3),
}


class GenerationSection(BaseModel):
    """The recipe's `generation:` section: named sampling presets (added to the built-in ones) and the default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    presets: dict[str, SamplingPreset] = Field(
        default_factory=dict, description=f"Named presets; built in: {', '.join(BUILTIN_PRESETS)} (same names override)")
    default_preset: str = Field("greedy", description="Preset `lmlab generate` uses without --preset; a run "
                                "trained from scratch that names none gets 'varied' (sampling, repetition penalty)")

    @model_validator(mode="after")
    def _default_exists(self) -> GenerationSection:
        known = {**BUILTIN_PRESETS, **self.presets}
        if self.default_preset not in known:
            raise ValueError(f"default_preset: '{self.default_preset}' is not a preset; one of {', '.join(known)}")
        return self


def presets_of(recipe: Any) -> dict[str, SamplingPreset]:
    """Built-in presets plus the recipe's own (a recipe without a generation section has only the built-ins)."""
    section = getattr(recipe, "generation", None)
    return {**BUILTIN_PRESETS, **(section.presets if section is not None else {})}


def pick_preset(recipe: Any, name: str | None, overrides: Mapping[str, Any] | None = None) -> SamplingPreset:
    """The named preset (default: the recipe's default_preset) with CLI overrides (None values ignored)."""
    section = getattr(recipe, "generation", None)
    name = name or (section.default_preset if section is not None else "greedy")
    presets = presets_of(recipe)
    if name not in presets:
        raise LmlabError(f"--preset: unknown preset '{name}'; one of {', '.join(presets)} "
                         "(add your own under generation.presets in the recipe)")
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return SamplingPreset.model_validate({**presets[name].model_dump(), **changes})
    except ValueError as e:  # pydantic's ValidationError: name the CLI option of the first bad field
        where, msg = first_error(e)
        raise LmlabError(f"--{(where or 'preset').replace('_', '-')}: {msg}") from None

"""The `pair:` recipe section: which columns hold a preference pair, how it is encoded, which model reads it.

Task `pair_classify` predicts, for a prompt and two responses A and B, which one people preferred:
class 0 = A wins, 1 = B wins, 2 = tie.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lmlab.recipe.section import Section


class PairConfig(Section):
    # --- columns and labels
    prompt_columns: list[str] = Field(
        default_factory=lambda: ["prompt"],
        description="Columns joined (blank line between, empty ones skipped) into the prompt; [] = no prompt "
        "column, e.g. instruction + input: [instruction, input]",
    )
    response_a_column: str = Field("response_a", description="Column of response A (labels winner / one_hot)")
    response_b_column: str = Field("response_b", description="Column of response B (labels winner / one_hot)")
    labels: Literal["auto", "winner", "one_hot", "chosen_rejected"] = Field(
        "auto",
        description="winner: one column valued a / b / tie (also model_a, model_b, 'tie (bothbad)'); one_hot: three "
        "0/1 columns (arena data); chosen_rejected: preference data without ties, put in a seeded random "
        "A/B order; auto: the first of these whose columns exist",
    )
    winner_column: str = Field("winner", description="labels winner: the column holding a / b / tie")
    one_hot_columns: tuple[str, str, str] = Field(
        ("winner_model_a", "winner_model_b", "winner_tie"),
        description="labels one_hot: the 0/1 columns for A wins, B wins, tie (exactly one 1 per row)",
    )
    chosen_column: str = Field("chosen", description="labels chosen_rejected: the preferred response")
    rejected_column: str = Field("rejected", description="labels chosen_rejected: the other response")
    json_lists: bool = Field(
        False, description="Prompt and response columns hold JSON-encoded lists of turns (arena data); "
        "turns are decoded and joined with turn_separator, null turns read as empty"
    )
    invalid_json: Literal["error", "drop"] = Field(
        "error", description="json_lists: a value that is not a JSON list stops the run (error) or drops the "
        "row (drop; counted and reported)"
    )
    turn_separator: str = Field("\n\n", description="Joins decoded turns and prompt columns")
    shared_prefix_marker: str | None = Field(
        None, description="When both responses are full transcripts sharing their start (hh-rlhf: "
        "'\\n\\nAssistant:'), the shared start up to and including the last marker in it moves to the prompt"
    )
    # --- bad rows: explicit rules, every one counted in the data report
    empty_responses: Literal["keep", "drop", "error"] = Field(
        "keep", description="A pair with an empty response (after decoding and stripping): keep it "
        "(the model sees an empty part), drop it, or stop with an error"
    )
    identical_responses: Literal["fixed", "keep", "drop"] = Field(
        "fixed", description="A pair whose responses are equal (after stripping) carries no signal on which is "
        "better. fixed: not trained on; predicted with identical_probs and still scored; keep: treated like any "
        "pair; drop: removed from every split"
    )
    identical_probs: tuple[float, float, float] | None = Field(
        None, description="identical_responses fixed: P(A), P(B), P(tie) for equal responses; null = from the "
        "training split's equal pairs: tie rate (ties+1)/(n+2) if it has ties at all, else 0, A and B "
        "share the rest"
    )
    # --- how a pair becomes tokens (data.max_length is the token limit of one sequence)
    architecture: Literal["cross", "bi", "sequence_classification"] = Field(
        "cross", description="cross: prompt, A and B in one sequence → encoder → A's and B's tokens pooled → "
        "[a, b, a−b, a·b] → MLP head; bi: A and B encoded separately (prompt prepended to each) → pooled → "
        "[a, b, a−b, a·b] → MLP head; "
        "sequence_classification: the cross sequence into AutoModelForSequenceClassification (decoder LLMs; "
        "LoRA/QLoRA through the adapter section)"
    )
    include_prompt: bool = Field(True, description="Put the prompt in the sequence(s); false = responses only")
    prompt_budget: float = Field(
        0.2, gt=0, lt=1, description="Share of the token budget for the prompt; each response gets half the "
        "rest (0.2 → 20% / 40% / 40%). Budget a short part leaves unused goes to the others"
    )
    prompt_truncation: Literal["left", "right"] = Field(
        "left", description="Which end of a long prompt is cut: left keeps its end (the last turn)"
    )
    response_truncation: Literal["left", "right"] = Field(
        "right", description="Which end of a long response is cut: right keeps its start"
    )
    # --- model
    pooling: Literal["mean", "cls"] = Field(
        "mean", description="bi: a response is the mean of its token states or the first token's (cross always "
        "takes the mean over each response's tokens)"
    )
    head_hidden: int = Field(256, gt=0, description="cross/bi: hidden width of the MLP head")
    head_dropout: float = Field(0.1, ge=0, lt=1, description="cross/bi: dropout in the MLP head")
    # --- order bias
    swap_augment: bool = Field(
        True, description="Train on every pair in both orders (A↔B, label swapped): one epoch = 2 × pairs"
    )
    swap_tta: bool = Field(
        True, description="Predict both orders and average: P(A wins | A, B) = P(B wins | B, A) exactly"
    )

    @model_validator(mode="after")
    def _consistent(self) -> PairConfig:
        if len(set(self.one_hot_columns)) != 3:
            raise ValueError(f"one_hot_columns: needs three different columns (got {list(self.one_hot_columns)})")
        if self.identical_probs is not None:
            p = self.identical_probs
            if min(p) < 0 or abs(sum(p) - 1) > 1e-6:
                raise ValueError(f"identical_probs: must be three probabilities >= 0 summing to 1 (got {list(p)})")
            if p[0] != p[1]:
                raise ValueError(f"identical_probs: P(A) and P(B) must be equal for equal responses (got {list(p)})")
        return self


def pair_config(recipe: Any) -> PairConfig:
    """The recipe's `pair:` section, or its defaults when the recipe has none."""
    return getattr(recipe, "pair", None) or PairConfig()

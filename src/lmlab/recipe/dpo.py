"""The `dpo:` recipe section: preference training (task dpo) — the loss, the reference model, and which columns
hold a preference pair.

Direct Preference Optimization (Rafailov et al. 2023) trains a policy π on pairs (prompt x, chosen y_w, rejected
y_l) against a fixed reference π_ref: with Δ = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)],
sigmoid: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)   (ε = label_smoothing: conservative DPO for noisy labels)
ipo:     (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))²  (Azar et al. 2023; per-token log-ratios, as TRL computes it)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmlab.recipe.section import Section

Reference = Literal["auto", "adapter_disabled", "frozen_copy", "precomputed"]


class DpoConfig(Section):
    # --- the loss
    beta: float = Field(0.1, gt=0, description="Strength of the pull toward the reference (DPO's β; IPO's τ): "
                        "smaller lets the policy move further")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: DPO's logistic loss; ipo: IPO's "
                                            "squared loss on per-token log-ratios")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid only: the share of pairs assumed "
                                   "mislabeled (conservative DPO); 0 = plain DPO")
    reference: Reference = Field(
        "auto", description="The reference model π_ref. adapter_disabled: the same model with its LoRA adapter "
        "switched off (no second copy; LoRA only); frozen_copy: a frozen copy of the starting model (+1× weights); "
        "precomputed: its log-probs computed once before training and cached with the data fingerprint (no copy, "
        "one extra forward pass over the data, once). auto: adapter_disabled for a new LoRA adapter, else "
        "precomputed")
    # --- columns (JSON / JSONL / CSV rows; chat data may hold lists of {role, content} messages)
    prompt_column: str = Field("prompt", description="chat template: the prompt, a string (one user turn) or a "
                               "list of messages. alpaca / prompt_completion render the prompt from their own "
                               "columns ('{prompt}' in data.prompt_template reads this one)")
    chosen_column: str = Field("chosen", description="The preferred response: text, or a list of messages whose "
                               "last one is the assistant's answer")
    rejected_column: str = Field("rejected", description="The other response, like chosen_column")
    shared_prefix_marker: str | None = Field(
        None, description="When chosen and rejected are whole transcripts sharing their start (hh-rlhf: "
        "'\\n\\nAssistant:'), the shared start up to and including the last marker in it becomes the prompt")
    transcript_roles: dict[str, str] = Field(
        default_factory=lambda: {"Human": "user", "Assistant": "assistant"},
        description="chat template with shared_prefix_marker: the speaker names of the transcript "
        "('\\n\\nHuman: …') and the chat roles they become")

    @model_validator(mode="after")
    def _consistent(self) -> DpoConfig:
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing: applies to the sigmoid loss only; set it to 0 for ipo")
        if self.chosen_column == self.rejected_column:
            raise ValueError(f"rejected_column: must differ from chosen_column (both '{self.chosen_column}')")
        return self

"""The recipe's `judge:` section (LLM-as-judge settings) and the pinned, versioned judge prompts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The judge prompts, pinned: a changed wording is a new version, so cached scores never mix two prompts.
# v1 is the prompt of the instruction fine-tuning chapter of "Build a Large Language Model (From Scratch)"
# (Raschka, ch. 7), whose GPT-2 medium SFT baseline scores about 50.
PROMPTS: dict[str, str] = {
    "v1": ("Given the input `{input}` and correct output `{reference}`, score the model response `{response}` "
           "on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."),
}


LATEST_PROMPT = "v1"


class JudgeConfig(BaseModel):
    """The recipe's `judge:` section (every field can also be given to `lmlab eval --judge` as an option)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1, "
                                 "http://127.0.0.1:11434/v1 (Ollama), http://127.0.0.1:8000/v1 (lmlab serve)")
    model: str | None = Field(None, description="Judge model name as the endpoint knows it")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key; '' for "
                             "endpoints that need none (Ollama, llama.cpp, lmlab serve without --api-key)")
    prompt_version: Literal["v1"] = Field(LATEST_PROMPT, description="Pinned judge prompt (see lmlab.judge.PROMPTS)")
    split: Literal["train", "val", "test"] = Field("val", description="Which split's examples to generate and judge")
    max_examples: int | None = Field(None, gt=0, description="Judge only the first N examples of the split")
    preset: str | None = Field(None, description="Sampling preset for the generations; default the recipe's "
                               "generation.default_preset")
    max_new_tokens: int | None = Field(None, gt=0, description="Generation budget per example (default: the preset's)")
    batch_size: int = Field(8, gt=0, description="Prompts generated together")
    concurrency: int = Field(4, gt=0, le=64, description="Judge requests in flight at once")
    retries: int = Field(3, ge=0, le=10, description="Retries per request on connection errors, timeouts, 429 and "
                         "5xx, with exponential backoff")
    timeout_s: float = Field(60.0, gt=0, description="Seconds before one judge request gives up")
    max_tokens: int = Field(16, gt=0, description="Answer budget of the judge (an integer needs few tokens)")
    temperature: float = Field(0.0, ge=0, description="Judge sampling temperature (0 = its most likely answer)")

    def missing_endpoint(self) -> list[str]:
        """The endpoint fields not set ('judge.base_url', 'judge.model'): without them there is no judge to ask."""
        return [f"judge.{k}" for k in ("base_url", "model") if not getattr(self, k)]

    def missing_key(self) -> str | None:
        """The API-key environment variable the endpoint needs and this process lacks, if any."""
        import os

        return self.api_key_env if self.api_key_env and not os.environ.get(self.api_key_env) else None

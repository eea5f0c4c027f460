"""`lmlab plan` knows task dpo: two sequences per pair in one forward pass, and the reference strategy's memory
(a frozen copy adds one more model's weights; the adapter switched off or precomputed log-probs add none)."""

from __future__ import annotations

from helpers.recipes import REPO

from lmlab import load_recipe
from lmlab.analysis.plan import plan_recipe

RECIPE = REPO / "recipes" / "dpo-smollm2-lora-cpu.yaml"


def small_base(folder):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512).save_pretrained(folder)
    return folder


def test_plan_knows_the_dpo_task(tmp_path):
    base = f"model.pretrained={small_base(tmp_path)}"
    lora = plan_recipe(load_recipe(RECIPE, [base]))
    sft = plan_recipe(load_recipe(RECIPE, [base, "run.task=sft"]))
    assert "2 sequences" in lora.setup
    assert 1.95 < lora.activations_no_checkpointing / sft.activations_no_checkpointing <= 2  # RoPE tables: once
    assert "reference adapter_disabled: no second copy" in " ".join(lora.notes)
    full = [base, "adapter.kind=none"]
    precomputed = plan_recipe(load_recipe(RECIPE, full))  # auto: precomputed for full fine-tuning
    frozen = plan_recipe(load_recipe(RECIPE, [*full, "dpo.reference=frozen_copy"]))
    assert "reference precomputed" in " ".join(precomputed.notes)
    assert frozen.weights - precomputed.weights == 4 * precomputed.parameters  # one more fp32 copy
    assert frozen.peak - precomputed.peak == 4 * precomputed.parameters and "frozen reference copy" in frozen.setup

"""The fine-tuning recipes: settings as the seeds ran them, GPU-sized models built from their configs without a
download (on the meta device: exact parameter counts), and every recipe run for two steps on a tiny stand-in base."""

from __future__ import annotations

import pytest
import torch
from helpers.recipes import REPO

from lmlab import load_recipe, train
from lmlab.errors import LmlabError

RECIPES = REPO / "recipes"
FINETUNE = ["alpaca-gpt2-medium-full.yaml", "alpaca-gpt2-medium-lora.yaml", "cantos-zephyr-qlora.yaml",
            "cantos-smollm2-lora-cpu.yaml", "instruct-smollm2-lora-cpu.yaml"]

# The hub configs of the GPU recipes' models, written out: the tests never download.
GPT2_MEDIUM = dict(vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16)
ZEPHYR_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=10000.0,
                 sliding_window=4096, tie_word_embeddings=False)


def hub_config(name: str, **shrink):
    from transformers import GPT2Config, MistralConfig

    if name == "gpt2-medium":
        return GPT2Config(**{**GPT2_MEDIUM, **shrink})
    assert name == "HuggingFaceH4/zephyr-7b-beta"
    return MistralConfig(**{**ZEPHYR_7B, **shrink})


@pytest.mark.parametrize("name", FINETUNE)
def test_recipe_parses(name):
    r = load_recipe(RECIPES / name)
    assert r.run.task == "sft" and r.model.pretrained and r.tokenizer.kind == "pretrained"


def test_gpt2_medium_recipes_are_the_chapter_settings():
    full, lora = (load_recipe(RECIPES / f"alpaca-gpt2-medium-{k}.yaml") for k in ("full", "lora"))
    for r in (full, lora):
        t = r.train
        assert (t.optimizer, t.lr, t.weight_decay, t.warmup_fraction, t.schedule, t.min_lr) == (
            "adamw", 5e-5, 0.1, 0.2, "cosine", 1e-5)
        assert (t.clip_grad, t.batch_size, t.grad_accum, t.epochs, t.max_steps) == (1.0, 2, 1, 1, None)
        assert r.data.path == "rasbt_instruction_data/instruction-data.json" and r.data.template == "alpaca"
    assert full.adapter.kind == "none"
    assert (lora.adapter.kind, lora.adapter.r, lora.adapter.alpha) == ("lora", 16, 16)
    assert full.model_dump(exclude={"adapter", "run"}) == lora.model_dump(exclude={"adapter", "run"})


def test_zephyr_qlora_recipe_is_the_seed_setup():
    r = load_recipe(RECIPES / "cantos-zephyr-qlora.yaml")
    a, t = r.adapter, r.train
    assert (a.kind, a.r, a.alpha, a.dropout) == ("qlora", 32, 64, 0.05)
    assert a.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (t.lr, t.max_steps, t.batch_size, t.precision) == (2.5e-5, 500, 2, "bf16")
    assert r.data.prompt_template == '### Question: "{input}"\n ### Answer: {output}'
    assert r.data.path == "poundian_cantos/dataset.jsonl"
    assert r.generation.default_preset == "json" and r.generation.presets["json"].temperature == 0.0


@pytest.mark.parametrize("name, total, trainable", [
    ("alpaca-gpt2-medium-full.yaml", 354_823_168, 354_823_168),
    ("alpaca-gpt2-medium-lora.yaml", 354_823_168 + 6_291_456, 6_291_456),  # r16 on c_attn, c_proj, c_fc, mlp c_proj
    ("cantos-zephyr-qlora.yaml", 7_241_732_096 + 83_886_080, 83_886_080),  # r32 on the 7 projections × 32 layers
])
def test_gpu_recipe_models_build_from_config_on_the_meta_device(name, total, trainable):
    from transformers import AutoModelForCausalLM

    from lmlab.models.build import apply_adapter, count_parameters

    r = load_recipe(RECIPES / name)
    if r.adapter.kind == "qlora":  # 4-bit needs CUDA; the LoRA it wraps is the same
        r = load_recipe(RECIPES / name, ["adapter.kind=lora"])
    with torch.device("meta"):
        model = apply_adapter(AutoModelForCausalLM.from_config(hub_config(r.model.pretrained)), r)
    assert count_parameters(model) == (total, trainable)


def tiny_base(folder, name: str):
    """A tiny random model of the recipe's architecture with a tiny tokenizer, saved like a hub folder."""
    from helpers import tiny_sentencepiece_tokenizer, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    llama_like = name != "gpt2-medium"
    tok = tiny_sentencepiece_tokenizer() if llama_like else tiny_tokenizer()
    shrink = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512) if llama_like
              else dict(n_embd=32, n_layer=2, n_head=4))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hub_config(name, vocab_size=len(tok), **shrink))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", FINETUNE)
def test_recipe_runs_two_steps_on_a_tiny_stand_in(workspace, name):
    r = load_recipe(RECIPES / name)
    arch = r.model.pretrained if r.model.pretrained in ("gpt2-medium", "HuggingFaceH4/zephyr-7b-beta") else "llama"
    base = tiny_base(workspace / "base", "HuggingFaceH4/zephyr-7b-beta" if arch == "llama" else arch)
    shrink = [f"model.pretrained={base}", "train.max_steps=2", "train.warmup_fraction=null", "train.warmup_steps=0",
              "data.max_examples=40", "data.max_length=128", "eval.max_batches=1", "eval.every_steps=2",
              "train.batch_size=2"]
    if r.adapter.kind == "qlora" and not torch.cuda.is_available():
        # fp32: accelerate refuses a second precision in one process (AcceleratorState is a singleton)
        shrink.append("train.precision=fp32")
        with pytest.raises(LmlabError, match="'qlora' needs a CUDA GPU"):
            train(load_recipe(RECIPES / name, shrink), quiet=True)
        shrink.append("adapter.kind=lora")
    result = train(load_recipe(RECIPES / name, shrink), quiet=True)
    assert result.status == "FINISHED" and result.step == 2
    files = {p.name for p in result.best_checkpoint.iterdir()}
    assert ("adapter_model.safetensors" in files) == (r.adapter.kind != "none")
    assert ("model.safetensors" in files) == (r.adapter.kind == "none")

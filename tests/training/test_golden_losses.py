"""Golden losses (torchtune's expected-loss tests): a tiny fixed CPU fp32 run must reproduce these numbers, so a
refactor that changes what the loop computes fails here. Pinned before the round-2 package move; it passed before
and after it. If a change is *meant* to alter the numbers, re-pin them in the same commit and say why."""

import pytest
import torch

from lmlab import load_recipe, train

GOLDEN_TRAIN = [5.770267009735107, 5.74503755569458, 5.720578670501709, 5.6614990234375, 5.537282466888428,
                5.500502109527588, 5.487342834472656, 5.393725395202637, 5.353261470794678, 5.358933448791504]
GOLDEN_VAL = 5.36356700675452


def test_tiny_llama_run_reproduces_its_golden_losses(workspace):
    recipe = load_recipe(data={
        "run": {"name": "golden", "seed": 11},
        "data": {"path": "hn_headlines/hacker_news.csv", "text_column": "title", "max_examples": 600,
                 "split": {"train": 0.8, "val": 0.2}},
        "tokenizer": {"vocab_size": 320},
        "model": {"arch": "llama", "n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 32, "dropout": 0.0},
        "train": {"lr": 3e-3, "batch_size": 4, "max_steps": 10, "warmup_steps": 2, "log_every": 1,
                  "precision": "fp32", "num_threads": 1},
        "eval": {"every_steps": 10},
        "ledger": {"enabled": False},
    })
    threads = torch.get_num_threads()
    try:
        result = train(recipe, quiet=True)
    finally:
        torch.set_num_threads(threads)
    losses = [row["train/loss"] for row in result.history if "train/loss" in row]
    assert len(losses) == 10
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(GOLDEN_TRAIN, dtype=torch.float64), rtol=1e-4, atol=0)
    assert result.metrics["val/loss"] == pytest.approx(GOLDEN_VAL, rel=1e-4)

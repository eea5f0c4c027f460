"""A toy fine-tuning setup shared by the generation, judge, serve and export tests: a tiny random Llama folder, four
questions with JSON answers, the SFT recipe that teaches them, and the real `lmlab` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_tokenizer
from helpers.recipes import with_overrides
from lmlab import load_recipe, train

QUOTED = '### Question: "{input}"\n ### Answer: {output}'
ANSWERS = {"one": '{"n": 1}', "two": '{"n": 2}', "three": '{"n": 3}', "four": '{"n": 4}'}


def make_base(folder: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny pretrained-looking Llama folder (random weights) with a tiny BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def toy_data(folder: Path, copies: int = 8) -> Path:
    """Four questions with JSON answers, repeated: a tiny model learns them by heart in a few dozen steps."""
    path = folder / "toy.jsonl"
    rows = [{"input": q, "output": a} for _ in range(copies) for q, a in ANSWERS.items()]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def toy_recipe(root: Path, base: Path, **over) -> dict:
    recipe = {
        "run": {"name": "toy", "task": "sft", "seed": 3, "output_dir": str(root / "lmlab-runs")},
        "data": {"path": str(toy_data(root)), "template": "prompt_completion", "prompt_template": QUOTED,
                 "max_length": 64, "split": {"train": 0.75, "val": 0.25}},
        "model": {"pretrained": str(base)},
        "tokenizer": {"kind": "pretrained"},
        "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 120, "warmup_steps": 0, "weight_decay": 0.0,
                  "log_every": 20, "schedule": "constant"},
        "eval": {"every_steps": 120},
    }
    return with_overrides(recipe, over)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tiny Llama fully fine-tuned until it answers the four questions (about 10 s on 2 cores)."""
    root = tmp_path_factory.mktemp("toy")
    base = make_base(root / "base")
    result = train(load_recipe(data=toy_recipe(root, base)), quiet=True)
    return root, result


def lmlab_cli(*args, cwd=None):
    """The real command (errors printed by lmlab.cli.main, exit codes as a user gets them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", "from lmlab.cli import main; main()", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)

"""The driver the throughput benches share (sft_throughput.py, dpo_throughput.py): each contender trains in a process
of its own (`SCRIPT --only NAME ...`, its result the last line of its stdout, one JSON object), contenders
alternating over rounds so that load drifting on a shared machine hits them alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def tiny_base_folder(root: Path, max_length: int) -> Path:
    """The benches' tiny Llama (~5.2M parameters, most of them the tied 49k-token embedding; seed 0, the same weights
    every time) with SmolLM2's tokenizer, saved as a pretrained folder (what an lmlab recipe points at). Needs
    tests/ on sys.path (helpers.smollm2)."""
    import torch
    from helpers.smollm2 import smollm2_hf_dir
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_length,
                         tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    folder = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def alternate(script: str, contenders: Sequence[str], rounds: int, args: Sequence[str],
              on_result: Callable[[int, str, dict], None],
              after_round: Callable[[int, dict[str, list[dict]]], None] | None = None) -> dict[str, list[dict]]:
    """{contender: [its result in each round]}; `on_result(round, name, result)` prints one as it comes."""
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    for r in range(rounds):
        for name in contenders:
            cmd = [sys.executable, script, "--only", name, *args]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            on_result(r, name, results[name][-1])
        if after_round is not None:
            after_round(r, results)
    return results

"""DPO training throughput: lmlab's dpo task against TRL's DPOTrainer, same model, data, batch and precision.

Pairs/s = preference pairs trained per second of steady-state training (start-up, tokenization and the first
warm-up steps not counted). Both train LoRA (r 16, alpha 32, every linear layer of the blocks, no dropout) on the
same tiny Llama (~5.2M parameters, built from a config, SmolLM2-135M's tokenizer and 49k vocabulary) with the
reference = the same model with the adapter switched off (neither keeps a second copy), sigmoid loss, β 0.1, on
the first 200 pairs of ../shared/data/rasbt_instruction_data/instruction-data-with-preference.json whose responses
differ, Alpaca prompt, batch 8 pairs, max_length 512, fp32 (this CPU has no native bf16). Each contender runs in
its own process; the contenders alternate over several rounds so that load drifting on a shared machine hits them
alike, and the median round counts.

Contenders: lmlab; TRL with its own defaults (on CPU that includes gradient checkpointing); TRL without gradient
checkpointing (what lmlab does), so the ratio that remains is the frameworks', not the setting's.

    OMP_NUM_THREADS=2 python bench/dpo_throughput.py [--steps 12] [--rounds 3] [--model tiny|smollm2]

`--model smollm2` runs the same comparison on SmolLM2-135M-Instruct itself (30 layers × 576): with the tiny model the
49k-token LM head is most of the compute, so lmlab computing logits only over the response columns
(`logits_to_keep`) counts for more there than on a real model.

The last line printed is one JSON object: the median over rounds of each round's ratio (goal: lmlab ≥ 1.5× TRL)
and each contender's median pairs/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # contenders.py beside this file (also when imported)
sys.path.insert(0, str(REPO / "tests"))  # helpers.smollm2: SmolLM2's tokenizer offline
from contenders import alternate, tiny_base_folder  # noqa: E402

DATA = Path(os.environ.get("LMLAB_DATA") or REPO.parent / "shared" / "data")
DATA_FILE = DATA / "rasbt_instruction_data" / "instruction-data-with-preference.json"
CONTENDERS = ["lmlab", "trl", "trl_no_checkpointing"]
PAIRS, BATCH, MAX_LENGTH, LR, BETA, WARMUP_STEPS = 200, 8, 512, 1e-4, 0.1, 2
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def records() -> list[dict]:
    rows = [r for r in json.loads(DATA_FILE.read_text()) if r["chosen"].strip() != r["rejected"].strip()]
    return rows[:PAIRS]


def base_folder(root: Path, model: str = "tiny") -> Path:
    """The benches' tiny Llama with SmolLM2's tokenizer (contenders.tiny_base_folder), or SmolLM2-135M-Instruct's
    own folder."""
    from helpers.smollm2 import smollm2_hf_dir

    return smollm2_hf_dir() if model == "smollm2" else tiny_base_folder(root, MAX_LENGTH)


def steady(step_seconds: list[float]) -> dict:
    seconds = sum(step_seconds[WARMUP_STEPS:])
    pairs = BATCH * (len(step_seconds) - WARMUP_STEPS)
    return {"pairs_per_s": pairs / seconds, "steps_timed": len(step_seconds) - WARMUP_STEPS, "seconds_timed": seconds}


# ------------------------------------------------------------------------------------------ lmlab
def run_lmlab(base: Path, steps: int, out: Path) -> dict:
    from lmlab import load_recipe, train

    data = out / "pairs.json"
    out.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(records()))
    recipe = load_recipe(data={
        "run": {"name": "bench", "task": "dpo", "seed": 0, "output_dir": str(out)},
        "data": {"path": str(data), "template": "alpaca", "max_length": MAX_LENGTH, "split": {"train": 1.0, "val": 0.0}},
        "model": {"pretrained": str(base)}, "tokenizer": {"kind": "pretrained"},
        "adapter": {"kind": "lora", **LORA, "target_modules": "all-linear"},
        "dpo": {"beta": BETA, "loss": "sigmoid", "reference": "adapter_disabled"},
        "train": {"lr": LR, "batch_size": BATCH, "max_steps": steps, "warmup_steps": 0, "log_every": 1,
                  "precision": "fp32", "schedule": "constant", "weight_decay": 0.0},
        "checkpoint": {"save_optimizer": False}, "ledger": {"enabled": False},
    })
    result = train(recipe, quiet=True)
    rows = [h for h in result.history if "train/tokens_per_s" in h]
    seen = [0] + [int(h["train/tokens_seen"]) for h in rows]
    seconds = [(b - a) / h["train/tokens_per_s"] for a, b, h in zip(seen, seen[1:], rows, strict=False)]
    return steady(seconds)


# -------------------------------------------------------------------------------------------- TRL
def run_trl(base: Path, steps: int, out: Path, checkpointing: bool | None) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lmlab.data.templates import PromptTemplate

    tok = AutoTokenizer.from_pretrained(base)
    template = PromptTemplate("alpaca", completion_column="output")
    data = Dataset.from_list([{"prompt": template.prompt_text(r), "chosen": r["chosen"], "rejected": r["rejected"]}
                              for r in records()])
    model = AutoModelForCausalLM.from_pretrained(base)
    step_seconds = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_seconds.append(time.perf_counter() - self.t0)

    kwargs = {} if checkpointing is None else {"gradient_checkpointing": checkpointing}
    config = DPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                       beta=BETA, loss_type=["sigmoid"], learning_rate=LR, lr_scheduler_type="constant",
                       warmup_steps=0, weight_decay=0.0, logging_steps=10**6, save_strategy="no", report_to="none",
                       use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0, bf16=False, **kwargs)
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=peft,
                         callbacks=[Timer()])
    trainer.train()
    settings = {"bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing,
                "pad_to_multiple_of": config.pad_to_multiple_of, "torch_threads": torch.get_num_threads()}
    return {**steady(step_seconds), "trl_settings": settings}


# ---------------------------------------------------------------------------------------- driver
def run_one(name: str, steps: int, model: str = "tiny") -> dict:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = base_folder(root, model)
        if name == "lmlab":
            return run_lmlab(base, steps, root / "runs")
        return run_trl(base, steps, root / "trl", False if name == "trl_no_checkpointing" else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per contender per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median counts")
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny", help="tiny: a ~5.2M-parameter Llama "
                   "with SmolLM2's vocabulary; smollm2: SmolLM2-135M-Instruct itself")
    p.add_argument("--only", choices=CONTENDERS, help="run one contender once, print its JSON (internal)")
    args = p.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args.steps, args.model)))
        return
    if not DATA_FILE.is_file():
        sys.exit(f"data file {DATA_FILE} not found; set LMLAB_DATA")

    def show(r: int, name: str, res: dict) -> None:
        print(f"round {r + 1} {name:21s} {res['pairs_per_s']:7.2f} pairs/s "
              f"({res['steps_timed']} steps in {res['seconds_timed']:.1f} s)", flush=True)

    def ratios_of_round(r: int, results: dict[str, list[dict]]) -> None:
        lmlab = results["lmlab"][-1]["pairs_per_s"]
        print(f"round {r + 1} ratios: " + ", ".join(f"lmlab / {c} {lmlab / results[c][-1]['pairs_per_s']:.2f}"
                                                      for c in CONTENDERS[1:]), flush=True)

    results = alternate(__file__, CONTENDERS, args.rounds, ["--steps", str(args.steps), "--model", args.model],
                        show, ratios_of_round)
    median = {c: statistics.median(x["pairs_per_s"] for x in runs) for c, runs in results.items()}
    print(f"TRL settings: {results['trl'][0]['trl_settings']}")
    for c in CONTENDERS:
        print(f"{c:21s} median {median[c]:7.2f} pairs/s")
    # the median of each round's ratio: contenders of one round ran minutes apart, rounds may be far apart in load
    ratios = {f"lmlab_vs_{c}": round(statistics.median(a["pairs_per_s"] / b["pairs_per_s"] for a, b in
                                                       zip(results["lmlab"], results[c], strict=True)), 3)
              for c in CONTENDERS[1:]}
    print(json.dumps({**ratios, "pairs_per_s_median": {c: round(v, 3) for c, v in median.items()},
                      "model": args.model, "steps": args.steps, "rounds": args.rounds}))


if __name__ == "__main__":
    main()

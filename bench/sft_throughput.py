"""SFT training throughput: lmlab (packed, padded) against TRL's SFTTrainer (padded, packed), same model and batch.

Effective tokens/s = loss-bearing (completion) tokens trained per second of steady-state training: start-up,
tokenization and the first warm-up steps are not counted. Every contender trains the same tiny Llama (~5.2M
parameters, built from a config, SmolLM2-135M's tokenizer and vocabulary) on the same first 400 rows of
../shared/data/rasbt_instruction_data/instruction-data.json with the Alpaca prompt, batch 8 sequences, max_length
512, for a fixed number of optimizer steps; each contender runs in its own process, and the contenders alternate
over several rounds so that load drifting on a shared machine hits them alike. The median round counts.

TRL runs with its own defaults (on CPU: gradient checkpointing on; packing = padding-free 'bfd') except precision,
which both frameworks share: TRL's CPU default is bf16 autocast, which pays off only where the CPU multiplies bf16
natively (AVX512-BF16 / AMX); on a CPU without (AVX2 only: bf16 matmuls ~50× slower than fp32, measured) bf16 would
measure the missing instructions, not the frameworks. --precision auto (default) probes a matmul and picks the faster.

    OMP_NUM_THREADS=2 python bench/sft_throughput.py [--steps 20] [--rounds 3] [--precision auto|fp32|bf16]

The last line printed is one JSON object with the ratios (goal: packed ≥ 2× TRL padded, ≥ 1.0× TRL packed).
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
DATA_FILE = DATA / "rasbt_instruction_data" / "instruction-data.json"
CONTENDERS = ["lmlab_packed", "lmlab_padded", "trl_padded", "trl_packed"]
EXAMPLES, BATCH, MAX_LENGTH, LR, WARMUP_STEPS = 400, 8, 512, 3e-4, 3


def steady(step_tokens: list[int], step_seconds: list[float]) -> dict:
    tokens, seconds = sum(step_tokens[WARMUP_STEPS:]), sum(step_seconds[WARMUP_STEPS:])
    return {"eff_tokens_per_s": tokens / seconds, "steps_timed": len(step_seconds) - WARMUP_STEPS,
            "tokens_timed": tokens, "seconds_timed": seconds}


# ------------------------------------------------------------------------------------------ lmlab
def run_lmlab(base: Path, packed: bool, steps: int, precision: str, out: Path) -> dict:
    from lmlab import load_recipe, train

    recipe = load_recipe(data={
        "run": {"name": "bench", "task": "sft", "seed": 0, "output_dir": str(out)},
        "data": {"path": str(DATA_FILE), "template": "alpaca", "max_examples": EXAMPLES, "max_length": MAX_LENGTH,
                 "packing": packed, "split": {"train": 1.0, "val": 0.0}},
        "model": {"pretrained": str(base)}, "tokenizer": {"kind": "pretrained"},
        "train": {"lr": LR, "batch_size": BATCH, "max_steps": steps, "warmup_steps": 0, "log_every": 1,
                  "precision": precision, "schedule": "constant"},
        "checkpoint": {"save_optimizer": False}, "ledger": {"enabled": False},
    })
    result = train(recipe, quiet=True)
    rows = [h for h in result.history if "train/tokens_per_s" in h]
    seen = [0] + [int(h["train/tokens_seen"]) for h in rows]  # every token read (the rate's numerator)
    with_loss = [0] + [int(h["train/loss_tokens_seen"]) for h in rows]  # effective: the ones with loss
    seconds = [(b - a) / h["train/tokens_per_s"] for a, b, h in zip(seen, seen[1:], rows, strict=False)]
    tokens = [b - a for a, b in zip(with_loss, with_loss[1:], strict=False)]
    return steady(tokens, seconds)


# -------------------------------------------------------------------------------------------- TRL
def run_trl(base: Path, packed: bool, steps: int, precision: str, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lmlab.data.templates import PromptTemplate

    tok = AutoTokenizer.from_pretrained(base)
    template = PromptTemplate("alpaca", completion_column="output")
    rows = json.loads(DATA_FILE.read_text())[:EXAMPLES]
    data = Dataset.from_list([{"prompt": template.prompt_text(r), "completion": r["output"]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(base)
    counted = {"tokens": 0}

    def count_targets(module, args, kwargs):  # loss-bearing tokens of each training forward
        labels = kwargs.get("labels")
        if module.training and labels is not None:
            counted["tokens"] += int((labels != -100).sum())

    model.register_forward_pre_hook(count_targets, with_kwargs=True)
    step_tokens, step_seconds = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.n0 = time.perf_counter(), counted["tokens"]

        def on_step_end(self, args, state, control, **kw):
            step_seconds.append(time.perf_counter() - self.t0)
            step_tokens.append(counted["tokens"] - self.n0)

    config = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                       packing=packed, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                       logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True,
                       dataloader_num_workers=0, disable_tqdm=True, seed=0, bf16=precision == "bf16")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    settings = {"bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing,
                "packing_strategy": config.packing_strategy if packed else None, "torch_threads": torch.get_num_threads()}
    return {**steady(step_tokens, step_seconds), "trl_settings": settings}


# ---------------------------------------------------------------------------------------- driver
def faster_precision() -> str:
    """bf16 if this CPU multiplies bf16 at least as fast as fp32 (a 512² matmul probe), else fp32."""
    import torch

    a = torch.randn(512, 512)
    speed = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = a.to(dtype)
        x @ x
        t = time.perf_counter()
        for _ in range(5):
            x @ x
        speed[name] = 5 / (time.perf_counter() - t)
    return "bf16" if speed["bf16"] >= speed["fp32"] else "fp32"


def run_one(name: str, steps: int, precision: str) -> dict:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = tiny_base_folder(root, MAX_LENGTH)
        if name.startswith("lmlab"):
            return run_lmlab(base, name.endswith("packed"), steps, precision, root / "runs")
        return run_trl(base, name.endswith("packed"), steps, precision, root / "trl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per contender per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median counts")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast precision of every contender; auto = the faster on this CPU")
    p.add_argument("--only", choices=CONTENDERS, help="run one contender once, print its JSON (internal)")
    args = p.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args.steps, args.precision)))
        return
    if args.precision == "auto":
        args.precision = faster_precision()
    if not DATA_FILE.is_file():
        sys.exit(f"data file {DATA_FILE} not found; set LMLAB_DATA")

    def show(r: int, name: str, res: dict) -> None:
        print(f"round {r + 1} {name:13s} {res['eff_tokens_per_s']:9.0f} eff. tok/s "
              f"({res['tokens_timed']} tokens in {res['seconds_timed']:.1f} s)", flush=True)

    results = alternate(__file__, CONTENDERS, args.rounds,
                        ["--steps", str(args.steps), "--precision", args.precision], show)
    median = {c: statistics.median(x["eff_tokens_per_s"] for x in runs) for c, runs in results.items()}
    print(f"precision {args.precision}; TRL settings: {results['trl_packed'][0]['trl_settings']}")
    for c in CONTENDERS:
        print(f"{c:13s} median {median[c]:9.0f} eff. tok/s")
    ratios = {
        "lmlab_packed_vs_trl_padded": median["lmlab_packed"] / median["trl_padded"],
        "lmlab_packed_vs_trl_packed": median["lmlab_packed"] / median["trl_packed"],
        "lmlab_padded_vs_trl_padded": median["lmlab_padded"] / median["trl_padded"],
        "lmlab_packed_vs_lmlab_padded": median["lmlab_packed"] / median["lmlab_padded"],
    }
    summary = {k: round(v, 3) for k, v in ratios.items()}
    summary.update({"goal_met": ratios["lmlab_packed_vs_trl_padded"] >= 2.0 and ratios["lmlab_packed_vs_trl_packed"] >= 1.0,
                    "eff_tokens_per_s": {c: round(v, 1) for c, v in median.items()},
                    "steps": args.steps, "rounds": args.rounds, "precision": args.precision, "load_average_end": round(os.getloadavg()[0], 2)})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

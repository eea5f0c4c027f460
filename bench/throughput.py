"""Training throughput: lmlab vs a plain PyTorch loop vs the Hugging Face Trainer, same model, data, batch.

All three train the same transformers model (built from lmlab's own scratch config) on the same
headline blocks with the same batch, optimizer, schedule, clipping and precision. Runs alternate
(lmlab, plain, trainer, lmlab, ...) so machine drift hits all alike; each contender's tokens/s is the
median over its rounds of the steady-state rate (steps after the first `--skip` are timed; start-up,
evaluation and checkpointing are excluded for all three).

  python bench/throughput.py [--steps 60] [--rounds 2] [--precision fp32|bf16] [--arch gpt2|llama]
Last line: one JSON object with the ratios, e.g. {"vs_plain": 1.01, "vs_trainer": 1.18, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab import load_recipe, train
from lmlab.data.lm import BlockView, collate_blocks, tokenize_documents
from lmlab.data.sources import column, load_records
from lmlab.data.tokenizer import train_bpe
from lmlab.models.build import build_causal_lm
from lmlab.training.loop import epoch_order
from lmlab.training.optim import lr_at, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def recipe_for(args, workdir: str):
    return load_recipe(data={
        "run": {"name": "bench-throughput", "seed": 0, "output_dir": workdir},
        "data": {"path": "hn_headlines/hacker_news.csv", "text_column": "title", "split": {"train": 0.95, "val": 0.05}},
        "tokenizer": {"vocab_size": args.vocab},
        "model": {"arch": args.arch, "n_layer": 4, "n_head": 4, "d_model": 256, "block_size": 128, "dropout": 0.0},
        "train": {"optimizer": "adamw", "lr": 1e-3, "min_lr": 1e-4, "batch_size": 16, "max_steps": args.steps,
                  "warmup_steps": 0, "clip_grad": 1.0, "precision": args.precision, "log_every": 1},
        "eval": {"every_steps": 10_000, "max_batches": 1},
        "checkpoint": {"keep_last": 1, "save_optimizer": False},
        "ledger": {"enabled": False},
    })


def steady(times: list[float], tokens_per_step: int, skip: int) -> float:
    dts = [b - a for a, b in zip(times[skip:], times[skip + 1:], strict=False)]
    return tokens_per_step / statistics.median(dts)


def run_lmlab(recipe, skip: int) -> float:
    result = train(recipe, quiet=True)
    rates = [h["train/tokens_per_s"] for h in result.history if "train/tokens_per_s" in h][skip:]
    return statistics.median(rates)


def shared_data(recipe):
    records = load_records(recipe)
    docs = column(records, "title", "bench")
    tok = train_bpe(docs, recipe.tokenizer.vocab_size, recipe.tokenizer.special_tokens)
    stream = tokenize_documents(docs, tok, tok.eos_token_id)
    return tok, BlockView(stream.ids, recipe.model.block_size, drop_last=True)


def run_plain(recipe, tok, blocks, skip: int) -> float:
    """The loop a careful user writes by hand over the same transformers model."""
    t = recipe.train
    torch.manual_seed(0)
    model = build_causal_lm(recipe, len(tok), tok.eos_token_id)
    model.train()
    opt = make_optimizer(recipe.train, model, strategy=recipe.distributed.strategy)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, lr=1.0, min_lr=t.min_lr / t.lr, warmup=0,
                                                                   total=t.max_steps, schedule=t.schedule))
    order = epoch_order(len(blocks), 0, 0)
    times = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.precision == "bf16")
    for step in range(t.max_steps):
        idx = order[step * t.batch_size:(step + 1) * t.batch_size]
        batch = collate_blocks([blocks[i] for i in idx])
        with autocast:
            logits = model(input_ids=batch["input_ids"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return steady(times, t.batch_size * recipe.model.block_size, skip)


def run_trainer(recipe, tok, blocks, skip: int, workdir: str) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    t = recipe.train
    torch.manual_seed(0)
    model = build_causal_lm(recipe, len(tok), tok.eos_token_id)
    order = epoch_order(len(blocks), 0, 0)[: t.max_steps * t.batch_size]
    data = [{"input_ids": blocks[int(i)][:-1], "labels": blocks[int(i)][:-1]} for i in order]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=os.path.join(workdir, "trainer"), per_device_train_batch_size=t.batch_size, max_steps=t.max_steps,
        learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
        lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=t.clip_grad, bf16=t.precision == "bf16",
        logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Clock()]).train()
    return steady(times, t.batch_size * recipe.model.block_size, skip)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps not timed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    os.environ.setdefault("LMLAB_DATA", str(ROOT.parent / "shared" / "data"))
    workdir = tempfile.mkdtemp(prefix="lmlab-bench-")
    recipe = recipe_for(args, workdir)
    tok, blocks = shared_data(recipe)
    print(f"model {args.arch} 4L×256, block 128, batch 16, {args.precision}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps ({args.skip} untimed) × {args.rounds} rounds")
    rates: dict[str, list[float]] = {"lmlab": [], "plain": [], "trainer": []}
    for r in range(args.rounds):
        for name in rates:
            if name == "lmlab":
                rate = run_lmlab(recipe, args.skip // recipe.train.log_every)
            elif name == "plain":
                rate = run_plain(recipe, tok, blocks, args.skip)
            else:
                rate = run_trainer(recipe, tok, blocks, args.skip, workdir)
            rates[name].append(rate)
            print(f"  round {r + 1} {name:8} {rate:9,.0f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in med.items():
        print(f"{k:8} {v:9,.0f} tok/s (median)")
    print(json.dumps({"vs_plain": round(med["lmlab"] / med["plain"], 3),
                      "vs_trainer": round(med["lmlab"] / med["trainer"], 3),
                      "lmlab_tok_s": round(med["lmlab"]), "plain_tok_s": round(med["plain"]),
                      "trainer_tok_s": round(med["trainer"]), "precision": args.precision}))


if __name__ == "__main__":
    main()

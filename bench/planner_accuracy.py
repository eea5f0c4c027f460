"""Planner accuracy: predicted vs measured peak memory of real training steps.

    python bench/planner_accuracy.py                 # CPU: 10 configurations, ~7 CPU-minutes (2 threads)
    python bench/planner_accuracy.py --saved         # saved-for-backward bytes vs autograd, tiny shapes
    python bench/planner_accuracy.py --device cuda   # on a GPU: torch.cuda.max_memory_allocated

Each configuration (scratch GPT-2 / Llama sizes, SmolLM2-135M's shape with LoRA and full fine-tuning, batch
and sequence variations, fp32 / bf16, activation checkpointing, gradient accumulation) runs in a fresh
subprocess: the model is built from a config with random weights (no download), then two optimizer steps of
lmlab's loop run — forward + token cross-entropy + backward inside autocast, clip, AdamW step,
zero_grad(set_to_none=True). The last line printed is one JSON object: {"median_err": …, "worst_err": …, "n": …}.

What "measured" means. On CUDA it is `torch.cuda.max_memory_allocated()`: every byte handed out by torch's
allocator, weights included, at its high-water mark. On CPU there is no such counter, so the steps run under
`torch.profiler` with `profile_memory=True`, which records every allocation and free of torch's CPU allocator
with the running total; the peak is that total's maximum plus the bytes already allocated when profiling
started (weights and buffers, counted from the tensors). That is the same quantity as on CUDA — tensor bytes
live at once — exact to the byte and identical from run to run. The process's resident-set high-water mark
(ru_maxrss) was the other candidate; it is printed for information only: it adds the interpreter and the
libraries (~0.5 GiB), glibc keeps freed blocks, and mkldnn scratch buffers come and go outside torch's
allocator, so it would grade the planner on the allocator rather than on the model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmlab.analysis.plan import ModelShape, TrainSetup, activation_bytes, plan_from_shape

# SmolLM2-135M's config.json (LlamaConfig): built with random weights, nothing downloaded
SMOLLM2_135M = dict(arch="llama", vocab_size=49152, d_model=576, n_layer=30, n_head=9, n_kv_head=3, d_ff=1536,
                    context=2048, tied_embeddings=True, activation="silu", name="SmolLM2-135M")

# (name, shape kwargs, setup kwargs): sizes chosen so that the whole run stays within a few minutes on 2 cores
# (bf16 autocast is several times slower than fp32 on an AVX2-only CPU, so its configurations are smaller)
LLAMA_8x512 = dict(arch="llama", vocab_size=8192, d_model=512, n_layer=8, n_head=8, n_kv_head=4, d_ff=1344,
                   context=256, activation="silu")
GPT2_4x256 = dict(arch="gpt2", vocab_size=4096, d_model=256, n_layer=4, n_head=4, d_ff=1024, context=128)
CONFIGS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("llama 4x128 headlines-tiny", dict(arch="llama", vocab_size=2048, d_model=128, n_layer=4, n_head=4, d_ff=320,
                                        context=128, activation="silu"), dict(micro_batch=32, seq_len=128)),
    ("gpt2 4x256 B16 T128", GPT2_4x256, dict(micro_batch=16, seq_len=128)),
    ("gpt2 4x256 B4 T128 bf16", GPT2_4x256, dict(micro_batch=4, seq_len=128, precision="bf16")),
    ("gpt2 6x384 B4 T512 gelu_new", dict(arch="gpt2", vocab_size=8192, d_model=384, n_layer=6, n_head=6, d_ff=1536,
                                         context=512, activation="gelu_new"), dict(micro_batch=4, seq_len=512)),
    ("llama 8x512 gqa B4 T256", LLAMA_8x512, dict(micro_batch=4, seq_len=256)),
    ("llama 8x512 gqa B4 T256 ckpt", LLAMA_8x512, dict(micro_batch=4, seq_len=256, checkpointing=True)),
    ("llama 4x128 B8x2acc T128 bf16", dict(arch="llama", vocab_size=2048, d_model=128, n_layer=4, n_head=4,
                                           n_kv_head=2, d_ff=320, context=128, activation="silu"),
     dict(micro_batch=8, seq_len=128, precision="bf16", grad_accum=2)),
    ("SmolLM2-135M LoRA r16 B4 T256", SMOLLM2_135M, dict(micro_batch=4, seq_len=256, adapter="lora", lora_r=16)),
    ("SmolLM2-135M LoRA r16 B1 T64 bf16", SMOLLM2_135M,
     dict(micro_batch=1, seq_len=64, adapter="lora", lora_r=16, precision="bf16")),
    ("SmolLM2-135M full B2 T128", SMOLLM2_135M, dict(micro_batch=2, seq_len=128)),
]

GPT2_MEDIUM = dict(arch="gpt2", vocab_size=50257, d_model=1024, n_layer=24, n_head=16, d_ff=4096, context=1024,
                   activation="gelu_new", resid_dropout=0.1, attn_dropout=0.1, name="gpt2-medium")
GPT2_LARGE = {**GPT2_MEDIUM, "d_model": 1280, "n_layer": 36, "n_head": 20, "d_ff": 5120, "name": "gpt2-large"}
SMOLLM2_360M = dict(arch="llama", vocab_size=49152, d_model=960, n_layer=32, n_head=15, n_kv_head=5, d_ff=2560,
                    context=2048, tied_embeddings=True, activation="silu", name="SmolLM2-360M")
TINYLLAMA_1B = dict(arch="llama", vocab_size=32000, d_model=2048, n_layer=22, n_head=32, n_kv_head=4, d_ff=5632,
                    context=2048, tied_embeddings=False, activation="silu", name="TinyLlama-1.1B")
# GPU-sized configurations, run only with --device cuda (pretrained shapes with their dropout, the seed figure)
CUDA_CONFIGS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("gpt2-medium full B4 T1024 bf16", GPT2_MEDIUM, dict(micro_batch=4, seq_len=1024, precision="bf16")),
    ("gpt2-medium LoRA B8 T1024 fp32", GPT2_MEDIUM, dict(micro_batch=8, seq_len=1024, adapter="lora")),
    ("gpt2-large full B2 T1024 fp32 eager", {**GPT2_LARGE, "attention": "eager"}, dict(micro_batch=2, seq_len=1024)),
    ("gpt2-large full B2 T1024 fp32 sdpa", GPT2_LARGE, dict(micro_batch=2, seq_len=1024)),
    ("SmolLM2-135M full B16 T1024 bf16", SMOLLM2_135M, dict(micro_batch=16, seq_len=1024, precision="bf16")),
    ("SmolLM2-360M LoRA B8 T1024 bf16", SMOLLM2_360M,
     dict(micro_batch=8, seq_len=1024, precision="bf16", adapter="lora")),
    ("TinyLlama-1.1B full B4 T1024 bf16 ckpt", TINYLLAMA_1B,
     dict(micro_batch=4, seq_len=1024, precision="bf16", checkpointing=True)),
    ("TinyLlama-1.1B full B2 T1024 bf16 acc2", TINYLLAMA_1B,
     dict(micro_batch=2, seq_len=1024, precision="bf16", grad_accum=2)),
]

# tiny shapes for --saved: saved-for-backward bytes, formula vs autograd's saved-tensor hooks
SAVED_SHAPES = {
    "gpt2": dict(arch="gpt2", vocab_size=1000, d_model=96, n_layer=2, n_head=4, d_ff=384, context=40),
    "gpt2 gelu_new dropout": dict(arch="gpt2", vocab_size=1000, d_model=96, n_layer=2, n_head=4, d_ff=384, context=40,
                                  activation="gelu_new", resid_dropout=0.1, attn_dropout=0.1),
    "llama gqa": dict(arch="llama", vocab_size=1000, d_model=96, n_layer=2, n_head=4, n_kv_head=2, d_ff=200,
                      context=40, activation="silu"),
    "llama eager": dict(arch="llama", vocab_size=1000, d_model=96, n_layer=2, n_head=4, n_kv_head=2, d_ff=200,
                        context=40, activation="silu", attention="eager"),
}


# ------------------------------------------------------------------------------------------ the model
def build_model(shape: ModelShape, setup: TrainSetup, seed: int = 0, device: str = "cpu"):
    """A transformers model of `shape` with random weights, wrapped like lmlab does for the setup."""
    import torch

    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it will train (fast on a GPU)
        model = _hf_model(shape)
    if setup.checkpointing:
        model.gradient_checkpointing_enable()
    if setup.adapter == "lora":
        from peft import LoraConfig, get_peft_model

        targets = list(setup.lora_targets) if setup.lora_targets else "all-linear"
        model = get_peft_model(model, LoraConfig(r=setup.lora_r, lora_alpha=2 * setup.lora_r, lora_dropout=0.0,
                                                 target_modules=targets))
    model.train()
    return model


def _hf_model(shape: ModelShape):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if shape.arch == "gpt2":
        cfg = GPT2Config(vocab_size=shape.vocab_size, n_positions=shape.context, n_embd=shape.d_model,
                         n_layer=shape.n_layer, n_head=shape.n_head, n_inner=shape.d_ff,
                         activation_function=shape.activation, resid_pdrop=shape.resid_dropout,
                         embd_pdrop=shape.resid_dropout, attn_pdrop=shape.attn_dropout,
                         tie_word_embeddings=shape.tied_embeddings, bos_token_id=0, eos_token_id=0,
                         attn_implementation=shape.attention)
        return GPT2LMHeadModel(cfg)
    if shape.arch == "llama":
        cfg = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.d_model, intermediate_size=shape.d_ff,
                          num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head,
                          num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.context,
                          tie_word_embeddings=shape.tied_embeddings, attention_dropout=shape.attn_dropout,
                          bos_token_id=0, eos_token_id=0, attn_implementation=shape.attention)
        return LlamaForCausalLM(cfg)
    raise ValueError(f"the benchmark builds gpt2 and llama models, not {shape.arch}")


def make_batch(shape: ModelShape, setup: TrainSetup, device: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab_size, (setup.micro_batch, setup.seq_len), generator=g)
    return {"input_ids": ids.to(device), "labels": ids.roll(-1, dims=1).to(device)}


def token_nll(model, batch):
    """lmlab's causal_lm.token_nll: summed cross-entropy over (B·T, V) fp32 logits."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"]).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum")


def param_groups(model, weight_decay: float = 0.1):
    """lmlab's train.param_groups: decay matrices, not embeddings / norms / biases."""
    import torch

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_steps(model, shape: ModelShape, setup: TrainSetup, device: str, steps: int = 2) -> None:
    """lmlab's loop: per micro-batch forward + loss + backward inside autocast; clip; step; zero_grad."""
    import torch

    opt = torch.optim.AdamW(param_groups(model), lr=1e-4, fused=True)  # as lmlab's loop (train.fused)
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        for micro in range(setup.grad_accum):
            batch = make_batch(shape, setup, device, seed=step * 100 + micro)
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=setup.precision == "bf16"):
                nll = token_nll(model, batch)
                nll.backward()
            del nll, batch
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (shared storages once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


# ---------------------------------------------------------------------------------------- measuring
def measure_peak(shape: ModelShape, setup: TrainSetup, device: str = "cpu") -> dict[str, float]:
    """Peak tensor bytes of two training steps (run this in a fresh process)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = build_model(shape, setup, device=device)
    t0 = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_steps(model, shape, setup, device)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        before = tensor_bytes(model)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_steps(model, shape, setup, device)
        high = 0
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                high = max(high, node.extra_fields.total_allocated)
            stack.extend(node.children)
        peak = before + high
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak": peak, "rss_delta": rss - rss0, "seconds": time.perf_counter() - t0}


def measure_saved_bytes(model, shape: ModelShape, setup: TrainSetup, device: str = "cpu") -> int:
    """Bytes autograd saves for backward in one forward + loss (parameter storages excluded, each storage once):
    what `activation_bytes(...).total` predicts for a model without checkpointing."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    batch = make_batch(shape, setup, device, seed=0)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=setup.precision == "bf16"):
            token_nll(model, batch)
    return sum(saved.values())


# -------------------------------------------------------------------------------------------- running
def predicted(shape: ModelShape, setup: TrainSetup, device: str) -> int:
    plan_device = "gpu:1000gb" if device.startswith("cuda") else "cpu:1000gb"
    return plan_from_shape(shape, setup, plan_device, explore=False).peak


def run_one(name: str, shape_kw: dict, setup_kw: dict, device: str) -> dict[str, Any]:
    """Measure one configuration in a fresh subprocess; predict it here."""
    shape, setup = ModelShape(**shape_kw), TrainSetup(**setup_kw)
    job = json.dumps({"shape": shape_kw, "setup": setup_kw, "device": device})
    proc = subprocess.run([sys.executable, __file__, "--one", job], capture_output=True, text=True,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: measurement failed\n{proc.stderr[-3000:]}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    pred = predicted(shape, setup, device)
    return {"name": name, "predicted": pred, "measured": measured["peak"],
            "err": (pred - measured["peak"]) / measured["peak"], "rss_delta": measured["rss_delta"],
            "seconds": measured["seconds"]}


def check_saved(device: str) -> None:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    for (name, kw), precision, adapter in itertools.product(SAVED_SHAPES.items(), ("fp32", "bf16"), (None, "lora")):
        shape = ModelShape(**kw)
        setup = TrainSetup(micro_batch=3, seq_len=40, precision=precision, adapter=adapter, lora_r=8)
        measured = measure_saved_bytes(build_model(shape, setup, device=device), shape, setup, device)
        pred = activation_bytes(shape, setup, kind).total
        print(f"saved  {name:<24}{precision:<6}{adapter or 'full':<6}{pred:>10}{measured:>10}{pred / measured - 1:>+8.2%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one JSON-described config
    ap.add_argument("--only", default="", help="run the configurations whose name contains this")
    ap.add_argument("--saved", action="store_true", help="check saved-for-backward bytes on tiny shapes instead")
    args = ap.parse_args()
    if args.one:
        job = json.loads(args.one)
        print(json.dumps(measure_peak(ModelShape(**job["shape"]), TrainSetup(**job["setup"]), job["device"])))
        return
    if args.saved:
        check_saved(args.device)
        return
    rows = []
    mib = 1024**2
    configs = CONFIGS + (CUDA_CONFIGS if args.device.startswith("cuda") else [])
    print(f"{'configuration':<38}{'predicted':>12}{'measured':>12}{'error':>8}{'RSS Δ':>11}{'time':>7}")
    for name, shape_kw, setup_kw in configs:
        if args.only and args.only not in name:
            continue
        r = run_one(name, shape_kw, setup_kw, args.device)
        rows.append(r)
        print(f"{name:<38}{r['predicted'] / mib:>9.1f} MiB{r['measured'] / mib:>9.1f} MiB{r['err']:>+8.1%}"
              f"{r['rss_delta'] / mib:>7.0f} MiB{r['seconds']:>6.1f}s", flush=True)
    errs = [abs(r["err"]) for r in rows]
    print(json.dumps({"median_err": round(statistics.median(errs), 4), "worst_err": round(max(errs), 4),
                      "n": len(rows), "device": args.device}))


if __name__ == "__main__":
    main()

"""What mirroring a run to object storage costs: the same run with and without run.storage (--storage), alternating.

The storage is moto's S3 server on 127.0.0.1, started in a process of its own at nice 10 (`--server-nice`): S3 would
be another machine, so its request handling should take only cores the training leaves idle; it still shares the
same two cores here, so the figure stays pessimistic for a real bucket (`--server-nice 0` for the worst case). The run is the
headlines-tiny model (4 layers x 128, block 128, batch 32) saving a checkpoint (weights + optimizer state) every
`--save-every` steps, each uploaded in the background while training goes on. Rounds alternate (plain, storage,
plain, ...) so machine drift hits both alike; each ratio is the median over rounds of a round's storage run over its
plain run.

  python bench/storage_overhead.py [--steps 120] [--save-every 40] [--rounds 5] [--server-nice 10]

The default saves a checkpoint (~18 MB with the optimizer state) every ~13 s of training on 2 CPU cores, far more
often than a real run does (minutes apart); `--steps 60 --save-every 10` is a stress case (one every ~3 s).
Reports, storage over plain: tokens/s over the whole loop (training steps, evaluation and checkpoints:
`wall_ratio`, the target >= 0.95), tokens/s over training steps only (`steps_ratio`), and the seconds the call
took beyond the loop compared with plain (`drain_s`: the storage check at the start and the uploads still queued at
the end). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmlab import load_recipe, train

os.environ.setdefault("LMLAB_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

SERVER = """
import logging, os, sys, time
os.nice(int(sys.argv[1]))
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print(s.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the bench closes our stdin
"""


def recipe(args, workdir: str, storage: str | None):
    return load_recipe(data={
        "run": {"name": "bench-storage", "seed": 0, "output_dir": workdir, "storage": storage},
        "data": {"path": "hn_headlines/hacker_news.csv", "text_column": "title", "split": {"train": 0.95, "val": 0.05}},
        "tokenizer": {"vocab_size": 2048},
        "model": {"arch": "llama", "n_layer": 4, "n_head": 4, "d_model": 128, "block_size": 128, "dropout": 0.0},
        "train": {"optimizer": "adamw", "lr": 3e-3, "min_lr": 3e-4, "batch_size": 32, "max_steps": args.steps,
                  "warmup_steps": 5, "clip_grad": 1.0, "log_every": 10},
        "eval": {"every_steps": args.steps, "max_batches": 2},
        "checkpoint": {"every_steps": args.save_every, "keep_last": 2},
    })


def one_run(args, storage: str | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as workdir:
        r = recipe(args, workdir, storage)
        t0 = time.perf_counter()
        result = train(r, quiet=True)
        total = time.perf_counter() - t0
    assert result.status == "FINISHED", result.status
    m = result.metrics
    tokens_per_step = r.train.batch_size * r.train.grad_accum * r.model.block_size
    loop_s = result.step * tokens_per_step / m["train/wall_tokens_per_s"]
    return {"wall": m["train/wall_tokens_per_s"], "steps": m["train/mean_tokens_per_s"], "total_s": total,
            "loop_s": loop_s}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--save-every", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--server-nice", type=int, default=10)
    args = p.parse_args()

    server = subprocess.Popen([sys.executable, "-c", SERVER, str(args.server_nice)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        one_run(args, None)  # warm-up: data cache, imports
        results: dict[str, list[dict[str, float]]] = {"plain": [], "storage": []}
        for r in range(args.rounds):
            for kind in ("plain", "storage"):
                res = one_run(args, f"s3://bench/round-{r}" if kind == "storage" else None)
                results[kind].append(res)
                print(f"round {r} {kind:8s} {res['wall']:8.0f} tok/s whole loop, {res['steps']:8.0f} tok/s training "
                      f"steps, call {res['total_s']:.1f} s", flush=True)
    finally:
        server.stdin.close()
        server.wait(timeout=30)

    def med(kind: str, key: str) -> float:
        return statistics.median(x[key] for x in results[kind])

    drain = statistics.median(s["total_s"] - s["loop_s"] - (p["total_s"] - p["loop_s"])
                              for s, p in zip(results["storage"], results["plain"], strict=True))
    # each round's storage run over the plain run just before it (the machine's load drifts between rounds)
    paired = {key: [s[key] / p[key] for s, p in zip(results["storage"], results["plain"], strict=True)]
              for key in ("wall", "steps")}
    summary = {"wall_ratio": round(statistics.median(paired["wall"]), 3),
               "steps_ratio": round(statistics.median(paired["steps"]), 3),
               "wall_ratio_min": round(min(paired["wall"]), 3), "wall_ratio_max": round(max(paired["wall"]), 3),
               "ratio_of_medians": round(med("storage", "wall") / med("plain", "wall"), 3),
               "drain_s": round(drain, 2), "plain_wall_tok_s": round(med("plain", "wall")),
               "storage_wall_tok_s": round(med("storage", "wall")), "steps": args.steps,
               "checkpoints": args.steps // args.save_every, "rounds": args.rounds,
               "server_nice": args.server_nice}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""A DPO recipe's validation preference accuracy before and after training.

Before: the starting model scored on the recipe's val split exactly as the run's evaluations score it (policy =
reference, so every reward margin is 0 and accuracy is chance by construction; val/policy_accuracy is what the
model prefers on its own, log π(chosen) > log π(rejected)). After: the run's final evaluation. Prints both and,
last, one JSON object.

    nice python bench/dpo_accuracy.py recipes/dpo-smollm2-lora-cpu.yaml [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time

KEYS = ("val/accuracy", "val/policy_accuracy", "val/rewards/margin", "val/loss", "val/pairs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    from lmlab import load_recipe, train
    from lmlab.training.prepare import prepare

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.run.task != "dpo":
        raise SystemExit(f"{args.recipe}: run.task is {recipe.run.task}, not dpo")
    start = time.perf_counter()
    prep = prepare(recipe)
    before = prep.task.evaluate(prep.model, prep.task.val_set, "val")
    print("before:", {k: round(before[k], 4) for k in KEYS}, f"({time.perf_counter() - start:.0f} s)", flush=True)
    del prep
    start = time.perf_counter()
    result = train(recipe, quiet=True)
    after = result.metrics
    keys = [*KEYS, *(k for k in ("test/accuracy", "test/policy_accuracy", "test/pairs") if k in after)]
    print("after: ", {k: round(after[k], 4) for k in keys}, f"({time.perf_counter() - start:.0f} s, {result.step} "
          f"steps, run {result.run_id})", flush=True)
    print(json.dumps({"run_id": result.run_id, "before": {k: before[k] for k in KEYS},
                      "after": {k: after[k] for k in keys}}))


if __name__ == "__main__":
    main()

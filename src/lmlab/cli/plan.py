"""`lmlab plan`: predicted peak memory of a recipe's training step on a device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmlab.cli.app import app
from lmlab.cli.options import FormatOpt, SetOpt
from lmlab.console import emit


@app.command("plan")
def plan_cmd(
    recipe: Path,
    device: Annotated[str, typer.Option(help="a100-40gb | a100-80gb | h100-80gb | h200-141gb | a10g-24gb | "
                                             "t4-16gb | a6000-48gb | cpu:<N>gb | gpu:<N>gb")] = "cpu:24gb",
    set_: SetOpt = None,
    world_size: Annotated[int | None, typer.Option(min=1, help="GPUs; default distributed.nproc × num_nodes, else 1")] = None,
    zero: Annotated[int, typer.Option(min=0, max=3, help="ZeRO stage; 0 = from distributed.strategy")] = 0,
    micro_batch: Annotated[int | None, typer.Option(min=1, help="Plan this micro-batch instead of train.batch_size")] = None,
    fmt: FormatOpt = "table",  # type: ignore[assignment]
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json")] = False,
):
    """Peak memory per device (weights, gradients, optimizer states, activations), whether it fits, the
    largest micro-batch that does, and the cheapest changes when it does not."""
    from lmlab.analysis.plan import plan_recipe
    from lmlab.recipe.loading import load_recipe

    plan = plan_recipe(load_recipe(recipe, set_), device, world_size=world_size, zero_stage=zero, micro_batch=micro_batch)
    emit("json" if as_json else fmt, grid=plan.grid(), text=plan.render(), data=plan.to_dict())

"""The recipe's `distributed:` section: how a run is spread over processes and machines."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmlab.recipe.section import Section

Strategy = Literal["none", "ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]


class DistributedConfig(Section):
    strategy: Strategy = Field(
        "none", description="none: one process (plain data parallel if launched with several); ddp: torch DDP; "
        "deepspeed_zero1/2/3: DeepSpeed ZeRO (optional extra); fsdp: PyTorch FSDP2. Each has an accelerate "
        "config file shipped in lmlab/accelerate_configs/"
    )
    nproc: int | None = Field(
        None, gt=0, description="Processes per machine (one per GPU); default: the GPUs here, 1 without GPU. "
        "`lmlab run --nproc N` overrides it"
    )
    num_nodes: int = Field(
        1, gt=0, description="Machines; start the same `lmlab run` on each with --node-rank and --main-address "
        "(docs/multi-node.md)"
    )

"""How a run is spread over processes: the recipe's `distributed` section, starting the processes, and the
few places where the engine (DDP, DeepSpeed ZeRO, FSDP) changes what the one training loop does.

`lmlab run RECIPE --nproc N` re-executes itself under `accelerate launch` with the accelerate config file
lmlab ships for `distributed.strategy` (accelerate_configs/*.yaml); `accelerate launch -m lmlab run RECIPE`
works too. In the launched processes `make_accelerator` checks that the launcher and the recipe agree.

Checkpoints look the same whatever the strategy and world size: full weights, plus the optimizer state as
one process's torch optimizer would hold it (ZeRO shards are gathered on save and re-sharded on load). So a
run can resume with another number of processes, or another strategy, if its global batch stays the same.

lmlab.config imports this module: keep module-level imports light (no torch, accelerate or deepspeed).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.recipe.distributed import DistributedConfig

CONFIGS = Path(__file__).with_name("accelerate_configs")
# set in the environment of processes lmlab launched, so that they never launch again
LAUNCHED_ENV = "LMLAB_LAUNCHED"
DEEPSPEED_INSTALL = "pip install --no-build-isolation deepspeed==0.19.8  (after torch)"


# ------------------------------------------------------------------------------------------------ launch
def config_file(strategy: str) -> Path:
    """The accelerate config file lmlab ships for `strategy` (none and ddp share ddp.yaml)."""
    return CONFIGS / f"{'ddp' if strategy in ('none', 'ddp') else strategy}.yaml"


def launched() -> bool:
    """Inside processes a launcher started (accelerate launch, torchrun): they must not launch again."""
    return any(key in os.environ for key in (LAUNCHED_ENV, "LOCAL_RANK", "WORLD_SIZE"))


def processes_per_node(cfg: DistributedConfig, nproc: int | None = None) -> int:
    if nproc is not None:
        return nproc
    if cfg.nproc is not None:
        return cfg.nproc
    import torch

    return max(1, torch.cuda.device_count())


def needs_launch(cfg: DistributedConfig, nproc: int | None = None, nodes: int | None = None) -> bool:
    """Whether `lmlab run` must start its processes through accelerate rather than train in this one."""
    if launched():
        return False
    engine = cfg.strategy not in ("none", "ddp")  # DeepSpeed and FSDP want a launcher even for one process
    return engine or processes_per_node(cfg, nproc) * (nodes or cfg.num_nodes) > 1


def launch_command(run_args: list[str], cfg: DistributedConfig, *, nproc: int | None = None,
                   nodes: int | None = None, node_rank: int = 0, main_address: str | None = None,
                   main_port: int | None = None) -> list[str]:
    """`accelerate launch` of `lmlab run *run_args` with the strategy's config file; the processes per machine,
    machines and rendezvous on the command line (they override the file)."""
    per_node, nodes = processes_per_node(cfg, nproc), nodes or cfg.num_nodes
    if nodes > 1 and not main_address:
        raise LmlabError("--main-address: needed with several machines: the main node's address, reachable from "
                         "the others (the same on every node)")
    # one machine: a free port, so that runs (and tests) side by side never meet on the default 29500
    port = main_port or (29500 if nodes > 1 else free_port())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file(cfg.strategy)),
           "--num_processes", str(per_node * nodes), "--num_machines", str(nodes), "--machine_rank", str(node_rank),
           "--main_process_port", str(port)]
    if main_address:
        cmd += ["--main_process_ip", main_address]
    return [*cmd, "-m", "lmlab", "run", *run_args]


def main_process() -> bool:
    """Rank 0, or the only process: the one that prints."""
    return os.environ.get("RANK", "0") == "0"


def launch_env() -> dict[str, str]:
    return {**os.environ, LAUNCHED_ENV: "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _how_to_launch(strategy: str) -> str:
    return (f"start it with `lmlab run RECIPE --nproc N`, or `accelerate launch --config_file "
            f"{config_file(strategy)} --num_processes N -m lmlab run RECIPE`")


# ----------------------------------------------------------------------------------------- accelerator
def make_accelerator(recipe) -> Any:
    """The run's Accelerator, after checking that the launcher started what the recipe asks for; for DeepSpeed,
    the recipe's batch, accumulation and clipping are written into its config."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    strategy = recipe.distributed.strategy
    _check_launcher(recipe.distributed)
    options: dict[str, Any] = {"cpu": not torch.cuda.is_available()}
    if strategy.startswith("deepspeed") and not torch.cuda.is_available():
        # accelerate ignores DeepSpeed with cpu=True, and finds no backend for it on CPU by itself: name gloo
        options = {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    from accelerate.state import AcceleratorState

    # the state is process-wide: a second train() in one process (a notebook) may ask another precision or
    # strategy; the process group (PartialState) stays
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision="bf16" if recipe.train.precision == "bf16" else "no", **options)
    if strategy == "fsdp" and not torch.cuda.is_available():
        _fsdp_on_cpu(accelerator)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise LmlabError(f"launched {expected} processes but accelerate sees {accelerator.num_processes}: each would "
                         f"train alone; {_how_to_launch(strategy)}")
    if strategy == "fsdp" and not accelerator.is_fsdp2:
        raise LmlabError(f"distributed.strategy: fsdp is FSDP2 in lmlab; launch with fsdp_version: 2 "
                         f"({config_file(strategy)})")
    if is_deepspeed(accelerator):
        t = recipe.train
        accelerator.state.deepspeed_plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": t.batch_size,
            "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.batch_size * t.grad_accum * accelerator.num_processes,
            "gradient_clipping": t.clip_grad or 0.0,  # DeepSpeed clips inside its step; 0 = off
        })
        accelerator.gradient_accumulation_steps = t.grad_accum  # what accelerate would copy from the config
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """accelerate enters FSDP only on accelerators: with `cpu=True` it quietly trains plain data parallel (every
    process holding everything). FSDP2 itself (`fully_shard`, all-gather and reduce-scatter) runs on CPU over gloo,
    so lmlab puts the state into FSDP mode with the plugin accelerate reads from the launcher's config; from here
    on accelerate's own FSDP2 path prepares, clips and gathers, as on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()  # from ACCELERATE_FSDP_*
    if plugin.fsdp_version != 2:
        return  # the fsdp_version check below names the fix
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
    # each later AcceleratorState() (the prepared optimizer makes one) copies the process state's type over ours
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def preflight(cfg: DistributedConfig) -> None:
    """What can be checked before any process starts: the engine is installed."""
    if cfg.strategy.startswith("deepspeed"):
        try:
            import deepspeed as _  # noqa: F401
        except ImportError:
            raise LmlabError(f"distributed.strategy: {cfg.strategy} needs DeepSpeed, which is not installed: "
                             f"{DEEPSPEED_INSTALL}") from None


def _check_launcher(cfg: DistributedConfig) -> None:
    preflight(cfg)
    strategy, env = cfg.strategy, os.environ
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp = env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    launched_as = "deepspeed" if deepspeed else "fsdp" if fsdp else "ddp"
    wanted = strategy.split("_")[0] if strategy not in ("none", "ddp") else "ddp"
    if wanted != launched_as:
        if not launched() and wanted != "ddp":
            raise LmlabError(f"distributed.strategy: {strategy} runs in launched processes; {_how_to_launch(strategy)}")
        raise LmlabError(f"distributed.strategy: the recipe asks for {strategy} but the processes were launched "
                         f"for {launched_as} (accelerate config); {_how_to_launch(strategy)}")
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if deepspeed and stage is not None and strategy != f"deepspeed_zero{stage}":
        raise LmlabError(f"distributed.strategy: the recipe asks for {strategy} but the processes were launched "
                         f"with ZeRO stage {stage}; {_how_to_launch(strategy)}")


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


# ---------------------------------------------------------------------------------------- the loop's step
@contextlib.contextmanager
def accumulating(accelerator, model):
    """A micro-batch that is not the last of its optimizer step: gradients add up locally without being
    all-reduced, and DeepSpeed, which steps inside `accelerator.backward` when gradients sync, waits."""
    state = accelerator.gradient_state
    state._set_sync_gradients(False)  # what accelerator.accumulate() sets; the loop counts micro-batches itself
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        state._set_sync_gradients(True)


def backward_kwargs(accelerator) -> dict[str, Any]:
    """Extra arguments of `accelerator.backward`: the loop's loss is already divided by the step's item count,
    so DeepSpeed must not divide it again by its accumulation steps."""
    return {"scale_wrt_gas": False} if is_deepspeed(accelerator) else {}


# ------------------------------------------------------------------------------------------ checkpoints
def parameter_names(model, optimizer) -> list[list[str]]:
    """The names of the optimizer's parameters per group, in its order, taken before `accelerator.prepare`.
    A torch optimizer state dict indexes parameters by this position; ZeRO replaces each group's parameters
    with one flat shard and FSDP with sharded copies, so the names translate between the two."""
    names = {p: n for n, p in model.named_parameters()}
    return [[names[p] for p in group["params"]] for group in optimizer.param_groups]


def gather_for_checkpoint(accelerator, model, optimizer, groups: list[list[str]]) -> tuple[Any, Any]:
    """What `checkpoint.save_checkpoint` is given as model and optimizer: the unwrapped model and the optimizer
    itself, or, when they are sharded (ZeRO, FSDP), stand-ins holding the gathered full weights and optimizer
    state. Every process must call this, in step; only rank 0's result is complete."""
    unwrapped = accelerator.unwrap_model(model)
    if is_deepspeed(accelerator):
        keep = accelerator.is_main_process  # every process takes part in each gather; only rank 0 keeps the result
        weights = _deepspeed_fp32_weights(unwrapped, keep)
        state = _deepspeed_optimizer_state(optimizer, unwrapped, groups, keep) if optimizer is not None else None
    elif accelerator.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        weights = _tie_like(unwrapped, accelerator.get_state_dict(model))
        state = None if optimizer is None else _by_position(get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)), groups)
    else:
        return unwrapped, optimizer
    return SavedModel(unwrapped, weights), (SavedOptimizer(state) if state is not None else None)


def load_optimizer_state(accelerator, model, optimizer, groups: list[list[str]], state: dict[str, Any]) -> None:
    """Load a saved optimizer state (torch format, by position) into the prepared optimizer; under ZeRO and FSDP
    each process keeps its shard. The model's weights must be loaded already, before `accelerator.prepare`."""
    if is_deepspeed(accelerator):
        _load_deepspeed_optimizer_state(optimizer, accelerator.unwrap_model(model), groups, state)
    elif accelerator.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, _by_name(state, groups),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def _tie_like(model, weights: dict[str, Any]) -> dict[str, Any]:
    """Gathered weights are separate tensors; where the model ties parameters (embedding and LM head), let the
    copies share one tensor again, so that `save_pretrained` writes the tied weight once, as for a plain model."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(p), name)
        if canonical != name and canonical in weights and name in weights:
            weights[name] = weights[canonical]
    return weights


class SavedModel:
    """Stands in for a sharded model when a checkpoint is written: `save_pretrained` writes the full weights."""

    def __init__(self, model, weights: dict[str, Any]):
        self._model, self._weights = model, weights

    def save_pretrained(self, path, **kwargs) -> None:
        self._model.save_pretrained(path, state_dict=self._weights, **kwargs)


class SavedOptimizer:
    """Stands in for a sharded optimizer when a checkpoint is written: `state_dict()` is the full state."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _deepspeed_fp32_weights(unwrapped, keep: bool) -> dict[str, Any]:
    """Full fp32 master weights (not the bf16 copies the module may hold), and the persistent buffers."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, p in unwrapped.named_parameters():
        full = safe_get_full_fp32_param(p)  # None for a frozen parameter: ZeRO-1/2 keep those whole
        if keep:
            weights[name] = (p if full is None else full).detach().cpu()
    kept = unwrapped.state_dict().keys()
    return {**{n: b.detach().cpu() for n, b in unwrapped.named_buffers() if n in kept}, **weights}


def _deepspeed_optimizer_state(optimizer, unwrapped, groups: list[list[str]], keep: bool) -> dict[str, Any]:
    import torch
    from deepspeed.utils import safe_get_full_optimizer_state

    zero = optimizer.optimizer  # DeepSpeed's ZeRO optimizer around our torch optimizer
    _check_group_count(zero, groups)
    _link_optimizer_state(zero)
    shard = next(iter(zero.optimizer.state.values()), {})  # one flat shard's state: its keys and step count
    keys = [k for k, v in shard.items() if torch.is_tensor(v) and v.dim() > 0]  # exp_avg, exp_avg_sq, ...
    params = dict(unwrapped.named_parameters())
    state: dict[int, dict[str, Any]] = {}
    param_groups, index = [], 0
    for group, names in zip(zero.param_groups, groups, strict=True):
        ids = list(range(index, index + len(names)))
        index += len(names)
        param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        for i, name in zip(ids, names, strict=True):
            if keys:  # an all-reduce over the shards per parameter and key
                full = {k: safe_get_full_optimizer_state(params[name], k).detach() for k in keys}
                if keep:
                    state[i] = {**({"step": shard["step"].clone().cpu()} if "step" in shard else {}),
                                **{k: v.cpu() for k, v in full.items()}}
    return {"state": state, "param_groups": param_groups}


def _load_deepspeed_optimizer_state(optimizer, unwrapped, groups: list[list[str]], state: dict[str, Any]) -> None:
    import torch
    from deepspeed.utils import safe_set_full_optimizer_state

    zero = optimizer.optimizer
    _check_group_count(zero, groups)
    saved = state["state"]
    for group, saved_group in zip(zero.param_groups, state["param_groups"], strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    if not saved:  # saved before the first step: nothing more to restore
        return
    first = next(iter(saved.values()))
    keys = [k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0]
    # give every flat shard the state the optimizer's first step would create, then fill in each
    # parameter's slice of it from the full tensors
    # ZeRO-3 keeps its flat shards aside and hands them to the torch optimizer only while it steps
    shards = getattr(zero, "fp32_partitioned_groups_flat", None) or \
        [p for group in zero.optimizer.param_groups for p in group["params"]]
    for shard in shards:
        zero.optimizer.state[shard] = {**({"step": first["step"].clone()} if "step" in first else {}),
                                       **{k: torch.zeros_like(shard) for k in keys}}
    _link_optimizer_state(zero)
    params = dict(unwrapped.named_parameters())
    for i, name in enumerate(n for names in groups for n in names):
        for k in keys:
            safe_set_full_optimizer_state(params[name], saved[i][k], k)


def _link_optimizer_state(zero) -> None:
    # ZeRO-1/2 link each parameter to its slice of the optimizer state once, right after the first group's
    # step, when the other groups have no state yet (DeepSpeed 0.19.8): link again when all have it
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _check_group_count(zero, groups: list[list[str]]) -> None:
    if len(zero.param_groups) != len(groups):
        raise LmlabError(f"checkpoint: DeepSpeed split the optimizer's {len(groups)} parameter groups into "
                         f"{len(zero.param_groups)} (zero_optimization.sub_group_size?); cannot map its state")


def _by_position(state: dict[str, Any], groups: list[list[str]]) -> dict[str, Any]:
    """A state dict keyed by parameter name (torch.distributed.checkpoint) -> keyed by position (torch)."""
    if not state.get("param_groups"):  # not rank 0: nothing gathered here
        return {"state": {}, "param_groups": []}
    position = {n: i for i, n in enumerate(n for names in groups for n in names)}
    return {"state": {position[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in state["param_groups"]]}


def _by_name(state: dict[str, Any], groups: list[list[str]]) -> dict[str, Any]:
    names = [n for group in groups for n in group]
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}

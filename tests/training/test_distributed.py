"""Several processes on CPU (gloo): a 2-process run equals a 1-process run with the same global batch, under
DDP and DeepSpeed ZeRO-1/2; checkpoints resume with another number of processes (and another strategy).

The 2-process runs go through the user's path, `lmlab run RECIPE --nproc 2`, in a subprocess. Dropout is off:
each process draws its own dropout masks, so with dropout on the runs differ by design.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.processes import final_weights
from helpers.recipes import tiny_lm
from safetensors.torch import load_file

from lmlab import load_recipe, train
from lmlab.errors import LmlabError
from lmlab.training import distributed
from lmlab.training.loop import resume_run
from lmlab.workspace.layout import list_checkpoints
from lmlab.workspace.layout import sqlite_uri as default_uri
from lmlab.workspace.ledger import client
from lmlab.workspace.runs import list_runs

LOSS_RTOL = 1e-5  # per-step train/loss, relative; measured: ≤ 1e-7
WEIGHT_ATOL = 2e-5  # final weights after 6 AdamW steps at lr 3e-3; measured: ≤ 4e-6 (summation order only)


def recipe(**over) -> dict:
    # 6 steps, loss logged every step, checkpoint at 4 and 6; a step is 8 sequences
    return tiny_lm(model__dropout=0.0, train__max_steps=6, train__log_every=1, eval__every_steps=4, **over)


def lmlab_run(workspace: Path, *args: str) -> tuple[str, subprocess.CompletedProcess]:
    """`lmlab run ... -q` as a user types it; returns the run id it printed (once: rank 0 only)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", distributed.LAUNCHED_ENV)}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "lmlab", "run", *args, "-q"], cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.endswith(("FINISHED step 6", "PAUSED step 3"))]
    assert len(lines) == 1, proc.stdout  # one process prints
    return lines[0].split()[0], proc


def write_recipe(workspace: Path, **over) -> str:
    path = workspace / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(**over)))
    return str(path)


def losses(run_id: str) -> list[float]:
    history = client(default_uri("lmlab-runs")).get_metric_history(run_id, "train/loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def assert_same_run(run_id: str, reference) -> None:
    ref = reference.run_id
    a, b = losses(run_id), losses(ref)
    assert len(a) == len(b) == 6
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))
    assert worst <= LOSS_RTOL, (a, b)
    wa, wb = final_weights(Path("lmlab-runs/runs") / run_id), final_weights(Path("lmlab-runs/runs") / ref)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= WEIGHT_ATOL


@pytest.fixture
def one_process(workspace):
    """The reference: one process, batch 8, uninterrupted."""
    return train(load_recipe(data=recipe(run__name="one", train__batch_size=8)), quiet=True)


# ------------------------------------------------------------------------------------------- launching
def test_launch_command_uses_the_shipped_config_for_the_strategy(monkeypatch):
    for key in ("LOCAL_RANK", "WORLD_SIZE", distributed.LAUNCHED_ENV):
        monkeypatch.delenv(key, raising=False)
    cfg = distributed.DistributedConfig(strategy="deepspeed_zero2")
    cmd = distributed.launch_command(["r.yaml", "--quiet"], cfg, nproc=2)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1].endswith("accelerate_configs/deepspeed_zero2.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[-5:] == ["-m", "lmlab", "run", "r.yaml", "--quiet"]
    # two machines: the process count is the total, the main address is required
    two = distributed.launch_command([], cfg, nproc=8, nodes=2, node_rank=1, main_address="10.0.0.1")
    assert two[two.index("--num_processes") + 1] == "16" and two[two.index("--machine_rank") + 1] == "1"
    assert two[two.index("--main_process_port") + 1] == "29500"
    with pytest.raises(LmlabError, match="--main-address"):
        distributed.launch_command([], cfg, nproc=8, nodes=2)
    # who launches: more than one process or an engine; never a process that was launched itself
    assert distributed.needs_launch(distributed.DistributedConfig(), nproc=2)
    assert distributed.needs_launch(cfg)
    assert not distributed.needs_launch(distributed.DistributedConfig(strategy="ddp", nproc=1))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not distributed.needs_launch(cfg, nproc=2)


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_shipped_accelerate_configs_load(strategy):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(distributed.config_file(strategy)))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(strategy, "DEEPSPEED")
    assert config.distributed_type == expected
    if strategy.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(strategy[-1])
    two_nodes = load_config_from_file(str(distributed.CONFIGS / "multi_node_ddp.yaml"))
    assert two_nodes.num_machines == 2 and two_nodes.num_processes == 16


def test_engine_strategy_without_a_launcher_is_a_clear_error(workspace):
    with pytest.raises(LmlabError, match="distributed.strategy: deepspeed_zero2"):
        train(load_recipe(data=recipe(distributed__strategy="deepspeed_zero2")), quiet=True)


def test_resume_with_another_global_batch_is_a_clear_error(workspace):
    part = train(load_recipe(data=recipe(train__batch_size=8)), stop_after_steps=2, quiet=True)
    with pytest.raises(LmlabError, match=r"8 items per optimizer step.*--set train.grad_accum=2"):
        resume_run(part.run_id, overrides=["train.batch_size=4"], quiet=True)


# --------------------------------------------------------------------------------- equality on 2 processes
# ~70 s on 2 busy cores (one 2-process launch); kept in the default run: it guards the multi-process path
def test_two_ddp_processes_equal_one_with_the_same_global_batch(workspace, one_process):
    run_id, proc = lmlab_run(workspace, write_recipe(workspace, train__batch_size=4), "--nproc", "2")
    assert_same_run(run_id, one_process)
    # rank 0 alone writes: one ledger run with world size 2, one set of checkpoints
    (row,) = [r for r in list_runs() if r.run_id == run_id]
    assert row.status == "FINISHED" and row.params["derived.world_size"] == "2"
    assert row.params["derived.items_per_step"] == "8" and row.params["derived.engine"] == "MULTI_CPU"
    assert [p.name for p in list_checkpoints(Path("lmlab-runs/runs") / run_id)] == ["step-0000004", "step-0000006"]


@pytest.mark.slow  # ~2 min on 2 busy cores: two 2-process launches
def test_checkpoint_resumes_across_world_sizes(workspace, one_process):
    # 2 processes × batch 4 pause at step 3; one process × batch 8 finishes
    path = write_recipe(workspace, train__batch_size=4)
    run_id, _ = lmlab_run(workspace, path, "--nproc", "2", "--stop-after-steps", "3")
    resumed = resume_run(run_id, overrides=["train.batch_size=8"], quiet=True)
    assert resumed.status == "FINISHED" and resumed.step == 6
    assert_same_run(run_id, one_process)
    # and the other way round: one process pauses, 2 processes × batch 4 finish
    part = train(load_recipe(data=recipe(run__name="other-way", train__batch_size=8)), stop_after_steps=3, quiet=True)
    again, _ = lmlab_run(workspace, "--resume", part.run_id, "--nproc", "2", "--set", "train.batch_size=4")
    assert again == part.run_id
    assert_same_run(part.run_id, one_process)


# ------------------------------------------------------------------------------------------ DeepSpeed ZeRO
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_two_processes_equal_one(workspace, one_process, stage):
    pytest.importorskip("deepspeed")
    # batch 2 × accumulation 2 × 2 processes: DeepSpeed's own accumulation boundary is exercised too
    path = write_recipe(workspace, train__batch_size=2, train__grad_accum=2,
                        distributed__strategy=f"deepspeed_zero{stage}")
    run_id, _ = lmlab_run(workspace, path, "--nproc", "2")
    assert_same_run(run_id, one_process)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_resumes_in_one_plain_process_and_back(workspace, one_process, stage):
    pytest.importorskip("deepspeed")
    # ZeRO over 2 processes pauses; the gathered weights and optimizer state resume in one plain process
    path = write_recipe(workspace, train__batch_size=4, distributed__strategy=f"deepspeed_zero{stage}")
    run_id, _ = lmlab_run(workspace, path, "--nproc", "2", "--stop-after-steps", "3")
    resume_run(run_id, overrides=["train.batch_size=8", "distributed.strategy=none"], quiet=True)
    assert_same_run(run_id, one_process)
    # one plain process pauses; ZeRO over 2 processes shards its optimizer state and finishes
    part = train(load_recipe(data=recipe(run__name="into-zero", train__batch_size=8)), stop_after_steps=3, quiet=True)
    lmlab_run(workspace, "--resume", part.run_id, "--nproc", "2",
              "--set", "train.batch_size=4", "--set", f"distributed.strategy=deepspeed_zero{stage}")
    assert_same_run(part.run_id, one_process)


# ------------------------------------------------------------------------------------------------ FSDP2
# accelerate enters FSDP only on accelerators; lmlab switches it on for CPU (gloo), so the same FSDP2 path runs.
# ~40 s, kept in the default run: the switch relies on accelerate's state internals, which an upgrade may change
def test_fsdp_two_processes_equal_one(workspace, one_process):
    # batch 2 × accumulation 2 × 2 processes: FSDP's reduce-scatter after accumulated micro-batches
    path = write_recipe(workspace, train__batch_size=2, train__grad_accum=2, distributed__strategy="fsdp")
    run_id, proc = lmlab_run(workspace, path, "--nproc", "2")
    assert_same_run(run_id, one_process)
    (row,) = [r for r in list_runs() if r.run_id == run_id]
    assert row.params["derived.world_size"] == "2" and row.params["derived.engine"] == "FSDP"


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_plain_process_and_back(workspace, one_process):
    # FSDP over 2 processes pauses; the gathered weights and optimizer state resume in one plain process
    path = write_recipe(workspace, train__batch_size=4, distributed__strategy="fsdp")
    run_id, _ = lmlab_run(workspace, path, "--nproc", "2", "--stop-after-steps", "3")
    resume_run(run_id, overrides=["train.batch_size=8", "distributed.strategy=none"], quiet=True)
    assert_same_run(run_id, one_process)
    # one plain process pauses; FSDP over 2 processes shards its weights and optimizer state and finishes
    part = train(load_recipe(data=recipe(run__name="into-fsdp", train__batch_size=8)), stop_after_steps=3, quiet=True)
    lmlab_run(workspace, "--resume", part.run_id, "--nproc", "2",
              "--set", "train.batch_size=4", "--set", "distributed.strategy=fsdp")
    assert_same_run(part.run_id, one_process)


@pytest.mark.slow
def test_lora_under_fsdp_equals_one_process(workspace, one_process):
    # LoRA on the reference run's final weights: frozen base and trainable adapters in the same FSDP2 units
    base = str(list_checkpoints(Path("lmlab-runs/runs") / one_process.run_id)[-1])
    lora = {"adapter__kind": "lora", "adapter__r": 4, "adapter__alpha": 8, "adapter__dropout": 0.0,
            "adapter__target_modules": "all-linear", "model__init_from": base}
    plain = train(load_recipe(data=recipe(run__name="lora-one", train__batch_size=8, **lora)), quiet=True)
    run_id, _ = lmlab_run(workspace, write_recipe(workspace, train__batch_size=4, distributed__strategy="fsdp",
                                                  **lora), "--nproc", "2")
    a, b = losses(run_id), losses(plain.run_id)
    assert len(a) == len(b) == 6 and max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)) <= LOSS_RTOL
    # adapter-only checkpoints from both, equal
    adapters = [load_file(str(list_checkpoints(Path("lmlab-runs/runs") / r)[-1] / "adapter_model.safetensors"))
                for r in (run_id, plain.run_id)]
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) > 0
    assert max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0]) <= WEIGHT_ATOL

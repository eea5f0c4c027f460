"""The one training loop: forward, loss, backward, clip, step, schedule, log, eval, checkpoint.

Every task (lm, sft, pair_classify) and every model change (full, LoRA, QLoRA) runs through this loop;
tasks differ only in the Task object (lmlab.tasks) and the model that `prepare` builds. `train()` reads in
three phases: setup (open_run, prepare, derive_sizes, restore_state or record_provenance), the loop, and
finish_run.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from accelerate.utils import broadcast_object_list

import lmlab.training.distributed as distributed
from lmlab import __version__
from lmlab.console import Reporter
from lmlab.environment import environment, git_state
from lmlab.errors import LmlabError, TrainingFailed
from lmlab.models import checkpoint as ckpt
from lmlab.models.build import count_parameters, loaded_model_params
from lmlab.models.loading import base_fingerprint
from lmlab.recipe.loading import flatten, load_recipe
from lmlab.recipe.schema import DEFAULT_WORKSPACE, Recipe
from lmlab.training.alerts import Alerts
from lmlab.training.optim import lr_at, make_optimizer
from lmlab.training.prepare import prepare
from lmlab.training.signals import StopRequest
from lmlab.workspace.layout import (
    ARTIFACTS,
    CHECKPOINTS,
    TAG_BEST,
    TAG_LAST,
    TAG_PARENT_CHECKPOINT,
    TAG_PARENT_RUN,
    TAG_PAUSED,
    TAG_RUN_DIR,
    TAG_STORAGE_BEHIND,
    TAG_TASK,
    prune,
    read_meta,
)
from lmlab.workspace.layout import run_dir as layout_run_dir
from lmlab.workspace.ledger import MlflowLedger, NullLedger, recipe_params, tracking_uri
from lmlab.workspace.mirror import NoMirror, open_mirror
from lmlab.workspace.resolve import latest_checkpoint, resolve_init_from, resolve_run_dir
from lmlab.workspace.storage import pull_for_resume, storage_url


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    status: str  # FINISHED, FAILED, PAUSED (stop_after_steps / Ctrl-C: resumable), STOPPED (on_eval said why)
    step: int
    metrics: dict[str, float] = field(default_factory=dict)  # final eval, best, throughput
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # per logged step


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training examples' order in an epoch: a function of (seed, epoch) only, so resume is exact."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class OpenedRun:
    """Who the run is: its id, folder and ledger record; `resume_from` is the checkpoint it continues from."""

    run_id: str
    run_dir: Path
    ledger: Any  # MlflowLedger, or NullLedger (ledger off, or not the main process)
    resume_from: Path | None = None
    finished: bool = False  # ended in the ledger (FINISHED, FAILED or KILLED)
    notes: list[str] = field(default_factory=list)  # e.g. checkpoints skipped on resume, and why
    mirror: Any = field(default_factory=NoMirror)  # uploads checkpoints and the ledger record to run.storage
    alerts: Any = None  # the loop's Alerts, once it has them (storage falling behind is one)


@dataclass
class Sizes:
    """Sizes derived from the recipe and the data, printed at the start so a surprising number is seen early."""

    per_step: int  # sequences (or examples) per optimizer step, all processes together
    steps_per_epoch: int
    total_steps: int
    warmup: int
    eval_every: int
    save_every: int


@dataclass
class LoopState:
    """What the loop carries from step to step (and what a checkpoint restores)."""

    step: int = 0
    best_value: float | None = None
    best_path: Path | None = None
    last_path: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the latest eval
    history: list[dict[str, float]] = field(default_factory=list)
    tokens_seen: int = 0  # tokens the model processed since the run started, padding excluded (kept on resume)
    loss_tokens_seen: int = 0  # of those, the ones that carry loss
    # this call's throughput: tokens processed, seconds in training steps (evaluation and saving excluded) and
    # seconds of the whole loop (evaluation and saving included)
    call_tokens: int = 0
    call_loss_tokens: int = 0
    train_time: float = 0.0
    wall_time: float = 0.0


def train(recipe: Recipe, *, resume: str | Path | None = None, stop_after_steps: int | None = None,
          quiet: bool = False, on_eval: Callable[[int, dict[str, float]], str | None] | None = None,
          tags: dict[str, str] | None = None) -> TrainResult:
    """Run `recipe` end to end and return its result. `resume`: a run id (or run folder) to continue
    exactly from its last checkpoint. `stop_after_steps`: train at most this many steps in this call,
    then checkpoint and return with status PAUSED (resume later: the result equals an unbroken run).
    `on_eval(step, val_metrics)`: called after each evaluation (and its checkpoint); a returned reason stops the run
    there with status STOPPED, KILLED in the ledger with that reason, checkpoints kept (a sweep's pruner).
    `tags`: ledger tags set on the run (e.g. mlflow.parentRunId)."""
    # ---- setup: processes, run identity, data and model, optimizer
    t, seed = recipe.train, recipe.run.seed
    transformers.utils.logging.disable_progress_bar()  # our own bar is the only one
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    accelerator = distributed.make_accelerator(recipe)  # checks the launcher started what the recipe asks for
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    out = Reporter(enabled=main and not quiet)
    run = open_run(recipe, resume, main=main, world=world, tags=tags)
    ledger, run_id, run_dir = run.ledger, run.run_id, run.run_dir
    stop = StopRequest()
    state = LoopState()
    # whatever happens next, the run ends FINISHED/FAILED/KILLED, then its storage gets what is still queued
    with mirrored(run, out, state), ends_in_the_ledger(run), stop.catching():
        torch.manual_seed(seed)  # seeded before the model is built: initial weights depend on run.seed only
        prep = prepare(recipe, tokenizer_dir=run.resume_from)
        task, model, tokenizer = prep.task, prep.model, prep.tokenizer
        sizes = derive_sizes(recipe, len(task.train_set), world)
        n_total, n_trainable = count_parameters(model)
        derived = {"derived.params_total": n_total, "derived.params_trainable": n_trainable,
                   "derived.world_size": world, "derived.items_per_step": sizes.per_step,
                   "derived.steps_per_epoch": sizes.steps_per_epoch, "derived.total_steps": sizes.total_steps,
                   "derived.warmup_steps": sizes.warmup, "derived.device": str(accelerator.device),
                   "derived.engine": accelerator.distributed_type.value}  # what accelerate runs: NO, MULTI_CPU, FSDP, …
        if recipe.run.task == "lm":
            derived["derived.tokens_per_step"] = sizes.per_step * recipe.model.block_size
        out.start(recipe, run_id, run_dir, derived)
        alerts = run.alerts = Alerts(recipe.alerts, sizes.total_steps, sizes.warmup,
                                     best_metric=recipe.eval.best_metric, best_mode=recipe.eval.best_mode)
        for line in prep.notes:
            out.note(line)

        optimizer = make_optimizer(t, model, strategy=recipe.distributed.strategy)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(
            s, lr=1.0, min_lr=t.min_lr / t.lr, warmup=sizes.warmup, total=sizes.total_steps, schedule=t.schedule))
        if run.resume_from is not None:  # weights before prepare: ZeRO and FSDP copy or shard them there
            ckpt.load_model_weights(model, run.resume_from)
        groups = distributed.parameter_names(model, optimizer)  # ZeRO and FSDP replace the parameters in prepare
        # adapters record which base they were trained on: loading one on another base is refused (models.loading)
        base_fp = base_fingerprint(model) if recipe.adapter.kind != "none" and recipe.run.task != "pair_classify" \
            else None
        model, optimizer = accelerator.prepare(model, optimizer)
        if t.compile:
            model = torch.compile(model)

        if run.resume_from is not None:
            restore_state(state, run.resume_from, prep, sizes, accelerator, model, optimizer, scheduler, groups, t)
            for line in run.notes:
                out.note(line)
            out.note(f"resumed from {run.resume_from} at step {state.step}")
        else:
            record_provenance(ledger, recipe, run_dir, prep, derived, accelerator)
            if recipe.model.init_from is not None and recipe.model.init_optimizer:
                parent = resolve_init_from(recipe).checkpoint
                parent_state = ckpt.load_trainer_state(parent)
                if parent_state is None:
                    raise LmlabError(f"model.init_optimizer: {parent} has no optimizer state; set it to false")
                distributed.load_optimizer_state(accelerator, model, optimizer, groups, parent_state["optimizer"])

        def save(step: int, metrics: dict[str, float]) -> Path | None:
            accelerator.wait_for_everyone()
            # every process takes part: ZeRO and FSDP gather full weights and optimizer state from their shards
            saved_model, saved_optimizer = distributed.gather_for_checkpoint(
                accelerator, model, optimizer if recipe.checkpoint.save_optimizer else None, groups)
            if not main:
                return None
            meta = {"run_id": run_id, "epoch": step // sizes.steps_per_epoch,
                    "position_in_epoch": step % sizes.steps_per_epoch, "metrics": metrics,
                    "best_value": state.best_value, "best_checkpoint": str(state.best_path) if state.best_path else None,
                    "fingerprints": prep.fingerprints, "lmlab_version": __version__, "task": recipe.run.task,
                    "recipe_source": recipe.source_path, "items_per_step": sizes.per_step, "world_size": world,
                    "strategy": recipe.distributed.strategy, "lr": t.lr, "tokens_seen": state.tokens_seen,
                    "loss_tokens_seen": state.loss_tokens_seen}
            if base_fp is not None:
                meta["base_fingerprint"] = base_fp
            path = ckpt.save_checkpoint(run_dir, step, model=saved_model, tokenizer=tokenizer,
                                        meta=meta, recipe_yaml=recipe.to_yaml(), files=prep.checkpoint_files,
                                        optimizer=saved_optimizer, scheduler=scheduler)
            run.mirror.checkpoint_saved(path, state.best_path)  # snapshotted and queued; uploads in the background
            prune(run_dir, recipe.checkpoint.keep_last, state.best_path if recipe.checkpoint.keep_best else None)
            return path

        def evaluate(split, prefix):
            return task.evaluate(model, split, prefix, device=accelerator.device, autocast=accelerator.autocast)

        def report_alerts(raised, step):
            for alert in raised:
                out.alert(alert.message)
            if raised:
                ledger.log_metrics(alerts.counts(), step)
                ledger.log_dict(alerts.to_dict(), "alerts.json")

        report_alerts(alerts.on_start(), state.step)
        # ---- the loop
        model.train()
        backward_kwargs = distributed.backward_kwargs(accelerator)  # DeepSpeed: the loss is normalised already
        status, reason = "FINISHED", None
        start_step, order_epoch, order = state.step, -1, None
        window = {"loss": 0.0, "items": 0, "tokens": 0, "loss_tokens": 0, "steps": 0, "t0": time.perf_counter()}
        loop_t0 = window["t0"]
        out.progress(sizes.total_steps, state.step)
        try:
            while state.step < sizes.total_steps:
                step = state.step
                if stop_after_steps is not None and step - start_step >= stop_after_steps:
                    status = "PAUSED"
                    break
                if stop_requested(stop, accelerator):  # SIGTERM / Ctrl-C: the step in flight has finished; pause
                    status, reason = "PAUSED", f"{stop.reason or 'stop requested'} at step {step}"
                    break
                epoch, pos = divmod(step, sizes.steps_per_epoch)
                if epoch != order_epoch:
                    order, order_epoch = epoch_order(len(task.train_set), seed, epoch), epoch
                chunk = order[pos * sizes.per_step:(pos + 1) * sizes.per_step]
                micro = [task.collate([task.train_set[i] for i in chunk[f:f + t.batch_size]])
                         for f in ((a * world + rank) * t.batch_size for a in range(t.grad_accum))]
                # every item (target token, example) of the step weighs the same whatever the accumulation and
                # world size: divide by the step's item count over all processes, known before any forward pass
                items = torch.tensor(float(sum(task.count(b) for b in micro)), device=accelerator.device)
                items = accelerator.reduce(items, reduction="sum") if world > 1 else items
                scale = world / max(float(items), 1.0)  # × world: DDP averages gradients over processes
                loss_sum, tokens, loss_tokens = torch.zeros((), device=accelerator.device), 0, 0
                for a, batch in enumerate(micro):
                    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                    last = a == t.grad_accum - 1  # DeepSpeed steps inside this backward; others after the loop
                    sync = contextlib.nullcontext() if last else distributed.accumulating(accelerator, model)
                    with sync, accelerator.autocast():
                        nll, _ = task.loss(model, batch)
                        accelerator.backward(nll * scale, **backward_kwargs)
                    loss_sum += nll.detach()
                    tokens += task.tokens(batch)
                    loss_tokens += task.loss_tokens(batch)
                loss_sum = accelerator.reduce(loss_sum, reduction="sum") if world > 1 else loss_sum
                step_loss = float(loss_sum) / max(float(items), 1.0)
                if not math.isfinite(step_loss):
                    status, reason = "FAILED", f"loss became {step_loss} at step {step + 1}; last good checkpoint kept"
                    report_alerts(alerts.on_train(step + 1, step_loss), step + 1)
                    break
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.clip_grad or float("inf"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step = step = step + 1
                state.tokens_seen += tokens * world
                state.loss_tokens_seen += loss_tokens * world
                state.call_tokens += tokens * world
                state.call_loss_tokens += loss_tokens * world
                window["loss"] += step_loss
                window["steps"] += 1
                window["tokens"] += tokens * world
                window["loss_tokens"] += loss_tokens * world
                out.advance(step, step_loss, scheduler.get_last_lr()[0])
                report_alerts(alerts.on_train(step, step_loss), step)
                report_storage(run, out, step)

                if step % t.log_every == 0 or step == sizes.total_steps:
                    dt = time.perf_counter() - window["t0"]
                    state.train_time += dt
                    row = {"train/loss": window["loss"] / window["steps"], "train/lr": scheduler.get_last_lr()[0],
                           "train/grad_norm": float(grad_norm), "train/tokens_per_s": window["tokens"] / dt,
                           "train/loss_tokens_per_s": window["loss_tokens"] / dt,
                           "train/epoch": step / sizes.steps_per_epoch, "train/tokens_seen": state.tokens_seen,
                           "train/loss_tokens_seen": state.loss_tokens_seen}
                    row.update(getattr(task, "train_metrics", dict)())  # a task's own (dpo: rewards, margin, accuracy)
                    ledger.log_metrics(row, step)
                    state.history.append({"step": step, **row})
                    out.throughput(row["train/tokens_per_s"], row["train/loss_tokens_per_s"])
                    window.update(loss=0.0, steps=0, tokens=0, loss_tokens=0, t0=time.perf_counter())

                at_eval = step % sizes.eval_every == 0 or step == sizes.total_steps
                if at_eval or step % sizes.save_every == 0:
                    t_eval = time.perf_counter()
                    if len(task.val_set) and at_eval:
                        state.metrics = evaluate(task.val_set, "val")
                        bad = [k for k, v in state.metrics.items() if "loss" in k and not math.isfinite(v)]
                        if bad:  # never saved: the newest checkpoint on disk stays the last good one
                            status, reason = "FAILED", (f"{bad[0]} became {state.metrics[bad[0]]} at step {step}; "
                                                        "last good checkpoint kept")
                            break
                        ledger.log_metrics(state.metrics, step)
                        state.history.append({"step": step, **state.metrics})
                        out.eval(step, state.metrics)
                        report_alerts(alerts.on_eval(step, state.metrics), step)
                        value = state.metrics.get(recipe.eval.best_metric)
                        if value is not None and (state.best_value is None or (
                                value < state.best_value if recipe.eval.best_mode == "min" else value > state.best_value)):
                            state.best_value, state.best_path = value, run_dir / CHECKPOINTS / f"step-{step:07d}"
                    if not weights_finite(model):
                        status, reason = "FAILED", f"weights became non-finite at step {step}; last good checkpoint kept"
                        break
                    state.last_path = save(step, state.metrics) or state.last_path
                    window["t0"] += time.perf_counter() - t_eval  # eval and saving are not training throughput
                    if alerts.should_stop:  # early stopping: the run ends here as FINISHED, best checkpoint kept
                        break
                    if on_eval is not None and at_eval and len(task.val_set):  # every process stops at the same step
                        why = on_eval(step, state.metrics) if main else None
                        why = broadcast_object_list([why])[0] if world > 1 else why
                        if why:
                            status, reason = "STOPPED", why
                            break
        except KeyboardInterrupt:
            status, reason = "PAUSED", f"interrupted at step {state.step}"
            optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is dropped; resume redoes it
        state.wall_time = time.perf_counter() - loop_t0
        out.stop()

        # ---- finish: a paused run saves where it stopped; every run ends in the ledger
        if status == "PAUSED" and state.step > start_step and weights_finite(model):
            state.last_path = save(state.step, state.metrics) or state.last_path
        final = {}
        if status == "FINISHED" and len(task.test_set):
            final = evaluate(task.test_set, "test")
        return finish_run(run, recipe, state, status, reason, final, out)


@contextmanager
def mirrored(run: OpenedRun, out: Any, state: LoopState):
    """At the end of a run with storage (finished, paused by SIGTERM / Ctrl-C, failed): the ledger record with its
    final status is queued and every queued upload is waited for, with a progress bar. A Ctrl-C here stops
    uploading; storage stays consistent (a checkpoint there is complete iff its manifest is)."""
    try:
        yield
    finally:
        mirror = run.mirror
        if mirror.active:
            mirror.record_changed()
            try:
                with out.uploading(mirror.store.where(run.run_id)) as bar:
                    mirror.drain(bar)
            except KeyboardInterrupt:
                mirror.abandon()
                out.note(f"uploads interrupted; lmlab push {run.run_id[:8]} --storage URL uploads the rest")
                raise
            report_storage(run, out, state.step)
            out.note(mirror.summary())


def report_storage(run: OpenedRun, out: Any, step: int) -> None:
    """Storage that fell behind (an upload failed every try) is an alert and the tag storage.behind, while training
    goes on; the tag goes when storage catches up."""
    for event in run.mirror.events():
        if event.behind:
            out.alert(event.message)
            run.ledger.set_tags({TAG_STORAGE_BEHIND: event.message})
            if run.alerts is not None:
                run.alerts.storage_behind(step, event.message)
                run.ledger.log_metrics(run.alerts.counts(), step)
                run.ledger.log_dict(run.alerts.to_dict(), "alerts.json")
        else:
            run.ledger.delete_tag(TAG_STORAGE_BEHIND)
            out.note(event.message)


@contextmanager
def ends_in_the_ledger(run: OpenedRun):
    """A run registered in the ledger never stays RUNNING: an error ends it FAILED with its reason, an interrupt
    outside the loop (the loop pauses by itself) KILLED; the exception goes on to the caller."""
    try:
        yield
    except TrainingFailed:
        raise  # finish_run ended it FAILED already
    except KeyboardInterrupt:
        if not run.finished:
            run.ledger.finish("KILLED", "interrupted outside the training steps; nothing to resume from this call")
            run.finished = True
        raise
    except BaseException as e:
        if not run.finished:
            first = (str(e).strip().splitlines() or [""])[0][:500]
            run.ledger.finish("FAILED", first if isinstance(e, LmlabError) else f"{type(e).__name__}: {first}")
            run.finished = True
        raise


def stop_requested(stop: StopRequest, accelerator: Any) -> bool:
    """Whether any process was asked to stop (every process must stop at the same step: saving is collective)."""
    if accelerator.num_processes == 1:
        return bool(stop)
    flag = torch.tensor(1.0 if stop else 0.0, device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum")) > 0


def weights_finite(model: torch.nn.Module) -> bool:
    """Every trainable weight finite: checked before each save, so a poisoned model is never checkpointed."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def open_run(recipe: Recipe, resume: str | Path | None, *, main: bool, world: int,
             tags: dict[str, str] | None = None) -> OpenedRun:
    """A new ledger run, or the one being resumed (its id, folder and newest checkpoint). Every process gets
    the same run id; only the main process writes to the ledger. With run.storage (or $LMLAB_STORAGE) the storage
    is checked first (one clear error before anything starts), a resume pulls a newer checkpoint from it, and the
    main process mirrors the run there."""
    check_writable(recipe.run.output_dir)
    url = storage_url(recipe.run.storage)
    if url != recipe.run.storage:
        recipe.run.storage = url  # from $LMLAB_STORAGE: recorded with the run like any recipe field
    mirror = open_mirror(url, recipe.run.storage_options, keep_last=recipe.checkpoint.keep_last,
                         keep_best=recipe.checkpoint.keep_best, check_only=not main)
    # a run id to resume: pulled from storage first when that holds a newer checkpoint. A run folder (what
    # resume_run / `lmlab run --resume` pass, after resume_recipe pulled; several processes: pulled before the
    # launch) is resumed as it is, so storage is listed and the local checkpoint verified once, not twice.
    if resume is not None and url and main and world == 1 and not Path(resume).is_dir():
        pull_for_resume(url, str(resume), output_dir=recipe.run.output_dir, uri=recipe.ledger.uri,
                        options=recipe.run.storage_options)
    resume_from, notes, changes = None, [], {}
    if resume is not None:
        run_id, run_dir, _ = resolve_run_dir(resume, output_dir=recipe.run.output_dir, uri=recipe.ledger.uri)
        resume_from = latest_checkpoint(run_dir, notes=notes)
        changes = resume_changes(resume_from, recipe)
    else:
        run_id = uuid.uuid4().hex if not (recipe.ledger.enabled and main) else None
    ledger: Any = NullLedger(run_id or "")
    if main and recipe.ledger.enabled:
        ledger = MlflowLedger(tracking_uri(recipe), recipe.ledger.experiment, recipe.run.name, run_id=run_id,
                              artifact_root=Path(recipe.run.output_dir) / ARTIFACTS, tags=tags)
        run_id = ledger.run_id
        if resume is not None and tags:
            ledger.set_tags(tags)
    run_id = broadcast_object_list([run_id])[0] if world > 1 else run_id
    if changes:  # recorded where the run changed: params are write-once, so a tag per resume step
        step = read_meta(resume_from).get("step", 0)
        ledger.set_tags({f"lmlab.resumed_at_step_{step}.changes": "; ".join(
            f"{k}: {old} → {new}" for k, (old, new) in changes.items())})
        notes.append("changed on resume: " + ", ".join(f"{k} {old} → {new}" for k, (old, new) in changes.items()))
    opened = OpenedRun(run_id, layout_run_dir(recipe.run.output_dir, run_id), ledger, resume_from, notes=notes,
                       mirror=mirror)
    mirror.attach(run_id, opened.run_dir, getattr(ledger, "uri", None))
    return opened


def check_writable(output_dir: str) -> None:
    """run.output_dir must be a folder lmlab can create and write: one clear error before anything starts."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise LmlabError(f"run.output_dir: '{output_dir}' is not a folder lmlab can write ({e.strerror or e}); "
                         "choose a writable folder with --set run.output_dir=DIR") from None


# Fields a resumed run may change: how long and how fast it trains from here, how often it evaluates, saves and
# logs, where it records. Anything else (model, data, tokenizer, adapter, optimizer kind, seed, precision, …)
# would make the continuation another run.
RESUMABLE_CHANGES = ("train.lr", "train.min_lr", "train.max_steps", "train.epochs", "train.log_every",
                     "train.num_threads", "train.compile", "train.fused", "train.batch_size", "train.grad_accum",
                     "eval.", "checkpoint.", "alerts.", "ledger.", "run.name", "run.notes", "run.output_dir", "run.storage",
                     "distributed.", "generation.", "judge.")


def resume_changes(checkpoint: Path, recipe: Recipe) -> dict[str, tuple[Any, Any]]:
    """The recipe fields that differ from the checkpoint's recipe.yaml: those a resume may change, as
    {field: (before, now)}; any other change is one clear error naming every such field."""
    before = flatten(load_recipe(checkpoint / "recipe.yaml").resolved())
    now = flatten(recipe.resolved())
    changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}
    refused = [k for k in changed if not k.startswith(RESUMABLE_CHANGES)]
    if refused:
        shown = ", ".join(f"{k} ({changed[k][0]} → {changed[k][1]})" for k in refused)
        raise LmlabError(f"--resume: {shown} changed since the checkpoint; that changes the model or the data, so it "
                         "would be another run: restore the value(s) or start a new run")
    return {k: v for k, v in changed.items() if not k.startswith(("run.output_dir", "ledger.", "run.storage"))}


def derive_sizes(recipe: Recipe, n_items: int, world: int) -> Sizes:
    """Steps, warmup and cadences from the recipe and the number of training items; one clear error when the
    batch or the warmup cannot fit."""
    t = recipe.train
    per_step = t.batch_size * t.grad_accum * world
    steps_per_epoch = n_items // per_step
    if steps_per_epoch == 0:
        raise LmlabError(f"train.batch_size: {t.batch_size} × grad_accum {t.grad_accum} × {world} process(es) "
                         f"= {per_step} exceeds the {n_items} training items; lower batch_size")
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps if t.warmup_steps is not None else round((t.warmup_fraction or 0.0) * total_steps)
    if warmup >= total_steps:
        raise LmlabError(f"train.warmup_steps: warmup of {warmup} steps is not shorter than the run "
                         f"({total_steps} steps); shorten the warmup or train longer")
    eval_every = recipe.eval.every_steps or total_steps
    save_every = recipe.checkpoint.every_steps or eval_every
    return Sizes(per_step, steps_per_epoch, total_steps, warmup, eval_every, save_every)


def restore_state(state: LoopState, checkpoint: Path, prep: Any, sizes: Sizes, accelerator: Any, model: Any,
                  optimizer: Any, scheduler: Any, groups: list[list[str]], t: Any) -> None:
    """Continue exactly where `checkpoint` left off: same data and global batch (else a clear error), optimizer,
    schedule and RNG states, step and best-so-far."""
    meta = read_meta(checkpoint)
    _check_same_data(meta, prep.fingerprints)
    _check_same_batch(meta, sizes.per_step, t.batch_size, t.grad_accum, accelerator.num_processes)
    saved = ckpt.load_trainer_state(checkpoint)
    if saved is None:
        raise LmlabError(f"--resume: {checkpoint} has no optimizer state (checkpoint.save_optimizer was false)")
    distributed.load_optimizer_state(accelerator, model, optimizer, groups, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if (meta.get("lr") or load_recipe(checkpoint / "recipe.yaml").train.lr) != t.lr:
        # train.lr changed on resume: the schedule continues from the new peak (min_lr / lr from this recipe too)
        scheduler.base_lrs = [t.lr for _ in scheduler.optimizer.param_groups]
        for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"], group["lr"] = t.lr, t.lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
    ckpt.set_rng_state(saved["rng"])
    state.step, state.best_value = meta["step"], meta.get("best_value")
    state.tokens_seen, state.loss_tokens_seen = meta.get("tokens_seen", 0), meta.get("loss_tokens_seen", 0)
    # the best checkpoint by name beside this one: the run may have moved (another workspace, another machine)
    state.best_path = checkpoint.parent / Path(meta["best_checkpoint"]).name if meta.get("best_checkpoint") else None


def record_provenance(ledger: Any, recipe: Recipe, run_dir: Path, prep: Any, derived: dict[str, Any],
                      accelerator: Any) -> None:
    """Everything needed to explain the run later: the resolved recipe and derived sizes as params, data
    reports and fingerprints, the environment, the parent run, the git state."""
    # a loaded model (pretrained, init_from) is recorded as it is, not as the schema's from-scratch defaults
    loaded = recipe.model.pretrained is not None or recipe.model.init_from is not None
    ledger.log_params({**recipe_params(recipe, loaded_model_params(prep.model) if loaded else None), **derived,
                       **prep.data_info,
                       **{f"data.fingerprint.{k}": v for k, v in prep.fingerprints.items()}})
    env = environment(str(accelerator.device), recipe.train.precision)
    ledger.set_tags({TAG_RUN_DIR: str(run_dir.resolve()), TAG_TASK: recipe.run.task,
                     **{f"env.{k}": v for k, v in env.items()}})
    ledger.log_text(recipe.to_yaml(), "recipe.yaml")
    ledger.log_dict(env, "environment.json")
    for name, report in prep.artifacts.items():
        ledger.log_dict(report, f"{name}.json")
    if recipe.model.init_from is not None:
        parent = resolve_init_from(recipe).checkpoint
        parent_meta = read_meta(parent) if (parent / "meta.json").exists() else {}
        ledger.set_tags({TAG_PARENT_RUN: parent_meta.get("run_id", ""), TAG_PARENT_CHECKPOINT: str(parent)})
    git = git_state()
    if git is not None:
        ledger.set_tags({"git.commit": git["commit"], "git.dirty": git["dirty"]})
        if git["patch"] or git["untracked"]:
            ledger.log_text(git["patch"] + ("\n# untracked:\n" + git["untracked"] if git["untracked"] else ""),
                            "git.patch")


def finish_run(run: OpenedRun, recipe: Recipe, state: LoopState, status: str, reason: str | None,
               test_metrics: dict[str, float], out: Any) -> TrainResult:
    """End the run in the ledger as FINISHED (final metrics, best and last checkpoints), KILLED with a pause tag
    (resumable), or FAILED with its reason (raised as TrainingFailed)."""
    ledger, best = run.ledger, state.best_path
    run.finished = True
    result = TrainResult(run.run_id, run.run_dir, status, state.step, history=state.history,
                         last_checkpoint=state.last_path,
                         best_checkpoint=best if best and best.exists() else state.last_path)
    if status == "FINISHED":
        final = {**state.metrics, **test_metrics}
        if state.best_value is not None:
            final[f"best/{recipe.eval.best_metric}"] = state.best_value
        if state.train_time > 0:  # this call's means (a resumed run: since it resumed)
            final["train/mean_tokens_per_s"] = state.call_tokens / state.train_time
            final["train/mean_loss_tokens_per_s"] = state.call_loss_tokens / state.train_time
        if state.wall_time > 0:
            final["train/wall_tokens_per_s"] = state.call_tokens / state.wall_time
        result.metrics = final
        ledger.log_metrics({f"final/{k}": v for k, v in final.items()}, state.step)
        ledger.set_tags({TAG_BEST: str(result.best_checkpoint or ""), TAG_LAST: str(state.last_path or "")})
        out.finish(result)
        ledger.finish("FINISHED")
    elif status == "PAUSED":
        ledger.set_tags({TAG_PAUSED: str(state.step), TAG_LAST: str(state.last_path or "")})
        ledger.finish("KILLED", reason or f"paused after {state.step} steps; resume with: lmlab run --resume "
                      f"{run.run_id}")
        out.note(f"paused at step {state.step}; resume with: lmlab run --resume {run.run_id}")
    elif status == "STOPPED":  # on_eval stopped it (a pruned sweep trial): not resumable, checkpoints kept
        ledger.set_tags({TAG_BEST: str(result.best_checkpoint or ""), TAG_LAST: str(state.last_path or "")})
        ledger.finish("KILLED", reason)
        out.note(f"stopped at step {state.step}: {reason}")
    else:
        ledger.finish("FAILED", reason)
        raise TrainingFailed(f"run {run.run_id} FAILED: {reason}")
    return result


def resume_run(run_id: str, *, output_dir: str | None = None, overrides: list[str] | dict | None = None,
               storage: str | None = None, **kwargs) -> TrainResult:
    """Continue a run from its last checkpoint with the recipe it was started with. `overrides` (--set) may
    change how it runs, e.g. train.grad_accum to keep the global batch with another number of processes.
    `storage` (or $LMLAB_STORAGE): pull the run from there first when it holds a newer checkpoint (a fresh machine)."""
    recipe, run_dir = resume_recipe(run_id, output_dir=output_dir, overrides=overrides, storage=storage)
    return train(recipe, resume=run_dir, **kwargs)


def resume_recipe(run_id: str, *, output_dir: str | None = None, overrides: list[str] | dict | None = None,
                  storage: str | None = None) -> tuple[Recipe, Path]:
    """The recipe a run was started with (plus `overrides`) and the run's folder, pulled from `storage` (or
    $LMLAB_STORAGE) first when that holds a newer checkpoint than the workspace."""
    url = storage_url(storage)
    if url:
        pulled = pull_for_resume(url, run_id, output_dir=output_dir or DEFAULT_WORKSPACE)
        run_id = pulled.run_id if pulled is not None else run_id
    _, run_dir, _ = resolve_run_dir(run_id, output_dir=output_dir or DEFAULT_WORKSPACE)
    recipe_file = latest_checkpoint(run_dir) / "recipe.yaml"
    recipe = load_recipe(recipe_file, overrides)
    # relative data paths resolve against the folder of the recipe the run was started from
    recipe.source_path = read_meta(recipe_file.parent).get("recipe_source")
    # the run goes on in the workspace it lives in (checkpoints and ledger rows), wherever it was started from
    recipe.run.output_dir = str(run_dir.parent.parent)
    if storage:
        recipe.run.storage = storage
    return recipe, run_dir


def _check_same_data(meta: dict, fingerprints: dict[str, str]) -> None:
    before = meta.get("fingerprints", {})
    changed = [k for k in fingerprints if before.get(k) not in (None, fingerprints[k])]
    if changed:
        raise LmlabError(f"--resume: the {', '.join(changed)} split(s) differ from the checkpoint's "
                         "(data file or split settings changed); restore them or start a new run")


def _check_same_batch(meta: dict, per_step: int, batch_size: int, grad_accum: int, world: int) -> None:
    """Resuming with another number of processes is exact only with the same items per optimizer step."""
    before = meta.get("items_per_step", per_step)
    if before != per_step:
        hint = f"e.g. --set train.grad_accum={before // (batch_size * world)}" \
            if before % (batch_size * world) == 0 else "change train.batch_size or train.grad_accum"
        raise LmlabError(f"--resume: the checkpoint took {before} items per optimizer step ({meta.get('world_size', '?')} "
                         f"process(es)); this run takes {per_step} (batch {batch_size} × accumulation {grad_accum} × "
                         f"{world} process(es)); keep the global batch: {hint}")

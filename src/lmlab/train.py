"""The one training loop: forward, loss, backward, clip, step, schedule, log, eval, checkpoint.

Every task (lm, sft, pair_classify) and every model change (full, LoRA, QLoRA) runs through this loop;
tasks differ only in the Task object (lmlab.task) and the model that `prepare` builds.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from accelerate.utils import broadcast_object_list

from lmlab import checkpoint as ckpt
from lmlab import distributed
from lmlab.alerts import Alerts
from lmlab.config import Recipe, load_recipe
from lmlab.console import Reporter
from lmlab.environment import environment, git_state
from lmlab.errors import LmlabError, TrainingFailed
from lmlab.ledger import MlflowLedger, NullLedger, find_run, recipe_params, tracking_uri
from lmlab.models import count_parameters
from lmlab.prepare import prepare
from lmlab.schedule import lr_at


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    status: str  # FINISHED, FAILED, PAUSED (stop_after_steps / Ctrl-C: resumable)
    step: int
    metrics: dict[str, float] = field(default_factory=dict)  # final eval, best, throughput
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # per logged step


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training examples' order in an epoch: a function of (seed, epoch) only, so resume is exact."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def param_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool) -> list[dict[str, Any]]:
    """Decay matrices; exclude biases, norm weights and embeddings unless decay_all (nanoGPT's split)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if decay_all or (p.dim() >= 2 and id(p) not in embeddings) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = recipe.train
    groups = param_groups(model, t.weight_decay, t.decay_norms_and_biases)
    # fused kernels need plain tensors on one CPU/CUDA device; DeepSpeed and FSDP shard and step on their own
    fused = t.fused and recipe.distributed.strategy in ("none", "ddp") and \
        len({p.device.type for g in groups for p in g["params"]} - {"cpu", "cuda"}) == 0
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, fused=fused or None)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=fused or None)


def train(recipe: Recipe, *, resume: str | Path | None = None, stop_after_steps: int | None = None,
          quiet: bool = False) -> TrainResult:
    """Run `recipe` end to end and return its result. `resume`: a run id (or run folder) to continue
    exactly from its last checkpoint. `stop_after_steps`: train at most this many steps in this call,
    then checkpoint and return with status PAUSED (resume later: the result equals an unbroken run)."""
    t, seed = recipe.train, recipe.run.seed
    transformers.utils.logging.disable_progress_bar()  # our own bar is the only one
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    accelerator = distributed.make_accelerator(recipe)  # checks the launcher started what the recipe asks for
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    out = Reporter(enabled=main and not quiet)

    # ---- run identity: a new ledger run, or the one being resumed
    resume_from = None
    if resume is not None:
        run_dir = Path(resume) if Path(str(resume)).is_dir() else _run_dir_of(recipe, str(resume))
        resume_from = _latest_checkpoint(run_dir)
        run_id = run_dir.name
    else:
        run_id = uuid.uuid4().hex if not (recipe.ledger.enabled and main) else None
    ledger: Any = NullLedger(run_id or "")
    if main and recipe.ledger.enabled:
        ledger = MlflowLedger(tracking_uri(recipe), recipe.ledger.experiment, recipe.run.name, run_id=run_id,
                              artifact_root=Path(recipe.run.output_dir) / "mlartifacts")
        run_id = ledger.run_id
    run_id = broadcast_object_list([run_id])[0] if world > 1 else run_id
    run_dir = (Path(recipe.run.output_dir) / "runs" / run_id).resolve()  # absolute: ledger paths work from anywhere
    # seeded before the model is built: initial weights depend on run.seed only
    torch.manual_seed(seed)
    prep = prepare(recipe, tokenizer_dir=resume_from)
    task, model, tokenizer = prep.task, prep.model, prep.tokenizer

    # ---- derived sizes, printed so a surprising number is seen before the run, not after
    per_step = t.batch_size * t.grad_accum * world  # sequences (or examples) per optimizer step
    steps_per_epoch = len(task.train_set) // per_step
    if steps_per_epoch == 0:
        raise LmlabError(f"train.batch_size: {t.batch_size} × grad_accum {t.grad_accum} × {world} process(es) "
                         f"= {per_step} exceeds the {len(task.train_set)} training items; lower batch_size")
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps if t.warmup_steps is not None else round((t.warmup_fraction or 0.0) * total_steps)
    if warmup >= total_steps:
        raise LmlabError(f"train.warmup_steps: warmup of {warmup} steps is not shorter than the run "
                         f"({total_steps} steps); shorten the warmup or train longer")
    n_total, n_trainable = count_parameters(model)
    eval_every = recipe.eval.every_steps or total_steps
    save_every = recipe.checkpoint.every_steps or eval_every
    derived = {"derived.params_total": n_total, "derived.params_trainable": n_trainable,
               "derived.world_size": world, "derived.items_per_step": per_step,
               "derived.steps_per_epoch": steps_per_epoch, "derived.total_steps": total_steps,
               "derived.warmup_steps": warmup, "derived.device": str(accelerator.device),
               "derived.engine": accelerator.distributed_type.value}  # what accelerate runs: NO, MULTI_CPU, FSDP, …
    if recipe.run.task == "lm":
        derived["derived.tokens_per_step"] = per_step * recipe.model.block_size
    out.start(recipe, run_id, run_dir, derived)
    alerts = Alerts(recipe.alerts, total_steps, warmup, best_metric=recipe.eval.best_metric,
                    best_mode=recipe.eval.best_mode)
    for line in prep.notes:
        out.note(line)

    optimizer = make_optimizer(recipe, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(
        s, lr=1.0, min_lr=t.min_lr / t.lr, warmup=warmup, total=total_steps, schedule=t.schedule))
    if resume_from is not None:  # weights before prepare: ZeRO and FSDP copy or shard them there
        ckpt.load_model_weights(model, resume_from)
    groups = distributed.parameter_names(model, optimizer)  # ZeRO and FSDP replace the parameters in prepare
    # adapters record which base they were trained on: loading one on another base is refused (generate.py)
    from lmlab.generate import base_fingerprint

    base_fp = base_fingerprint(model) if recipe.adapter.kind != "none" and recipe.run.task != "pair_classify" \
        else None
    model, optimizer = accelerator.prepare(model, optimizer)
    if t.compile:
        model = torch.compile(model)

    step, best_value, best_path, last_path = 0, None, None, None
    if resume_from is not None:
        meta = ckpt.read_meta(resume_from)
        _check_same_data(meta, prep.fingerprints)
        _check_same_batch(meta, per_step, t.batch_size, t.grad_accum, world)
        state = ckpt.load_trainer_state(resume_from)
        if state is None:
            raise LmlabError(f"--resume: {resume_from} has no optimizer state (checkpoint.save_optimizer was false)")
        distributed.load_optimizer_state(accelerator, model, optimizer, groups, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        step, best_value, best_path = meta["step"], meta.get("best_value"), meta.get("best_checkpoint")
        best_path = Path(best_path) if best_path else None
        out.note(f"resumed from {resume_from} at step {step}")
    else:
        ledger.log_params({**recipe_params(recipe), **derived, **prep.data_info,
                           **{f"data.fingerprint.{k}": v for k, v in prep.fingerprints.items()}})
        env = environment(str(accelerator.device), t.precision)
        ledger.set_tags({"lmlab.run_dir": str(run_dir.resolve()), "lmlab.task": recipe.run.task,
                         **{f"env.{k}": v for k, v in env.items()}})
        ledger.log_text(recipe.to_yaml(), "recipe.yaml")
        ledger.log_dict(env, "environment.json")
        for name, report in prep.artifacts.items():
            ledger.log_dict(report, f"{name}.json")
        if recipe.model.init_from is not None:
            parent = ckpt.resolve_init_from(recipe.model.init_from, recipe)
            parent_meta = ckpt.read_meta(parent) if (parent / "meta.json").exists() else {}
            ledger.set_tags({"lmlab.parent_run": parent_meta.get("run_id", ""), "lmlab.parent_checkpoint": str(parent)})
            if recipe.model.init_optimizer:
                state = ckpt.load_trainer_state(parent)
                if state is None:
                    raise LmlabError(f"model.init_optimizer: {parent} has no optimizer state; set it to false")
                distributed.load_optimizer_state(accelerator, model, optimizer, groups, state["optimizer"])
        git = git_state()
        if git is not None:
            ledger.set_tags({"git.commit": git["commit"], "git.dirty": git["dirty"]})
            if git["patch"] or git["untracked"]:
                ledger.log_text(git["patch"] + ("\n# untracked:\n" + git["untracked"] if git["untracked"] else ""),
                                "git.patch")

    def save(step: int, metrics: dict[str, float]) -> Path | None:
        accelerator.wait_for_everyone()
        # every process takes part: ZeRO and FSDP gather full weights and optimizer state from their shards
        saved_model, saved_optimizer = distributed.gather_for_checkpoint(
            accelerator, model, optimizer if recipe.checkpoint.save_optimizer else None, groups)
        if not main:
            return None
        meta = {"run_id": run_id, "epoch": step // steps_per_epoch, "position_in_epoch": step % steps_per_epoch,
                "metrics": metrics, "best_value": best_value, "best_checkpoint": str(best_path) if best_path else None,
                "fingerprints": prep.fingerprints, "lmlab_version": _version(), "task": recipe.run.task,
                "recipe_source": recipe.source_path, "items_per_step": per_step, "world_size": world,
                "strategy": recipe.distributed.strategy}
        if base_fp is not None:
            meta["base_fingerprint"] = base_fp
        path = ckpt.save_checkpoint(run_dir, step, model=saved_model, tokenizer=tokenizer,
                                    meta=meta, recipe_yaml=recipe.to_yaml(), files=prep.checkpoint_files,
                                    optimizer=saved_optimizer, scheduler=scheduler)
        ckpt.prune(run_dir, recipe.checkpoint.keep_last, best_path if recipe.checkpoint.keep_best else None)
        return path

    def evaluate(split, prefix):
        return task.evaluate(model, split, prefix, device=accelerator.device, autocast=accelerator.autocast)

    def report_alerts(raised, step):
        for alert in raised:
            out.alert(alert.message)
        if raised:
            ledger.log_metrics(alerts.counts(), step)
            ledger.log_dict(alerts.to_dict(), "alerts.json")

    report_alerts(alerts.on_start(), step)
    # ---- the loop
    model.train()
    backward_kwargs = distributed.backward_kwargs(accelerator)  # DeepSpeed: the loss is normalised already
    status, reason, metrics, history = "FINISHED", None, {}, []
    start_step, order_epoch, order = step, -1, None
    window = {"loss": 0.0, "items": 0, "tokens": 0, "steps": 0, "t0": time.perf_counter()}
    tokens_seen, train_time = 0, 0.0
    out.progress(total_steps, step)
    try:
        while step < total_steps:
            if stop_after_steps is not None and step - start_step >= stop_after_steps:
                status = "PAUSED"
                break
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(len(task.train_set), seed, epoch), epoch
            chunk = order[pos * per_step:(pos + 1) * per_step]
            micro = [task.collate([task.train_set[i] for i in chunk[f:f + t.batch_size]])
                     for f in ((a * world + rank) * t.batch_size for a in range(t.grad_accum))]
            # every item (target token, example) of the step weighs the same whatever the accumulation and
            # world size: divide by the step's item count over all processes, known before any forward pass
            items = torch.tensor(float(sum(task.count(b) for b in micro)), device=accelerator.device)
            items = accelerator.reduce(items, reduction="sum") if world > 1 else items
            scale = world / max(float(items), 1.0)  # × world: DDP averages gradients over processes
            loss_sum, tokens = torch.zeros((), device=accelerator.device), 0
            for a, batch in enumerate(micro):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                last = a == t.grad_accum - 1  # DeepSpeed steps inside this backward; others after the loop
                sync = contextlib.nullcontext() if last else distributed.accumulating(accelerator, model)
                with sync, accelerator.autocast():
                    nll, _ = task.loss(model, batch)
                    accelerator.backward(nll * scale, **backward_kwargs)
                loss_sum += nll.detach()
                tokens += task.tokens(batch)
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
            step += 1
            tokens_seen += tokens * world
            window["loss"] += step_loss
            window["steps"] += 1
            window["tokens"] += tokens * world
            out.advance(step, step_loss, scheduler.get_last_lr()[0])
            report_alerts(alerts.on_train(step, step_loss), step)

            if step % t.log_every == 0 or step == total_steps:
                dt = time.perf_counter() - window["t0"]
                train_time += dt
                row = {"train/loss": window["loss"] / window["steps"], "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": float(grad_norm), "train/tokens_per_s": window["tokens"] / dt,
                       "train/epoch": step / steps_per_epoch, "train/tokens_seen": tokens_seen}
                ledger.log_metrics(row, step)
                history.append({"step": step, **row})
                out.throughput(row["train/tokens_per_s"])
                window.update(loss=0.0, steps=0, tokens=0, t0=time.perf_counter())

            if step % eval_every == 0 or step == total_steps or step % save_every == 0:
                t_eval = time.perf_counter()
                if len(task.val_set) and (step % eval_every == 0 or step == total_steps):
                    metrics = evaluate(task.val_set, "val")
                    ledger.log_metrics(metrics, step)
                    history.append({"step": step, **metrics})
                    out.eval(step, metrics)
                    report_alerts(alerts.on_eval(step, metrics), step)
                    value = metrics.get(recipe.eval.best_metric)
                    if value is not None and (best_value is None or (
                            value < best_value if recipe.eval.best_mode == "min" else value > best_value)):
                        best_value, best_path = value, run_dir / ckpt.CHECKPOINTS / f"step-{step:07d}"
                last_path = save(step, metrics) or last_path
                window["t0"] += time.perf_counter() - t_eval  # eval and saving are not training throughput
                if alerts.should_stop:  # early stopping: the run ends here as FINISHED, best checkpoint kept
                    break
    except KeyboardInterrupt:
        status, reason = "PAUSED", f"interrupted at step {step}"
        optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is dropped; resume redoes it
    out.stop()

    if status == "PAUSED" and step > start_step:
        last_path = save(step, metrics) or last_path
    result = TrainResult(run_id, run_dir, status, step, history=history, last_checkpoint=last_path,
                         best_checkpoint=best_path if best_path and best_path.exists() else last_path)
    if status == "FINISHED":
        final = dict(metrics)
        if len(getattr(task, "test_set", [])):
            final.update(evaluate(task.test_set, "test"))
        if best_value is not None:
            final[f"best/{recipe.eval.best_metric}"] = best_value
        if train_time > 0:
            final["train/mean_tokens_per_s"] = tokens_seen / train_time
        result.metrics = final
        ledger.log_metrics({f"final/{k}": v for k, v in final.items()}, step)
        ledger.set_tags({"lmlab.best_checkpoint": str(result.best_checkpoint or ""),
                         "lmlab.last_checkpoint": str(last_path or "")})
        out.finish(result)
        ledger.finish("FINISHED")
    elif status == "PAUSED":
        ledger.set_tags({"lmlab.paused_at_step": str(step), "lmlab.last_checkpoint": str(last_path or "")})
        ledger.finish("KILLED", reason or f"paused after {step} steps; resume with: lmlab run --resume {run_id}")
        out.note(f"paused at step {step}; resume with: lmlab run --resume {run_id}")
    else:
        ledger.finish("FAILED", reason)
        raise TrainingFailed(f"run {run_id} FAILED: {reason}")
    return result


def resume_run(run_id: str, *, output_dir: str | None = None, overrides: list[str] | dict | None = None,
               **kwargs) -> TrainResult:
    """Continue a run from its last checkpoint with the recipe it was started with. `overrides` (--set) may
    change how it runs, e.g. train.grad_accum to keep the global batch with another number of processes."""
    recipe, run_dir = resume_recipe(run_id, output_dir=output_dir, overrides=overrides)
    return train(recipe, resume=run_dir, **kwargs)


def resume_recipe(run_id: str, *, output_dir: str | None = None,
                  overrides: list[str] | dict | None = None) -> tuple[Recipe, Path]:
    """The recipe a run was started with (plus `overrides`) and the run's folder."""
    probe = load_recipe(data={"data": {"path": "-"}, "run": {"output_dir": output_dir or "lmlab-runs"}})
    run_dir = _run_dir_of(probe, run_id)
    recipe_file = _latest_checkpoint(run_dir) / "recipe.yaml"
    recipe = load_recipe(recipe_file, overrides)
    # relative data paths resolve against the folder of the recipe the run was started from
    recipe.source_path = ckpt.read_meta(recipe_file.parent).get("recipe_source")
    return recipe, run_dir


def _run_dir_of(recipe: Recipe, run_id: str) -> Path:
    local = Path(recipe.run.output_dir) / "runs" / run_id
    if local.is_dir():
        return local
    run = find_run(recipe, run_id)
    path = run.data.tags.get("lmlab.run_dir")
    if not path or not Path(path).is_dir():
        raise LmlabError(f"--resume: run {run_id} has no run folder on this machine ({path}); nothing to resume")
    return Path(path)


def _latest_checkpoint(run_dir: Path) -> Path:
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        raise LmlabError(f"--resume: no checkpoint in {run_dir / ckpt.CHECKPOINTS}; the run saved none to resume from")
    return found[-1]


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


def _version() -> str:
    from lmlab import __version__

    return __version__


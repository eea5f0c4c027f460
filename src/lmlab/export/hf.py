"""`lmlab export`: a run's checkpoint as a standalone Hugging Face folder, optionally with the LoRA adapter merged.

A merge is verified before anything is written. On held-out examples of the run's own data (its validation
split, tokenized with the saved template) we compare the adapter model with the merged one: the largest logit
difference and the validation loss of each. When the checkpoint recorded its validation loss at training time and
the same examples were scored, the adapter must also reproduce that loss: a corrupted adapter file or a base model
other than the one trained on shows up there. Any disagreement beyond tolerance refuses the export unless forced.

QLoRA adapters were trained on a 4-bit base: they are merged into a dequantized copy of that base (the very
weights the adapter saw, in bf16), and the loss change from the 4-bit adapter model to the merged one is reported.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.data.packing import collate_padded
from lmlab.data.sft import pad_token_id, tokenize_sft
from lmlab.errors import LmlabError
from lmlab.evaluation.json_check import checkpoint_split, split_fingerprint_matches
from lmlab.models.loading import LoadedCheckpoint, load_checkpoint
from lmlab.models.merge import _is_four_bit, merged_model
from lmlab.recipe.defaults import DEFAULT_WORKSPACE

# fp32 merges agree to ~1e-5 in logits; bf16 and 4-bit bases round differently, so their bounds are looser
TOLERANCES = {"fp32": {"logits": 1e-2, "loss": 1e-3}, "bf16": {"logits": 0.5, "loss": 2e-2},
              "qlora": {"logits": 2.0, "loss": 5e-2}}


@dataclass
class MergeCheck:
    """Adapter model vs merged model on the same held-out examples."""

    split: str
    examples: int
    tokens: int
    max_abs_logit_diff: float
    adapter_loss: float
    merged_loss: float
    recorded_loss: float | None  # the checkpoint's val/loss from training, when comparable
    base_loss: float | None = None  # the base model without adapter (how much the adapter changed)
    tol_logits: float = 1e-2
    tol_loss: float = 1e-3
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = []
        values = [self.max_abs_logit_diff, self.adapter_loss, self.merged_loss]
        if not all(math.isfinite(v) for v in values):
            out.append("non-finite logits or loss (NaN/inf): the adapter weights are corrupt")
            return out
        if self.max_abs_logit_diff > self.tol_logits:
            out.append(f"merged logits differ from the adapter's by up to {self.max_abs_logit_diff:.3g} "
                       f"(tolerance {self.tol_logits:g})")
        if abs(self.merged_loss - self.adapter_loss) > self.tol_loss:
            out.append(f"merged loss {self.merged_loss:.5f} vs adapter loss {self.adapter_loss:.5f} "
                       f"(tolerance {self.tol_loss:g})")
        if self.recorded_loss is not None and abs(self.adapter_loss - self.recorded_loss) > max(
                self.tol_loss, 1e-3 * abs(self.recorded_loss)):
            out.append(f"the adapter's loss {self.adapter_loss:.5f} is not the {self.recorded_loss:.5f} recorded at "
                       "training time: the adapter file is corrupt or the base model is not the one it was "
                       "trained on")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"merge check on {self.examples} held-out examples ({self.split} split, {self.tokens:,} target tokens):",
               f"  max |logit difference| merged vs adapter  {self.max_abs_logit_diff:.3g} (tolerance {self.tol_logits:g})",
               f"  {self.split} loss adapter {self.adapter_loss:.5f}  merged {self.merged_loss:.5f}  "
               f"change {self.merged_loss - self.adapter_loss:+.5f} (tolerance {self.tol_loss:g})"]
        if self.recorded_loss is not None:
            out.append(f"  {self.split} loss recorded at training time {self.recorded_loss:.5f}")
        if self.base_loss is not None:
            out.append(f"  {self.split} loss of the base model without adapter {self.base_loss:.5f}")
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  FAILED: {p}" for p in self.problems]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()} | {"ok": self.ok, "problems": self.problems}


class CheckRejected(LmlabError):
    """An export whose verification failed; nothing was written (or the written file was deleted)."""

    exit_code = 4
    what = "verification"
    hint = "pass --force to export anyway"

    def __init__(self, check: Any):  # a MergeCheck or a GgufCheck: anything with .problems
        self.check = check
        super().__init__(f"{self.what} failed: " + "; ".join(check.problems) + f"; nothing written ({self.hint})")


class MergeRejected(CheckRejected):
    """The merged model does not behave like the adapter model; nothing was written."""

    what = "merge verification"


@dataclass
class ExportResult:
    out_dir: Path
    kind: str  # "full" (fine-tuned weights), "adapter" (peft folder), "merged" (adapter folded into the base)
    source: Path  # the checkpoint exported
    run_id: str | None
    check: MergeCheck | None = None
    notes: list[str] = field(default_factory=list)


def export_checkpoint(ref: str | os.PathLike, out_dir: str | os.PathLike, *, merge: bool = False,
                      force: bool = False, output_dir: str = DEFAULT_WORKSPACE, base: str | None = None,
                      max_examples: int = 200, tol_logits: float | None = None,
                      tol_loss: float | None = None) -> ExportResult:
    """Write the run's (best) checkpoint to `out_dir` as a folder plain transformers / peft load.
    merge=True folds a LoRA adapter into its base after verifying it (see the module docstring); raises
    MergeRejected when the check fails and not `force`."""

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise LmlabError(f"-o: {out} exists and is not empty; choose a new folder or remove it")
    loaded = load_checkpoint(ref, output_dir=output_dir, base=base)
    check, notes = None, []
    if not loaded.adapter:
        if merge:
            notes.append("the checkpoint holds full weights (no adapter): nothing to merge, exported as is")
        kind, model = "full", loaded.model
    elif not merge:
        kind, model = "adapter", loaded.model
    else:
        kind = "merged"
        if loaded.recipe.adapter.kind == "qlora" and not _is_four_bit(loaded.model):
            notes.append("QLoRA adapter without CUDA: merged into the full-precision base, not the 4-bit one it "
                         "was trained on; expect a loss change")
        merged = merged_model(loaded)
        check = verify_merge(loaded, merged, max_examples=max_examples, tol_logits=tol_logits, tol_loss=tol_loss,
                             qlora=loaded.recipe.adapter.kind == "qlora")
        if not check.ok and not force:
            raise MergeRejected(check)
        model = merged
    _write(out, loaded, model, kind, check)
    return ExportResult(out, kind, loaded.path, loaded.run_id, check, notes)


def heldout_examples(loaded: LoadedCheckpoint, max_examples: int) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(split name, its records, tokenized examples, notes): the run's validation split (else test, else train),
    the examples capped at `max_examples`."""

    if loaded.template is None:
        raise LmlabError("export --merge: verification scores the run's SFT examples, and this checkpoint has no "
                         "template.json (task lm); export without --merge, or pass --force")
    notes = []
    for split in ("val", "test", "train"):
        records = checkpoint_split(loaded.recipe, loaded.tokenizer, split)
        if records:
            break
    if split == "train":
        notes.append("the run has no validation or test split: checked on training examples")
    examples, _ = tokenize_sft(records, loaded.template, loaded.tokenizer, loaded.recipe.data, source=split)
    if len(examples) > max_examples:
        notes.append(f"checked the first {max_examples} of {len(examples)} {split} examples")
        examples = examples[:max_examples]
    return split, records, examples, notes


def verify_merge(loaded: LoadedCheckpoint, merged: Any, *, max_examples: int = 200, tol_logits: float | None = None,
                 tol_loss: float | None = None, qlora: bool = False) -> MergeCheck:
    """Compare adapter and merged model on held-out examples, batch by batch (logits are never all kept)."""
    from functools import partial

    import torch
    import torch.nn.functional as F

    try:
        split, records, examples, notes = heldout_examples(loaded, max_examples)
    except LmlabError as e:
        raise LmlabError(f"export --merge: cannot verify the merge, the run's data is needed ({e}); "
                         "make it available or pass --force") from None
    precision = "qlora" if qlora else ("bf16" if loaded.recipe.train.precision == "bf16" else "fp32")
    tol = TOLERANCES[precision]
    collate = partial(collate_padded, pad_id=pad_token_id(loaded.tokenizer))
    bs = loaded.recipe.eval.batch_size or loaded.recipe.train.batch_size
    limit = loaded.recipe.eval.max_batches
    adapter_dev = next(loaded.model.parameters()).device
    merged_dev = next(merged.parameters()).device
    max_diff, nll_a, nll_m, nll_b, count = 0.0, 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for b, start in enumerate(range(0, len(examples), bs)):
            if limit is not None and b >= limit:
                break
            batch = collate(examples[start:start + bs])
            labels, attended = batch["labels"], batch["attention_mask"].bool()
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            la = loaded.model(**{k: v.to(adapter_dev) for k, v in inputs.items()}, use_cache=False).logits.float().cpu()
            lm = merged(**{k: v.to(merged_dev) for k, v in inputs.items()}, use_cache=False).logits.float().cpu()
            diff = (la - lm).abs()[attended]
            max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
            if not math.isfinite(float(diff.sum())):
                max_diff = float("nan")
            nll_a += float(F.cross_entropy(la.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"))
            nll_m += float(F.cross_entropy(lm.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"))
            with loaded.model.disable_adapter():  # the base alone: how far the adapter moved the loss
                lb = loaded.model(**{k: v.to(adapter_dev) for k, v in inputs.items()}, use_cache=False).logits
            nll_b += float(F.cross_entropy(lb.float().cpu().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                           reduction="sum"))
            count += int((labels != -100).sum())
    adapter_loss, merged_loss = nll_a / max(count, 1), nll_m / max(count, 1)
    recorded = _recorded_loss(loaded, split, records, max_examples, notes)
    return MergeCheck(split, min(len(examples), (limit or 10**9) * bs), count, max_diff, adapter_loss,
                      merged_loss, recorded, nll_b / max(count, 1), tol_logits=tol_logits if tol_logits is not None else tol["logits"],
                      tol_loss=tol_loss if tol_loss is not None else tol["loss"], notes=notes)


def _recorded_loss(loaded: LoadedCheckpoint, split: str, records: list, max_examples: int, notes: list[str]) -> float | None:
    """The checkpoint's own val/loss from training, if it scored exactly the examples we just scored. The
    metrics in meta.json belong to the checkpoint's step when that step was an eval step (or it is the best
    checkpoint, whose value is the best one)."""

    meta, recipe = loaded.meta, loaded.recipe
    metrics = meta.get("metrics", {})
    value = metrics.get(f"{split}/loss")
    if split != "val" or value is None:
        return None
    step, every = int(meta.get("step", 0)), recipe.eval.every_steps
    is_best = Path(str(meta.get("best_checkpoint"))).name == loaded.path.name and \
        meta.get("best_value") == metrics.get(recipe.eval.best_metric)
    fresh = (every is not None and step % every == 0) or recipe.train.max_steps == step or is_best
    if not fresh:
        notes.append(f"the checkpoint (step {step}) was saved between evaluations: no recorded loss to compare")
        return None
    if split_fingerprint_matches(meta, "val", records) is False:
        notes.append("the validation data changed since training: no recorded loss to compare")
        return None
    if len(records) > max_examples:
        return None
    return float(value)


def _write(out: Path, loaded: LoadedCheckpoint, model: Any, kind: str, check: MergeCheck | None) -> None:
    """Write atomically: a temporary sibling renamed into place."""
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(tmp))
        if kind == "adapter":
            # point the adapter at the model id the recipe names, not at this machine's cache folder
            cfg_path = tmp / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = loaded.recipe.model.pretrained or cfg.get("base_model_name_or_path")
            cfg_path.write_text(json.dumps(cfg, indent=2))
        for name in ("template.json", "recipe.yaml"):
            if (loaded.path / name).is_file():
                shutil.copy2(loaded.path / name, tmp / name)
        info = {"kind": kind, "source_checkpoint": str(loaded.path.resolve()), "run_id": loaded.run_id,
                "step": loaded.meta.get("step"), "base_model": loaded.recipe.model.pretrained,
                "merge_check": check.to_dict() if check is not None else None}
        (tmp / "lmlab_export.json").write_text(json.dumps(info, indent=2, default=str))
        if out.exists():
            out.rmdir()  # empty (checked before)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

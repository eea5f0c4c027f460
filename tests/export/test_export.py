"""`lmlab export`: standalone folders plain transformers / peft load, and a merge that is verified (and refused when
the adapter is corrupt, the merge is wrong or the base is not the one trained on)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.toy import lmlab_cli, make_base, toy_recipe
from safetensors.torch import load_file, save_file

from lmlab import load_recipe, train
from lmlab.errors import LmlabError
from lmlab.export.hf import MergeRejected, export_checkpoint
from lmlab.models.loading import load_checkpoint
from lmlab.workspace.manifest import write_manifest


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny Llama with a LoRA adapter trained enough that its B matrices are far from zero (~10 s)."""
    root = tmp_path_factory.mktemp("export")
    base = make_base(root / "base")
    recipe = toy_recipe(root, base, adapter={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                        train__max_steps=12, eval__every_steps=6)
    return root, train(load_recipe(data=recipe), quiet=True)


def copy_checkpoint(result, dest):
    shutil.copytree(result.best_checkpoint, dest)
    return dest


def corrupt(ckpt, fn):
    """Replace the adapter's weights and re-sign the manifest: an adapter intact on disk but wrong, which only the
    merge verification can catch (a file altered after saving is refused by the manifest check before that)."""
    path = ckpt / "adapter_model.safetensors"
    state = load_file(str(path))
    save_file({k: fn(k, v) for k, v in state.items()}, str(path))
    write_manifest(ckpt)


def test_merge_is_verified_and_loads_with_plain_transformers(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, result = lora_run
    out = export_checkpoint(result.run_dir, tmp_path / "merged", merge=True)
    check = out.check
    assert out.kind == "merged" and check.ok, check.lines()
    assert check.max_abs_logit_diff < 1e-4 and abs(check.merged_loss - check.adapter_loss) < 1e-5
    assert check.recorded_loss == pytest.approx(check.adapter_loss, abs=1e-5)  # the adapter reproduces training
    assert check.base_loss is not None and check.base_loss > check.adapter_loss  # the adapter learned something
    folder = tmp_path / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json", "template.json", "lmlab_export.json"} <= {
        p.name for p in folder.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not any("lora" in k for k in model.state_dict())
    adapter = load_checkpoint(result.best_checkpoint)
    ids = AutoTokenizer.from_pretrained(folder)('### Question: "one"\n ### Answer: ', return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapter.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    info = json.loads((folder / "lmlab_export.json").read_text())
    assert info["kind"] == "merged" and info["merge_check"]["ok"] and info["run_id"] == result.run_id


def test_adapter_export_points_at_the_recipe_base(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, result = lora_run
    out = export_checkpoint(result.best_checkpoint, tmp_path / "adapter")
    assert out.kind == "adapter" and out.check is None
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(root / "base")  # the recipe's model.pretrained
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), tmp_path / "adapter")
    assert model.peft_config["default"].r == 4


def test_corrupted_adapter_is_rejected_and_nothing_written(lora_run, tmp_path):
    _, result = lora_run
    ckpt = copy_checkpoint(result, tmp_path / "ckpt")
    corrupt(ckpt, lambda k, v: v * 3 if "lora_B" in k else v)  # a damaged file: still finite, silently wrong
    with pytest.raises(MergeRejected, match="not the .* recorded at training time") as err:
        export_checkpoint(ckpt, tmp_path / "out", merge=True)
    assert not err.value.check.ok and not (tmp_path / "out").exists()
    # --force writes it anyway and records the failed check
    forced = export_checkpoint(ckpt, tmp_path / "out", merge=True, force=True)
    assert json.loads((tmp_path / "out" / "lmlab_export.json").read_text())["merge_check"]["ok"] is False
    assert forced.check.problems


def test_nan_adapter_is_rejected(lora_run, tmp_path):
    _, result = lora_run
    ckpt = copy_checkpoint(result, tmp_path / "ckpt")
    corrupt(ckpt, lambda k, v: torch.full_like(v, float("nan")) if k.endswith("layers.0.self_attn.q_proj.lora_B.weight") else v)
    with pytest.raises(MergeRejected, match="non-finite"):
        export_checkpoint(ckpt, tmp_path / "out", merge=True)


def test_a_wrong_merge_is_caught_by_the_logit_comparison(lora_run, tmp_path, monkeypatch):
    from lmlab.export import hf as export

    _, result = lora_run
    good = export.merged_model

    def bad_merge(loaded):  # e.g. a merge that forgot one adapted layer
        merged = good(loaded)
        with torch.no_grad():
            merged.model.layers[1].mlp.down_proj.weight.mul_(0.9)
        return merged

    monkeypatch.setattr(export, "merged_model", bad_merge)
    with pytest.raises(MergeRejected, match="merged logits differ from the adapter's") as err:
        export_checkpoint(result.best_checkpoint, tmp_path / "out", merge=True)
    assert err.value.check.max_abs_logit_diff > 1e-2


def test_same_shape_wrong_base_is_caught_by_the_recorded_loss(lora_run, tmp_path):
    _, result = lora_run
    other = make_base(tmp_path / "other", seed=5)
    # the checkpoint records its base's fingerprint: refused as soon as it loads
    with pytest.raises(LmlabError, match="is not the one this adapter was trained on"):
        export_checkpoint(result.best_checkpoint, tmp_path / "out", merge=True, base=str(other))
    # a checkpoint without one (older, or hand-made) is still caught by the loss it recorded in training
    ckpt = copy_checkpoint(result, tmp_path / "ckpt")
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["base_fingerprint"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / "manifest.json").unlink()  # as checkpoints from before manifests
    with pytest.raises(MergeRejected, match="base model is not the one it was trained on"):
        export_checkpoint(ckpt, tmp_path / "out", merge=True, base=str(other))
    assert not (tmp_path / "out").exists()


def test_full_checkpoint_exports_as_is(tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_base(tmp_path / "base")
    result = train(load_recipe(data=toy_recipe(tmp_path, base, train__max_steps=2, eval__every_steps=2)), quiet=True)
    out = export_checkpoint(result.best_checkpoint, tmp_path / "full", merge=True)
    assert out.kind == "full" and out.check is None and "nothing to merge" in out.notes[0]
    AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    with pytest.raises(LmlabError, match="exists and is not empty"):
        export_checkpoint(result.best_checkpoint, tmp_path / "full")


def test_cli_refuses_a_corrupted_merge_with_a_non_zero_exit(lora_run, tmp_path):
    _, result = lora_run
    ckpt = copy_checkpoint(result, tmp_path / "ckpt")
    corrupt(ckpt, lambda k, v: v * 3 if "lora_B" in k else v)
    proc = lmlab_cli("export", str(ckpt), "--merge", "-o", str(tmp_path / "out"))
    assert proc.returncode == 4, proc.stderr
    assert "max |logit difference| merged vs adapter" in proc.stderr and "FAILED: the adapter's loss" in proc.stderr
    assert "error: merge verification failed" in proc.stderr and "pass --force" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_qlora_merge_into_dequantized_base(tmp_path):
    """On CUDA with bitsandbytes: a QLoRA adapter merges into the dequantized 4-bit base; loss change reported."""
    pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    base = make_base(tmp_path / "base", hidden=64)
    recipe = toy_recipe(tmp_path, base, adapter={"kind": "qlora", "r": 4, "alpha": 8, "dropout": 0.0},
                        train__max_steps=12, eval__every_steps=6, train__precision="bf16")
    result = train(load_recipe(data=recipe), quiet=True)
    out = export_checkpoint(result.best_checkpoint, tmp_path / "merged", merge=True)
    assert out.kind == "merged" and out.check.ok, out.check.lines()
    assert not any(type(m).__name__ == "Linear4bit" for m in load_checkpoint(tmp_path / "merged").model.modules())

"""Folding a LoRA/QLoRA adapter into its base: a plain transformers model (lmlab.export.hf verifies the result)."""

from __future__ import annotations

from lmlab.models.build import peft_quietly
from lmlab.models.loading import LoadedCheckpoint, load_base


def merged_model(loaded: LoadedCheckpoint):
    """The adapter folded into its base, as a plain transformers model. LoRA: a copy of the peft model merged
    (the adapter model stays intact for the comparison). QLoRA: the 4-bit base dequantized to bf16, then merged."""
    import copy

    if loaded.recipe.adapter.kind == "qlora" and _is_four_bit(loaded.model):
        from peft import PeftModel

        base = load_base(loaded.recipe, loaded.base, four_bit=True, device="cuda")
        base = dequantize_four_bit(base)
        with peft_quietly():
            return PeftModel.from_pretrained(base, str(loaded.path)).merge_and_unload().eval()
    return copy.deepcopy(loaded.model).merge_and_unload().eval()


def _is_four_bit(model) -> bool:
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


def dequantize_four_bit(model):
    """Replace every bitsandbytes Linear4bit with a torch Linear holding its dequantized weight (bf16): the exact
    weights a QLoRA adapter was trained against, now mergeable without re-quantizing."""
    import torch
    from peft.utils.integrations import dequantize_bnb_weight

    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Linear4bit":
            continue
        weight = dequantize_bnb_weight(module.weight, state=module.weight.quant_state).to(torch.bfloat16)
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                 device=weight.device, dtype=torch.bfloat16)
        linear.weight.data.copy_(weight)
        if module.bias is not None:
            linear.bias.data.copy_(module.bias.data.to(torch.bfloat16))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    model.is_loaded_in_4bit = False
    model.is_quantized = False
    return model

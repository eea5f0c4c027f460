"""The recipe's dpo section and task dpo's cross-section rules: each mistake is one line naming the field."""

from __future__ import annotations

import copy

import pytest

from lmlab import load_recipe
from lmlab.errors import RecipeError

BASE = {"run": {"task": "dpo"}, "data": {"path": "prefs.json", "template": "alpaca"},
        "model": {"pretrained": "some/model"}, "adapter": {"kind": "lora"}}


def test_defaults_are_plain_dpo():
    r = load_recipe(data=BASE)
    assert (r.dpo.beta, r.dpo.loss, r.dpo.label_smoothing, r.dpo.reference) == (0.1, "sigmoid", 0.0, "auto")
    assert (r.dpo.prompt_column, r.dpo.chosen_column, r.dpo.rejected_column) == ("prompt", "chosen", "rejected")


@pytest.mark.parametrize("overrides, message", [
    (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing: applies to the sigmoid loss only"),
    (["dpo.label_smoothing=0.5"], "dpo.label_smoothing: input should be less than 0.5"),
    (["dpo.beta=0"], "dpo.beta: input should be greater than 0"),
    (["dpo.rejected_column=chosen"], "dpo.rejected_column: must differ from chosen_column"),
    (["dpo.refrence=auto"], "dpo.refrence: unknown key; did you mean 'reference'?"),
    (["data.template=text"], "data: task dpo renders prompts with data.template"),
    (["adapter.kind=none", "dpo.reference=adapter_disabled"], "dpo: reference adapter_disabled needs a LoRA adapter"),
])
def test_mistakes_name_the_field(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(data=copy.deepcopy(BASE), overrides=overrides)

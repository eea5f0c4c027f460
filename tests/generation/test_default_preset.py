"""A model trained from scratch does not decode greedily by default (small ones loop: "the the the ..."); a
pretrained or fine-tuned one does; a recipe that names its default keeps it; `lmlab generate` says which it used."""

from helpers.recipes import tiny_lm
from typer.testing import CliRunner

from lmlab import load_recipe, train
from lmlab.recipe.generation import BUILTIN_PRESETS, pick_preset


def test_the_default_preset_follows_how_the_model_was_made():
    scratch = load_recipe(data=tiny_lm())
    assert scratch.generation.default_preset == "varied" and pick_preset(scratch, None) == BUILTIN_PRESETS["varied"]
    varied = BUILTIN_PRESETS["varied"]
    assert varied.mode == "sample" and varied.repetition_penalty > 1
    pretrained = load_recipe(data=tiny_lm(model={"pretrained": "some/model"}, tokenizer={"kind": "pretrained"}))
    assert pretrained.generation.default_preset == "greedy"
    named = load_recipe(data=tiny_lm(generation={"default_preset": "greedy"}))
    assert named.generation.default_preset == "greedy"  # the recipe's own choice stays
    assert "default_preset: varied" in scratch.to_yaml()  # recorded with the run, so generate reads it back


def test_generate_says_which_preset_it_used(workspace):
    from lmlab.cli import app

    run = train(load_recipe(data=tiny_lm(train__max_steps=2, train__warmup_steps=0, eval__every_steps=2)), quiet=True)
    out = CliRunner().invoke(app, ["generate", run.run_id[:8], "-p", "Show HN", "--max-new-tokens", "6", "--no-log"])
    assert out.exit_code == 0, out.output
    assert f"{run.run_id[:8]}" in out.output and "preset varied (its recipe's generation.default_preset" in out.output
    out = CliRunner().invoke(app, ["generate", run.run_id[:8], "-p", "Show HN", "--max-new-tokens", "6", "--no-log",
                                   "--preset", "greedy"])
    assert "preset greedy (--preset" in out.output

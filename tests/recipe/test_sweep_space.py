"""The sweep's space, checked before any trial: every field path exists, every value passes the schema, derived
values evaluate; every problem on its own line, exit 2, no traceback."""

import os
import subprocess
import sys

import pytest
import yaml
from helpers.recipes import tiny_lm

from lmlab.errors import RecipeError
from lmlab.recipe.sweep import ParamSpec, SweepConfig, evaluate_expr, expr_names, parse_grid, scalar


def lmlab(*args, cwd):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", "from lmlab.cli import main; main()", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def test_a_bad_space_gives_one_line_per_problem_and_exit_2(workspace):
    (workspace / "recipe.yaml").write_text(yaml.safe_dump(tiny_lm()))
    (workspace / "space.yaml").write_text(yaml.safe_dump({"sweep": {"params": {
        "train.lrr": [1e-3, 3e-3],  # unknown field
        "train.lr": {"choice": [-1.0, 1e-3]},  # a value the schema rejects
        "model.n_layer": {"choice": []},  # empty choice
        "adapter.alpha": {"expr": "2 * adapter.rank"},  # a derived value reading nothing known
    }}}))
    proc = lmlab("sweep", "recipe.yaml", "--space", "space.yaml", cwd=workspace)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 4, proc.stderr
    assert any("sweep.params.train.lrr: unknown field; did you mean 'train.lr'?" in line for line in lines)
    assert any("sweep.params.train.lr: -1.0 is rejected: train.lr: input should be greater than 0" in line
               for line in lines)
    assert any("sweep.params.model.n_layer: is empty" in line for line in lines)
    assert any("sweep.params.adapter.alpha: 'adapter.rank' is neither a searched param nor a field" in line
               for line in lines)
    assert not (workspace / "lmlab-runs" / "optuna.db").exists()  # nothing ran


def test_grid_values_cross_checked_with_the_recipe(workspace):
    from lmlab.training.sweep import plan_sweep

    path = workspace / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_lm(train__min_lr=1e-4)))
    with pytest.raises(RecipeError) as e:  # lr 5e-5 is below the recipe's min_lr: a trial would fail
        plan_sweep(path, grid=["train.lr=1e-3,5e-5", "model.d_model=32,33"])
    text = str(e.value)
    assert "sweep.params.train.lr: 5e-05 is rejected: train.min_lr: 0.0001 must be <= lr (5e-05)" in text
    assert "sweep.params.model.d_model: 33 is rejected" in text and "divisible by n_head" in text
    plan = plan_sweep(path, grid=["train.lr=1e-3,3e-3", "model.d_model=32,64"])
    assert plan.sampler == "grid" and plan.n_trials == 4 and plan.name == "tiny-sweep"


def test_grid_sampler_needs_choices_and_ranges_need_low_below_high():
    from lmlab.recipe.sweep import check_space

    config = SweepConfig(sampler="grid", params={"train.lr": {"log_uniform": [1e-5, 1e-3]}})
    problems = check_space(config, lambda values: None, {}, __import__("lmlab.recipe.schema").recipe.schema.Recipe)
    assert problems == ["sweep.params.train.lr: sampler grid needs choices, not a log_uniform range; list values "
                        "or use sampler tpe / random"]
    with pytest.raises(ValueError, match="low must be below high"):
        ParamSpec.model_validate({"uniform": [0.5, 0.1]})
    with pytest.raises(ValueError, match="exactly one of"):
        ParamSpec.model_validate({"choice": [1], "uniform": [0, 1]})


def test_command_line_values_and_derived_values():
    assert scalar("1e-4") == pytest.approx(1e-4) and scalar("16") == 16 and scalar("true") is True
    assert scalar("cosine") == "cosine"
    grid = parse_grid(["train.lr=1e-4,5e-5", "adapter.r=16,32"])
    assert grid["train.lr"].choice == [1e-4, 5e-5] and grid["adapter.r"].choice == [16, 32]
    with pytest.raises(RecipeError, match="expected field=value1,value2"):
        parse_grid(["train.lr"])
    assert expr_names("2 * adapter.r + max(train.lr, 1)") == ["adapter.r", "train.lr"]
    assert evaluate_expr("2 * adapter.r", {"adapter.r": 16}) == 32
    with pytest.raises(ValueError, match="not allowed"):
        evaluate_expr("__import__('os')", {})
    config = SweepConfig(params={"adapter.r": [8, 16], "adapter.alpha": {"expr": "2 * adapter.r"},
                                 "train.lr": [1e-3, 3e-3]})
    assert config.sampler_name() == "grid" and config.n_trials() == 4
    assert config.grid() == [{"adapter.r": 8, "train.lr": 1e-3}, {"adapter.r": 8, "train.lr": 3e-3},
                             {"adapter.r": 16, "train.lr": 1e-3}, {"adapter.r": 16, "train.lr": 3e-3}]

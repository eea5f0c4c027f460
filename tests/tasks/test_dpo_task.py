"""The dpo task against the reference implementation: TRL's DPOTrainer (trl==1.16.0, installed by `make test`)
computes loss, rewards and gradients of the same batch on the same tiny Llama with the same reference — a frozen
copy (full fine-tuning) and the LoRA adapter switched off — and lmlab must agree within 1e-5. Label smoothing,
which TRL 1.16 no longer applies to its sigmoid loss, is checked against the conservative-DPO formula written out
from the paper; left padding, the reference strategies and the metrics are checked on their own."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer

from lmlab.recipe.dpo import DpoConfig
from lmlab.tasks.preference import (
    AdapterDisabled,
    DpoTask,
    FrozenCopy,
    Precomputed,
    collate_pairs,
    dpo_loss,
    pair_metrics,
    precompute_reference,
    sequence_logps,
)

TOL = 1e-5


def make_pairs(vocab: int, n: int = 4, seed: int = 0) -> list[dict]:
    """Random token pairs of different prompt and response lengths: {prompt_ids, chosen_ids, rejected_ids}."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(1, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_ids": ids(3, 12), "chosen_ids": ids(2, 9), "rejected_ids": ids(2, 9)} for _ in range(n)]


def as_example(pair: dict) -> dict:
    """lmlab's pair example: whole sequences with labels aligned to positions (-100 on the prompt)."""
    out = {"row": 0}
    for side in ("chosen", "rejected"):
        ids = pair["prompt_ids"] + pair[f"{side}_ids"]
        flags = [False] * len(pair["prompt_ids"]) + [True] * len(pair[f"{side}_ids"])
        out[f"{side}_ids"] = ids
        out[f"{side}_labels"] = [ids[t + 1] if flags[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]
    return out


def trl_trainer(tmp_path, model, tok, *, beta: float, loss: str, ref_model=None, peft_config=None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss], report_to="none", use_cpu=True,
                     gradient_checkpointing=False, max_length=None, pad_to_multiple_of=None, seed=0,
                     bf16=False)  # TRL defaults to bf16 autocast; fp32 on both sides
    text = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})  # unused: batches come below
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=text, processing_class=tok,
                      peft_config=peft_config)


def trl_step(trainer, pairs: list[dict], pad_id: int):
    """TRL's loss on its own collated batch, backward, and its logged rewards (means over the batch)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    inputs = DataCollatorForPreference(pad_token_id=pad_id)(pairs)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return float(loss.detach()), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def lmlab_step(model, pairs: list[dict], reference, pad_id: int, *, beta: float, loss: str):
    task = DpoTask(DpoConfig(beta=beta, loss=loss), [], [], reference=reference, pad_id=pad_id, eval_batch_size=4)
    model.train()
    total, n = task.loss(model, task.collate([as_example(p) for p in pairs]))
    (total / n).backward()
    return float(total.detach() / n), task.train_metrics()


def assert_same(trl_loss, trl_metrics, ours_loss, ours, trl_model, our_model):
    assert abs(ours_loss - trl_loss) < TOL
    for ours_key, trl_key in (("train/rewards/chosen", "rewards/chosen"), ("train/rewards/rejected", "rewards/rejected"),
                              ("train/rewards/margin", "rewards/margins"), ("train/accuracy", "rewards/accuracies")):
        assert abs(ours[ours_key] - trl_metrics[trl_key]) < TOL, ours_key
    assert abs(ours["train/rewards/margin"]) > 1e-3  # the policy differs from the reference: not a trivial zero
    theirs = {n: p.grad for n, p in trl_model.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in our_model.named_parameters() if p.requires_grad}
    assert theirs.keys() == mine.keys() and len(mine) > 0
    for name, grad in mine.items():
        assert grad is not None and theirs[name] is not None, name
        assert torch.allclose(grad, theirs[name], atol=TOL, rtol=0), (name, (grad - theirs[name]).abs().max())
    assert any(float(g.abs().max()) > 1e-3 for g in mine.values())


@pytest.mark.parametrize("loss, beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_full_fine_tuning_with_a_frozen_reference_equals_trl(tmp_path, loss, beta):
    tok = tiny_tokenizer()
    reference = tiny_llama(len(tok), seed=1)
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # the policy a little way from the reference, as after some training
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = make_pairs(len(tok))
    ours_model = copy.deepcopy(policy)
    ours_loss, ours = lmlab_step(ours_model, pairs, FrozenCopy(reference), tok.pad_token_id, beta=beta, loss=loss)
    trainer = trl_trainer(tmp_path, copy.deepcopy(policy), tok, beta=beta, loss=loss, ref_model=copy.deepcopy(reference))
    trl_loss, trl_metrics = trl_step(trainer, pairs, tok.pad_token_id)
    assert_same(trl_loss, trl_metrics, ours_loss, ours, trainer.model, ours_model)


def test_lora_with_the_adapter_switched_off_equals_trl(tmp_path):
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    base = tiny_llama(len(tok), seed=2)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    trainer = trl_trainer(tmp_path, copy.deepcopy(base), tok, beta=0.2, loss="sigmoid", peft_config=config)
    with torch.no_grad():  # a trained-looking adapter (new ones start at B = 0: policy = reference)
        g = torch.Generator().manual_seed(3)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    ours_model = get_peft_model(copy.deepcopy(base), config)
    ours_model.load_state_dict(trainer.model.state_dict())
    pairs = make_pairs(len(tok), seed=4)
    ours_loss, ours = lmlab_step(ours_model, pairs, AdapterDisabled(), tok.pad_token_id, beta=0.2, loss="sigmoid")
    trl_loss, trl_metrics = trl_step(trainer, pairs, tok.pad_token_id)
    assert_same(trl_loss, trl_metrics, ours_loss, ours, trainer.model, ours_model)


def test_label_smoothing_is_conservative_dpo_from_the_paper():
    """Mitchell (2023), 'A note on DPO with noisy preferences', as in the DPO authors' code:
    loss = -logsigmoid(β·Δ)·(1 − ε) − logsigmoid(−β·Δ)·ε."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 5 for _ in range(4))
    beta, eps = 0.3, 0.2
    logits = (pc - pr) - (rc - rr)
    expected = [-math.log(1 / (1 + math.exp(-beta * x))) * (1 - eps) - math.log(1 / (1 + math.exp(beta * x))) * eps
                for x in logits.tolist()]
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert torch.allclose(losses.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(chosen, beta * (pc - rc)) and torch.allclose(rejected, beta * (pr - rr))
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert not torch.allclose(plain, losses)


def test_left_padding_does_not_change_a_pairs_log_probs():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=5)
    examples = [as_example(p) for p in make_pairs(len(tok), n=5, seed=6)]
    together = sequence_logps(model, collate_pairs(examples, tok.pad_token_id))
    alone = torch.cat([sequence_logps(model, collate_pairs([e], tok.pad_token_id)) for e in examples])
    n = len(examples)
    alone = torch.cat([alone[0::2], alone[1::2]])  # each single batch is [chosen, rejected]
    assert torch.allclose(together, alone, atol=TOL)
    # and equal to a plain unpadded forward with the labels summed by hand
    e = examples[2]
    logits = model(torch.tensor([e["rejected_ids"]])).logits[0].log_softmax(-1)
    by_hand = sum(float(logits[t, y]) for t, y in enumerate(e["rejected_labels"]) if y != -100)
    assert abs(float(together[n + 2]) - by_hand) < TOL


def test_reference_strategies_agree():
    """Precomputed log-probs equal a frozen copy's; the adapter switched off equals the base model."""
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    base = tiny_llama(len(tok), seed=7)
    examples = [as_example(p) for p in make_pairs(len(tok), n=6, seed=8)]
    batch = collate_pairs(examples[:3], tok.pad_token_id)
    frozen = FrozenCopy(base).logps(base, batch)
    pre = precompute_reference(base, examples, lambda ex: collate_pairs(ex, tok.pad_token_id), batch_size=2)
    for e, ref in zip(examples, pre, strict=True):
        e["ref"] = ref
    carried = Precomputed().logps(base, collate_pairs(examples[:3], tok.pad_token_id))
    assert torch.allclose(frozen, carried, atol=TOL)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert not torch.allclose(sequence_logps(lora, batch), frozen, atol=1e-3)  # the adapter changes the model…
    assert torch.allclose(AdapterDisabled().logps(lora, batch), frozen, atol=TOL)  # …and switched off it is the base


def test_metrics_count_ties_half_and_reset():
    metrics = pair_metrics(torch.tensor([1.0, 0.0, -1.0, 0.5]), torch.tensor([0.0, 0.0, 0.0, 1.5]), "val")
    assert metrics["val/accuracy"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert metrics["val/rewards/margin"] == pytest.approx((1 + 0 - 1 - 1) / 4)
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=9)
    task = DpoTask(DpoConfig(), [], [], reference=FrozenCopy(model), pad_id=tok.pad_token_id, eval_batch_size=2)
    task.loss(model, task.collate([as_example(p) for p in make_pairs(len(tok), n=3)]))
    first = task.train_metrics()
    assert first["train/accuracy"] == 0.5 and first["train/rewards/margin"] == 0.0  # policy = reference: chance
    assert task.train_metrics() == {}  # the window was consumed


def test_evaluation_keeps_reference_log_probs_for_the_next_one():
    """The reference runs once per val pair: later evaluations score the policy alone, with the same result."""
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=10)
    calls = []

    class Counting(FrozenCopy):
        def logps(self, model, batch):
            calls.append(batch["input_ids"].shape[0])
            return super().logps(model, batch)

    val = [as_example(p) for p in make_pairs(len(tok), n=5, seed=11)]
    task = DpoTask(DpoConfig(), [], val, reference=Counting(model), pad_id=tok.pad_token_id, eval_batch_size=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    first = task.evaluate(model, task.val_set, "val")
    assert calls == [4, 4, 2] and all("ref" in e for e in val)
    second = task.evaluate(model, task.val_set, "val")
    assert calls == [4, 4, 2] and second == pytest.approx(first, abs=1e-6)
    assert first["val/accuracy"] != 0.5  # the policy moved away from the reference

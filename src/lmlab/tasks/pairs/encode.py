"""Pairs → token ids: one cross sequence (prompt, A, B) or two bi-encoder sequences (prompt + A, prompt + B),
each within data.max_length, with a per-part token budget.

Parts are tokenized once (capped at max_length each); the layout is assembled per batch, so the swapped
order of a pair costs no second tokenization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from lmlab.data.pairs import Pair
from lmlab.errors import LmlabError
from lmlab.recipe.pair import PairConfig

SWAP = (1, 0, 2)  # label (and probability column) of a pair after A↔B: A wins ↔ B wins, tie stays
_TOKENIZE_CHUNK = 1024


@dataclass(frozen=True)
class EncodedPair:
    prompt: np.ndarray  # (≤ max_length,) int32 token ids, no special tokens
    a: np.ndarray
    b: np.ndarray
    label: int
    a_chars: int  # response lengths in characters, for the "longer response wins" baseline
    b_chars: int
    identical: bool  # responses equal: predicted by the fixed rule when pair.identical_responses is 'fixed'
    swapped: bool = False  # A and B exchanged relative to the data

    def swap(self) -> EncodedPair:
        return replace(self, a=self.b, b=self.a, label=SWAP[self.label], a_chars=self.b_chars,
                       b_chars=self.a_chars, swapped=not self.swapped)


def tokenize_pairs(pairs: Sequence[Pair], tokenizer, cfg: PairConfig, max_length: int) -> list[EncodedPair]:
    """Tokenize every part without special tokens, keeping at most max_length ids per part (the end that the
    truncation side keeps), so long texts cost no memory beyond what any layout can use."""
    prompts = _tokenize([p.prompt if cfg.include_prompt else "" for p in pairs], tokenizer)
    a_ids = _tokenize([p.a for p in pairs], tokenizer)
    b_ids = _tokenize([p.b for p in pairs], tokenizer)
    out = []
    for p, pr, a, b in zip(pairs, prompts, a_ids, b_ids, strict=True):
        out.append(EncodedPair(
            prompt=_cap(pr, max_length, cfg.prompt_truncation), a=_cap(a, max_length, cfg.response_truncation),
            b=_cap(b, max_length, cfg.response_truncation), label=p.label, a_chars=len(p.a), b_chars=len(p.b),
            identical=p.identical,
        ))
    return out


def _tokenize(texts: list[str], tokenizer) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = texts[start:start + _TOKENIZE_CHUNK]
        # verbose=False: lengths above the model maximum are expected here, the layout cuts them
        ids += tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
    return ids


def _cap(ids: list[int], limit: int, side: str) -> np.ndarray:
    kept = ids[-limit:] if side == "left" else ids[:limit]
    return np.asarray(kept, dtype=np.int32)


def allocate(lengths: Sequence[int], weights: Sequence[float], budget: int) -> list[int]:
    """Token budget per part: each part gets its weighted share of `budget`; a part shorter than its share
    keeps its length and its unused share is spread over the others by weight ("water filling").
    Parts with equal weights and lengths get equal counts, so A and B are treated alike in either order."""
    alloc = [0] * len(lengths)
    active = [i for i, n in enumerate(lengths) if n > 0]
    remaining = budget
    while active:
        total_weight = sum(weights[i] for i in active)
        fits = [i for i in active if lengths[i] <= remaining * weights[i] / total_weight]
        if not fits:
            for i in active:
                alloc[i] = int(remaining * weights[i] / total_weight)
            break
        for i in fits:
            alloc[i] = lengths[i]
        remaining -= sum(lengths[i] for i in fits)
        active = [i for i in active if i not in fits]
    return alloc


class PairLayout:
    """How one tokenizer lays a pair out: special tokens, part markers and the budget per part.

    cross:  [CLS] Prompt: <prompt> [SEP] Response A: <a> [SEP] Response B: <b> [SEP]   (one sequence: A and B
            attend to each other; our head pools A's and B's tokens separately)
    bi:     [CLS] Prompt: <prompt> [SEP] Response: <a> [SEP]    (and the same with <b>)
    A tokenizer without CLS/SEP (decoders) uses BOS (if any) first and EOS last, unless EOS is its pad token
    (then the last real token would be read as padding by sequence-classification heads)."""

    def __init__(self, tokenizer, cfg: PairConfig, max_length: int):
        self.cfg, self.max_length = cfg, max_length
        self.bi = cfg.architecture == "bi"

        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        def one(token_id: int | None) -> list[int]:
            return [] if token_id is None else [token_id]

        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        self.start = one(tokenizer.cls_token_id) or one(tokenizer.bos_token_id)
        self.sep = one(tokenizer.sep_token_id)
        eos = tokenizer.eos_token_id
        self.end = self.sep or ([] if eos is None or eos == pad else [eos])
        self.mark_prompt = ids("Prompt:")
        self.mark_a, self.mark_b = ids("\n\nResponse A:"), ids("\n\nResponse B:")
        self.mark_response = ids("\n\nResponse:")
        # the prompt's part (markers, separator) exists only when some pair has a prompt; counted per pair
        responses = (self.mark_response + self.end) if self.bi else (self.mark_a + self.sep + self.mark_b + self.end)
        self.fixed = len(self.start) + len(responses)
        self.prompt_overhead = len(self.mark_prompt) + len(self.sep)
        room = max_length - self.fixed - self.prompt_overhead
        if room < 8:
            raise LmlabError(f"data.max_length: {max_length} leaves {room} tokens for text after special tokens "
                             f"and part markers ({self.fixed + self.prompt_overhead}); raise data.max_length")
        r = (1 - cfg.prompt_budget) / 2
        self.weights = (cfg.prompt_budget, r) if self.bi else (cfg.prompt_budget, r, r)

    def _prompt_part(self, prompt: np.ndarray, keep: int) -> list[int]:
        if not len(prompt):
            return []
        kept = prompt[len(prompt) - keep:] if self.cfg.prompt_truncation == "left" else prompt[:keep]
        return self.mark_prompt + kept.tolist() + self.sep

    def _response(self, ids: np.ndarray, keep: int) -> list[int]:
        return (ids[len(ids) - keep:] if self.cfg.response_truncation == "left" else ids[:keep]).tolist()

    def _budget(self, ex: EncodedPair) -> int:
        return self.max_length - self.fixed - (self.prompt_overhead if len(ex.prompt) else 0)

    def cross(self, ex: EncodedPair) -> tuple[list[int], list[int]]:
        """(token ids, segment of each token: 1 = response A with its marker, 2 = B, 0 = the rest)."""
        p, a, b = allocate((len(ex.prompt), len(ex.a), len(ex.b)), self.weights, self._budget(ex))
        head = self.start + self._prompt_part(ex.prompt, p)
        part_a = self.mark_a + self._response(ex.a, a)
        part_b = self.mark_b + self._response(ex.b, b)
        ids = head + part_a + self.sep + part_b + self.end
        segments = [0] * len(head) + [1] * len(part_a) + [0] * len(self.sep) + [2] * len(part_b) + [0] * len(self.end)
        return ids, segments

    def single(self, ex: EncodedPair, response: np.ndarray) -> list[int]:
        p, r = allocate((len(ex.prompt), len(response)), self.weights, self._budget(ex))
        return self.start + self._prompt_part(ex.prompt, p) + self.mark_response + self._response(response, r) + self.end

    def truncated(self, ex: EncodedPair) -> bool:
        """Whether the layout cuts any part of this pair (parts were already capped at max_length)."""
        if self.bi:
            return any(sum(allocate((len(ex.prompt), len(r)), self.weights, self._budget(ex)))
                       < len(ex.prompt) + len(r) for r in (ex.a, ex.b))
        return sum(allocate((len(ex.prompt), len(ex.a), len(ex.b)), self.weights, self._budget(ex))) \
            < len(ex.prompt) + len(ex.a) + len(ex.b)

    def collate(self, examples: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        """labels (B,) and
        cross: input_ids, attention_mask, segments (B, T) (segments only for our head, which pools A and B);
        sequence_classification: input_ids, attention_mask (B, T);
        bi: input_ids, attention_mask (B, 2, T) with A's sequence at [:, 0]."""
        segments = None
        if self.bi:
            rows = [seq for ex in examples for seq in (self.single(ex, ex.a), self.single(ex, ex.b))]
        else:
            rows, segments = zip(*(self.cross(ex) for ex in examples), strict=True)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.bi:
            batch = {k: v.view(len(examples), 2, width) for k, v in batch.items()}
        elif self.cfg.architecture == "cross":
            seg = torch.zeros((len(rows), width), dtype=torch.long)
            for i, s in enumerate(segments):
                seg[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            batch["segments"] = seg
        batch["labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.long)
        return batch

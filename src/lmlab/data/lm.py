"""Language-modelling data: documents -> one token stream with EOS between documents -> fixed blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenStream:
    """A split as one long token sequence plus what the per-character metric needs."""

    ids: torch.Tensor  # (N,) int64: doc_0 EOS doc_1 EOS ...
    n_chars: int  # characters of the split's text, counting one per EOS (the separator it stands for)
    n_docs: int


def tokenize_documents(docs: list[str], tokenizer, eos_id: int) -> TokenStream:
    ids: list[int] = []
    # batched fast-tokenizer call: ~20k headlines in well under a second
    for row in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(eos_id)
    return TokenStream(torch.tensor(ids, dtype=torch.long), sum(len(d) + 1 for d in docs), len(docs))


class BlockView:
    """Indexable view of a stream as blocks of `block` inputs: item i covers ids[i·block : (i+1)·block + 1].

    Consecutive blocks overlap by one token so every token after the first is predicted exactly once
    (the per-character loss needs full coverage). With `drop_last`, a short final block is left out
    (training); otherwise it is kept and padded at collate time (evaluation).
    """

    def __init__(self, stream: torch.Tensor, block: int, drop_last: bool):
        self.stream, self.block = stream, block
        n_pred = len(stream) - 1
        self.n = n_pred // block if drop_last else -(-n_pred // block)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.stream[i * self.block: (i + 1) * self.block + 1]


def collate_blocks(blocks: list[torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Blocks of length T+1 -> input_ids (B, T) and labels (B, T) aligned as targets; short ones padded."""
    T = max(len(b) for b in blocks) - 1
    input_ids = torch.full((len(blocks), T), pad_id, dtype=torch.long)
    labels = torch.full((len(blocks), T), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(blocks), T), dtype=torch.long)
    for row, b in enumerate(blocks):
        n = len(b) - 1
        input_ids[row, :n] = b[:-1]
        labels[row, :n] = b[1:]
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

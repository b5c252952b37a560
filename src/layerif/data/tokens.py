"""Tokenise texts (truncated) and pack them into right-padded batches whose padding never enters a loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from layerif.errors import LayerIFError


@dataclass
class EncodedSet:
    """Token ids of each sample (no padding), in dataset order."""

    input_ids: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(ids) for ids in self.input_ids])


@dataclass
class Batch:
    """A right-padded batch; `labels` is -100 on padding and `index` gives each row's sample number."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)), self.index)


def encode_texts(texts: list[str], tokenizer, max_length: int = 128, what: str = "sample") -> EncodedSet:
    """Tokenise each text, truncated to max_length tokens; every sample must keep >= 2 real tokens."""
    if max_length < 2:
        raise LayerIFError(f"--max-length must be at least 2, got {max_length}")
    encoded = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    ids = [torch.tensor(row, dtype=torch.long) for row in encoded["input_ids"]]
    for position, row in enumerate(ids):
        if len(row) < 2:
            raise LayerIFError(
                f"{what} {position} has {len(row)} real token(s) after truncation; a next-token loss needs at least 2"
            )
    return EncodedSet(ids)


def make_batches(encoded: EncodedSet, batch_size: int, pad_token_id: int) -> list[Batch]:
    """Split samples into right-padded batches in order (sample order is preserved)."""
    if batch_size < 1:
        raise LayerIFError(f"--batch-size must be >= 1, got {batch_size}")
    batches = []
    for first in range(0, len(encoded), batch_size):
        rows = encoded.input_ids[first : first + batch_size]
        input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_token_id)
        attention_mask = pad_sequence([torch.ones_like(row) for row in rows], batch_first=True, padding_value=0)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        index = torch.arange(first, first + len(rows))
        batches.append(Batch(input_ids, attention_mask, labels, index))
    return batches


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each sample's real tokens -> shape (batch,)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != -100).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts

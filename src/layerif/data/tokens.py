"""Tokenise texts (truncated), pack them into right-padded batches, and the per-sample training losses.

Padding never enters a loss. A loss is a callable `loss(logits (B, T, V), batch) -> (B,)` giving each sample's
loss; the built-in ones are `tokens` (mean next-token cross-entropy over every real token) and `answer` (the
same mean over the tokens of the row's `output` only, for instruction rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from layerif.errors import LayerIFError


@dataclass
class EncodedSet:
    """Token ids of each sample (no padding), in dataset order."""

    input_ids: list[torch.Tensor]
    answer_starts: list[int] | None = None  # position of each sample's first answer token (loss="answer")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(ids) for ids in self.input_ids])


@dataclass
class Batch:
    """A right-padded batch; `labels` is -100 on padding and `index` gives each row's sample number.

    `answer_start` (B,) is the position of each row's first answer token when the rows were encoded with
    their prompt / answer split (None otherwise).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    answer_start: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        moved = (t.to(device) for t in (self.input_ids, self.attention_mask, self.labels))
        start = None if self.answer_start is None else self.answer_start.to(device)
        return Batch(*moved, self.index, start)

    def rows(self, keep: slice | torch.Tensor) -> Batch:
        """The batch restricted to some rows (a slice or a row index tensor)."""
        start = None if self.answer_start is None else self.answer_start[keep]
        return Batch(self.input_ids[keep], self.attention_mask[keep], self.labels[keep], self.index[keep], start)


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


def encode_answers(prompts: list[str], texts: list[str], tokenizer, max_length: int = 128,
                   what: str = "sample") -> EncodedSet:
    """Tokenise prompt + answer texts; the answer span is every token after the tokenised prompt.

    A sample whose answer has no token left after truncation to max_length is a LayerIFError naming it.
    """
    encoded = encode_texts(texts, tokenizer, max_length, what)
    prompt_ids = tokenizer(prompts, truncation=False, add_special_tokens=True)["input_ids"]
    starts = [len(ids) for ids in prompt_ids]
    for position, (ids, start) in enumerate(zip(encoded.input_ids, starts)):
        if len(ids) <= start:
            raise LayerIFError(
                f"{what} {position} has no answer token left after truncation to {max_length} tokens (its prompt "
                f"takes {start}); raise --max-length or shorten the prompt"
            )
    return EncodedSet(encoded.input_ids, starts)


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
        answer_start = None
        if encoded.answer_starts is not None:
            answer_start = torch.tensor(encoded.answer_starts[first : first + batch_size], dtype=torch.long)
        batches.append(Batch(input_ids, attention_mask, labels, index, answer_start))
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


LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]


def token_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """loss="tokens": mean next-token cross-entropy over every real token of each sample -> (B,)."""
    return per_sample_loss(logits, batch.labels)


def answer_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """loss="answer": mean next-token cross-entropy over each sample's answer tokens only -> (B,)."""
    if batch.answer_start is None:
        raise LayerIFError("the answer loss needs rows encoded with their prompt / answer split")
    positions = torch.arange(batch.labels.shape[1], device=batch.labels.device)
    prompt = positions.unsqueeze(0) < batch.answer_start.to(batch.labels.device).unsqueeze(1)
    return per_sample_loss(logits, batch.labels.masked_fill(prompt, -100))


LOSSES: dict[str, LossFn] = {"tokens": token_loss, "answer": answer_loss}


def resolve_loss(loss: str | LossFn) -> LossFn:
    """The loss function for a config value: a built-in name or a callable(logits, batch) -> (B,)."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise LayerIFError(f"--loss must be one of {', '.join(LOSSES)} (or a callable in the API), got {loss!r}")
    return LOSSES[loss]

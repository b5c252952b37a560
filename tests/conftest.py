"""Shared fixtures: tiny models built in code (random weights) and tiny data; no downloads."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never download: every hub lookup fails fast instead.
for _flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_flag, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue cat dog bird fish tree").split()


class TinyTokenizer:
    """A whitespace word tokenizer with the Hugging Face call surface the package uses."""

    def __init__(self, vocab_size: int = 64):
        self.vocab = {word: i + 3 for i, word in enumerate(WORDS)}
        self.pad_token_id, self.eos_token_id, self.bos_token_id = 0, 1, 2
        self.pad_token, self.eos_token = "<pad>", "</s>"
        self.padding_side = "right"
        self.vocab_size = vocab_size

    def _encode(self, text: str) -> list[int]:
        ids = [self.bos_token_id]
        for word in text.replace("\n", " ").split():
            ids.append(self.vocab.get(word.strip(".,?:'").lower(), 3 + (sum(map(ord, word)) % (self.vocab_size - 3))))
        return ids

    def __call__(self, texts, truncation=True, max_length=None, add_special_tokens=True, **_):
        rows = [self._encode(t) for t in ([texts] if isinstance(texts, str) else texts)]
        if truncation and max_length is not None:
            rows = [row[:max_length] for row in rows]
        return {"input_ids": rows}


def tiny_llama(layers: int = 4, hidden: int = 32, seed: int = 0, vocab: int = 64, dtype=torch.float32):
    """A random Llama with `layers` blocks, built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
        bos_token_id=2, eos_token_id=1,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.config._attn_implementation = "eager"
    return model.eval()


def tiny_texts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 12) -> list[str]:
    """n random word sequences of varying length (deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        length = int(torch.randint(min_words, max_words + 1, (1,), generator=generator))
        picks = torch.randint(0, len(WORDS), (length,), generator=generator).tolist()
        texts.append(" ".join(WORDS[i] for i in picks))
    return texts


@pytest.fixture
def tokenizer():
    return TinyTokenizer()


@pytest.fixture
def llama():
    return tiny_llama()

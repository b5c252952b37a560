"""Builders for tests: tiny models of several architectures and a real HF tokenizer made in code."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import WORDS


def tiny_gpt2(layers: int = 2, hidden: int = 32, seed: int = 0, vocab: int = 64):
    """A random GPT-2 (Conv1D weights) built from a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                        bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    model.config._attn_implementation = "eager"
    return model.eval()


def tiny_neox(layers: int = 2, hidden: int = 32, seed: int = 0, vocab: int = 64):
    """A random GPT-NeoX (Pythia layout) built from a config."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=2 * hidden, max_position_embeddings=128, bos_token_id=2,
                           eos_token_id=1, pad_token_id=0)
    model = GPTNeoXForCausalLM(config)
    model.config._attn_implementation = "eager"
    return model.eval()


def hf_tokenizer(directory: Path | None = None):
    """A real `PreTrainedTokenizerFast` (word level) over the test vocabulary; saved to `directory` if given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    for extra in ("what", "is", "the", "answer", "of", "plus", "capital", "opposite", "word"):
        vocab.setdefault(extra, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                        bos_token="<s>", unk_token="<unk>")
    if directory is not None:
        tokenizer.save_pretrained(directory)
    return tokenizer


def save_tiny_model(directory: Path, layers: int = 3, seed: int = 0) -> Path:
    """A tiny Llama + tokenizer saved as a local Hugging Face model directory."""
    from tests.conftest import tiny_llama

    model = tiny_llama(layers=layers, seed=seed)
    model.save_pretrained(directory)
    hf_tokenizer(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows in the instruction / input / output / answer format."""
    from tests.conftest import tiny_texts

    texts = tiny_texts(n, seed=seed)
    return [{"instruction": f"what is {text}", "input": "", "output": f"answer {text.split()[0]}",
             "answer": text.split()[0]} for text in texts]


def run_cli(*args: str) -> int:
    """Run the `layerif` command in-process and return its exit code."""
    from layerif.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0

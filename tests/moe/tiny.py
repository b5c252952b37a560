"""Tiny models (Llama, GPT-2 Conv1D) and a character tokenizer built in code for the LoRA-MoE tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch

SHARED_DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer():
    """A Hugging Face fast tokenizer over single printable characters (BOS added, pad 0, eos 2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(set(string.printable)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.padding_side = "right"
    return tokenizer


VOCAB = len(SPECIALS) + len(set(string.printable))


def tiny_llama(layers: int = 4, seed: int = 0):
    """Random Llama: hidden 64, MLP 128, 4 heads, 2 KV heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(layers: int = 3, seed: int = 0):
    """Random GPT-2 (Conv1D projections): 64 wide, 4 heads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=512, vocab_size=VOCAB,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def save_tiny(model, directory: Path) -> Path:
    """Save a tiny model with the char tokenizer as a local model folder."""
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def task_rows(n: int, seed: int = 0) -> list[dict]:
    """A two-label toy task in the benchmark's row format: is the number even?"""
    generator = torch.Generator().manual_seed(seed)
    numbers = torch.randint(0, 100, (n,), generator=generator).tolist()
    rows = []
    for number in numbers:
        label = "even" if number % 2 == 0 else "odd"
        rows.append({"instruction": f"Is {number} even or odd?\n", "input": "", "output": f"Answer: {label}.",
                     "answer": label})
    return rows

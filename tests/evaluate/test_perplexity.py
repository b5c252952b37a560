"""Perplexity over non-overlapping windows, against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from layerif.errors import LayerIFError
from layerif.evaluate.perplexity import perplexity
from tests.conftest import tiny_llama, tiny_texts
from tests.helpers import hf_tokenizer


def test_perplexity_matches_direct_computation(tmp_path):
    model, tokenizer = tiny_llama(layers=2), hf_tokenizer()
    path = tmp_path / "text.txt"
    path.write_text("\n".join(tiny_texts(40, seed=2)))
    result = perplexity(model, tokenizer, path, length=16, batch_size=3, quiet=True)
    ids = tokenizer("\n\n".join(path.read_text().splitlines()), return_tensors="pt")["input_ids"][0]
    n = len(ids) // 16
    nll, count = 0.0, 0
    for w in range(n):
        window = ids[w * 16 : (w + 1) * 16]
        with torch.no_grad():
            logprobs = model(input_ids=window[None]).logits[0, :-1].log_softmax(-1)
        nll -= float(logprobs.gather(1, window[1:, None]).sum())
        count += 15
    assert result["windows"] == n and result["tokens_scored"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    first = perplexity(model, tokenizer, path, length=16, max_windows=2, quiet=True)
    assert first["windows"] == 2 and first["perplexity"] != pytest.approx(result["perplexity"])
    with pytest.raises(LayerIFError, match="fewer than one window"):
        perplexity(model, tokenizer, path, length=100_000, quiet=True)


def test_perplexity_returns_per_window_nll(tmp_path):
    model, tokenizer = tiny_llama(layers=2), hf_tokenizer()
    path = tmp_path / "text.txt"
    path.write_text("\n".join(tiny_texts(40, seed=2)))
    result = perplexity(model, tokenizer, path, length=16, batch_size=3, max_windows=7, quiet=True)
    ids = tokenizer("\n\n".join(path.read_text().splitlines()), return_tensors="pt")["input_ids"][0]
    assert len(result["window_nll"]) == 7 and result["window_tokens"] == [15] * 7
    for w in (0, 3, 6):  # each window's summed NLL, computed on its own
        window = ids[w * 16 : (w + 1) * 16]
        with torch.no_grad():
            logprobs = model(input_ids=window[None]).logits[0, :-1].log_softmax(-1)
        assert result["window_nll"][w] == pytest.approx(-float(logprobs.gather(1, window[1:, None]).sum()), rel=1e-5)
    assert result["mean_nll"] == pytest.approx(sum(result["window_nll"]) / sum(result["window_tokens"]))

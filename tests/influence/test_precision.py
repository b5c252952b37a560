"""bf16 / fp16 weights: gradients in the model dtype, estimator maths in float32; ranks agree with float32."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from layerif.api import ScoreConfig, score_layers
from tests.conftest import TinyTokenizer, tiny_llama, tiny_texts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layer_ranking_matches_float32(dtype):
    train, val = tiny_texts(24, seed=70), tiny_texts(6, seed=71)
    reference = score_layers(tiny_llama(layers=8, hidden=64, seed=9), TinyTokenizer(), train, val,
                             ScoreConfig(quiet=True))
    half = score_layers(tiny_llama(layers=8, hidden=64, seed=9, dtype=dtype), TinyTokenizer(), train, val,
                        ScoreConfig(quiet=True))
    assert half.q.dtype == torch.float32 and torch.isfinite(half.q).all()
    rho = spearmanr(reference.scores("S_pos"), half.scores("S_pos")).statistic
    assert rho >= 0.95, rho

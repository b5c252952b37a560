"""PL_Alpha_Hill and OWL outlier metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerif.allocate.metrics import (
    block_alpha_hill,
    esd,
    hill_fit,
    outlier_ratio,
    pl_alpha_hill,
    wanda_scores,
)
from layerif.errors import LayerIFError


def naive_hill(eigs: torch.Tensor, window=(0.95, 1.5)) -> tuple[float, float]:
    """Candidate-by-candidate reference of the xmin_peak Hill fit (loops, float64)."""
    eigs = eigs[eigs > 1e-5].double()
    logs = eigs.log()
    counts, edges = np.histogram(np.log10(eigs.numpy()), bins=100)
    peak = 10 ** edges[int(np.argmax(counts))]
    best = (math.inf, None)
    n_total = len(eigs)
    for i in range(n_total - 1):
        xmin = float(eigs[i])
        if not (window[0] * peak <= xmin <= window[1] * peak):
            continue
        n = n_total - i
        alpha = 1 + n / float(logs[i:].sum() - n * logs[i])
        seq = torch.arange(n).double() / n
        dist = float(torch.max(torch.abs(1 - (eigs[i:] / xmin) ** (1 - alpha) - seq)))
        if dist < best[0]:
            best = (dist, alpha)
    return best[1], best[0]


def test_vectorised_fit_matches_loop():
    generator = torch.Generator().manual_seed(0)
    for shape in [(48, 80), (96, 32), (64, 64)]:
        weight = torch.randn(shape, generator=generator) @ torch.diag(torch.rand(shape[1], generator=generator) ** 3)
        eigs = esd(weight)
        alpha, _, distance = hill_fit(eigs)
        ref_alpha, ref_distance = naive_hill(eigs)
        assert alpha == pytest.approx(ref_alpha, rel=1e-9)
        assert distance == pytest.approx(ref_distance, rel=1e-9)


def test_pareto_spectrum_recovers_exponent():
    rng = np.random.default_rng(1)
    for true_alpha in (2.5, 4.0):
        # Pareto(xmin = 1) samples with density ∝ x^-alpha
        samples = (1 - rng.random(4000)) ** (-1 / (true_alpha - 1))
        alpha, xmin, _ = hill_fit(torch.tensor(np.sort(samples)))
        assert abs(alpha - true_alpha) < 0.25
        assert xmin < 1.6


def test_heavier_tail_gives_smaller_alpha():
    generator = torch.Generator().manual_seed(2)
    gaussian = torch.randn(128, 256, generator=generator)
    u, _, v = torch.linalg.svd(gaussian, full_matrices=False)
    quantiles = 1 - torch.arange(1, 129, dtype=torch.float64) / 129
    heavy_eigs = quantiles ** (-1 / (2.0 - 1))  # Pareto quantiles, alpha = 2
    heavy = u @ torch.diag(heavy_eigs.sqrt().float()) @ v
    assert pl_alpha_hill(heavy) < pl_alpha_hill(gaussian)


def test_alpha_is_invariant_to_transpose_and_scale():
    weight = torch.randn(40, 70, generator=torch.Generator().manual_seed(3))
    assert pl_alpha_hill(weight) == pytest.approx(pl_alpha_hill(weight.t()), rel=1e-4)
    assert pl_alpha_hill(weight) == pytest.approx(pl_alpha_hill(weight * 7), rel=1e-4)


def test_bad_weight_raises():
    with pytest.raises(LayerIFError):
        pl_alpha_hill(torch.zeros(3))
    with pytest.raises(LayerIFError):
        pl_alpha_hill(torch.zeros(4, 4))


def test_block_alpha_hill_is_block_mean(tiny_llama):
    from layerif.models import select_matrices
    from layerif.models.blocks import weight_of

    values = block_alpha_hill(tiny_llama)
    refs = select_matrices(tiny_llama)
    assert values.shape == (len(refs),)
    expected = [np.mean([pl_alpha_hill(weight_of(ref)) for ref in block]) for block in refs]
    np.testing.assert_allclose(values, expected)
    attn_only = block_alpha_hill(tiny_llama, modules="attn")
    assert not np.allclose(values, attn_only)


def test_outlier_ratio_and_wanda_scores():
    scores = torch.ones(100)
    scores[:3] = 50.0
    assert outlier_ratio(scores, m=5) == pytest.approx(0.03)
    assert outlier_ratio(torch.ones(10), m=5) == 0.0
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    np.testing.assert_allclose(wanda_scores(weight, torch.tensor([4.0, 9.0])), [[2.0, 6.0], [6.0, 1.5]])

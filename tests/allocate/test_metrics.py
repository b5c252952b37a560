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


def naive_hill(eigs: torch.Tensor) -> tuple[float, float]:
    """Candidate-by-candidate reference of the xmin_peak Hill fit (loops, float64)."""
    eigs = eigs[eigs > 1e-5].double()
    logs = eigs.log()
    counts, edges = np.histogram(np.log10(eigs.numpy()), bins=100)
    peak = 10 ** edges[int(np.argmax(counts))]
    low, high = math.log10(0.95 * peak), 1.5 * peak  # the references' bounds (lower one in log10 units)
    best = (math.inf, None)
    n_total = len(eigs)
    for i in range(n_total - 1):
        xmin = float(eigs[i])
        if not (low <= xmin <= high):
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


def heavy_tailed(seed: int, shape: tuple[int, int], scale: float) -> torch.Tensor:
    """A random matrix with a heavy-tailed spectrum: Gaussian times a cubed-uniform column scaling, scaled."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) @ torch.diag(torch.rand(shape[1], generator=generator) ** 3) * scale


def transcribed_alpha(weight: torch.Tensor) -> tuple[float, float]:
    """PL_Alpha_Hill written out from the published recipe, independently of the library (numpy, loops).

    Hill / Clauset et al.: for xmin = λ_k, α = 1 + n / Σ_{λ ≥ xmin} ln(λ / xmin), D = KS distance between the
    tail's empirical CDF and 1 − (λ / xmin)^(1 − α); pick the xmin with the least D among the eigenvalues
    within WeightWatcher's xmin_peak range (log10(0.95·peak), 1.5·peak), peak = left edge of the fullest of
    100 bins of the log10 spectrum.
    """
    values = np.linalg.svd(weight.double().numpy(), compute_uv=False) ** 2
    values = np.sort(values[values > 1e-5])
    counts, edges = np.histogram(np.log10(values), bins=100)
    peak = 10 ** edges[np.argmax(counts)]
    best_d, best_alpha = np.inf, None
    for k, xmin in enumerate(values[:-1]):
        if xmin < np.log10(0.95 * peak) or xmin > 1.5 * peak:
            continue
        tail = values[k:]
        alpha = 1 + len(tail) / np.sum(np.log(tail / xmin))
        d = np.max(np.abs(1 - (tail / xmin) ** (1 - alpha) - np.arange(len(tail)) / len(tail)))
        if d < best_d:
            best_d, best_alpha = d, alpha
    return best_alpha, best_d


HEAVY_CASES = [(0, (200, 300), 1.0), (1, (256, 128), 0.05), (2, (300, 300), 3.0), (3, (96, 400), 0.02)]


@pytest.mark.parametrize("seed,shape,scale", HEAVY_CASES)
def test_alpha_matches_an_independent_transcription(seed, shape, scale):
    weight = heavy_tailed(seed, shape, scale)
    alpha, distance = transcribed_alpha(weight)
    assert pl_alpha_hill(weight) == pytest.approx(alpha, rel=1e-4)
    assert hill_fit(esd(weight))[2] == pytest.approx(distance, rel=1e-3)


@pytest.mark.parametrize("seed,shape,scale", HEAVY_CASES)
def test_alpha_matches_weightwatcher(seed, shape, scale):
    """Parity with WeightWatcher's own xmin_peak alpha (test-only extra `parity`; skipped when absent)."""
    import logging
    import warnings

    ww = pytest.importorskip("weightwatcher")
    pytest.importorskip("powerlaw")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    weight = heavy_tailed(seed, shape, scale)
    layer = torch.nn.Linear(shape[1], shape[0], bias=False)
    layer.weight.data = weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = ww.WeightWatcher(model=torch.nn.Sequential(layer)).analyze(fix_fingers="xmin_peak",
                                                                                  pl_package="powerlaw")
    reference = float(details["alpha"].iloc[0])
    if reference < 0:
        pytest.skip("this weightwatcher/powerlaw pair cannot fit (weightwatcher needs powerlaw 1.x)")
    assert hill_fit(esd(weight), weightwatcher=True)[0] == pytest.approx(reference, rel=1e-4)
    assert hill_fit(esd(weight), weightwatcher=True)[1] == pytest.approx(float(details["xmin"].iloc[0]), rel=1e-4)

"""Pruners on single matrices: exact counts, Wanda's per-row groups, SparseGPT's reconstruction."""

from __future__ import annotations

import pytest
import torch

from layerif.errors import LayerIFError
from layerif.prune.pruners import magnitude_mask, row_smallest_mask, sparsegpt_prune, wanda_mask


def data(d_out: int = 48, d_in: int = 96, tokens: int = 400, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=generator)
    scale = torch.rand(d_in, generator=generator) * 4  # uneven feature norms make Wanda differ from magnitude
    x = torch.randn(tokens, d_in, generator=generator) * scale
    return weight, x


@pytest.mark.parametrize("sparsity", [0.0, 0.013, 0.5, 0.7, 0.9])
def test_masks_prune_exactly_the_ratio(sparsity):
    weight, x = data()
    expected = round(weight.numel() * sparsity)
    assert int(magnitude_mask(weight, sparsity).sum()) == expected
    mask = wanda_mask(weight, (x * x).mean(0), sparsity)
    assert int(mask.sum()) == expected
    per_row = mask.sum(1)
    assert int(per_row.max() - per_row.min()) <= 1
    pruned = sparsegpt_prune(weight, 2 * x.t() @ x / len(x), sparsity)
    assert int((pruned == 0).sum()) == expected


def test_magnitude_prunes_smallest_and_wanda_the_smallest_product_per_row():
    weight, x = data(seed=1)
    mask = magnitude_mask(weight, 0.5)
    assert weight.abs()[mask].max() <= weight.abs()[~mask].min()
    norms = (x * x).mean(0)
    mask = wanda_mask(weight, norms, 0.5)
    score = weight.abs() * norms.sqrt()
    for row in range(weight.shape[0]):
        assert score[row][mask[row]].max() <= score[row][~mask[row]].min()
    assert not torch.equal(mask, row_smallest_mask(weight.abs(), int(mask.sum())))


def test_sparsegpt_reconstructs_outputs_better_than_masking():
    weight, _ = data(seed=2)
    generator = torch.Generator().manual_seed(5)
    # correlated features (as in real activations) leave room for the OBS weight updates
    x = torch.randn(400, 24, generator=generator) @ torch.randn(24, 96, generator=generator)
    x += 0.1 * torch.randn(400, 96, generator=generator)
    hessian = 2 * x.t() @ x / len(x)
    pruned = sparsegpt_prune(weight, hessian, 0.6, block_size=32)
    wanda = weight.masked_fill(wanda_mask(weight, (x * x).mean(0), 0.6), 0)
    magnitude = weight.masked_fill(magnitude_mask(weight, 0.6), 0)
    reference = x @ weight.t()

    def error(w):
        return float(((x @ w.t() - reference) ** 2).mean())

    assert error(pruned) < 0.5 * min(error(wanda), error(magnitude))


def test_sparsegpt_dead_features_and_shape_errors():
    weight, x = data(d_in=40, seed=3)
    x[:, 5] = 0  # a feature never seen in calibration
    pruned = sparsegpt_prune(weight, 2 * x.t() @ x / len(x), 0.5, block_size=16)
    assert torch.all(pruned[:, 5] == 0)
    with pytest.raises(LayerIFError):
        sparsegpt_prune(weight, torch.eye(7), 0.5)

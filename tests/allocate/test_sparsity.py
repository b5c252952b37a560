"""Sparsity allocations: exact mean, bounds, monotonicity, mirroring, smoothing, errors, ratios.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.signal import savgol_filter

from layerif.allocate.sparsity import (
    MAX_RATIO,
    SparsityAllocation,
    allocate_from_scores,
    allocate_sparsity,
    block_ratios,
    layerif_ratios,
    linear_map_ratios,
    owl_ratios,
    smoothed_scores,
    weighted_mean,
)
from layerif.errors import LayerIFError
from layerif.scores import LayerScores

RNG = np.random.default_rng(0)
N_BLOCKS = 30


def random_case(seed: int, equal: bool = False):
    rng = np.random.default_rng(seed)
    scores = rng.gamma(1.0, 1.0, N_BLOCKS) * 10 ** rng.uniform(-3, 3)
    params = np.full(N_BLOCKS, 1000) if equal else rng.integers(500, 5000, N_BLOCKS)
    return scores, params


def all_allocations(scores, params, sparsity, epsilon):
    inputs = {"scores": scores, "alpha": 2 + scores / scores.max(), "outlier": scores / scores.sum()}
    return {name: block_ratios(name, sparsity, params, epsilon=epsilon, **inputs)[0]
            for name in ("layerif", "reversed", "uniform", "owl", "alphapruning")}


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7, 0.9, 0.97])
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3, 0.6, 0.95])
def test_every_allocation_hits_target_within_bounds(sparsity, epsilon):
    for seed in range(3):
        scores, params = random_case(seed)
        for name, ratios in all_allocations(scores, params, sparsity, epsilon).items():
            assert abs(weighted_mean(ratios, params) - sparsity) < 1e-6, name
            assert ratios.min() >= 0 and ratios.max() <= MAX_RATIO, name


def test_clipping_rebalances_onto_other_blocks():
    scores = np.zeros(N_BLOCKS)
    scores[-1] = 1.0  # one sharp peak: its unclipped ratio exceeds 1 at 70 % with ε = 0.6
    params = np.full(N_BLOCKS, 100)
    ratios, unclipped, _ = layerif_ratios(scores, params, 0.7, 0.6, smooth_scores=False)
    assert unclipped.max() > 1.0
    assert ratios[-1] == pytest.approx(MAX_RATIO)
    assert weighted_mean(ratios, params) == pytest.approx(0.7, abs=1e-12)
    free = ratios < MAX_RATIO
    # the unclipped blocks keep the linear profile, only rescaled
    np.testing.assert_allclose(ratios[free] / unclipped[free], (ratios[free] / unclipped[free])[0])


def test_layerif_higher_score_higher_ratio_and_reversed_mirrors():
    scores, params = random_case(5, equal=True)
    ratios, _, processed = layerif_ratios(scores, params, 0.5, 0.2, smooth_scores=False)
    order = np.argsort(scores)
    assert np.all(np.diff(ratios[order]) >= -1e-12)
    assert ratios[np.argmax(scores)] > ratios[np.argmin(scores)]
    reversed_ratios, _, mirrored = layerif_ratios(scores, params, 0.5, 0.2, smooth_scores=False, reverse=True)
    np.testing.assert_allclose(processed + mirrored, processed.max() + processed.min(), atol=1e-12)
    # both are exact affine maps of the score, with opposite slopes and the same relative spread (1 ± ε)
    for values, sign in ((ratios, 1), (reversed_ratios, -1)):
        slope, intercept = np.polyfit(processed, values, 1)
        np.testing.assert_allclose(values, slope * processed + intercept, atol=1e-12)
        assert np.sign(slope) == sign
        assert values.max() / values.min() == pytest.approx(1.2 / 0.8)
    smoothed, _, s = layerif_ratios(scores, params, 0.5, 0.2)
    assert np.all(np.diff(smoothed[np.argsort(s)]) >= -1e-12)  # monotone in the smoothed score


def test_smoothing_is_savgol_on_minmax_abs_scores():
    scores = RNG.normal(size=N_BLOCKS) * 5
    normalised = (np.abs(scores) - np.abs(scores).min()) / (np.abs(scores).max() - np.abs(scores).min())
    np.testing.assert_allclose(smoothed_scores(scores), savgol_filter(normalised, 7, 3), atol=1e-12)
    np.testing.assert_allclose(smoothed_scores(scores, smooth_scores=False), normalised)
    assert not np.allclose(smoothed_scores(scores), normalised)


def test_linear_map_matches_alphapruning_formula_without_clipping():
    metric, params = random_case(7)
    ratios, unclipped = linear_map_ratios(metric, params, 0.5, 0.1)
    shape = 0.9 + 0.2 * (metric - metric.min()) / (metric.max() - metric.min())
    expected = shape * 0.5 * params.sum() / np.dot(params, shape)
    np.testing.assert_allclose(ratios, expected, rtol=1e-12)
    np.testing.assert_allclose(unclipped, expected, rtol=1e-12)


def test_owl_spread_is_two_lambda_and_denser_where_more_outliers():
    outlier = RNG.uniform(0, 0.05, N_BLOCKS)
    ratios = owl_ratios(outlier, np.full(N_BLOCKS, 10), 0.5, lam=0.08)
    assert ratios.max() - ratios.min() == pytest.approx(0.16)
    assert ratios[np.argmax(outlier)] == ratios.min()
    assert ratios.mean() == pytest.approx(0.5)


def test_uniform_and_degenerate_scores():
    params = np.arange(1, N_BLOCKS + 1) * 10
    ratios = block_ratios("layerif", 0.6, params, scores=np.ones(N_BLOCKS))[0]
    np.testing.assert_allclose(ratios, 0.6)
    np.testing.assert_allclose(block_ratios("uniform", 0.6, params)[0], 0.6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"allocation": "layerif", "sparsity": 0.0},
        {"allocation": "layerif", "sparsity": 1.0},
        {"allocation": "layerif", "sparsity": 0.995},
        {"allocation": "layerif", "sparsity": float("nan")},
        {"allocation": "layerif", "sparsity": 0.5, "epsilon": 1.0},
        {"allocation": "layerif", "sparsity": 0.5, "epsilon": -0.1},
        {"allocation": "layerif", "sparsity": 0.5, "scores": np.ones(N_BLOCKS - 1)},
        {"allocation": "layerif", "sparsity": 0.5, "scores": None},
        {"allocation": "layerif", "sparsity": 0.5, "scores": np.array([np.nan] * N_BLOCKS)},
        {"allocation": "bogus", "sparsity": 0.5},
        {"allocation": "owl", "sparsity": 0.5},
    ],
)
def test_bad_input_raises(kwargs):
    kwargs.setdefault("scores", np.ones(N_BLOCKS))
    with pytest.raises(LayerIFError):
        block_ratios(block_params=np.full(N_BLOCKS, 5), **kwargs)


def make_scores(n_layers: int, module_names: list[str], params: list[int], seed: int = 0) -> LayerScores:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n_layers, 20, generator=generator) * torch.linspace(0.5, 3, n_layers).unsqueeze(1)
    q_modules = q.unsqueeze(1).repeat(1, len(module_names), 1) / len(module_names)
    return LayerScores(q=q, module_names=module_names, q_modules=q_modules, n_params=params, n_val=5)


def test_model_allocations(tiny_llama, tmp_path):
    from layerif.models import select_matrices

    refs = select_matrices(tiny_llama)
    params = [sum(ref.n_params for ref in block) for block in refs]
    scores = make_scores(len(refs), [ref.name for ref in refs[0]], params)
    scores.save(tmp_path / "run")
    loaded = LayerScores.load(tmp_path / "run")
    calib = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    for name in ("layerif", "reversed", "uniform", "alphapruning", "owl"):
        plan = allocate_sparsity(tiny_llama, name, 0.6, scores=loaded, epsilon=0.3, calib_ids=calib, batch_size=3)
        assert plan.mean_sparsity == pytest.approx(0.6, abs=1e-6)
        assert len(plan.matrix_ratios) == sum(len(block) for block in refs)
        assert all(0 <= r <= MAX_RATIO for r in plan.matrix_ratios.values())
        assert plan.matrix_ratios["model.layers.2.mlp.down_proj"] == pytest.approx(plan.block_ratios[2])
        plan.save(tmp_path / name)
        again = SparsityAllocation.load(tmp_path / name)
        np.testing.assert_allclose(again.block_ratios, plan.block_ratios)
        data = json.loads((tmp_path / name / "ratios.json").read_text())
        assert {"block_ratios", "matrix_ratios", "metric", "arguments"} <= set(data)
    plan = allocate_sparsity(tiny_llama, "alphapruning", 0.6)
    assert plan.metric_name == "pl_alpha_hill" and len(plan.metric) == len(refs)
    # a JSON list is taken as given
    (tmp_path / "list.json").write_text(json.dumps([0.1, 0.2, 0.3, 0.4]))
    plan = allocate_sparsity(tiny_llama, str(tmp_path / "list.json"), 0.5)
    np.testing.assert_allclose(plan.block_ratios, [0.1, 0.2, 0.3, 0.4])
    for bad in ([0.1, 0.2], [0.1, 0.2, 0.3, 1.0], {"x": 1}, "nope"):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(LayerIFError):
            allocate_sparsity(tiny_llama, str(tmp_path / "bad.json"), 0.5)
    with pytest.raises(LayerIFError, match="blocks"):
        allocate_sparsity(tiny_llama, "layerif", 0.5, scores=make_scores(3, ["a"], [1, 1, 1]))


def test_allocate_from_scores_uses_scored_parameters():
    scores = make_scores(12, ["self_attn.q_proj", "mlp.up_proj"], list(range(100, 1300, 100)))
    plan = allocate_from_scores(scores, 0.7, epsilon=0.3)
    assert plan.mean_sparsity == pytest.approx(0.7, abs=1e-9)
    assert len(plan.matrix_ratios) == 24
    s = scores.scores("S_pos")
    smoothed = savgol_filter((s - s.min()) / (s.max() - s.min()), 7, 3)
    np.testing.assert_allclose(plan.metric, smoothed, atol=1e-12)


@pytest.mark.parametrize("sparsity,epsilon", [(0.5, 0.1), (0.7, 0.3), (0.9, 0.6)])
def test_controls_keep_the_target_and_the_layerif_map(sparsity, epsilon):
    """depth: the LayerIF map applied to the block index; random: the LayerIF ratios permuted (equal blocks)."""
    from layerif.allocate.sparsity import placement

    for seed in range(5):
        scores, params = random_case(seed, equal=True)
        layerif = block_ratios("layerif", sparsity, params, scores=scores, epsilon=epsilon)[0]
        shuffled = block_ratios("random", sparsity, params, scores=scores, epsilon=epsilon, seed=seed)[0]
        np.testing.assert_allclose(shuffled, layerif[placement(N_BLOCKS, seed)], rtol=0, atol=1e-12)
        assert abs(weighted_mean(shuffled, params) - sparsity) < 1e-9
        depth, name, processed, _ = block_ratios("depth", sparsity, params, epsilon=epsilon)
        assert name == "block_index_processed"
        np.testing.assert_allclose(processed, np.linspace(0, 1, N_BLOCKS), atol=1e-12)  # smoothing: no-op on a line
        assert abs(weighted_mean(depth, params) - sparsity) < 1e-9 and np.all(np.diff(depth) >= 0)
        expected = linear_map_ratios(np.arange(N_BLOCKS), params, sparsity, epsilon)[0]
        np.testing.assert_allclose(depth, expected, atol=1e-12)
        # unequal blocks: random still meets the target exactly (the input is permuted, then mapped)
        scores, unequal = random_case(seed)
        shuffled = block_ratios("random", sparsity, unequal, scores=scores, epsilon=epsilon, seed=seed)[0]
        assert abs(weighted_mean(shuffled, unequal) - sparsity) < 1e-9
    assert not np.array_equal(placement(N_BLOCKS, 0), placement(N_BLOCKS, 1))
    with pytest.raises(LayerIFError, match="scores"):
        block_ratios("random", 0.5, np.full(N_BLOCKS, 10))


def test_ratios_from_scores_use_the_model_module_names_when_the_run_recorded_them():
    """One naming scheme: allocate_from_scores keys equal allocate_sparsity's when the run knows the block path."""
    from layerif.allocate.sparsity import allocate_from_scores, allocate_sparsity
    from layerif.models import select_matrices
    from tests.conftest import tiny_llama

    model = tiny_llama(layers=3)
    per_block = select_matrices(model, modules="all")
    names = [ref.name for ref in per_block[0]]
    q = torch.randn(3, 10, generator=torch.Generator().manual_seed(0)) + torch.arange(3.0).unsqueeze(1)
    block_params = [sum(ref.n_params for ref in refs) for refs in per_block]
    scores = LayerScores(q=q, module_names=names, q_modules=q.unsqueeze(1).repeat(1, len(names), 1) / len(names),
                         n_params=block_params, n_val=4, metadata={"model": {"blocks_path": "model.layers"}})
    from_scores = allocate_from_scores(scores, 0.5, 0.2, smooth_scores=False)
    with_model = allocate_sparsity(model, "layerif", 0.5, scores=scores, epsilon=0.2, smooth_scores=False)
    assert set(from_scores.matrix_ratios) == set(with_model.matrix_ratios)
    assert from_scores.matrix_ratios == pytest.approx(with_model.matrix_ratios)
    scores.metadata = {}
    assert all(key.startswith("blocks.") for key in allocate_from_scores(scores, 0.5, 0.2).matrix_ratios)

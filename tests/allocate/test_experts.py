"""Expert allocation: LayerIF rule, MoLA shapes, uniform, AlphaLoRA, reversed, explicit lists, experts.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layerif.allocate.experts import (
    ExpertAllocation,
    allocate_experts,
    alphalora_counts,
    layerif_counts,
    mola_counts,
    parse_counts,
    reversed_scores,
    top_k_for,
    uniform_counts,
)
from layerif.errors import LayerIFError


def _check(counts, budget, n_layers):
    counts = np.asarray(counts)
    assert counts.dtype.kind == "i"
    assert len(counts) == n_layers
    assert counts.sum() == budget
    assert counts.min() >= 1


@pytest.mark.parametrize("seed", range(25))
def test_layerif_random_scores_sum_and_monotone(seed):
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(1, 40))
    budget = int(n_layers + rng.integers(0, 6 * n_layers + 1))
    scores = rng.exponential(size=n_layers) * 10 ** rng.uniform(-6, 6)
    beta = float(rng.choice([0.5, 1.0, 1.5, 2.0, 2.5, 3.0]))
    counts = layerif_counts(scores, budget, beta)
    _check(counts, budget, n_layers)
    # Higher score never gets fewer experts.
    order = np.argsort(scores)
    assert np.all(np.diff(counts[order]) >= 0)


def test_layerif_matches_the_formula():
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    counts = layerif_counts(scores, 14, beta=2.0)
    shares = scores**2 / (scores**2).sum() * (14 - 4)  # 0.333, 1.333, 3.0, 5.333
    floor = np.floor(shares).astype(int) + 1  # 1, 2, 4, 6 -> 13, one left for the largest remainder
    expected = floor.copy()
    expected[np.argmax(shares - np.floor(shares))] += 1
    assert counts.tolist() == expected.tolist()


@pytest.mark.parametrize(
    "scores",
    [np.full(7, 3.2), np.zeros(7), np.array([0, 0, 1e12, 0, 0, 0, 0.0]), np.array([1e-300] * 6 + [2e-300]),
     np.array([1e200, 1, 2, 3, 4, 5, 6])],
    ids=["equal", "zeros", "one-huge", "tiny", "overflow"],
)
@pytest.mark.parametrize("budget", [7, 8, 20, 35, 36])
def test_layerif_edge_cases(scores, budget):
    counts = layerif_counts(scores, budget, beta=2.5)
    _check(counts, budget, 7)
    if np.all(scores == scores[0]):
        assert counts.max() - counts.min() <= 1
    if scores.max() >= 1e12 * max(np.sort(scores)[-2], 1e-300):
        assert counts[np.argmax(scores)] == budget - 6  # everything spare goes to the dominant layer


def test_layerif_negative_scores_are_shifted():
    counts = layerif_counts([-3.0, -1.0, 2.0], 9, beta=1.0)
    _check(counts, 9, 3)
    assert counts.tolist() == sorted(counts.tolist())


@pytest.mark.parametrize("bad", [dict(budget=3), dict(beta=0.0), dict(beta=-1.0), dict(budget=4.5)])
def test_layerif_bad_input(bad):
    arguments = dict(scores=[1.0, 2.0, 3.0, 4.0], budget=8, beta=2.5) | bad
    with pytest.raises(LayerIFError):
        layerif_counts(**arguments)


def test_nan_scores_rejected():
    with pytest.raises(LayerIFError):
        layerif_counts([1.0, float("nan")], 4)


def test_reversed_swaps_extremes():
    scores = np.array([1.0, 5.0, 2.0, 9.0])
    flipped = reversed_scores(scores)
    assert flipped.tolist() == [9.0, 5.0, 8.0, 1.0]
    forward = layerif_counts(scores, 20, 2.0)
    backward = layerif_counts(flipped, 20, 2.0)
    assert np.argmax(forward) == np.argmin(backward) == 3


def test_mola_shapes_exact_for_32_layers():
    for name, shape in {"mola-2468": (2, 4, 6, 8), "mola-8642": (8, 6, 4, 2), "mola-5555": (5, 5, 5, 5)}.items():
        counts = mola_counts(name, 32, 160)
        assert counts.tolist() == [v for v in shape for _ in range(8)]


@pytest.mark.parametrize("n_layers,budget", [(30, 150), (5, 9), (4, 4), (13, 100), (1, 3)])
def test_mola_any_layer_count(n_layers, budget):
    counts = mola_counts("mola-2468", n_layers, budget)
    _check(counts, budget, n_layers)
    assert np.all(np.diff(counts) >= 0)  # increasing shape stays increasing
    assert np.all(np.diff(mola_counts("mola-8642", n_layers, budget)) <= 0)


def test_uniform():
    assert uniform_counts(30, 150).tolist() == [5] * 30
    counts = uniform_counts(4, 10)
    _check(counts, 10, 4)
    assert counts.max() - counts.min() == 1


def test_alphalora_rounds_and_fixes_up():
    alphas = np.array([2.0, 3.0, 4.0, 6.0, 2.5])
    counts = alphalora_counts(alphas, 25, beta=2.5)
    _check(counts, 25, 5)
    ideal = 25 * alphas**2.5 / (alphas**2.5).sum()
    assert np.all(np.abs(counts - ideal) < 1.0 + 1e-9)
    order = np.argsort(alphas)
    assert np.all(np.diff(counts[order]) >= 0)
    with pytest.raises(LayerIFError):
        alphalora_counts([1.0, -1.0], 4)


def test_top_k():
    assert top_k_for([1, 2, 5]) == [1, 2, 2]
    assert top_k_for([1, 1]) == [1, 1]
    assert top_k_for([1, 3, 5], 3) == [1, 3, 3]
    with pytest.raises(LayerIFError):
        top_k_for([1, 2], 0)
    with pytest.raises(LayerIFError):
        top_k_for([1, 2], 3)  # more than any layer has


def test_explicit_list_and_errors():
    allocation = allocate_experts("3,1,2", n_layers=3)
    assert allocation.counts == [3, 1, 2] and allocation.top_k == [2, 1, 2]
    with pytest.raises(LayerIFError):
        allocate_experts("3,1", n_layers=3)
    with pytest.raises(LayerIFError):
        allocate_experts("3,1,2", n_layers=3, budget=7)
    with pytest.raises(LayerIFError):
        parse_counts("2,0,1")
    with pytest.raises(LayerIFError):
        parse_counts("two,one")


def test_allocate_experts_checks_layer_count():
    with pytest.raises(LayerIFError):
        allocate_experts("layerif", n_layers=5, budget=20, scores=[1.0, 2.0, 3.0])
    with pytest.raises(LayerIFError):
        allocate_experts("layerif", budget=20)  # no scores


def test_experts_json_round_trip(tmp_path):
    allocation = allocate_experts("layerif", budget=12, scores=[0.5, 1.0, 2.0, 0.1], beta=2.0)
    allocation.save(tmp_path)
    data = json.loads((tmp_path / "experts.json").read_text())
    assert data["counts"] == allocation.counts and sum(data["counts"]) == 12
    assert data["scores"] == [0.5, 1.0, 2.0, 0.1]
    assert data["arguments"]["beta"] == 2.0
    assert ExpertAllocation.load(tmp_path).counts == allocation.counts


def test_alphalora_from_a_model():
    from layerif.allocate.experts import model_alphas
    from tests.moe.tiny import tiny_llama

    alphas = model_alphas(tiny_llama())
    assert alphas.shape == (4,) and np.all(alphas > 0)
    allocation = allocate_experts("alphalora", budget=20, alphas=alphas)
    _check(allocation.counts, 20, 4)
    assert allocation.scores == pytest.approx(alphas.tolist())


@pytest.mark.parametrize("seed", range(6))
def test_depth_and_random_controls(seed):
    """random: the LayerIF counts permuted (sum T); depth: the LayerIF rule on the layer index, monotone."""
    rng = np.random.default_rng(seed)
    n_layers, budget = 30, 150
    scores = rng.gamma(2.0, 1.0, n_layers)
    reference = allocate_experts("layerif", n_layers, budget, scores=scores, beta=2.5)
    shuffled = allocate_experts("random", n_layers, budget, scores=scores, beta=2.5, seed=seed)
    _check(shuffled.counts, budget, n_layers)
    order = shuffled.arguments["placement"]
    assert sorted(order) == list(range(n_layers))
    assert shuffled.counts == [reference.counts[i] for i in order]
    assert shuffled.top_k == top_k_for(shuffled.counts)
    depth = allocate_experts("depth", n_layers, budget, beta=2.5)
    _check(depth.counts, budget, n_layers)
    assert np.all(np.diff(depth.counts) >= 0) and depth.counts[-1] > depth.counts[0]
    assert depth.counts == layerif_counts(np.arange(n_layers), budget, 2.5).tolist()
    # with scores, the ramp spans their range: same spread as LayerIF, placement by depth only
    values = np.random.default_rng(seed).uniform(1.0, 1.6, n_layers)
    ramped = allocate_experts("depth", n_layers, budget, scores=values, beta=2.5)
    ramp = values.min() + (values.max() - values.min()) * np.arange(n_layers) / (n_layers - 1)
    assert ramped.counts == layerif_counts(ramp, budget, 2.5).tolist()
    assert np.all(np.diff(ramped.counts) >= 0) and max(ramped.counts) - min(ramped.counts) < \
        max(depth.counts) - min(depth.counts)
    with pytest.raises(LayerIFError, match="scores"):
        allocate_experts("random", n_layers, budget)

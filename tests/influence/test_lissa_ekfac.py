"""LiSSA and EK-FAC against `exact` (the damped empirical Fisher solved directly) on the same factors."""

from __future__ import annotations

import pytest
import torch

from layerif.errors import LayerIFError
from layerif.gradients.factors import FactorChunk, MatrixFactors, chunk_sq_norms
from layerif.influence.ekfac import ekfac_basis, ekfac_solve
from layerif.influence.estimators import damping, influence_from_factors
from layerif.influence.lissa import LissaSettings, TokenFactors, lissa_solve


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny steps: a second thread only adds contention (x100 slower on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_factors(n: int = 12, d_in: int = 6, d_out: int = 5, max_tokens: int = 5, seed: int = 0,
                   batch: int = 4) -> MatrixFactors:
    """Float64 factors in batch chunks with padding (x non-zero, delta zero past each sample's length)."""
    generator = torch.Generator().manual_seed(seed)
    factors = MatrixFactors(n, d_in, d_out, torch.float64)
    for start in range(0, n, batch):
        index = torch.arange(start, min(start + batch, n))
        x = torch.randn(len(index), max_tokens, d_in, generator=generator, dtype=torch.float64)
        delta = torch.randn(len(index), max_tokens, d_out, generator=generator, dtype=torch.float64)
        lengths = torch.randint(1, max_tokens + 1, (len(index),), generator=generator)
        delta[torch.arange(max_tokens).unsqueeze(0) >= lengths.unsqueeze(1)] = 0.0
        factors.add(FactorChunk(index, x, delta), chunk_sq_norms(x, delta))
    return factors


def estimate(estimator: str, factors: MatrixFactors, v: torch.Tensor, val_each: torch.Tensor | None = None,
             options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None, dict | None]:
    """(I, pairwise I or None, solver info) through the per-matrix estimator step."""
    from layerif.gradients.context import RunContext
    from layerif.influence.estimators import MatrixInputs

    result = influence_from_factors(estimator, MatrixInputs(factors, v, val_each),
                                    RunContext(compute_dtype=factors.compute_dtype), options)
    return result.values, result.pairwise, result.info


def gradients(factors: MatrixFactors) -> torch.Tensor:
    """(n, d_out * d_in) materialised per-sample gradients in sample order."""
    index, grads = next(factors.materialised(max_bytes=1 << 40))
    out = torch.empty_like(grads)
    out[index] = grads
    return out


def exact_h(factors: MatrixFactors, v: torch.Tensor) -> torch.Tensor:
    """(G^T G / n + lambda I)^-1 v by a dense solve."""
    G = gradients(factors)
    lam = damping(factors.sq_norms, factors.d_in * factors.d_out)
    hessian = G.t() @ G / factors.n + lam * torch.eye(G.shape[1], dtype=torch.float64)
    return torch.linalg.solve(hessian, v.reshape(-1)).view_as(v)


def val_gradient(d_in: int = 6, d_out: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_token_factors_match_materialised_gradients():
    factors = random_factors()
    tokens = TokenFactors.from_factors(factors)
    G = gradients(factors)
    h = torch.randn(2, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(tokens.dots(h), h.reshape(2, -1) @ G.t())
    weights = torch.randn(2, 12, dtype=torch.float64)
    torch.testing.assert_close(tokens.weighted_sums(weights).reshape(2, -1), weights @ G)
    assert tokens.x.shape[0] < 12 * 5  # padding rows were dropped


def test_lissa_full_batch_converges_to_exact():
    factors, v = random_factors(), val_gradient()
    lam = damping(factors.sq_norms, 30)
    solved, info = lissa_solve(factors, v.unsqueeze(0), lam, factors.n, LissaSettings(depth=3000, batch_size=factors.n, tol=0))
    expected = exact_h(factors, v)
    torch.testing.assert_close(solved[0], expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    assert info.batch_size == factors.n and info.relative_change < 1e-6
    # and the influence through the estimator interface agrees with `exact` to 1e-3
    got, _, _ = estimate("lissa", factors, v, options={"lissa_depth": 3000, "lissa_batch": 100, "lissa_tol": 0})
    want, _, _ = estimate("exact", factors, v)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_lissa_short_series_has_not_converged_and_says_so():
    factors, v = random_factors(), val_gradient()
    lam = damping(factors.sq_norms, 30)
    short, info_short = lissa_solve(factors, v.unsqueeze(0), lam, factors.n, LissaSettings(depth=10, batch_size=factors.n, tol=0))
    _, info_long = lissa_solve(factors, v.unsqueeze(0), lam, factors.n, LissaSettings(depth=3000, batch_size=factors.n, tol=0))
    expected = exact_h(factors, v)
    assert (short[0] - expected).norm() > 0.05 * expected.norm()
    assert info_short.relative_change > 100 * info_long.relative_change
    assert info_short.top_eigenvalue > 0 and info_short.scale > info_short.top_eigenvalue


def test_lissa_mini_batches_approach_exact_and_are_seeded():
    factors, v = random_factors(n=24, seed=3), val_gradient()
    lam = damping(factors.sq_norms, 30)
    expected = exact_h(factors, v)
    guess = float((v / lam - expected).norm() / expected.norm())  # H = lambda I: 0.92 off
    errors = {}
    for batch in (4, 12):
        solved, info = lissa_solve(factors, v.unsqueeze(0), lam, factors.n, LissaSettings(depth=3000, batch_size=batch, seed=5, tol=0))
        again, _ = lissa_solve(factors, v.unsqueeze(0), lam, factors.n, LissaSettings(depth=3000, batch_size=batch, seed=5, tol=0))
        torch.testing.assert_close(solved, again, rtol=0, atol=0)
        errors[batch] = float((solved[0] - expected).norm() / expected.norm())
        assert info.batch_size == batch and info.restarts == 0
    # measured (second-half iterate average): 0.021 with batches of 4 and 0.0046 with 12 of 24 samples,
    # against 1e-14 for full batches; the last iterate alone was 0.047 and 0.030
    assert errors[4] < 0.05 and errors[4] < 0.1 * guess
    assert errors[12] < 0.01


def test_lissa_left_out_samples_are_not_drawn():
    factors, v = random_factors(n=12, seed=4), val_gradient()
    dropped = MatrixFactors(14, 6, 5, torch.float64)
    for chunk in factors.chunks:
        dropped.add(chunk, chunk_sq_norms(chunk.x, chunk.delta))
    zeros = torch.zeros(2, 5, 6, dtype=torch.float64)
    dropped.add(FactorChunk(torch.tensor([12, 13]), zeros, zeros[..., :5].clone()), torch.zeros(2))
    lam = damping(factors.sq_norms, 30)
    solved, _ = lissa_solve(dropped, v.unsqueeze(0), lam, 12, LissaSettings(depth=3000, batch_size=6, seed=0, tol=0))
    full, _ = lissa_solve(factors, v.unsqueeze(0), lam, 12, LissaSettings(depth=3000, batch_size=6, seed=0, tol=0))
    torch.testing.assert_close(solved, full)


def test_lissa_divergence_is_a_clear_error():
    factors, v = random_factors(), val_gradient()
    lam = damping(factors.sq_norms, 30)
    with pytest.raises(LayerIFError, match="lissa-scale"):
        lissa_solve(factors, v.unsqueeze(0), lam, factors.n, LissaSettings(depth=200, scale=lam, batch_size=factors.n))
    with pytest.raises(LayerIFError, match="lissa-depth"):
        lissa_solve(factors, v.unsqueeze(0), lam, factors.n, LissaSettings(depth=0))


def single_token_factors(xs: torch.Tensor, deltas: torch.Tensor) -> MatrixFactors:
    """One token per sample (plus a padding token): g_i = delta_i x_i^T."""
    n, d_in = xs.shape
    factors = MatrixFactors(n, d_in, deltas.shape[1], torch.float64)
    x = torch.stack([xs, torch.randn_like(xs)], 1)
    delta = torch.stack([deltas, torch.zeros_like(deltas)], 1)
    factors.add(FactorChunk(torch.arange(n), x, delta), chunk_sq_norms(x, delta))
    return factors


def test_ekfac_equals_exact_for_one_rank_one_sample():
    generator = torch.Generator().manual_seed(0)
    factors = single_token_factors(torch.randn(1, 6, generator=generator, dtype=torch.float64),
                                   torch.randn(1, 5, generator=generator, dtype=torch.float64))
    v = val_gradient()
    got, _, _ = estimate("ekfac", factors, v)
    want, _, _ = estimate("exact", factors, v)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    lam = damping(factors.sq_norms, 30)
    torch.testing.assert_close(ekfac_solve(ekfac_basis(factors, 1), v.unsqueeze(0), lam)[0], exact_h(factors, v))


def test_ekfac_equals_exact_when_inputs_and_deltas_are_orthogonal():
    # x_i orthogonal to each other, delta_i orthogonal to each other, with distinct norms (so the
    # eigenbases of A and S are unique): Q_S (x) Q_A then diagonalises G^T G exactly
    q_in = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    q_out = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64))[0]
    xs = q_in[:, :4].t() * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).unsqueeze(1)
    deltas = q_out[:, :4].t() * torch.tensor([0.5, 1.5, 0.7, 2.5], dtype=torch.float64).unsqueeze(1)
    factors = single_token_factors(xs, deltas)
    v = val_gradient()
    got, _, _ = estimate("ekfac", factors, v)
    want, _, _ = estimate("exact", factors, v)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())


def test_ekfac_is_an_approximation_in_general():
    factors, v = random_factors(n=40, seed=7), val_gradient()
    got, _, _ = estimate("ekfac", factors, v)
    want, _, _ = estimate("exact", factors, v)
    assert not torch.allclose(got, want, rtol=1e-3)  # the construction above is not vacuous
    from scipy.stats import spearmanr

    # measured: 0.69 on these Gaussian factors, whose Fisher has no Kronecker structure at all
    assert spearmanr(got.numpy(), want.numpy()).statistic > 0.5


@pytest.mark.parametrize("estimator", ["lissa", "ekfac"])
def test_pairwise_sums_to_summed_influence(estimator):
    factors = random_factors()
    each = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    options = {"lissa_depth": 300, "lissa_batch": 100}
    summed, pair, _ = estimate(estimator, factors, each.sum(0), each, options=options)
    assert pair.shape == (12, 3)
    torch.testing.assert_close(pair.sum(1), summed, rtol=1e-6, atol=1e-9 * summed.abs().max().item())


def test_lissa_info_is_reported():
    factors, v = random_factors(), val_gradient()
    _, _, info = estimate("lissa", factors, v, options={"lissa_depth": 50, "lissa_scale": 1e3})
    assert info["scale"] == 1e3 and info["depth"] == 50 and info["top_eigenvalue"] is None
    assert 0 < info["relative_change"] < 1


def _scores(estimator: str, train, val, layers: int = 2, **settings):
    from layerif.api import ScoreConfig, score_layers
    from tests.conftest import TinyTokenizer, tiny_llama

    config = ScoreConfig(estimator=estimator, compute_dtype="float64", batch_size=5, quiet=True, **settings)
    return score_layers(tiny_llama(layers=layers, seed=1), TinyTokenizer(), train, val, config)


@pytest.mark.parametrize("strategy", ["store", "spill"])
def test_engine_lissa_matches_exact_on_a_tiny_model(strategy):
    from tests.conftest import tiny_texts

    train, val = tiny_texts(10, seed=2), tiny_texts(3, seed=3)
    exact = _scores("exact", train, val).q_modules.double()
    # 10 samples <= the mini-batch size: full-batch steps, deterministic; measured error 4e-3 at depth 200
    lissa = _scores("lissa", train, val, lissa_depth=1000, strategy=strategy)
    torch.testing.assert_close(lissa.q_modules.double(), exact, rtol=1e-3, atol=1e-3 * exact.abs().max().item())
    info = lissa.metadata["estimator_info"]
    # every recursion stopped early on the default tolerance (1e-3), not at the 1000-step cap
    assert len(info) == 14 and all(entry["depth"] == 1000 and entry["converged"] and entry["steps"] < 1000
                                   and entry["relative_change"] < 1e-3 for entry in info.values())


def test_engine_ekfac_equals_exact_when_one_token_carries_the_loss():
    # one training row of two tokens: only position 0 predicts anything, so every matrix's gradient is
    # delta_0 x_0^T (rank one) and EK-FAC's eigenbasis diagonalises the one-sample Fisher exactly
    from tests.conftest import tiny_texts

    train, val = ["alpha"], tiny_texts(3, seed=3)
    exact = _scores("exact", train, val).q_modules.double()
    ekfac = _scores("ekfac", train, val).q_modules.double()
    assert exact.abs().max() > 0
    torch.testing.assert_close(ekfac, exact, rtol=1e-6, atol=1e-9 * exact.abs().max().item())


def test_engine_ekfac_ranks_samples_like_exact_on_a_tiny_model():
    from scipy.stats import spearmanr

    from tests.conftest import tiny_texts

    train, val = tiny_texts(30, seed=2), tiny_texts(5, seed=3)
    exact = _scores("exact", train, val).q.double()
    ekfac = _scores("ekfac", train, val).q.double()
    # measured per layer: 0.57 and 0.53 (DataInf 0.75 / 0.84, identity 0.47 / 0.65 on the same rows)
    for layer in range(2):
        assert spearmanr(ekfac[layer].numpy(), exact[layer].numpy()).statistic > 0.35


def test_lissa_defaults_match_the_score_options():
    from layerif import args
    from layerif.influence import lissa

    config, settings = args.ScoreConfig(), LissaSettings()
    assert (config.lissa_depth, config.lissa_tol, config.lissa_batch, config.lissa_repeats) == (
        settings.depth, settings.tol, settings.batch_size, settings.repeats)
    # the per-plan defaults behind None, repeated in args so that reading the options imports no torch
    assert (args.LISSA_DEPTH, args.LISSA_KERNEL_DEPTH, args.LISSA_BATCH) == (
        lissa.LISSA_DEPTH, lissa.LISSA_KERNEL_DEPTH, lissa.LISSA_BATCH)


def test_plan_defaults_full_batches_in_the_kernel_plan_and_mini_batches_in_the_factor_plan():
    few, many = random_factors(n=24, seed=3), random_factors(n=100, seed=3)  # 30 parameters per matrix
    _, _, kernel = estimate("lissa", few, val_gradient())
    _, _, factor = estimate("lissa", many, val_gradient(), options={"lissa_tol": 0, "lissa_depth": 30})
    assert kernel["plan"] == "kernel" and kernel["batch_size"] == 24 and kernel["depth"] == 1_000_000
    assert kernel["converged"]
    assert factor["plan"] == "factors" and factor["batch_size"] == 64
    assert estimate("lissa", many, val_gradient(), options={"lissa_scale": 1e6})[2]["depth"] == 2000


def test_lissa_stops_once_the_influence_settles():
    factors, v = random_factors(), val_gradient()
    lam = damping(factors.sq_norms, 30)
    settings = LissaSettings(depth=5000, batch_size=factors.n, tol=1e-4)
    solved, info = lissa_solve(factors, v.unsqueeze(0), lam, factors.n, settings)
    assert info.converged and info.steps < 5000 and info.relative_change < 1e-4
    # the stopped influence is as close to exact as its last-window change suggests
    G = gradients(factors)
    got, want = G @ solved[0].reshape(-1), G @ exact_h(factors, v).reshape(-1)
    assert float((got - want).norm() / want.norm()) < 1e-3
    capped, info_capped = lissa_solve(factors, v.unsqueeze(0), lam, factors.n,
                                      LissaSettings(depth=info.steps // 4, batch_size=factors.n, tol=1e-4))
    assert not info_capped.converged and info_capped.steps == info.steps // 4
    assert info_capped.relative_change > 1e-4


def test_lissa_repeats_average_independent_seeded_recursions():
    factors, v = random_factors(n=24, seed=3), val_gradient()
    lam = damping(factors.sq_norms, 30)
    one, info_one = lissa_solve(factors, v.unsqueeze(0), lam, factors.n,
                                LissaSettings(depth=400, batch_size=4, seed=2, tol=0))
    two, info_two = lissa_solve(factors, v.unsqueeze(0), lam, factors.n,
                                LissaSettings(depth=400, batch_size=4, seed=2, tol=0, repeats=2))
    again, _ = lissa_solve(factors, v.unsqueeze(0), lam, factors.n,
                           LissaSettings(depth=400, batch_size=4, seed=2, tol=0, repeats=2))
    assert info_one.repeats == 1 and info_two.repeats == 2 and info_two.steps == 400
    torch.testing.assert_close(two, again, rtol=0, atol=0)
    assert not torch.allclose(one, two)
    # full batches make every recursion the same one: it runs once
    _, info_full = lissa_solve(factors, v.unsqueeze(0), lam, factors.n,
                               LissaSettings(depth=50, batch_size=factors.n, repeats=3))
    assert info_full.repeats == 1


def test_lissa_defaults_are_within_2_percent_of_exact_on_a_tiny_model():
    from layerif.api import ScoreConfig, score_layers
    from tests.conftest import TinyTokenizer, tiny_llama, tiny_texts

    train, val = tiny_texts(24, seed=0), tiny_texts(6, seed=1)

    def s_all(**settings):
        config = ScoreConfig(quiet=True, **settings)
        return score_layers(tiny_llama(layers=4, seed=0), TinyTokenizer(), train, val, config)

    exact = s_all(estimator="exact").scores("S_all")
    lissa = s_all(estimator="lissa")
    error = abs(lissa.scores("S_all") - exact).max() / abs(exact).max()
    # measured: 0.03 %; the earlier defaults (200 steps of 16-sample mini-batches) were 6.2 % off
    assert error < 0.02
    assert lissa.metadata["convergence"]["not_converged"] == 0
    old = s_all(estimator="lissa", lissa_depth=200, lissa_batch=16, lissa_tol=0).scores("S_all")
    assert abs(old - exact).max() / abs(exact).max() > 0.02  # so the check above is not a loose one


@pytest.mark.parametrize("batch_size, repeats", [(4, 2), (100, 1)])
def test_kernel_plan_runs_the_same_iterates_as_the_factor_plan(batch_size, repeats):
    factors, v = random_factors(n=24, seed=3), val_gradient()
    val_each = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    options = {"lissa_depth": 300, "lissa_batch": batch_size, "lissa_repeats": repeats, "lissa_tol": 1e-6,
               "lissa_scale": 4 * float(gradients(factors).square().sum(1).max()), "seed": 5}
    by_plan = {plan: estimate("lissa", factors, v, val_each, options | {"lissa_plan": plan}) for plan in ("kernel", "factors")}
    (kernel, kernel_pair, kernel_info), (factor, factor_pair, factor_info) = by_plan["kernel"], by_plan["factors"]
    assert kernel_info["plan"] == "kernel" and factor_info["plan"] == "factors"
    torch.testing.assert_close(kernel, factor, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(kernel_pair, factor_pair, rtol=1e-9, atol=1e-12)
    for key in ("steps", "batch_size", "repeats", "converged"):
        assert kernel_info[key] == factor_info[key]
    assert kernel_info["relative_change"] == pytest.approx(factor_info["relative_change"], rel=1e-6)
    assert kernel_info["h_relative_change"] == pytest.approx(factor_info["h_relative_change"], rel=1e-6)


def test_kernel_plan_with_an_automatic_scale_converges_to_exact():
    factors, v = random_factors(), val_gradient()
    got, _, info = estimate("lissa", factors, v, options={"lissa_depth": 3000, "lissa_batch": 100, "lissa_tol": 0})
    want, _, _ = estimate("exact", factors, v)
    assert info["plan"] == "kernel" and info["top_eigenvalue"] > 0
    G = gradients(factors)
    # the kernel plan takes the exact top eigenvalue of H; power iterations approach it from below
    assert info["top_eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(G @ G.t())[-1]) / factors.n, rel=1e-9)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def test_auto_plan_uses_factors_when_samples_outnumber_parameters():
    from layerif.influence.lissa import KERNEL_PLAN_MAX_SAMPLES

    small, large = random_factors(n=12), random_factors(n=40)  # 30 parameters per matrix
    assert estimate("lissa", small, val_gradient(), options={"lissa_depth": 50})[2]["plan"] == "kernel"
    assert estimate("lissa", large, val_gradient(), options={"lissa_depth": 50})[2]["plan"] == "factors"
    assert LissaSettings().kernel_plan(KERNEL_PLAN_MAX_SAMPLES + 1, 10**9) is False
    with pytest.raises(LayerIFError, match="--lissa-plan"):
        LissaSettings(plan="gram").kernel_plan(10, 100)

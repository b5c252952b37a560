"""Paired bootstrap: known answers (identical inputs, constant shifts), seeds, token weighting, coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from layerif.errors import LayerIFError
from layerif.evaluate.stats import compare_accuracy, compare_log_perplexity, seed_spread


def test_identical_inputs_give_p_one_and_a_zero_interval():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 2, 300)
    result = compare_accuracy(rows, rows.copy())
    assert result.estimate == 0 and result.low == 0 and result.high == 0 and result.p_value == 1.0
    assert result.verdict(higher_is_better=True) == "not distinguishable" and result.n_resamples == 10_000
    nll = rng.gamma(5.0, 100.0, 40)
    same = compare_log_perplexity(nll, nll.copy(), np.full(40, 511))
    assert same.estimate == 0 and same.low <= 0 <= same.high and same.p_value == 1.0


def test_constant_log_perplexity_shift_is_exact_and_detected():
    rng = np.random.default_rng(1)
    tokens = rng.integers(100, 512, 50).astype(float)  # unequal windows: token weighting matters
    nll_b = rng.gamma(5.0, 1.0, 50) * tokens
    shift = -0.25  # A's log-perplexity lower by 0.25 in every window
    result = compare_log_perplexity(nll_b + shift * tokens, nll_b, tokens)
    assert result.estimate == pytest.approx(shift) and result.low == pytest.approx(shift)
    assert result.high == pytest.approx(shift) and result.p_value == pytest.approx(2 / 10_001)
    assert result.verdict(higher_is_better=False) == "better"
    flipped = compare_log_perplexity(nll_b, nll_b + shift * tokens, tokens)
    assert flipped.estimate == pytest.approx(-shift) and flipped.verdict(higher_is_better=False) == "worse"


def test_token_weighted_estimate():
    nll_a, nll_b, tokens = np.array([10.0, 40.0]), np.array([20.0, 20.0]), np.array([10.0, 30.0])
    result = compare_log_perplexity(nll_a, nll_b, tokens, n_resamples=200)
    assert result.estimate == pytest.approx(50 / 40 - 40 / 40)  # Σ NLL / Σ tokens, not a mean of window means


def test_accuracy_shift_detected_with_the_right_sign():
    rng = np.random.default_rng(2)
    b = rng.integers(0, 2, 500)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:60]] = 1  # A right on 60 more rows, never worse
    better = compare_accuracy(a, b)
    assert better.estimate == pytest.approx(60 / 500) and better.low > 0 and better.p_value < 0.001
    assert better.verdict(higher_is_better=True) == "better"
    worse = compare_accuracy(b, a)
    assert worse.high < 0 and worse.verdict(higher_is_better=True) == "worse"


def test_seeds_are_averaged_inside_a_resample():
    rng = np.random.default_rng(3)
    a_seeds, b = rng.integers(0, 2, (3, 200)), rng.integers(0, 2, 200)
    result = compare_accuracy(a_seeds, b, n_resamples=500)
    assert result.estimate == pytest.approx(a_seeds.mean() - b.mean())
    # one seed repeated is the same configuration as that seed alone (same draws, same differences)
    single = compare_accuracy(a_seeds[0], b, n_resamples=500, seed=7)
    repeated = compare_accuracy(np.repeat(a_seeds[:1], 4, axis=0), b, n_resamples=500, seed=7)
    assert (single.low, single.high, single.p_value) == pytest.approx((repeated.low, repeated.high,
                                                                       repeated.p_value))
    # seeds only add noise here: the interval of a seed-averaged A is no wider than the average of single seeds'
    assert result.high - result.low < np.mean([
        (lambda c: c.high - c.low)(compare_accuracy(row, b, n_resamples=500)) for row in a_seeds]) + 1e-9


def test_tasks_are_averaged_with_equal_weight():
    rng = np.random.default_rng(4)
    a = {"x": rng.integers(0, 2, 100), "y": rng.integers(0, 2, 400)}
    b = {"x": rng.integers(0, 2, 100), "y": rng.integers(0, 2, 400)}
    result = compare_accuracy(a, b, n_resamples=300)
    expected = np.mean([a[t].mean() - b[t].mean() for t in ("x", "y")])
    assert result.estimate == pytest.approx(expected) and result.n_items == 500
    with pytest.raises(LayerIFError, match="same tasks"):
        compare_accuracy(a, {"x": b["x"]})


def test_coverage_of_the_95_percent_interval():
    """Over 300 simulated paired data sets with a known mean difference, the interval covers it ~95 % of the time."""
    rng = np.random.default_rng(5)
    true_difference, covered = 0.1, 0
    trials = 300
    for trial in range(trials):
        shared = rng.normal(0, 1, 80)  # per-item difficulty, common to A and B
        a = shared + true_difference + rng.normal(0, 0.5, 80)
        b = shared + rng.normal(0, 0.5, 80)
        result = compare_accuracy(a, b, n_resamples=1000, seed=trial)
        covered += result.low <= true_difference <= result.high
    assert 0.90 <= covered / trials <= 0.985


def test_p_value_is_uniform_ish_under_the_null():
    rng = np.random.default_rng(6)
    p_values = []
    for trial in range(200):
        a, b = rng.normal(0, 1, 60), rng.normal(0, 1, 60)
        p_values.append(compare_accuracy(a, b, n_resamples=1000, seed=trial).p_value)
    rejected = np.mean(np.asarray(p_values) < 0.05)
    assert 0.01 <= rejected <= 0.11  # nominal 5 %


def test_bad_input_and_spread():
    with pytest.raises(LayerIFError, match="same items"):
        compare_accuracy([1, 0, 1], [1, 0])
    with pytest.raises(LayerIFError, match="finite"):
        compare_accuracy([1, math.nan], [1, 0])
    with pytest.raises(LayerIFError, match="token"):
        compare_log_perplexity([1.0, 2.0], [1.0, 2.0], [1.0, 0.0])
    spread = seed_spread([1.0, 2.0, 3.0])
    assert spread == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert seed_spread([5.0])["std"] == 0.0


def test_block_bootstrap_keeps_the_estimate_and_covers_dependent_windows():
    """Windows drawn in runs from the same article: the window bootstrap is too narrow, the block one is not."""
    from layerif.evaluate.stats import lag_one_correlation

    tokens = np.full(200, 511.0)
    rng = np.random.default_rng(7)
    base = rng.gamma(5.0, 1.0, 200) * tokens
    one = compare_log_perplexity(base * 1.1, base, tokens, block=1)
    plain = compare_log_perplexity(base * 1.1, base, tokens)
    assert (one.estimate, one.low, one.high, one.p_value) == (plain.estimate, plain.low, plain.high, plain.p_value)
    blocked = compare_log_perplexity(base * 1.1, base, tokens, block=8)
    assert blocked.estimate == pytest.approx(plain.estimate) and blocked.n_items == 25

    # per-window differences that share an "article" effect over runs of 10 windows, true mean 0
    misses_window = misses_block = 0
    for trial in range(60):
        rng = np.random.default_rng(100 + trial)
        article = np.repeat(rng.normal(0.0, 0.1, 20), 10)
        difference = article + rng.normal(0.0, 0.02, 200)
        nll_b = rng.gamma(5.0, 1.0, 200) * tokens
        nll_a = nll_b + difference * tokens
        if trial == 0:
            assert lag_one_correlation(nll_a, nll_b, tokens) > 0.5
            assert abs(lag_one_correlation(nll_b + rng.normal(0, 0.1, 200) * tokens, nll_b, tokens)) < 0.2
        window = compare_log_perplexity(nll_a, nll_b, tokens, n_resamples=1000, seed=trial)
        block = compare_log_perplexity(nll_a, nll_b, tokens, n_resamples=1000, seed=trial, block=10)
        misses_window += not window.low <= 0 <= window.high
        misses_block += not block.low <= 0 <= block.high
    assert misses_block <= 9  # about 5 % of 60 expected (percentile intervals on 20 blocks run a little narrow)
    assert misses_window >= 20  # ignoring the dependence misses far more often
    with pytest.raises(LayerIFError, match="block"):
        compare_log_perplexity(base, base, tokens, block=0)


def test_one_item_is_refused_rather_than_read_as_certain():
    with pytest.raises(LayerIFError, match="at least 2 items"):
        compare_log_perplexity([10.0], [12.0], [5.0])
    with pytest.raises(LayerIFError, match="at least 2 items"):
        compare_log_perplexity(np.full(8, 10.0), np.full(8, 12.0), np.full(8, 5.0), block=8)


def simulated_study(rng, n_seeds: int = 3, seed_sd: float = 0.02, article_sd: float = 0.03,
                    n_windows: int = 100, block: int = 10, tokens: int = 100):
    """Per-window NLL of A and B (seeds x windows) whose true difference, averaged over seeds and articles, is 0.

    A's models differ from B's by a per-seed shift (sd `seed_sd`, what a calibration seed does) and by a
    per-article shift (sd `article_sd`, shared by A's seeds: some texts suit A); window noise on top.
    """
    base = rng.normal(3.0, 0.2, n_windows)
    article = rng.normal(0, article_sd, n_windows // block).repeat(block)
    seed = rng.normal(0, seed_sd, (n_seeds, 1))
    nll_a = (base + article + seed + rng.normal(0, 0.02, (n_seeds, n_windows))) * tokens
    nll_b = (base + rng.normal(0, 0.02, (n_seeds, n_windows))) * tokens
    return nll_a, nll_b, np.full(n_windows, tokens)


def test_two_level_interval_covers_with_known_seed_variance_and_one_level_does_not():
    from layerif.evaluate.stats import two_level_log_perplexity

    rng = np.random.default_rng(0)
    trials, two_covers, one_covers = 400, 0, 0
    for trial in range(trials):
        nll_a, nll_b, tokens = simulated_study(rng)
        two = two_level_log_perplexity(nll_a, nll_b, tokens, block=10, n_resamples=1000, seed=trial)
        one = compare_log_perplexity(nll_a, nll_b, tokens, block=10, n_resamples=1000, seed=trial)
        two_covers += two.low <= 0 <= two.high
        one_covers += one.low <= 0 <= one.high
    assert 0.90 <= two_covers / trials <= 0.985
    # the one-level interval holds the seeds' models fixed: with this much seed variance it is far too narrow
    assert one_covers / trials < 0.85
    assert one_covers / trials < two_covers / trials - 0.1


def test_two_level_without_seed_variance_matches_the_block_interval():
    from layerif.evaluate.stats import two_level_log_perplexity

    nll_a, nll_b, tokens = simulated_study(np.random.default_rng(1), seed_sd=0.0)
    nll_a[1:] = nll_a[0]  # identical seeds: nothing varies between them
    nll_b[1:] = nll_b[0]
    two = two_level_log_perplexity(nll_a, nll_b, tokens, block=10, n_resamples=4000)
    one = compare_log_perplexity(nll_a, nll_b, tokens, block=10, n_resamples=4000)
    assert two.estimate == pytest.approx(one.estimate)
    assert two.seed_share == pytest.approx(0.0, abs=1e-9)
    # same width up to the t quantile (9 degrees of freedom for 10 blocks) and resampling noise
    assert (two.high - two.low) / (one.high - one.low) == pytest.approx(2.262 / 1.96, rel=0.15)


def test_two_level_detects_a_real_difference_and_checks_its_input():
    from layerif.evaluate.stats import two_level_log_perplexity

    nll_a, nll_b, tokens = simulated_study(np.random.default_rng(2), seed_sd=0.005, article_sd=0.005)
    better = two_level_log_perplexity(nll_a - 0.05 * tokens, nll_b, tokens, block=10, n_resamples=2000)
    assert better.verdict(higher_is_better=False) == "better" and better.p_value < 0.01
    assert math.exp(better.estimate) < 1
    unpaired = two_level_log_perplexity(nll_a[:2], nll_b, tokens, block=10, n_resamples=500)
    assert unpaired.n_items == 10 and unpaired.dof > 1
    with pytest.raises(LayerIFError, match="paired seeds"):
        two_level_log_perplexity(nll_a[:2], nll_b, tokens, paired=True)
    with pytest.raises(LayerIFError, match="at least 2 runs"):
        two_level_log_perplexity(nll_a, nll_b, tokens, block=100)


def simulated_accuracy(rng, n_seeds: int = 3, seed_sd: float = 0.05, n_rows: int = 300, jitter: float = 0.1):
    """Per-row correctness (seeds x rows) of A and B whose true accuracy difference, over seeds, is 0.

    A row is hard for every model (one difficulty per row); each training seed of A moves A's accuracy by a
    shift of sd `seed_sd` (what a training seed does), and every run flips a few rows near its threshold.
    """
    difficulty = rng.random(n_rows)
    shift = rng.normal(0, seed_sd, (n_seeds, 1))
    a = (difficulty + rng.normal(0, jitter, (n_seeds, n_rows)) < 0.6 + shift).astype(float)
    b = (difficulty + rng.normal(0, jitter, (n_seeds, n_rows)) < 0.6).astype(float)
    return a, b


def test_two_level_accuracy_covers_with_known_seed_variance_and_one_level_does_not():
    from layerif.evaluate.stats import two_level_accuracy

    rng = np.random.default_rng(0)
    trials, two_covers, one_covers = 300, 0, 0
    for trial in range(trials):
        a, b = simulated_accuracy(rng)
        two = two_level_accuracy(a, b, n_resamples=1000, seed=trial)
        one = compare_accuracy(a, b, n_resamples=1000, seed=trial)
        two_covers += two.low <= 0 <= two.high
        one_covers += one.low <= 0 <= one.high
    assert 0.90 <= two_covers / trials <= 0.985
    # resampling test rows only holds the seeds' models fixed: far too narrow when seeds move accuracy
    assert one_covers / trials < 0.8
    assert one_covers / trials < two_covers / trials - 0.2


def test_two_level_accuracy_shares_the_log_perplexity_bootstrap_and_checks_input():
    from layerif.evaluate.stats import two_level_accuracy, two_level_log_perplexity

    a, b = simulated_accuracy(np.random.default_rng(3))
    result = two_level_accuracy(a, b, n_resamples=2000, seed=4)
    assert result.estimate == pytest.approx(a.mean() - b.mean()) and result.n_items == 300
    # accuracy is a mean with weight 1 per row: the log-perplexity version with one token per window
    same = two_level_log_perplexity(a, b, np.ones(300), block=1, n_resamples=2000, seed=4)
    assert (result.low, result.high, result.p_value, result.dof) == pytest.approx(
        (same.low, same.high, same.p_value, same.dof))
    better = two_level_accuracy(np.minimum(a + (b == 0) * 1.0, 1), b, n_resamples=500)
    assert better.verdict(higher_is_better=True) == "better"
    with pytest.raises(LayerIFError, match="at least 2 runs of 1 rows"):
        two_level_accuracy([[1.0]], [[0.0]])
    with pytest.raises(LayerIFError, match="paired seeds"):
        two_level_accuracy(a[:2], b, paired=True)

"""Paired bootstrap comparisons of two configurations on the same evaluation items (DESIGN §7).

Both configurations were evaluated on the same items (perplexity windows, task rows), possibly several times
(calibration or training seeds). One resample draws the items with replacement — the same draw for A and B,
which is what makes the comparison paired — and computes each configuration's statistic on it, averaged over
that configuration's seeds. The difference A − B over 10,000 resamples gives

- the estimate: the difference on the original items;
- the 95 % interval: percentiles 2.5 and 97.5 of the resampled differences (percentile bootstrap);
- the two-sided p-value: p = min(1, 2 · min(#{δ* ≤ 0} + 1, #{δ* ≥ 0} + 1) / (R + 1)), the smallest α at which
  the (1 − α) percentile interval would exclude 0 (with the usual +1 so a p-value is never 0).

Statistics: mean accuracy from per-row correctness (a list of tasks is averaged with equal weight per task, each
task's rows resampled on their own), and log-perplexity from per-window NLL, token-weighted inside a resample:
log ppl = Σ NLL / Σ tokens over the drawn windows; with `block`, runs of consecutive windows are the items.

`two_level_log_perplexity` and `two_level_accuracy` add the variance between seeds (calibration, placement or
training seeds), which resampling the windows or rows alone never sees; see their docstrings and
docs/compare.md for why it is a t interval around a two-level bootstrap standard error rather than a
percentile interval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as scipy_stats

from layerif.errors import LayerIFError

RESAMPLES = 10_000
CONFIDENCE = 0.95
_CHUNK = 1_000  # resamples drawn at once: bounds the [chunk, items] count matrix


@dataclass(frozen=True)
class Comparison:
    """Difference A − B of a statistic with its bootstrap interval and p-value."""

    estimate: float
    low: float
    high: float
    p_value: float
    n_items: int
    n_resamples: int
    confidence: float
    standard_error: float | None = None  # two-level: bootstrap standard error of the estimate
    dof: float | None = None  # two-level: Welch-Satterthwaite degrees of freedom of the t interval
    seed_share: float | None = None  # two-level: share of the variance that comes from the seeds

    def verdict(self, higher_is_better: bool) -> str:
        """'better' / 'worse' for A when the interval excludes 0, else 'not distinguishable'."""
        if self.low > 0 or self.high < 0:
            return "better" if (self.low > 0) == higher_is_better else "worse"
        return "not distinguishable"

    def to_dict(self) -> dict:
        return asdict(self)


def _as_runs(values, what: str) -> np.ndarray:
    runs = np.asarray(values, dtype=np.float64)
    if runs.ndim == 1:
        runs = runs[None, :]
    if runs.ndim != 2 or runs.shape[0] == 0 or runs.shape[1] == 0:
        raise LayerIFError(f"{what}: expected items, or seeds x items, got shape {runs.shape}")
    if not np.isfinite(runs).all():
        raise LayerIFError(f"{what}: values must be finite")
    return runs


def _group(a, b, tokens=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    runs_a, runs_b = _as_runs(a, "A"), _as_runs(b, "B")
    if runs_a.shape[1] != runs_b.shape[1]:
        raise LayerIFError(f"A and B must cover the same items ({runs_a.shape[1]} vs {runs_b.shape[1]})")
    if tokens is not None:
        tokens = np.asarray(tokens, dtype=np.float64).reshape(-1)
        if tokens.shape != (runs_a.shape[1],) or (tokens <= 0).any():
            raise LayerIFError("need one positive token count per window")
    return runs_a, runs_b, tokens


def _statistic(counts: np.ndarray, runs: np.ndarray, tokens: np.ndarray | None) -> np.ndarray:
    """Per-resample statistic averaged over seeds: counts [R, n] x runs [s, n] -> [R]."""
    totals = counts @ runs.T  # [R, s]
    denominator = counts @ tokens if tokens is not None else counts.sum(axis=1)
    return (totals / denominator[:, None]).mean(axis=1)


def _compare(groups, n_resamples: int, seed: int, confidence: float) -> Comparison:
    if n_resamples < 1 or not 0 < confidence < 1:
        raise LayerIFError("need n_resamples >= 1 and a confidence inside (0, 1)")
    groups = [_group(*group) for group in groups]
    if not groups:
        raise LayerIFError("nothing to compare")
    if min(a.shape[1] for a, _, _ in groups) < 2:
        # every resample of one item is that item: a zero-width interval that would read as a sure difference
        raise LayerIFError("need at least 2 items (windows, blocks or rows) to bootstrap")
    rng = np.random.default_rng(seed)

    def difference(all_counts) -> np.ndarray:
        return np.mean([_statistic(counts, a, tok) - _statistic(counts, b, tok)
                        for counts, (a, b, tok) in zip(all_counts, groups, strict=True)], axis=0)

    estimate = float(difference([np.ones((1, a.shape[1])) for a, _, _ in groups])[0])
    deltas = []
    for first in range(0, n_resamples, _CHUNK):
        size = min(_CHUNK, n_resamples - first)
        # multinomial counts = how often each item is drawn in a resample of n items with replacement
        all_counts = [rng.multinomial(a.shape[1], np.full(a.shape[1], 1.0 / a.shape[1]), size=size).astype(np.float64)
                      for a, _, _ in groups]
        deltas.append(difference(all_counts))
    delta = np.concatenate(deltas)
    tail = (1 - confidence) / 2
    low, high = np.quantile(delta, [tail, 1 - tail])
    below, above = int((delta <= 0).sum()), int((delta >= 0).sum())
    p_value = min(1.0, 2 * (min(below, above) + 1) / (n_resamples + 1))
    return Comparison(estimate, float(low), float(high), p_value, int(sum(a.shape[1] for a, _, _ in groups)),
                      n_resamples, confidence)


def compare_accuracy(a, b, *, n_resamples: int = RESAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE) -> Comparison:
    """Paired bootstrap of mean accuracy A − B from per-row correctness.

    `a`, `b`: rows, or seeds x rows, of one task; or dicts {task: rows or seeds x rows} with the same tasks (the
    mean over tasks, each task's rows resampled on their own). A and B may have different numbers of seeds.
    """
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or set(a) != set(b):
            raise LayerIFError("A and B must list the same tasks")
        return _compare([(a[task], b[task]) for task in sorted(a)], n_resamples, seed, confidence)
    return _compare([(a, b)], n_resamples, seed, confidence)


def compare_log_perplexity(nll_a, nll_b, tokens, *, n_resamples: int = RESAMPLES, seed: int = 0,
                           confidence: float = CONFIDENCE, block: int = 1) -> Comparison:
    """Paired bootstrap of log-perplexity A − B from per-window summed NLL (windows, or seeds x windows).

    Inside a resample, log ppl = Σ NLL / Σ tokens over the drawn windows (each seed's), averaged over seeds.
    exp of the estimate and of the interval bounds is the perplexity ratio A / B. With `block` > 1 the
    resampled items are runs of `block` consecutive windows (the last run may be shorter): consecutive windows
    of one text come from the same article and are not independent, and resampling them one by one makes the
    interval too narrow.
    """
    if block < 1:
        raise LayerIFError(f"block must be >= 1, got {block}")
    if block > 1:
        runs_a, runs_b, tokens = _group(nll_a, nll_b, tokens)
        if tokens is None:
            raise LayerIFError("need one positive token count per window")
        starts = np.arange(0, runs_a.shape[1], block)
        nll_a, nll_b = np.add.reduceat(runs_a, starts, axis=1), np.add.reduceat(runs_b, starts, axis=1)
        tokens = np.add.reduceat(tokens, starts)
    return _compare([(nll_a, nll_b, tokens)], n_resamples, seed, confidence)


def lag_one_correlation(nll_a, nll_b, tokens) -> float:
    """Correlation of consecutive windows' per-token NLL differences A − B (seeds averaged): 0 when independent."""
    runs_a, runs_b, tokens = _group(nll_a, nll_b, tokens)
    difference = (runs_a.mean(axis=0) - runs_b.mean(axis=0)) / tokens
    if difference.size < 3 or difference.std() == 0:
        return 0.0
    return float(np.corrcoef(difference[:-1], difference[1:])[0, 1])


def seed_spread(values) -> dict:
    """Spread of one configuration's statistic over seeds: mean, sample std, min, max and n."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise LayerIFError("no values to summarise")
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max()), "n": int(values.size)}


def _blocks(runs: np.ndarray, weights: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum per-item values and weights (NLL and tokens) over runs of `block` consecutive items (the last may be
    shorter)."""
    starts = np.arange(0, runs.shape[1], block)
    return np.add.reduceat(runs, starts, axis=1), np.add.reduceat(weights, starts)


def _seed_draws(rng, n_seeds: int, size: int) -> np.ndarray:
    """Seed weights of `size` resamples: multinomial counts / n_seeds -> [size, n_seeds]."""
    return rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=size) / n_seeds


def _inflated(per_seed: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-resample per-seed statistic with each seed's deviation from the seed mean scaled by sqrt(s / (s - 1)).

    Resampling s seeds with replacement shrinks their variance by (s - 1) / s (by a third for 3 seeds); scaling
    the deviations undoes that, as the unbiased sample variance does.
    """
    n_seeds = values.shape[0]
    if n_seeds < 2:
        return per_seed
    deviation = values - values.mean()
    return per_seed + (np.sqrt(n_seeds / (n_seeds - 1)) - 1) * deviation[None, :]


def two_level_log_perplexity(nll_a, nll_b, tokens, *, block: int = 10, paired: bool | None = None,
                             n_resamples: int = RESAMPLES, seed: int = 0,
                             confidence: float = CONFIDENCE) -> Comparison:
    """Log-perplexity A − B over seeds x windows, with an interval that sees both seed and window variance.

    `nll_a` [s_a, n], `nll_b` [s_b, n]: summed NLL of the same n test windows under each seed's model (a
    calibration seed, a placement seed). The estimand is the difference averaged over seeds and over texts
    like the test text. One resample of the two-level bootstrap draws the seeds with replacement (the same seed
    indices for A and B when `paired`, i.e. run k of A and of B share seed k; the default pairs them when both
    have the same number of seeds), then runs of `block` consecutive windows (about one article) with
    replacement, the same runs for A and B; its statistic is the mean over drawn seeds of each seed's
    token-weighted log ppl on the drawn windows.

    With 3 seeds a percentile interval of that bootstrap cannot reach its level: when seeds dominate it is
    about the range of 3 values, which holds the mean only 75 % of the time. So the interval is
    estimate ± t · SE, where SE is the standard deviation of the two-level resamples (seed deviations scaled by
    sqrt(s / (s − 1)), see `_inflated`) and t the quantile of a t distribution whose degrees of freedom come
    from Welch-Satterthwaite on the two parts of the variance: between seeds (s − 1 degrees of freedom each
    arm) and between article runs (blocks − 1). The p-value is the matching two-sided t test. An arm with one
    seed has no seed variance to estimate: its seed part is 0 and the interval is a windows-only one.
    """
    runs_a, runs_b, tokens = _group(nll_a, nll_b, tokens)
    if tokens is None:
        raise LayerIFError("need one positive token count per window")
    return _two_level(runs_a, runs_b, tokens, block, paired, n_resamples, seed, confidence, "windows")


def two_level_accuracy(a, b, *, block: int = 1, paired: bool | None = None, n_resamples: int = RESAMPLES,
                       seed: int = 0, confidence: float = CONFIDENCE) -> Comparison:
    """Mean accuracy A − B over training seeds x test rows, with an interval that sees seed and row variance.

    `a` [s_a, n], `b` [s_b, n] (or one row list each): per-row correctness (0/1) of the same n test rows under
    each training seed's model. The same two-level bootstrap as `two_level_log_perplexity` — seeds with
    replacement (paired when run k of A and of B share training seed k), then rows (or runs of `block` rows)
    with replacement, the same rows for A and B — and the same t interval around its standard error. The
    estimate, interval and standard error are accuracy fractions (× 100 for points).
    """
    runs_a, runs_b, _ = _group(a, b)
    return _two_level(runs_a, runs_b, np.ones(runs_a.shape[1]), block, paired, n_resamples, seed, confidence,
                      "rows")


def _two_level(runs_a: np.ndarray, runs_b: np.ndarray, weights: np.ndarray, block: int, paired: bool | None,
               n_resamples: int, seed: int, confidence: float, items: str) -> Comparison:
    """The two-level bootstrap t interval of a weighted mean, A − B (see `two_level_log_perplexity`)."""
    if block < 1:
        raise LayerIFError(f"block must be >= 1, got {block}")
    if n_resamples < 2 or not 0 < confidence < 1:
        raise LayerIFError("need n_resamples >= 2 and a confidence inside (0, 1)")
    blocks_a, block_weights = _blocks(runs_a, weights, block)
    blocks_b, _ = _blocks(runs_b, weights, block)
    n_blocks = block_weights.size
    if n_blocks < 2:
        raise LayerIFError(f"need at least 2 runs of {block} {items} to bootstrap, got {n_blocks}")
    if paired is None:
        paired = runs_a.shape[0] == runs_b.shape[0]
    if paired and runs_a.shape[0] != runs_b.shape[0]:
        raise LayerIFError(f"paired seeds need as many runs of A as of B ({runs_a.shape[0]} vs {runs_b.shape[0]})")
    mean_a = runs_a.sum(axis=1) / weights.sum()  # each seed's statistic on all the items
    mean_b = runs_b.sum(axis=1) / weights.sum()
    estimate = float(mean_a.mean() - mean_b.mean())
    rng = np.random.default_rng(seed)
    draws, item_only = [], []
    for first in range(0, n_resamples, _CHUNK):
        size = min(_CHUNK, n_resamples - first)
        counts = rng.multinomial(n_blocks, np.full(n_blocks, 1.0 / n_blocks), size=size).astype(np.float64)
        denominator = (counts @ block_weights)[:, None]
        per_seed_a = _inflated(counts @ blocks_a.T / denominator, mean_a)  # [size, s_a]
        per_seed_b = _inflated(counts @ blocks_b.T / denominator, mean_b)
        weights_a = _seed_draws(rng, runs_a.shape[0], size)
        weights_b = weights_a if paired else _seed_draws(rng, runs_b.shape[0], size)
        draws.append((per_seed_a * weights_a).sum(axis=1) - (per_seed_b * weights_b).sum(axis=1))
        # the seeds' deviations sum to 0, so this is the items-only resample of the seed-averaged difference
        item_only.append(per_seed_a.mean(axis=1) - per_seed_b.mean(axis=1))
    draws, item_only = np.concatenate(draws), np.concatenate(item_only)
    standard_error = float(draws.std(ddof=1))
    # the two parts of the variance and their degrees of freedom (Welch-Satterthwaite)
    item_var = float(item_only.var(ddof=1))
    seed_parts = [mean_a - mean_b] if paired else [mean_a, mean_b]
    parts = [(float(np.var(values, ddof=1)) / values.size, values.size - 1) for values in seed_parts
             if values.size >= 2]
    parts.append((item_var, n_blocks - 1))
    total = sum(v for v, _ in parts)
    denominator_df = sum(v * v / d for v, d in parts)
    dof = float(total * total / denominator_df) if denominator_df > 0 else float(n_blocks - 1)
    seed_share = float(1 - item_var / total) if total > 0 else 0.0
    if standard_error == 0:
        return Comparison(estimate, estimate, estimate, 1.0 if estimate == 0 else 0.0, int(n_blocks),
                          n_resamples, confidence, 0.0, dof, seed_share)
    t = float(scipy_stats.t.ppf(0.5 + confidence / 2, dof))
    p_value = float(2 * scipy_stats.t.sf(abs(estimate) / standard_error, dof))
    return Comparison(estimate, estimate - t * standard_error, estimate + t * standard_error, p_value,
                      int(n_blocks), n_resamples, confidence, standard_error, dof, seed_share)

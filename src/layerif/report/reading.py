"""Plain-language sentences generated from a run's numbers (every claim is computed, none is fixed text)."""

from __future__ import annotations

import numpy as np

from layerif.report.compare import AllocationTable, TaskComparison
from layerif.report.load import RunView


def block_ranges(indices) -> str:
    """Sorted block indices as compact ranges: [0, 1, 2, 5, 7, 8] -> "0–2, 5, 7–8"."""
    ordered = sorted({int(i) for i in indices})
    if not ordered:
        return "none"
    parts, start, previous = [], ordered[0], ordered[0]
    for index in [*ordered[1:], None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        parts.append(str(start) if start == previous else f"{start}–{previous}")
        if index is not None:
            start = previous = index
    return ", ".join(parts)


def _blocks(indices) -> str:
    indices = list(indices)
    return f"block {block_ranges(indices)}" if len(indices) == 1 else f"blocks {block_ranges(indices)}"


def _number(value: float) -> str:
    return f"{value:.3g}"


def _group_size(n_layers: int) -> int:
    return int(min(5, max(1, round(n_layers / 10))))


def depth_correlation(values: np.ndarray) -> float:
    """Spearman correlation of a profile with the block index (NaN for a constant profile)."""
    from scipy.stats import spearmanr

    if np.ptp(values) == 0 or len(values) < 3:
        return float("nan")
    return float(spearmanr(np.arange(len(values)), values).statistic)


def describe_run(view: RunView, score: str, experts: AllocationTable | None = None,
                 sparsity: AllocationTable | None = None) -> list[str]:
    """Sentences about one run: where the scores are high and low, how sure, depth trend, modules, allocations."""
    values = view.values(score)
    n_layers = len(values)
    order = np.argsort(-values, kind="stable")
    size = _group_size(n_layers)
    top, bottom = order[:size], order[::-1][:size]
    sentences = []
    if n_layers > 1:
        sentences.append(
            f"{_blocks(top).capitalize()} {'scores' if len(top) == 1 else 'score'} highest on {score} ({', '.join(_number(values[i]) for i in sorted(top))})"
            f" and {_blocks(bottom)} lowest ({', '.join(_number(values[i]) for i in sorted(bottom))}): by LayerIF's "
            f"reading the highest-scoring blocks are the most sensitive to this data, i.e. the least well trained.")
    sentences.extend(_interval_sentences(view, score, top))
    rho = depth_correlation(values)
    if np.isfinite(rho):
        if abs(rho) >= 0.3:
            trend = f"The score {'rises' if rho > 0 else 'falls'} with depth (Spearman ρ = {rho:.2f} against the block index)"
            if abs(rho) >= 0.7:
                trend += "; a data-free depth allocation follows much the same shape, so compare against it"
            sentences.append(trend + ".")
        else:
            sentences.append(f"The score shows no clear depth trend (Spearman ρ = {rho:.2f} against the block index).")
    if values.min() > 0:
        sentences.append(f"{score} spans a factor of {values.max() / values.min():.3g} from the lowest to the "
                         f"highest block.")
    else:
        sentences.append(f"{score} ranges from {_number(values.min())} to {_number(values.max())}.")
    sentences.extend(_count_sentences(view))
    sentences.extend(_module_sentences(view))
    if experts is not None and "layerif" in experts.values:
        counts = experts.values["layerif"]
        most, least = np.flatnonzero(counts == counts.max()), np.flatnonzero(counts == counts.min())
        sentences.append(
            f"At a budget of {experts.setting['budget']} experts (β {experts.setting['beta']:g}), LayerIF gives "
            f"{_blocks(most)} the most ({counts.max()} each) and {_blocks(least)} the fewest ({counts.min()} each).")
    if sparsity is not None and "layerif" in sparsity.values:
        ratios = sparsity.values["layerif"]
        low, high = int(np.argmin(ratios)), int(np.argmax(ratios))
        text = (f"At a mean sparsity of {sparsity.setting['sparsity']:.0%} (ε {sparsity.setting['epsilon']:g}), the "
                f"LayerIF ratios run from {ratios[low]:.1%} (block {low}) to {ratios[high]:.1%} (block {high})")
        if sparsity.clipped.get("layerif"):
            text += f"; {_blocks(sparsity.clipped['layerif'])} hit the cap and the rest were re-balanced"
        sentences.append(text + ".")
    return sentences


def _interval_sentences(view: RunView, score: str, top: np.ndarray) -> list[str]:
    if not view.has_interval(score):
        return [f"This run has no bootstrap intervals, so how sure each {score} is cannot be read from it "
                f"(score with --bootstrap to add them)."]
    low, high = view.values(f"{score}_lo"), view.values(f"{score}_hi")
    floor = low[top].min()
    below = [i for i in range(len(low)) if i not in set(top.tolist()) and high[i] < floor]
    sentences = []
    if below:
        sentences.append(f"The bootstrap intervals of {_blocks(top)} lie above those of {_blocks(below)} "
                         f"({len(below)} of {len(low)} blocks).")
    else:
        sentences.append(f"The bootstrap intervals of {_blocks(top)} overlap those of every other block, so this "
                         f"data does not settle which blocks score highest.")
    width = (high - low) / np.where(view.values(score) != 0, np.abs(view.values(score)), 1.0)
    sentences.append(f"Interval widths are {np.median(width):.1%} of the score at the median block "
                     f"(widest: block {int(np.argmax(width))}, {width.max():.1%}).")
    if "p_above_median" in view.frame.columns:
        p = view.values("p_above_median")
        sure_high, sure_low = np.flatnonzero(p >= 0.95), np.flatnonzero(p <= 0.05)
        sentences.append(f"{len(sure_high)} block(s) score above the median block in at least 95 % of resamples and "
                         f"{len(sure_low)} below it in at least 95 %; the other {len(p) - len(sure_high) - len(sure_low)}"
                         f" are not clearly on either side.")
    return sentences


def _count_sentences(view: RunView) -> list[str]:
    n_pos = view.values("n_pos").astype(np.int64)
    n_train = int(view.values("n_train").max())
    if (n_pos == n_train).all():
        return [f"All {n_train} training samples have q > 0 (are beneficial) in every block."]
    low, high = int(np.argmin(n_pos)), int(np.argmax(n_pos))
    return [f"Beneficial samples (q > 0) per block range from {n_pos[low]} (block {low}) to {n_pos[high]} "
            f"(block {high}) of {n_train}."]


def module_shares(view: RunView) -> tuple[list[str], np.ndarray]:
    """Module labels and each module's share of the summed per-module S_pos, per layer: [layers, modules]."""
    columns = view.module_columns()
    if not columns:
        return [], np.zeros((view.n_layers, 0))
    table = np.clip(view.frame[columns].to_numpy(dtype=np.float64), 0, None)
    totals = table.sum(axis=1, keepdims=True)
    shares = np.divide(table, totals, out=np.zeros_like(table), where=totals > 0)
    return [column[len("S_pos["):-1] for column in columns], shares


def _module_sentences(view: RunView) -> list[str]:
    labels, shares = module_shares(view)
    if len(labels) < 2:
        return []
    mean = shares.mean(axis=0)
    high, low = int(np.argmax(mean)), int(np.argmin(mean))
    lead = np.argmax(shares, axis=1)
    counts = np.bincount(lead, minlength=len(labels))
    return [f"Of the block matrices, {labels[high]} carries the largest share of the per-module S_pos on average "
            f"({mean[high]:.0%}) and {labels[low]} the smallest ({mean[low]:.0%}); {labels[int(np.argmax(counts))]} "
            f"leads in {counts.max()} of {len(lead)} blocks."]


def describe_tasks(comparison: TaskComparison) -> list[str]:
    """Sentences about several runs' profiles: which agree, which stand apart, where each peaks."""
    names, rho = comparison.names, comparison.similarity
    count = len(names)
    pairs = [(rho[i, j], i, j) for i in range(count) for j in range(i + 1, count) if np.isfinite(rho[i, j])]
    sentences = []
    if pairs:
        best, worst = max(pairs), min(pairs)
        sentences.append(f"The most similar profiles are {names[best[1]]} and {names[best[2]]} (Spearman ρ = "
                         f"{best[0]:.2f})" + (f"; the least similar are {names[worst[1]]} and {names[worst[2]]} "
                                              f"(ρ = {worst[0]:.2f})." if count > 2 else "."))
    if count > 2:
        masked = np.where(np.eye(count, dtype=bool), np.nan, rho)
        mean = np.nanmean(masked, axis=1)
        odd = int(np.nanargmin(mean))
        sentences.append(f"{names[odd]} agrees least with the others (mean ρ = {mean[odd]:.2f}).")
    peaks = [f"{name} at block {int(np.argmax(row))}" for name, row in zip(names, comparison.profiles)]
    sentences.append("Highest-scoring block per run: " + "; ".join(peaks) + ".")
    if comparison.excluded:
        sentences.append(f"Left out of the comparison (another number of blocks): {', '.join(comparison.excluded)}.")
    return sentences

"""What a report puts side by side: allocations of one run, and the layer profiles of several runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from layerif.errors import LayerIFError
from layerif.report.load import RunView
from layerif.scores import minmax


@dataclass
class AllocationTable:
    """Per-layer values of every allocation method that could be computed, and why the others were not."""

    kind: str  # "experts" or "sparsity"
    values: dict[str, np.ndarray]
    skipped: dict[str, str] = field(default_factory=dict)
    setting: dict = field(default_factory=dict)
    clipped: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class ModelInputs:
    """Per-block baseline metrics of a model, computed once and shared by every run of a report."""

    model: object | None = None
    alphas: np.ndarray | None = None  # block-mean PL_Alpha_Hill
    outlier: np.ndarray | None = None  # OWL outlier ratio per block (needs calibration text)


def expert_allocations(view: RunView, budget: int, beta: float, score: str,
                       inputs: ModelInputs | None = None) -> AllocationTable:
    """Expert counts of every method the allocate package offers, at `budget` experts in total."""
    from layerif.allocate.experts import METHODS, allocate_experts

    inputs = inputs or ModelInputs()
    values, skipped = {}, {}
    for method in METHODS:
        try:
            result = allocate_experts(method, n_layers=view.n_layers, budget=budget, scores=view.values(score),
                                      beta=beta, alphas=inputs.alphas)
        except LayerIFError as exc:
            skipped[method] = "needs --model" if method == "alphalora" and inputs.alphas is None else str(exc)
            continue
        values[method] = np.asarray(result.counts, dtype=np.int64)
    return AllocationTable("experts", values, skipped, {"budget": budget, "beta": beta, "score": score})


def sparsity_allocations(view: RunView, sparsity: float, epsilon: float, score: str, smooth_scores: bool = True,
                         inputs: ModelInputs | None = None) -> AllocationTable:
    """Per-block pruning ratios of every allocation the allocate package offers, at mean sparsity `sparsity`.

    With a model, `allocate_sparsity` weights blocks by the model's matrices (as `layerif allocate sparsity
    --model` does); without one, blocks are weighted by the run's scored parameters (as without --model).
    """
    from layerif.allocate.sparsity import ALLOCATIONS, MAX_RATIO, allocate_sparsity, block_ratios

    inputs = inputs or ModelInputs()
    values, skipped, clipped = {}, {}, {}
    for method in ALLOCATIONS:
        try:
            if inputs.model is not None:
                plan = allocate_sparsity(inputs.model, method, sparsity, scores=view.scores, score_name=score,
                                         epsilon=epsilon, smooth_scores=smooth_scores, alpha=inputs.alphas,
                                         outlier=inputs.outlier)
                ratios, raw = plan.block_ratios, plan.unclipped_ratios
            else:
                ratios, _, _, raw = block_ratios(method, sparsity, view.scores.n_params, scores=view.values(score),
                                                 epsilon=epsilon, smooth_scores=smooth_scores)
        except LayerIFError as exc:
            needs_model = inputs.model is None and method in ("owl", "alphapruning")
            skipped[method] = ("needs --model" + (" and --calib" if method == "owl" else "")) if needs_model \
                else str(exc)
            continue
        values[method] = np.asarray(ratios, dtype=np.float64)
        if raw is not None:
            raw = np.asarray(raw, dtype=np.float64)
            clipped[method] = np.flatnonzero((raw > MAX_RATIO) | (raw < 0)).tolist()
    return AllocationTable("sparsity", values, skipped,
                           {"sparsity": sparsity, "epsilon": epsilon, "score": score, "smooth": smooth_scores},
                           {k: v for k, v in clipped.items() if v})


@dataclass
class TaskComparison:
    """Normalised layer profiles of several runs with equal depth, their Spearman matrix and a clustered order."""

    names: list[str]
    profiles: np.ndarray  # [runs, layers], each row min-max normalised
    similarity: np.ndarray  # [runs, runs] Spearman correlation (NaN where a profile is constant)
    order: list[int]  # row order from hierarchical clustering of 1 - rho
    excluded: list[str] = field(default_factory=list)  # runs of another depth, left out


def spearman_matrix(rows: np.ndarray) -> np.ndarray:
    """Spearman correlation between every pair of rows (Pearson of average ranks)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.asarray(rows, dtype=np.float64), axis=1)
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (centred @ centred.T) / np.outer(norms, norms)
    return np.clip(rho, -1.0, 1.0)


def cluster_order(similarity: np.ndarray) -> list[int]:
    """Leaf order of an average-linkage clustering on 1 - rho (optimal leaf ordering); identity for < 3 rows."""
    count = len(similarity)
    if count < 3:
        return list(range(count))
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    distance = 1.0 - np.nan_to_num(similarity, nan=0.0)
    np.fill_diagonal(distance, 0.0)
    distance = (distance + distance.T) / 2
    tree = linkage(squareform(np.clip(distance, 0.0, 2.0), checks=False), method="average", optimal_ordering=True)
    return [int(i) for i in leaves_list(tree)]


def compare_tasks(views: list[RunView], score: str) -> TaskComparison | None:
    """Cross-run comparison over the runs sharing the most common depth; None with fewer than two such runs."""
    depths = [view.n_layers for view in views]
    common = max(set(depths), key=lambda depth: (depths.count(depth), depth))
    chosen = [view for view in views if view.n_layers == common]
    if len(chosen) < 2:
        return None
    profiles = np.stack([minmax(view.values(score)) for view in chosen])
    similarity = spearman_matrix(np.stack([view.values(score) for view in chosen]))
    return TaskComparison([view.name for view in chosen], profiles, similarity, cluster_order(similarity),
                          [view.name for view in views if view.n_layers != common])

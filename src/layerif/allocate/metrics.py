"""Baseline layer metrics: PL_Alpha_Hill (heavy-tail exponent of a weight's spectrum) and OWL outlier ratios."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from layerif.calibration import wanda_scores
from layerif.errors import LayerIFError

# Eigenvalues at or below this are treated as zeros (numerical noise of rank-deficient matrices).
EIG_THRESHOLD = 1e-5
HIST_BINS = 100


def xmin_bounds(peak: float) -> tuple[float, float]:
    """Range of xmin candidates around the ESD peak, as WeightWatcher's and AlphaPruning's `xmin_peak` compute it.

    Both references write the lower bound as log10(0.95 · peak) and compare it with eigenvalues in linear units,
    so it is a much lower bound than 0.95 · peak (no bound at all whenever peak < 1/0.95). We keep that
    arithmetic on purpose: PL_Alpha_Hill values, and the AlphaPruning allocation tuned on them, are those fits.
    """
    return math.log10(0.95 * peak), 1.5 * peak


def esd(weight: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of WᵀW (squared singular values), ascending, float64."""
    if weight.dim() != 2 or weight.numel() == 0:
        raise LayerIFError(f"PL_Alpha_Hill needs a non-empty 2-D weight matrix, got shape {tuple(weight.shape)}")
    singular = torch.linalg.svdvals(weight.detach().to(torch.float32).cpu())
    return torch.sort(singular.double() ** 2).values


def hill_fit(eigs: torch.Tensor, weightwatcher: bool = False) -> tuple[float, float, float]:
    """Power-law fit of an ascending spectrum with the `xmin_peak` rule -> (alpha, xmin, KS distance).

    For each candidate xmin = λ_i the Hill estimator gives α_i = 1 + n_i / Σ_{j≥i} log(λ_j / λ_i); the
    candidate whose fitted Pareto CDF is closest (Kolmogorov-Smirnov) to the empirical tail wins. Candidates
    are the eigenvalues inside `xmin_bounds` of the peak of the log10-histogram of the spectrum (all of them
    if none is: a degenerate spectrum, where the references return no fit). This is the AlphaPruning code's fit;
    `weightwatcher=True` gives WeightWatcher's instead, whose `powerlaw` package drops the largest candidate
    inside the range (it means to drop the largest eigenvalue, but applies that after the range filter).
    """
    eigs = eigs.double()
    eigs = eigs[eigs > EIG_THRESHOLD] if (eigs > EIG_THRESHOLD).sum() >= 2 else eigs[eigs > 0]
    n_eigs = len(eigs)
    if n_eigs < 2:
        raise LayerIFError("PL_Alpha_Hill needs at least two non-zero eigenvalues")
    log_eigs = eigs.log()
    log10_eigs = eigs.log10()
    low, high = float(log10_eigs.min()), float(log10_eigs.max())
    counts = torch.histc(log10_eigs, bins=HIST_BINS, min=low, max=high)
    peak = 10 ** (low + (high - low) * int(torch.argmax(counts)) / HIST_BINS)  # left edge of the fullest bin
    candidates = torch.arange(n_eigs - 1)  # the largest eigenvalue cannot start a tail of length >= 2
    lower, upper = xmin_bounds(peak)
    in_window = (eigs[:-1] >= lower) & (eigs[:-1] <= upper)
    if in_window.any():
        candidates = candidates[in_window]
        if weightwatcher and len(candidates) > 1:
            candidates = candidates[:-1]

    # Hill estimates for every candidate at once via suffix sums of the log-eigenvalues.
    suffix = torch.flip(torch.cumsum(torch.flip(log_eigs, [0]), 0), [0])  # suffix[i] = Σ_{j≥i} log λ_j
    tail = (n_eigs - candidates).double()
    alphas = 1 + tail / (suffix[candidates] - tail * log_eigs[candidates])

    # KS distance of each candidate: max_j |1 - (λ_j/xmin)^(1-α) - (j-i)/n_i| over its tail (masked matrix).
    index = torch.arange(n_eigs)
    offset = (index.unsqueeze(0) - candidates.unsqueeze(1)).double()  # [C, N]
    in_tail = offset >= 0
    ratio = (log_eigs.unsqueeze(0) - log_eigs[candidates].unsqueeze(1)).clamp(min=0)
    model_cdf = 1 - torch.exp(ratio * (1 - alphas.unsqueeze(1)))
    empirical = offset / tail.unsqueeze(1)
    distance = torch.where(in_tail, (model_cdf - empirical).abs(), torch.zeros_like(model_cdf)).amax(dim=1)
    distance = torch.where(torch.isfinite(alphas) & (alphas > 1), distance, torch.ones_like(distance))
    best = int(torch.argmin(distance))
    return float(alphas[best]), float(eigs[candidates[best]]), float(distance[best])


def pl_alpha_hill(weight: torch.Tensor) -> float:
    """PL_Alpha_Hill of one weight matrix: Hill power-law exponent of the ESD of WᵀW (`xmin_peak` fit)."""
    return hill_fit(esd(weight))[0]


def block_alpha_hill(model: nn.Module, modules: str = "all", quiet: bool = True) -> np.ndarray:
    """Mean PL_Alpha_Hill over each block's weight matrices -> one value per block."""
    from tqdm.auto import tqdm

    from layerif.models import select_matrices
    from layerif.models.blocks import weight_of

    per_block = select_matrices(model, modules=modules)
    values = np.zeros(len(per_block))
    for layer, refs in enumerate(tqdm(per_block, desc="PL_Alpha_Hill", disable=quiet, unit="block")):
        values[layer] = np.mean([pl_alpha_hill(weight_of(ref)) for ref in refs])
    return values


def outlier_ratio(scores: torch.Tensor, m: float = 5.0) -> float:
    """OWL: share of the entries of `scores` that exceed m times their mean."""
    scores = scores.flatten().double()
    return float((scores > m * scores.mean()).double().mean())


def owl_outlier_ratios(
    model: nn.Module,
    calib_ids: torch.Tensor,
    m: float = 5.0,
    modules: str = "all",
    batch_size: int = 8,
    quiet: bool = True,
) -> np.ndarray:
    """OWL layerwise outlier ratio of each block on the dense model: share of its Wanda scores above m × mean."""
    from tqdm.auto import tqdm

    from layerif.calibration import BlockRunner, InputStats, input_hooks
    from layerif.models import select_matrices
    from layerif.models.blocks import weight_of

    per_block = select_matrices(model, modules=modules)
    runner = BlockRunner(model, calib_ids, batch_size=batch_size)
    ratios = np.zeros(len(per_block))
    for layer, refs in enumerate(tqdm(per_block, desc="OWL outliers", disable=quiet, unit="block")):
        stats = InputStats()
        with input_hooks({ref.name: ref.module for ref in refs}, stats):
            runner.advance(runner.blocks[layer])  # dense outputs feed the next block
        block_scores = torch.cat([wanda_scores(weight_of(ref), stats.mean_sq(ref.name)).flatten() for ref in refs])
        ratios[layer] = outlier_ratio(block_scores, m)
    return ratios

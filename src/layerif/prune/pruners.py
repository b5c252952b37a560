"""Unstructured pruning of one weight matrix (d_out, d_in) at a given sparsity: magnitude, Wanda, SparseGPT."""

from __future__ import annotations

import torch

from layerif.errors import LayerIFError

METHODS = ("magnitude", "wanda", "sparsegpt")


def n_pruned(numel: int, sparsity: float) -> int:
    """How many weights a matrix of `numel` entries loses at `sparsity` (rounded)."""
    return int(round(numel * sparsity))


def smallest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of exactly `count` smallest entries of `scores` (whole tensor)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        mask[torch.argsort(scores.flatten(), stable=True)[:count]] = True
    return mask.view_as(scores)


def row_smallest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` smallest entries overall, spread over rows (per-row counts differ by at most one)."""
    rows, cols = scores.shape
    per_row = torch.full((rows,), count // rows, dtype=torch.long, device=scores.device)
    per_row[: count % rows] += 1  # the remainder goes one each to the first rows, so the total is exact
    order = torch.argsort(scores, dim=1, stable=True)
    take = torch.arange(cols, device=scores.device).unsqueeze(0) < per_row.unsqueeze(1)
    return torch.zeros_like(take).scatter_(1, order, take)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the smallest |W| of the whole matrix."""
    return smallest_mask(weight.abs().float(), n_pruned(weight.numel(), sparsity))


def wanda_mask(weight: torch.Tensor, input_mean_sq: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the smallest |W_ij|·‖X_j‖₂ within each output row (Wanda's comparison group)."""
    from layerif.calibration import wanda_scores

    return row_smallest_mask(wanda_scores(weight, input_mean_sq), n_pruned(weight.numel(), sparsity))


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    block_size: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT: OBS mask selection and weight reconstruction column block by column block -> new weight.

    Follows the SparseGPT paper: H = 2XᵀX (+ damp·mean diag), the upper Cholesky factor of H⁻¹ gives the
    sequential OBS updates; in every block of `block_size` columns the weights with the smallest
    w² / [H⁻¹]_jj² are pruned (adaptive mask selection), and the error is spread over the remaining columns.
    """
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    d_out, d_in = W.shape
    if H.shape != (d_in, d_in):
        raise LayerIFError(f"SparseGPT: Hessian of shape {tuple(H.shape)} for a weight with {d_in} inputs")
    dead = torch.diag(H) == 0  # features never active in the calibration data
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(d_in, device=H.device)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError as exc:
        raise LayerIFError(f"SparseGPT: the calibration Hessian is not positive definite ({exc})") from exc

    pruned_so_far = 0
    total_pruned = n_pruned(W.numel(), sparsity)
    for start in range(0, d_in, block_size):
        end = min(start + block_size, d_in)
        W1 = W[:, start:end].clone()
        Hinv1 = Hinv[start:end, start:end]
        # exact count per block, taken from the running total so the whole matrix hits its ratio exactly
        target_here = int(round(total_pruned * end / d_in)) - pruned_so_far
        mask1 = smallest_mask(W1**2 / torch.diag(Hinv1).unsqueeze(0) ** 2, target_here)
        pruned_so_far += target_here
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        # The OBS updates are sequential over columns by construction; each step is vectorised over rows.
        for i in range(end - start):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, start:end] = Q1
        W[:, end:] -= Err1 @ Hinv[start:end, end:]
    return W.to(weight.dtype)

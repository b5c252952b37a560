"""Per-matrix influence I_i = -h_W . g_i with h_W ~ H_W^-1 v_W (DESIGN §2), on stored gradient factors.

Signs follow Koh & Liang: positive I means up-weighting the sample raises the validation loss.
All scalar algebra is float64; matmuls run in the factors' compute dtype (float32 by default).
"""

from __future__ import annotations

import torch

from layerif.errors import LayerIFError
from layerif.gradients.factors import MatrixFactors

ESTIMATORS = ("datainf", "exact", "identity")
DAMPING_SCALE = 0.1


def damping(sq_norms: torch.Tensor, n_params: int, scale: float = DAMPING_SCALE, n: int | None = None) -> float:
    """lambda_W = scale * (1/n) sum_i mean(g_i^2) = scale * mean(||g_i||^2) / d_W.

    `n` counts the samples that take part (default: all); left-out samples carry zero norms.
    """
    n = sq_norms.numel() if n is None else n
    return float(scale * sq_norms.double().sum() / max(n, 1) / n_params)


def _datainf_terms(gv: torch.Tensor, sq: torch.Tensor, lam: float) -> torch.Tensor:
    """c_i = (g_i . v) / (lambda + ||g_i||^2); works column-wise for a pairwise (n, m) gv."""
    denominator = lam + sq
    return gv / (denominator.unsqueeze(-1) if gv.dim() == 2 else denominator)


def influence_from_factors(
    estimator: str,
    train: MatrixFactors,
    val_sum: torch.Tensor,
    val_each: torch.Tensor | None = None,
    max_bytes: int = 1 << 30,
    reduce=None,
    n_effective: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(I (n,), I_pairwise (n, m) or None, lambda) for one matrix.

    val_sum is v_W = sum_j grad l(v_j) as (d_out, d_in); val_each the per-validation-sample gradients
    (m, d_out, d_in), needed only for the pairwise matrix. `reduce` sums a tensor over data-parallel
    ranks when `train` holds only this rank's samples (zeros elsewhere); then sq_norms must be reduced.
    `n_effective` is the number of samples taking part when some were left out (their factors are zero).
    """
    reduce = reduce or (lambda tensor: tensor)
    if estimator not in ESTIMATORS:
        raise LayerIFError(f"unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    n = train.n if n_effective is None else n_effective
    n_params = train.d_in * train.d_out
    sq = train.sq_norms.double()
    lam = damping(sq, n_params, n=n)
    need_kernel = estimator == "exact" or val_each is not None
    if not need_kernel:
        gv = reduce(train.dots(val_sum))
        if estimator == "identity":
            return -gv, None, lam
        if lam == 0.0:  # every gradient is zero: nothing flows through this matrix
            return torch.zeros(train.n, dtype=torch.float64), None, lam
        coefficients = _datainf_terms(gv, sq, lam)
        # K c without forming K: u = sum_i c_i g_i, then g_i . u
        correction = reduce(train.dots(reduce(train.weighted_sum(coefficients))))
        return -(gv - correction / n) / lam, None, lam

    stack = val_sum.unsqueeze(0) if val_each is None else torch.cat([val_sum.unsqueeze(0), val_each])
    kernel, dots = train.gram_and_dots(stack, max_bytes=max_bytes)
    gv = dots[:, 0]
    pair = dots[:, 1:] if val_each is not None else None
    if estimator == "identity":
        return -gv, (None if pair is None else -pair), lam
    if lam == 0.0:
        zeros = torch.zeros(train.n, dtype=torch.float64)
        return zeros, (None if pair is None else torch.zeros_like(pair)), lam
    if estimator == "datainf":
        def apply(values: torch.Tensor) -> torch.Tensor:
            return -(values - kernel @ _datainf_terms(values, sq, lam) / n) / lam
    else:
        # Woodbury: (G^T G / n + lam I)^-1 v = (1/lam) [v - G^T (n lam I + G G^T)^-1 G v]
        system = kernel + n * lam * torch.eye(train.n, dtype=torch.float64)
        factor = torch.linalg.cholesky(system)

        def apply(values: torch.Tensor) -> torch.Tensor:
            rhs = values if values.dim() == 2 else values.unsqueeze(1)
            solved = torch.cholesky_solve(rhs, factor)
            out = -(rhs - kernel @ solved) / lam
            return out if values.dim() == 2 else out.squeeze(1)

    return apply(gv), (None if pair is None else apply(pair)), lam

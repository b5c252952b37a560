"""EK-FAC: eigenvalue-corrected Kronecker factors of each weight matrix's empirical Fisher, from gradient factors.

Per matrix W (d_out x d_in), over the tokens that carry gradient (delta_t != 0; padding and each sample's
last position carry none):

    A = mean_t x_t x_t^T (d_in x d_in),   S = mean_t delta_t delta_t^T (d_out x d_out),
    A = Q_A diag(.) Q_A^T,   S = Q_S diag(.) Q_S^T.

Only the eigenbases are used, so how A and S are normalised does not matter. In the Kronecker basis a
sample's gradient is R_i = Q_S^T g_i Q_A = (Delta_i Q_S)^T (X_i Q_A), and the eigenvalue correction is the
Fisher's exact diagonal there, Lambda*_{ab} = (1/n) sum_i (R_i)_{ab}^2 (George et al. 2018). With the same
damping lambda as `exact`,

    h = Q_S [ (Q_S^T v Q_A) / (Lambda* + lambda) ] Q_A^T  ~  ((1/n) G^T G + lambda I)^-1 v.

It equals `exact` whenever Q_S (x) Q_A diagonalises (1/n) G^T G, e.g. one training sample whose gradient has
rank one (a single token carries its loss), or samples whose x's are mutually orthogonal and whose delta's are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerif.gradients.factors import MatrixFactors


@dataclass
class EkfacBasis:
    """Eigenbases of one matrix's Kronecker factors and the corrected eigenvalues (n-averaged)."""

    q_a: torch.Tensor  # (d_in, d_in)
    q_s: torch.Tensor  # (d_out, d_out)
    corrected: torch.Tensor  # (d_out, d_in) Lambda*


def kronecker_factors(factors: MatrixFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, S) in float64: means of x x^T and delta delta^T over the tokens with non-zero delta."""
    a = torch.zeros(factors.d_in, factors.d_in, dtype=torch.float64)
    s = torch.zeros(factors.d_out, factors.d_out, dtype=torch.float64)
    count = 0
    for chunk in factors.chunks:
        x, delta = chunk.x.to(factors.compute_dtype), chunk.delta.to(factors.compute_dtype)
        active = delta.ne(0).any(-1)
        x, delta = x[active], delta[active]
        a = a.to(x.device) + (x.t() @ x).double()
        s = s.to(x.device) + (delta.t() @ delta).double()
        count += int(x.shape[0])
    return a / max(count, 1), s / max(count, 1)


def ekfac_basis(factors: MatrixFactors, n_effective: int) -> EkfacBasis:
    """Eigenbases of A and S, and Lambda*_{ab} = (1/n_effective) sum_i (Q_S^T g_i Q_A)_{ab}^2."""
    a, s = kronecker_factors(factors)
    q_a = torch.linalg.eigh(a).eigenvectors
    q_s = torch.linalg.eigh(s).eigenvectors
    dtype = factors.compute_dtype
    rot_a, rot_s = q_a.to(dtype), q_s.to(dtype)
    corrected = torch.zeros(factors.d_out, factors.d_in, dtype=torch.float64, device=q_a.device)
    for chunk in factors.chunks:  # a loop over batch chunks, each vectorised over its samples
        x = chunk.x.to(device=q_a.device, dtype=dtype)
        delta = chunk.delta.to(device=q_a.device, dtype=dtype)
        rotated = torch.bmm((delta @ rot_s).transpose(1, 2), x @ rot_a)  # (B, d_out, d_in)
        corrected += rotated.double().pow(2).sum(0)
    return EkfacBasis(q_a, q_s, corrected / max(n_effective, 1))


def ekfac_solve(basis: EkfacBasis, stack: torch.Tensor, lam: float) -> torch.Tensor:
    """(H_ekfac + lambda I)^-1 v_k for a stack of vectors (k, d_out, d_in), in float64."""
    q_a, q_s = basis.q_a, basis.q_s
    v = stack.to(device=q_a.device, dtype=torch.float64)
    rotated = q_s.t() @ v @ q_a
    return q_s @ (rotated / (basis.corrected + lam)) @ q_a.t()

"""Per-matrix influence I_i = -h_W . g_i with h_W ~ H_W^-1 v_W (DESIGN §2), on stored gradient factors.

Signs follow Koh & Liang: positive I means up-weighting the sample raises the validation loss.
All scalar algebra is float64; matmuls run in the factors' compute dtype (float32 by default).


The seam for new estimators is `Estimator`: one object per method whose `influence` consumes one
matrix's `MatrixInputs` (stored training factors, the validation gradient sum, optionally every
validation gradient) and returns a `MatrixInfluence`. The Store and Spill strategies call it for every
matrix; register a new subclass in `ESTIMATOR_TYPES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from layerif.errors import LayerIFError
from layerif.gradients.context import RunContext
from layerif.gradients.factors import MatrixFactors

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


@dataclass
class MatrixInputs:
    """What an estimator consumes for one matrix W.

    `train` holds this rank's training factors (zeros for other ranks' samples) with every rank's squared
    norms; `val_sum` is v_W = sum_j grad l(v_j) as (d_out, d_in), summed over ranks; `val_each` the
    per-validation-sample gradients (m, d_out, d_in), only for the pairwise matrix; `n_effective` the number
    of training samples taking part when some were left out (None: all).
    """

    train: MatrixFactors
    val_sum: torch.Tensor
    val_each: torch.Tensor | None = None
    n_effective: int | None = None


@dataclass
class MatrixInfluence:
    """An estimator's answer for one matrix: I (n,), I pairwise (n, m) or None, and its damping lambda_W."""

    values: torch.Tensor
    pairwise: torch.Tensor | None
    damping: float
    info: dict | None = None  # what the solver reports (LiSSA: scale, convergence), recorded in run.json


class Estimator:
    """One inverse-Hessian method, applied matrix by matrix (block-diagonal Hessian)."""

    name: ClassVar[str]
    options: dict  # settings from the run's config (LiSSA's depth, scale, seed); most estimators ignore them
    stream_passes: ClassVar[int | None] = None  # training passes of a streamed run; None: needs stored factors
    needs_kernel: ClassVar[bool] = False  # True: always works on the n x n Gram matrix K = G G^T

    def __init__(self, **options):
        self.options = options

    def influence(self, inputs: MatrixInputs, ctx: RunContext) -> MatrixInfluence:
        """I_i = -h_W . g_i for every training sample of one matrix (and pairwise when val_each is given)."""
        n = inputs.train.n if inputs.n_effective is None else inputs.n_effective
        sq = inputs.train.sq_norms.double()
        lam = damping(sq, inputs.train.d_in * inputs.train.d_out, n=n)
        if self.needs_kernel or inputs.val_each is not None:
            stack = inputs.val_sum.unsqueeze(0)
            if inputs.val_each is not None:
                stack = torch.cat([stack, inputs.val_each])
            kernel, dots = inputs.train.gram_and_dots(stack, max_bytes=ctx.kernel_bytes)
            values = self.from_kernel(kernel, dots, sq, lam, n)
            pair = None if inputs.val_each is None else values[:, 1:]
            return MatrixInfluence(values[:, 0], pair, lam)
        return MatrixInfluence(self.from_dots(inputs.train, inputs.val_sum, sq, lam, n, ctx), None, lam)

    def from_kernel(self, kernel: torch.Tensor, dots: torch.Tensor, sq: torch.Tensor, lam: float,
                    n: int) -> torch.Tensor:
        """I for each column of dots = G [v, v_1, ...] (n, k), given K = G G^T (n, n)."""
        raise NotImplementedError

    def from_dots(self, train: MatrixFactors, val_sum: torch.Tensor, sq: torch.Tensor, lam: float, n: int,
                  ctx: RunContext) -> torch.Tensor:
        """I (n,) without forming K (only matrix-vector work over the factors)."""
        kernel, dots = train.gram_and_dots(val_sum.unsqueeze(0), max_bytes=ctx.kernel_bytes)
        return self.from_kernel(kernel, dots, sq, lam, n)[:, 0]


class Identity(Estimator):
    """H = I: I_i = -g_i . v (TracIn-style)."""

    name = "identity"
    stream_passes = 1

    def from_kernel(self, kernel, dots, sq, lam, n):
        return -dots

    def from_dots(self, train, val_sum, sq, lam, n, ctx):
        return -ctx.dist.all_reduce_sum(train.dots(val_sum))


class DataInf(Estimator):
    """DataInf (DESIGN section 2): h = (1/(n lam)) sum_i (v - c_i g_i), c_i = g_i.v / (lam + ||g_i||^2)."""

    name = "datainf"
    stream_passes = 3

    def from_kernel(self, kernel, dots, sq, lam, n):
        if lam == 0.0:  # every gradient is zero: nothing flows through this matrix
            return torch.zeros_like(dots)
        return -(dots - kernel @ _datainf_terms(dots, sq, lam) / n) / lam

    def from_dots(self, train, val_sum, sq, lam, n, ctx):
        reduce = ctx.dist.all_reduce_sum
        gv = reduce(train.dots(val_sum))
        if lam == 0.0:
            return torch.zeros(train.n, dtype=torch.float64)
        # K c without forming K: u = sum_i c_i g_i, then g_i . u
        correction = reduce(train.dots(reduce(train.weighted_sum(_datainf_terms(gv, sq, lam)))))
        return -(gv - correction / n) / lam


class Exact(Estimator):
    """Damped empirical Fisher solved exactly in sample space (Woodbury)."""

    name = "exact"
    needs_kernel = True

    def from_kernel(self, kernel, dots, sq, lam, n):
        if lam == 0.0:
            return torch.zeros_like(dots)
        # Woodbury: (G^T G / n + lam I)^-1 v = (1/lam) [v - G^T (n lam I + K)^-1 G v], so
        # g_i . h = (1/lam) [(I - K (n lam I + K)^-1) G v]_i = n [(n lam I + K)^-1 G v]_i.
        # The right-hand form avoids subtracting two nearly equal terms when lam is small against K.
        factor = torch.linalg.cholesky(kernel + n * lam * torch.eye(kernel.shape[0], dtype=torch.float64))
        return -n * torch.cholesky_solve(dots, factor)


class _Solved(Estimator):
    """Estimators that form h = H^-1 v per matrix from the factors (no Gram), then I = -G h."""

    def solve(self, inputs: MatrixInputs, stack: torch.Tensor, lam: float, n: int) -> tuple[torch.Tensor, dict | None]:
        """(h for each vector of the stack (k, d_out, d_in), solver info or None)."""
        raise NotImplementedError

    def influence(self, inputs: MatrixInputs, ctx: RunContext) -> MatrixInfluence:
        train = inputs.train
        n = train.n if inputs.n_effective is None else inputs.n_effective
        lam = damping(train.sq_norms.double(), train.d_in * train.d_out, n=n)
        stack = inputs.val_sum.unsqueeze(0)
        if inputs.val_each is not None:
            stack = torch.cat([stack, inputs.val_each])
        if lam == 0.0:  # every gradient is zero: nothing flows through this matrix
            zeros = torch.zeros(train.n, stack.shape[0], dtype=torch.float64)
            return MatrixInfluence(zeros[:, 0], None if inputs.val_each is None else zeros[:, 1:], lam)
        values, info = self.solved_influence(inputs, stack, lam, n, ctx)
        return MatrixInfluence(values[:, 0], None if inputs.val_each is None else values[:, 1:], lam, info)

    def solved_influence(self, inputs: MatrixInputs, stack: torch.Tensor, lam: float, n: int,
                         ctx: RunContext) -> tuple[torch.Tensor, dict | None]:
        """(I (n, k) = -g_i . h_k for each vector of the stack, solver info)."""
        train = inputs.train
        solved, info = self.solve(inputs, stack, lam, n)
        solved = solved.to(device=stack.device, dtype=train.compute_dtype)
        if stack.shape[0] == 1:
            return -train.dots(solved[0]).unsqueeze(1), info
        flat = solved.reshape(stack.shape[0], -1)
        dots = torch.zeros(train.n, stack.shape[0], dtype=torch.float64)
        for index, grads in train.materialised(ctx.kernel_bytes):
            dots[index] = (grads @ flat.t().to(grads.device)).double().cpu()
        return -dots, info


class Lissa(_Solved):
    """LiSSA: the same damped Fisher as `exact`, solved by a stochastic Neumann series (influence/lissa.py)."""

    name = "lissa"

    def solved_influence(self, inputs, stack, lam, n, ctx):
        from layerif.influence.lissa import LissaProblem, lissa_kernel_influence, lissa_settings

        train, settings = inputs.train, lissa_settings(self.options)
        if not settings.kernel_plan(int((train.sq_norms > 0).sum()), train.d_in * train.d_out):
            return super().solved_influence(inputs, stack, lam, n, ctx)
        kernel, dots = train.gram_and_dots(stack, max_bytes=ctx.kernel_bytes)
        v_sq = stack.reshape(stack.shape[0], -1).double().square().sum(1)
        problem = LissaProblem(train.sq_norms, (train.d_out, train.d_in), lam, n)
        values, details = lissa_kernel_influence(kernel, dots, v_sq, problem, settings)
        return -values, details.to_dict()

    def solve(self, inputs, stack, lam, n):
        from layerif.influence.lissa import lissa_settings, lissa_solve

        solved, details = lissa_solve(inputs.train, stack.to(inputs.train.compute_dtype), lam, n,
                                      lissa_settings(self.options))
        return solved, details.to_dict()


class Ekfac(_Solved):
    """EK-FAC: eigenvalue-corrected Kronecker factors of the same Fisher (influence/ekfac.py)."""

    name = "ekfac"

    def solve(self, inputs, stack, lam, n):
        from layerif.influence.ekfac import ekfac_basis, ekfac_solve

        return ekfac_solve(ekfac_basis(inputs.train, n), stack, lam), None


ESTIMATOR_TYPES: dict[str, type[Estimator]] = {cls.name: cls for cls in (DataInf, Exact, Identity, Lissa, Ekfac)}
ESTIMATORS = tuple(ESTIMATOR_TYPES)


def get_estimator(name: str, **options) -> Estimator:
    """The estimator registered under `name`, with the run's estimator settings."""
    if name not in ESTIMATOR_TYPES:
        raise LayerIFError(f"unknown estimator {name!r}; choose from {', '.join(ESTIMATORS)}")
    return ESTIMATOR_TYPES[name](**options)


def influence_from_factors(estimator: str, inputs: MatrixInputs, ctx: RunContext,
                           options: dict | None = None) -> MatrixInfluence:
    """The per-matrix estimator step: `estimator`'s influence for one matrix."""
    return get_estimator(estimator, **(options or {})).influence(inputs, ctx)

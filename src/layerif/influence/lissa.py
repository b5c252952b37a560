"""LiSSA: H_W^-1 v_W by a stochastic Neumann series per weight matrix, with Hessian-vector products from factors.

Same H and damping as `exact`: H = (1/n) G^T G + lambda I. With h_0 = v the recursion

    h_{k+1} = v + (I - (H_B + lambda I) / scale) h_k,        H^-1 v ~ h_K / scale

uses a seeded mini-batch B of training samples per step, H_B = (1/|B|) sum_{i in B} g_i g_i^T (rescaled when
samples were left out). With |B| >= n every step is the full H and the series converges to `exact`
deterministically. H_B h is formed from the factors, never from G: g_i . h = sum_t delta_t^T h x_t and
H_B h = (1/|B|) sum_i (g_i . h) g_i, for a whole stack of vectors h at once (the summed validation gradient,
plus each validation sample's for the pairwise matrix).

With mini-batches the iterate keeps fluctuating around the solution, so the result is the average of h over
the second half of the steps (iterate averaging; full batches return the last iterate). Convergence is
reported as the relative change of the influence G h (and of h) over the last tenth of the steps, for the
average when mini-batches are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerif.errors import LayerIFError
from layerif.gradients.factors import MatrixFactors

LISSA_DEPTH = 200
LISSA_BATCH = 16
SCALE_SAFETY = 2.0
POWER_ITERATIONS = 10
POWER_SAMPLES = 32
PROBE_BATCHES = 3
MAX_RESTARTS = 3


class _Diverged(Exception):
    def __init__(self, size: float, step: int):
        super().__init__(f"|h| = {size} after {step} steps")
        self.size, self.step = size, step


@dataclass
class TokenFactors:
    """One matrix's factors as flat token rows: x (N, d_in), delta (N, d_out), owner (N,) sample number.

    Only tokens whose delta is non-zero are kept (the others add nothing to any gradient), so padding and
    the last position of each sample take no memory or time.
    """

    x: torch.Tensor
    delta: torch.Tensor
    owner: torch.Tensor
    n: int

    @classmethod
    def from_factors(cls, factors: MatrixFactors, device: torch.device | None = None) -> TokenFactors:
        """Flatten a MatrixFactors' batch chunks (store or spill) into token rows on `device`."""
        xs, deltas, owners = [], [], []
        for chunk in factors.chunks:
            x, delta = chunk.x.to(factors.compute_dtype), chunk.delta.to(factors.compute_dtype)
            device = device or x.device
            active = delta.ne(0).any(-1)  # (B, T)
            xs.append(x[active].to(device))
            deltas.append(delta[active].to(device))
            owners.append(chunk.index.to(device).unsqueeze(1).expand_as(active)[active.to(device)])
        if not xs:
            device = device or torch.device("cpu")
            return cls(torch.zeros(0, factors.d_in, dtype=factors.compute_dtype, device=device),
                       torch.zeros(0, factors.d_out, dtype=factors.compute_dtype, device=device),
                       torch.zeros(0, dtype=torch.long, device=device), factors.n)
        return cls(torch.cat(xs), torch.cat(deltas), torch.cat(owners), factors.n)

    def subset(self, samples: torch.Tensor) -> TokenFactors:
        """The token rows of the given sample numbers (same numbering)."""
        keep = torch.zeros(self.n, dtype=torch.bool, device=self.owner.device)
        keep[samples.to(self.owner.device)] = True
        rows = keep[self.owner]
        return TokenFactors(self.x[rows], self.delta[rows], self.owner[rows], self.n)

    def dots(self, stack: torch.Tensor) -> torch.Tensor:
        """(k, n) g_i . h_k for a stack h of k matrices (k, d_out, d_in); zero for samples without tokens."""
        per_token = (torch.matmul(self.x, stack.transpose(1, 2)) * self.delta).sum(-1)  # (k, N)
        out = torch.zeros(stack.shape[0], self.n, dtype=stack.dtype, device=stack.device)
        return out.index_add_(1, self.owner, per_token)

    def weighted_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """(k, d_out, d_in) sum_i w_{k,i} g_i for weights (k, n)."""
        weighted = self.delta.unsqueeze(0) * weights[:, self.owner].unsqueeze(-1)  # (k, N, d_out)
        return torch.matmul(weighted.transpose(1, 2), self.x)

    def hvp(self, stack: torch.Tensor, divisor: float) -> torch.Tensor:
        """(1/divisor) sum_i g_i (g_i . h_k) for each h_k of the stack."""
        return self.weighted_sums(self.dots(stack)) / divisor


@dataclass(frozen=True)
class LissaSettings:
    """How to run the series: steps, scale (None: automatic), training samples per step, seed of the draws."""

    depth: int = LISSA_DEPTH
    scale: float | None = None
    batch_size: int = LISSA_BATCH
    seed: int = 0


@dataclass
class LissaInfo:
    """How a LiSSA solve went for one matrix."""

    scale: float
    depth: int
    batch_size: int
    relative_change: float  # of the influence G h over the last w = max(1, depth // 10) steps: ||dI|| / ||I||
    h_relative_change: float  # the same for h itself (slow where H = lambda: directions no gradient sees)
    top_eigenvalue: float | None  # power-iteration estimate behind an automatic scale
    restarts: int = 0  # times an automatic scale was raised 4x after the series diverged

    def to_dict(self) -> dict:
        return {"scale": self.scale, "depth": self.depth, "batch_size": self.batch_size,
                "relative_change": self.relative_change, "h_relative_change": self.h_relative_change,
                "top_eigenvalue": self.top_eigenvalue, "restarts": self.restarts}


def top_eigenvalue(tokens: TokenFactors, divisor: float, start: torch.Tensor, iterations: int = POWER_ITERATIONS) -> float:
    """Power-iteration estimate of the top eigenvalue of (1/divisor) sum_i g_i g_i^T over `tokens`' samples."""
    vector = start / start.norm().clamp_min(torch.finfo(start.dtype).tiny)
    value = 0.0
    for _ in range(iterations):
        product = tokens.hvp(vector.unsqueeze(0), divisor)[0]
        value = float((product * vector).sum())
        norm = product.norm()
        if float(norm) == 0.0:
            return 0.0
        vector = product / norm
    return value


def lissa_solve(factors: MatrixFactors, stack: torch.Tensor, lam: float, n_effective: int,
                settings: LissaSettings = LissaSettings()) -> tuple[torch.Tensor, LissaInfo]:
    """(H + lambda I)^-1 v_k for a stack of vectors (k, d_out, d_in) by the LiSSA recursion, and how it converged.

    H = (1/n_effective) sum_i g_i g_i^T. Samples whose gradient is zero (left out, or no gradient at all)
    are never drawn; the others are drawn without replacement within a step. `scale` None picks
    2 x (top eigenvalue + lambda), the eigenvalue the largest power-iteration estimate over up to 32 samples
    and, with mini-batches, over 3 random mini-batches; should the series still diverge, the scale is raised
    4x and the series restarted (at most 3 times, counted in the info).
    """
    depth, scale, batch_size = settings.depth, settings.scale, settings.batch_size
    if depth < 1:
        raise LayerIFError(f"--lissa-depth must be >= 1, got {depth}")
    if scale is not None and scale <= 0:
        raise LayerIFError(f"--lissa-scale must be positive, got {scale}")
    tokens = TokenFactors.from_factors(factors, stack.device)
    stack = stack.to(tokens.x.dtype)
    active = torch.nonzero(factors.sq_norms > 0).flatten()
    n_active = int(active.numel())
    generator = torch.Generator().manual_seed(settings.seed)
    full_batch = batch_size >= n_active
    # each step's H_B = (n_active / n_effective) mean over B of g g^T, an unbiased draw of H
    divisor = n_effective if full_batch else batch_size * n_effective / max(n_active, 1)
    estimate, automatic, restarts = None, scale is None, 0
    if automatic:
        estimate = _probe_top_eigenvalue(tokens, active, n_effective, batch_size, stack, generator)
        scale = SCALE_SAFETY * (estimate + lam)
    while True:
        try:
            series = _Series(tokens, stack, active, lam, batch_size, divisor)
            h, marker = series.run(scale, depth, generator)
            break
        except _Diverged as diverged:
            # an automatic scale comes from a few probes; a mini-batch may still have a larger top eigenvalue
            if not automatic or restarts == MAX_RESTARTS:
                hint = "pass a larger --lissa-scale" if not automatic else "pass --lissa-scale explicitly"
                raise LayerIFError(f"LiSSA diverged (|h| = {diverged.size:.3g} after {diverged.step} steps with "
                                   f"scale {scale:.3g}); {hint}") from None
            scale *= 4.0
            restarts += 1
    tiny = torch.finfo(h.dtype).tiny
    h_change = float((h[0] - marker[0]).norm() / h[0].norm().clamp_min(tiny))
    # what the scores see is G h, not h: components of h that no training gradient reaches converge at
    # the slow rate lambda / scale but never change an influence
    last, before = tokens.dots(h[:1])[0], tokens.dots(marker[:1])[0]
    change = float((last - before).norm() / last.norm().clamp_min(tiny))
    info = LissaInfo(float(scale), depth, n_active if full_batch else batch_size, change, h_change, estimate,
                     restarts)
    return h / scale, info


def _probe_top_eigenvalue(tokens: TokenFactors, active: torch.Tensor, n_effective: int, batch_size: int,
                          stack: torch.Tensor, generator: torch.Generator) -> float:
    """Largest power-iteration top eigenvalue of H over a 32-sample probe and a few mini-batch-sized probes."""
    n_active = int(active.numel())
    sizes = [min(POWER_SAMPLES, n_active)] + ([batch_size] * PROBE_BATCHES if batch_size < n_active else [])
    start = torch.randn(stack.shape[1:], generator=generator, dtype=torch.float64).to(stack)
    largest = 0.0
    for size in sizes:  # a handful of probes, each vectorised over its samples
        probe = active if size >= n_active else active[torch.randperm(n_active, generator=generator)[:size]]
        probe_tokens = tokens if size >= n_active else tokens.subset(probe)
        # on the same footing as H: (1/|probe|) sum g g^T times the active share
        largest = max(largest, top_eigenvalue(probe_tokens, max(size, 1) * n_effective / max(n_active, 1), start))
    return largest


@dataclass
class _Series:
    """One matrix's recursion h_{k+1} = v + (I - (H_B + lambda I) / scale) h_k over a stack of vectors v."""

    tokens: TokenFactors
    stack: torch.Tensor
    active: torch.Tensor  # samples that may be drawn
    lam: float
    batch_size: int
    divisor: float  # H_B = (1 / divisor) sum_{i in B} g_i g_i^T

    def run(self, scale: float, depth: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, the same w steps earlier); raises _Diverged.

        h is the last iterate with full batches, the average over the second half of the steps otherwise.
        """
        tokens, stack, active, lam, batch_size, divisor = (self.tokens, self.stack, self.active, self.lam,
                                                           self.batch_size, self.divisor)
        n_active = int(active.numel())
        full_batch = batch_size >= n_active
        window = max(1, depth // 10)
        bound = 10.0 * scale * float(stack.norm()) / max(lam, torch.finfo(torch.float64).tiny)
        h = stack.clone()
        marker = h
        # with mini-batches the iterate keeps fluctuating around the solution: average it over the second half
        tail_start = depth // 2 if not full_batch else depth
        tail_sum = torch.zeros_like(h)
        for step in range(depth):
            batch = tokens if full_batch else tokens.subset(
                active[torch.randperm(n_active, generator=generator)[:batch_size]])
            h = stack + h - (batch.hvp(h, divisor) + lam * h) / scale
            if step >= tail_start:
                tail_sum += h
            if step == depth - 1 - window:
                marker = h if full_batch else tail_sum / max(step + 1 - tail_start, 1)
            if (step + 1) % 25 == 0 or step == depth - 1:
                size = float(h.norm())
                if not size < bound:  # also catches NaN
                    raise _Diverged(size, step + 1)
        if not full_batch:
            h = tail_sum / (depth - tail_start)
        return h, marker

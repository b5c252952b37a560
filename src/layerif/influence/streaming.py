"""DataInf / identity influence from streamed sums: memory of two weight-sized accumulators, not of n gradients.

DataInf needs three traversals: (1) validation sum v, then ||g_i||^2 and g_i . v for each training sample;
(2) u = sum_i c_i g_i once lambda and c are known; (3) g_i . u. Identity needs only the first.
"""

from __future__ import annotations

import torch

from layerif.gradients.context import RunContext
from layerif.gradients.factors import chunk_dots, chunk_sq_norms, chunk_weighted_sum, device_index
from layerif.influence.estimators import damping


class StreamingInfluence:
    """Accumulates what one matrix set needs across passes; call `consume_*` from `run_pass`."""

    def __init__(self, estimator: str, shapes: list[tuple[int, int]], n: int, ctx: RunContext):
        self.estimator = estimator
        self.shapes = shapes
        self.n = n
        self.n_effective = n  # lowered when samples are left out for non-finite gradients
        self.compute_dtype = ctx.compute_dtype
        self.device = ctx.device
        self.v: list[torch.Tensor | None] = [None] * len(shapes)
        self.u: list[torch.Tensor | None] = [None] * len(shapes)
        # per-sample sums stay on the device during a pass (no host sync per matrix)
        self.sq = torch.zeros(len(shapes), n, dtype=torch.float64, device=ctx.device)
        self.gv = torch.zeros(len(shapes), n, dtype=torch.float64, device=ctx.device)
        self.gu = torch.zeros(len(shapes), n, dtype=torch.float64, device=ctx.device)
        self.lam = torch.zeros(len(shapes), dtype=torch.float64)
        self.coefficients: torch.Tensor | None = None

    @property
    def passes(self) -> int:
        return 1 if self.estimator == "identity" else 3

    def _cast(self, x, delta):
        return x.to(self.compute_dtype), delta.to(self.compute_dtype)

    def consume_val(self, position: int, batch, x: torch.Tensor, delta: torch.Tensor, cache: dict) -> None:
        """Pass 1, validation batches: v += sum_j g_j."""
        x, delta = self._cast(x, delta)
        part = chunk_weighted_sum(x, delta, torch.ones(x.shape[0], dtype=x.dtype, device=x.device))
        self.v[position] = part if self.v[position] is None else self.v[position] + part

    def consume_first(self, position: int, batch, x: torch.Tensor, delta: torch.Tensor, cache: dict) -> None:
        """Pass 1, training batches: ||g_i||^2 and g_i . v."""
        x, delta = self._cast(x, delta)
        index = device_index(batch, cache, x.device)
        self.sq[position, index] = chunk_sq_norms(x, delta).double()
        self.gv[position, index] = chunk_dots(x, delta, self.v[position]).double()

    def finish_first(self) -> None:
        """Between passes 1 and 2: lambda and c for every matrix."""
        self.sq, self.gv = self.sq.cpu(), self.gv.cpu()
        for position, (d_out, d_in) in enumerate(self.shapes):
            self.lam[position] = damping(self.sq[position], d_in * d_out, n=self.n_effective)
        safe = torch.where(self.lam > 0, self.lam, torch.ones_like(self.lam))
        self.coefficients = (self.gv / (safe.unsqueeze(1) + self.sq)).to(self.device)

    def consume_second(self, position: int, batch, x: torch.Tensor, delta: torch.Tensor, cache: dict) -> None:
        """Pass 2: u += sum_i c_i g_i."""
        x, delta = self._cast(x, delta)
        weights = self.coefficients[position, device_index(batch, cache, x.device)]
        part = chunk_weighted_sum(x, delta, weights)
        self.u[position] = part if self.u[position] is None else self.u[position] + part

    def consume_third(self, position: int, batch, x: torch.Tensor, delta: torch.Tensor, cache: dict) -> None:
        """Pass 3: g_i . u."""
        x, delta = self._cast(x, delta)
        self.gu[position, device_index(batch, cache, x.device)] = chunk_dots(x, delta, self.u[position]).double()

    def influence(self) -> torch.Tensor:
        """(n_matrices, n) influence I (Koh & Liang sign)."""
        self.sq, self.gv, self.gu = self.sq.cpu(), self.gv.cpu(), self.gu.cpu()
        if self.estimator == "identity":
            return -self.gv
        safe = torch.where(self.lam > 0, self.lam, torch.ones_like(self.lam)).unsqueeze(1)
        values = -(self.gv - self.gu / self.n_effective) / safe
        return torch.where(self.lam.unsqueeze(1) > 0, values, torch.zeros_like(values))

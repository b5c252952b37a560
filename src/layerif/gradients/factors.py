"""Per-sample gradients of one weight matrix kept as factors, and the algebra the estimators need.

For a linear map y_t = W x_t, the gradient of sample i's loss is g_i = sum_t delta_t x_t^T, where
delta_t = dl_i/dy_t. Keeping (X_i, Delta_i) instead of g_i costs T (d_in + d_out) numbers instead of
d_in d_out, and every quantity an estimator needs is a matmul over these factors. Everything here
works on whole batches at once: no loop over samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class FactorChunk:
    """Factors of one batch: x (B, T, d_in), delta (B, T, d_out) (zero on padding), sample numbers (B,)."""

    index: torch.Tensor
    x: torch.Tensor
    delta: torch.Tensor


def device_index(batch, cache: dict, device: torch.device) -> torch.Tensor:
    """A batch's sample numbers on `device`, copied once per batch (`cache` is the pass's per-batch dict)."""
    index = cache.get("device_index")
    if index is None:
        index = cache["device_index"] = batch.index.to(device)
    return index


def chunk_sq_norms(x: torch.Tensor, delta: torch.Tensor, x_gram: torch.Tensor | None = None) -> torch.Tensor:
    """||g_i||^2 of each sample of a batch, by whichever of Gram or materialised form is cheaper."""
    batch, tokens, d_in = x.shape
    d_out = delta.shape[-1]
    if tokens * (d_in + d_out) <= d_in * d_out:
        # ||sum_t d_t x_t^T||^2 = sum_{t,s} (d_t . d_s)(x_t . x_s)
        if x_gram is None:
            x_gram = torch.bmm(x, x.transpose(1, 2))
        delta_gram = torch.bmm(delta, delta.transpose(1, 2))
        return (x_gram * delta_gram).sum(dim=(1, 2))
    grads = torch.bmm(delta.transpose(1, 2), x)
    return grads.pow(2).sum(dim=(1, 2))


def chunk_dots(x: torch.Tensor, delta: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """g_i . M for each sample of a batch, M in (d_out, d_in): sum_t delta_t^T M x_t."""
    return ((x @ matrix.t()) * delta).sum(dim=(1, 2))


def chunk_weighted_sum(x: torch.Tensor, delta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i g_i over a batch, as a (d_out, d_in) matrix."""
    weighted = delta * weights.to(device=delta.device, dtype=delta.dtype).view(-1, 1, 1)
    return weighted.reshape(-1, delta.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def chunk_materialise(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The per-sample gradients of a batch, flattened: (B, d_out * d_in)."""
    return torch.bmm(delta.transpose(1, 2), x).reshape(x.shape[0], -1)


@dataclass
class MatrixFactors:
    """All per-sample gradient factors of one matrix over a sample set (n samples), in batch chunks."""

    n: int
    d_in: int
    d_out: int
    compute_dtype: torch.dtype = torch.float32
    chunks: list[FactorChunk] = field(default_factory=list)
    sq_norms: torch.Tensor | None = None  # (n,), filled as chunks arrive

    def __post_init__(self) -> None:
        if self.sq_norms is None:
            self.sq_norms = torch.zeros(self.n, dtype=torch.float64)

    def add(self, chunk: FactorChunk, sq_norms: torch.Tensor) -> None:
        """Append one batch's factors and the per-sample squared norms computed at capture time."""
        self.sq_norms[chunk.index] = sq_norms.double().cpu()
        self.chunks.append(chunk)

    def _cast(self, chunk: FactorChunk) -> tuple[torch.Tensor, torch.Tensor]:
        return chunk.x.to(self.compute_dtype), chunk.delta.to(self.compute_dtype)

    def dots(self, matrix: torch.Tensor) -> torch.Tensor:
        """(n,) vector of g_i . M."""
        out = torch.zeros(self.n, dtype=torch.float64)
        matrix = matrix.to(self.compute_dtype)
        for chunk in self.chunks:
            x, delta = self._cast(chunk)
            out[chunk.index] = chunk_dots(x, delta, matrix).double().cpu()
        return out

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_i w_i g_i as (d_out, d_in); weights has shape (n,)."""
        total = None
        for chunk in self.chunks:
            x, delta = self._cast(chunk)
            part = chunk_weighted_sum(x, delta, weights[chunk.index].to(self.compute_dtype))
            total = part if total is None else total + part
        if total is None:  # no samples here (a data-parallel rank with an empty shard)
            total = torch.zeros(self.d_out, self.d_in, dtype=self.compute_dtype)
        return total

    def materialised(self, max_bytes: int = 1 << 30) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (sample numbers, per-sample gradients (k, d_out*d_in)) in groups of at most max_bytes."""
        row_bytes = self.d_in * self.d_out * torch.finfo(self.compute_dtype).bits // 8
        per_group = max(1, max_bytes // max(row_bytes, 1))
        pending_index: list[torch.Tensor] = []
        pending_grads: list[torch.Tensor] = []
        count = 0
        for chunk in self.chunks:
            x, delta = self._cast(chunk)
            pending_index.append(chunk.index)
            pending_grads.append(chunk_materialise(x, delta))
            count += len(chunk.index)
            if count >= per_group:
                yield torch.cat(pending_index), torch.cat(pending_grads)
                pending_index, pending_grads, count = [], [], 0
        if pending_index:
            yield torch.cat(pending_index), torch.cat(pending_grads)

    def gram_and_dots(self, matrices: torch.Tensor, max_bytes: int = 1 << 30) -> tuple[torch.Tensor, torch.Tensor]:
        """K = G G^T (n, n) and G M_k^T (n, k) for a stack of k matrices (k, d_out, d_in), in float64."""
        kernel = torch.zeros(self.n, self.n, dtype=torch.float64)
        flat = matrices.reshape(matrices.shape[0], -1).to(self.compute_dtype)
        dots = torch.zeros(self.n, flat.shape[0], dtype=torch.float64)
        row_bytes = self.d_in * self.d_out * torch.finfo(self.compute_dtype).bits // 8
        if self.n * row_bytes <= max_bytes:
            groups = list(self.materialised(max_bytes))
            index = torch.cat([group[0] for group in groups])
            grads = torch.cat([group[1] for group in groups])
            kernel[index.unsqueeze(1), index.unsqueeze(0)] = (grads @ grads.t()).double()
            dots[index] = (grads @ flat.t()).double()
            return kernel, dots
        # Too big to hold at once: rebuild the groups pairwise (a loop over groups of samples, not samples).
        for index_a, grads_a in self.materialised(max_bytes // 2):
            dots[index_a] = (grads_a @ flat.t()).double()
            for index_b, grads_b in self.materialised(max_bytes // 2):
                kernel[index_a.unsqueeze(1), index_b.unsqueeze(0)] = (grads_a @ grads_b.t()).double()
        return kernel, dots

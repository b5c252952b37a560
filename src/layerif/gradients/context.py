"""What every pass and estimator step of one scoring run shares: device, dtypes, ranks, loss, progress, policy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from layerif.data.tokens import LossFn, token_loss
from layerif.distributed import DistContext


@dataclass(frozen=True)
class RunContext:
    """Settings of one scoring run that the passes, strategies and estimators all read."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compute_dtype: torch.dtype = torch.float32  # dtype of the estimator's matmuls
    dist: DistContext = field(default_factory=DistContext)
    quiet: bool = False  # no progress bars
    skip_nonfinite: bool = False  # leave out samples with a non-finite loss or gradient instead of stopping
    loss: LossFn = token_loss  # per-sample training loss: loss(logits, batch) -> (B,)
    kernel_bytes: int = 1 << 30  # most bytes of materialised gradients an estimator holds at once
    spill_dir: str | None = None  # where a spill plan writes its factor files (default: the temporary directory)

    def progress(self, total: int, desc: str, unit: str = "sample"):
        """A progress bar (silent when quiet)."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=self.quiet, dynamic_ncols=True, leave=False)

    def reduced_sums(self, sums: Sequence[torch.Tensor | None], shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Weight-sized sums over every rank; a sum this rank never started (no samples) counts as zeros."""
        out = []
        for total, shape in zip(sums, shapes):
            if total is None:
                total = torch.zeros(shape, dtype=self.compute_dtype, device=self.device)
            out.append(self.dist.all_reduce_sum(total))
        return out

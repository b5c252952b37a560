"""bench/lissa_convergence.py: the closed-form full-batch step count is the recursion's own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from lissa_convergence import comparison_steps, full_batch_steps  # noqa: E402

from layerif.influence.estimators import Exact, damping  # noqa: E402
from layerif.influence.lissa import LissaProblem, LissaSettings, lissa_kernel_influence  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_full_batch_matches_the_recursion(seed):
    generator = torch.Generator().manual_seed(seed)
    n, d = 12, 40
    grads = torch.randn(n, d, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
    v = torch.randn(d, generator=generator, dtype=torch.float64)
    sq = grads.square().sum(1)
    entry = {"kernel": grads @ grads.t(), "dots": grads @ v, "v_sq": float(v @ v), "sq_norms": sq,
             "lam": damping(sq, d), "n": n, "shape": (4, 10)}
    steps, change, error = full_batch_steps(entry, 1e-4, comparison_steps(100_000))
    top = float(torch.linalg.eigvalsh(entry["kernel"])[-1]) / n + entry["lam"]
    values, info = lissa_kernel_influence(entry["kernel"], entry["dots"].unsqueeze(1), torch.tensor([entry["v_sq"]]),
                                          LissaProblem(sq, entry["shape"], entry["lam"], n),
                                          LissaSettings(depth=100_000, batch_size=n, tol=1e-4, scale=2 * top))
    assert info.converged and steps == info.steps
    assert change == pytest.approx(info.relative_change, rel=1e-6)
    exact = -Exact().from_kernel(entry["kernel"], entry["dots"].unsqueeze(1), sq, entry["lam"], n)
    assert error == pytest.approx(float((values - exact).norm() / exact.norm()), rel=1e-4)

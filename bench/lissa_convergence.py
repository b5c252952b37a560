"""How many LiSSA steps a real model needs at the contract's damping, from each matrix's Gram (SmolLM2, 300 x 50).

One gradient capture records every matrix's Gram K = G G^T, G v, ||v||^2, the squared norms and the damping
lambda (a bench-only estimator registered in ESTIMATOR_TYPES, the seam for new estimators; cached under
runs/). From those, per matrix:

- full batches: G h_t is a geometric series in the eigenbasis of K (G (H + lambda I) = (K/n + lambda I) G), so
  the step at which LiSSA's stopping rule (relative change of G h over the last tenth of the steps, checked
  every 25) first falls below the tolerance is found in closed form, with the error against `exact` then;
  the scale is 2 x (top eigenvalue of H + lambda), the ideal the automatic scale approaches;
- `lissa_kernel_influence` itself on a spread of matrices: 64-sample mini-batches (the factor plan's default)
  at 2000 steps, at 8x that, and 4 averaged recursions at 2x (the same sample-steps as 8x); full batches at
  16,000 steps; and the kernel plan's defaults (full batches, at most 1,000,000 steps).

    python bench/lissa_convergence.py            # writes bench/results/lissa_convergence.md (about 15 min)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCALE_SAFETY = 2.0


def record_kernels(task: str, sizes: tuple[int, int], batch_size: int) -> list[dict]:
    """Every matrix's Gram inputs from one spilled capture, in the order the engine visits the matrices."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from agreement import task_rows

    from layerif.api import ScoreConfig, score_layers
    from layerif.influence import estimators
    from layerif.models import load_model

    recorded: list[dict] = []

    class KernelRecord(estimators.Estimator):
        """Records (K, G v, ||v||^2, squared norms, lambda, n) per matrix; answers exact's influence."""

        name = "kernel-record"

        def influence(self, inputs, ctx):
            train = inputs.train
            lam = estimators.damping(train.sq_norms.double(), train.d_in * train.d_out)
            kernel, dots = train.gram_and_dots(inputs.val_sum.unsqueeze(0), max_bytes=ctx.kernel_bytes)
            recorded.append({"kernel": kernel, "dots": dots[:, 0], "v_sq": float(inputs.val_sum.double().square().sum()),
                             "sq_norms": train.sq_norms.double(), "lam": lam, "n": train.n,
                             "shape": (train.d_out, train.d_in)})
            values = estimators.Exact().from_kernel(kernel, dots, train.sq_norms.double(), lam, train.n)
            return estimators.MatrixInfluence(values[:, 0], None, lam)

    estimators.ESTIMATOR_TYPES[KernelRecord.name] = KernelRecord
    estimators.ESTIMATORS = tuple(estimators.ESTIMATOR_TYPES)
    loaded = load_model("smollm2-135m", quiet=True)
    train, val = task_rows(task, sizes)
    score_layers(loaded.model, loaded.tokenizer, train, val,
                 ScoreConfig(estimator=KernelRecord.name, strategy="spill", batch_size=batch_size, quiet=True))
    return recorded


def comparison_steps(depth: int, check_every: int = 25) -> list[tuple[int, int]]:
    """(marker step, step) pairs at which LiSSA's stopping rule compares G h, up to `depth` steps."""
    pairs, marker = [], 0
    for step in range(check_every, depth + 1, check_every):
        if step - marker >= max(1, step // 10):
            pairs.append((marker, step))
            marker = step
    return pairs


def full_batch_steps(entry: dict, tol: float, pairs: list[tuple[int, int]]) -> tuple[int | None, float, float]:
    """(first step the stopping rule passes or None, its last-window change, error of G h against exact then)."""
    n, lam = entry["n"], entry["lam"]
    kappa, basis = torch.linalg.eigh(entry["kernel"])
    kappa = kappa.clamp_min(0)
    w = basis.t() @ entry["dots"]
    eig = kappa / n + lam  # eigenvalues of K/n + lambda I: G (H + lambda I) = (K/n + lambda I) G
    scale = SCALE_SAFETY * float(eig.max())
    ratio = eig / scale
    log_q = torch.log1p(-ratio)
    limit = w / eig  # G (H + lambda I)^-1 v

    def gh(step: int) -> torch.Tensor:
        return w * -torch.expm1((step + 1) * log_q) / (scale * ratio)

    previous = gh(0)
    for marker, step in pairs:
        current = gh(step)
        change = float((current - (previous if marker else gh(0))).norm() / current.norm().clamp_min(1e-300))
        previous = current
        if change < tol:
            return step, change, float((current - limit).norm() / limit.norm())
    return None, change, float((current - limit).norm() / limit.norm())


def mini_batch_runs(entries: list[dict], settings: dict[str, dict]) -> dict[str, list[dict]]:
    """lissa_kernel_influence per setting on each entry: converged, steps, last-window change, error vs exact, s."""
    from layerif.influence.estimators import Exact
    from layerif.influence.lissa import LissaProblem, LissaSettings, lissa_kernel_influence

    out: dict[str, list[dict]] = {}
    for label, options in settings.items():
        rows = []
        for entry in entries:
            started = time.perf_counter()
            values, info = lissa_kernel_influence(
                entry["kernel"], entry["dots"].unsqueeze(1), torch.tensor([entry["v_sq"]]),
                LissaProblem(entry["sq_norms"], entry["shape"], entry["lam"], entry["n"]), LissaSettings(**options))
            exact = -Exact().from_kernel(entry["kernel"], entry["dots"].unsqueeze(1), entry["sq_norms"],
                                         entry["lam"], entry["n"])
            rows.append({"converged": info.converged, "steps": info.steps, "change": info.relative_change,
                         "error": float((values - exact).norm() / exact.norm()),
                         "seconds": time.perf_counter() - started})
        out[label] = rows
        print(f"  {label}: {sum(row['converged'] for row in rows)} of {len(rows)} converged", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="mrpc")
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=10_000_000, help="full-batch search horizon")
    parser.add_argument("--every", type=int, default=7, help="mini-batch runs on every k-th matrix")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "lissa_convergence.md"))
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-lissa-convergence"))
    args = parser.parse_args(argv)
    from layerif.influence.lissa import LISSA_BATCH, LISSA_DEPTH, LISSA_KERNEL_DEPTH
    from layerif.io import atomic_write_text

    cache = Path(args.work) / f"{args.task}-{args.n_train}x{args.n_val}-kernels.pt"
    started = time.perf_counter()
    if cache.is_file():
        entries = torch.load(cache)
    else:
        entries = record_kernels(args.task, (args.n_train, args.n_val), args.batch_size)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(entries, cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)
    capture_s = time.perf_counter() - started
    pairs = comparison_steps(args.max_steps)
    full = [full_batch_steps(entry, args.tol, pairs) for entry in entries]
    conditions = torch.tensor([float((torch.linalg.eigvalsh(e["kernel"]).max() / e["n"] + e["lam"]) / e["lam"])
                               for e in entries])
    sample = entries[::args.every]
    settings = {f"{LISSA_BATCH}-sample batches, depth {LISSA_DEPTH} (the earlier default)":
                {"batch_size": LISSA_BATCH, "depth": LISSA_DEPTH},
                f"{LISSA_BATCH}-sample batches, depth {8 * LISSA_DEPTH}": {"batch_size": LISSA_BATCH, "depth": 8 * LISSA_DEPTH},
                f"4 recursions of {LISSA_BATCH}, depth {2 * LISSA_DEPTH}":
                {"batch_size": LISSA_BATCH, "depth": 2 * LISSA_DEPTH, "repeats": 4},
                f"full batch, depth {8 * LISSA_DEPTH}": {"depth": 8 * LISSA_DEPTH},
                f"defaults (full batch, at most {LISSA_KERNEL_DEPTH:,} steps)": {}}
    minis = mini_batch_runs(sample, settings)
    reached = [steps for steps, _, _ in full if steps is not None]
    command = "python bench/lissa_convergence.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# LiSSA convergence on a real model", "", f"Command: `{command.strip()}`", "",
             f"smollm2-135m, first {args.n_train} training x {args.n_val} validation rows of {args.task}, all "
             f"{len(entries)} matrices, damping as `exact` (0.1 x mean ||g||^2 / d_W), tolerance {args.tol:g} on the "
             f"last-window change of G h (LiSSA's stopping rule). Capture and Grams: {capture_s:.0f} s.", "",
             "## Full batches (closed form, scale 2 x (top eigenvalue + lambda))", "",
             f"- condition number (top eigenvalue of H + lambda) / lambda: median {conditions.median():.3g}, "
             f"min {conditions.min():.3g}, max {conditions.max():.3g}",
             f"- the stopping rule passes within {args.max_steps:,} steps on {len(reached)} of {len(entries)} "
             "matrices" + (f"; steps median {sorted(reached)[len(reached) // 2]:,}, max {max(reached):,}"
                           if reached else ""),
             "- error of G h against exact when it passes (or at the horizon): median "
             f"{sorted(error for _, _, error in full)[len(full) // 2]:.3g}, max {max(error for _, _, error in full):.3g}",
             "", f"## The recursion itself (`lissa_kernel_influence`, every {args.every}th matrix: {len(sample)})", "",
             "| setting | converged | steps mean / max | worst last-window change | error vs exact median / max | "
             "seconds per matrix |", "|---|---|---|---|---|---|"]
    for label, rows in minis.items():
        errors = sorted(row["error"] for row in rows)
        lines.append(f"| {label} | {sum(row['converged'] for row in rows)} of {len(rows)} | "
                     f"{sum(row['steps'] for row in rows) / len(rows):.0f} / {max(row['steps'] for row in rows)} | "
                     f"{max(row['change'] for row in rows):.2e} | {errors[len(errors) // 2]:.3g} / {errors[-1]:.3g} | "
                     f"{sum(row['seconds'] for row in rows) / len(rows):.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

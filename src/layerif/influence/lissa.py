"""LiSSA: H_W^-1 v_W by a stochastic Neumann series per weight matrix, with Hessian-vector products from factors.

Same H and damping as `exact`: H = (1/n) G^T G + lambda I. With h_0 = v the recursion

    h_{k+1} = v + (I - (H_B + lambda I) / scale) h_k,        H^-1 v ~ h_K / scale

uses a seeded mini-batch B of training samples per step, H_B = (1/|B|) sum_{i in B} g_i g_i^T (rescaled when
samples were left out). With |B| >= n every step is the full H and the series converges to `exact`
deterministically. H_B h is formed from the factors, never from G: g_i . h = sum_t delta_t^T h x_t and
H_B h = (1/|B|) sum_i (g_i . h) g_i, for a whole stack of vectors h at once (the summed validation gradient,
plus each validation sample's for the pairwise matrix).

With mini-batches the iterate keeps fluctuating around the solution, so the estimate is the average of h over
the last half to three quarters of the steps (iterate averaging; full batches use the last iterate), and
`repeats` independent recursions can be run in lockstep and averaged. Every 25 steps, once a tenth of the steps
has passed since the last comparison, the relative change of the influence G h of the estimate is measured over
that window; a recursion stops when it falls below `tol`, or after `depth` steps (then it has not converged,
and the info says so).

Every iterate lies in span{v, g_1..g_n}, so with few samples (`plan` kernel) the same recursion runs on
coordinates in that span, from the Gram K = G G^T and G v: O(|B| n) per step instead of a pass over the factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerif.errors import LayerIFError
from layerif.gradients.factors import MatrixFactors

# Defaults measured on a random 4-block Llama with 24 x 6 rows (bench/lissa_defaults.py): full batches reach a
# last-window change of 1e-3 within 925 steps and then S_all within 0.03 % of `exact`; 16-sample mini-batches
# needed 10,000 steps for 3e-3, their noise shrinking only as one over the root of the steps. On SmolLM2 with
# 300 rows (bench/lissa_convergence.py) 64-sample mini-batches converged on no matrix even at 16,000 steps
# (median 3.7 % from exact), while full batches pass the tolerance within 467,600 steps on every matrix (median
# 7,600) and then lie within 0.22 % of exact: in the kernel plan a full-batch step costs O(n^2), so it is the default.
LISSA_DEPTH = 2000  # most steps in the factor plan; a recursion stops earlier once converged
LISSA_KERNEL_DEPTH = 1_000_000  # most steps in the kernel plan (about 26 us each at n = 300)
LISSA_TOL = 1e-3  # float32 iterates settle near 1e-4, so smaller tolerances may never be met
LISSA_BATCH = 64  # factor plan: up to 64 training samples every step is the full, deterministic H
LISSA_REPEATS = 1
LISSA_PLANS = ("auto", "kernel", "factors")
# auto runs the recursion in sample coordinates up to this many training samples (when they are fewer than the
# matrix's parameters): the n x n Gram costs about what 2000 factor-space steps of 64 samples cost near n = 2048
KERNEL_PLAN_MAX_SAMPLES = 2048
CHECK_EVERY = 25  # steps between divergence checks (and convergence checks, once a window has passed)
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
    """How to run the series.

    depth: most steps per recursion (None: 1,000,000 in the kernel plan, 2000 in the factor plan); tol: stop once
    the relative change of the influence over a window (the last tenth of the steps) is below it (0: always run
    `depth` steps); scale None: automatic; batch_size: training samples per step (None: all of them in the
    kernel plan, 64 in the factor plan); repeats: independent recursions averaged (mini-batches only); seed of the draws;
    plan: where the iterates live (`kernel`: sample coordinates from the Gram, `factors`: weight-shaped vectors
    from the token factors, `auto`: `kernel` for up to 2048 samples fewer than the parameters). Both plans run
    the same iterates.
    """

    depth: int | None = None
    scale: float | None = None
    batch_size: int | None = None
    seed: int = 0
    tol: float = LISSA_TOL
    repeats: int = LISSA_REPEATS
    plan: str = "auto"

    def kernel_plan(self, n: int, n_params: int) -> bool:
        """Whether a matrix with n training samples and n_params parameters runs in sample coordinates."""
        if self.plan not in LISSA_PLANS:
            raise LayerIFError(f"--lissa-plan must be one of {', '.join(LISSA_PLANS)}, got {self.plan!r}")
        return self.plan == "kernel" or (self.plan == "auto" and n <= min(KERNEL_PLAN_MAX_SAMPLES, n_params))


@dataclass(frozen=True)
class LissaProblem:
    """One matrix's system (H + lambda I) x = v: who has a gradient, the weight's shape, damping, H's divisor.

    sq_norms: (n,) ||g_i||^2 (zero: never drawn); H = (1/n_effective) sum_i g_i g_i^T.
    """

    sq_norms: torch.Tensor
    weight_shape: tuple[int, ...]
    lam: float
    n_effective: int


@dataclass
class LissaInfo:
    """How a LiSSA solve went for one matrix."""

    scale: float
    depth: int  # the most steps allowed
    batch_size: int
    relative_change: float  # of the influence G h over the last window (about a tenth of the steps): ||dI|| / ||I||
    h_relative_change: float  # the same for h itself (slow where H = lambda: directions no gradient sees)
    top_eigenvalue: float | None  # power-iteration estimate behind an automatic scale
    restarts: int = 0  # times an automatic scale was raised 4x after the series diverged
    steps: int = 0  # steps each recursion ran
    tol: float = 0.0
    repeats: int = 1
    converged: bool = False  # relative_change < tol when the recursion stopped
    plan: str = "factors"  # where the iterates lived: kernel (sample coordinates) or factors

    def to_dict(self) -> dict:
        return {"plan": self.plan, "scale": self.scale, "depth": self.depth, "steps": self.steps,
                "batch_size": self.batch_size,
                "repeats": self.repeats, "tol": self.tol, "converged": self.converged,
                "relative_change": self.relative_change, "h_relative_change": self.h_relative_change,
                "top_eigenvalue": self.top_eigenvalue, "restarts": self.restarts}


def lissa_settings(options: dict) -> LissaSettings:
    """LissaSettings from a run's estimator options (`lissa_depth`, `lissa_tol`, ...; absent or None: the default)."""
    def pick(name: str, default):
        value = options.get(name)
        return default if value is None else value

    return LissaSettings(depth=options.get("lissa_depth"), scale=options.get("lissa_scale"),
                         batch_size=options.get("lissa_batch"), seed=pick("seed", 0),
                         tol=pick("lissa_tol", LISSA_TOL), repeats=pick("lissa_repeats", LISSA_REPEATS),
                         plan=pick("lissa_plan", "auto"))


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
    tokens = TokenFactors.from_factors(factors, stack.device)
    stack = stack.to(tokens.x.dtype)

    def top(samples: torch.Tensor | None, divisor: float, start: torch.Tensor) -> float:
        return top_eigenvalue(tokens if samples is None else tokens.subset(samples), divisor, start.to(stack))

    problem = LissaProblem(factors.sq_norms, tuple(stack.shape[1:]), lam, n_effective)
    h, info = _solve(_FactorSpace(tokens, stack), problem, settings, top, kernel_plan=False)
    return h / info.scale, info


def lissa_kernel_influence(kernel: torch.Tensor, dots: torch.Tensor, v_sq: torch.Tensor, problem: LissaProblem,
                           settings: LissaSettings = LissaSettings()) -> tuple[torch.Tensor, LissaInfo]:
    """(n, k) g_i . (H + lambda I)^-1 v_k by the same recursion as `lissa_solve`, run in sample coordinates.

    kernel = G G^T (n, n), dots = G [v_1..v_k] (n, k), v_sq the ||v_k||^2. Same draws, steps, averaging and
    stopping rule as `lissa_solve` for the same settings; an automatic scale takes the exact top eigenvalue of
    H and of each mini-batch probe (eigvalsh of its kernel block) where `lissa_solve` runs power iterations
    over a 32-sample probe. Defaults: full batches, at most 1,000,000 steps.
    """
    kernel, dots = kernel.double(), dots.double()

    def top(samples: torch.Tensor | None, divisor: float, start: torch.Tensor) -> float:
        block = kernel if samples is None else kernel[samples][:, samples]
        return float(torch.linalg.eigvalsh(block)[-1]) / divisor if block.numel() else 0.0

    space = _KernelSpace(kernel, dots, v_sq.double())
    h, info = _solve(space, problem, settings, top, kernel_plan=True)
    return space.influence(h) / info.scale, info


def _solve(space, problem: LissaProblem, settings: LissaSettings, top,
           kernel_plan: bool) -> tuple[torch.Tensor, LissaInfo]:
    """The recursion of `lissa_solve` in either space: checks, scale, restarts; (scale x solution, info)."""
    lam, n_effective = problem.lam, problem.n_effective
    active = torch.nonzero(problem.sq_norms > 0).flatten()
    n_active = int(active.numel())
    depth = settings.depth if settings.depth is not None else LISSA_KERNEL_DEPTH if kernel_plan else LISSA_DEPTH
    batch_size = settings.batch_size if settings.batch_size is not None else (
        max(n_active, 1) if kernel_plan else LISSA_BATCH)
    scale = settings.scale
    if depth < 1:
        raise LayerIFError(f"--lissa-depth must be >= 1, got {depth}")
    if scale is not None and scale <= 0:
        raise LayerIFError(f"--lissa-scale must be positive, got {scale}")
    if not settings.tol >= 0:
        raise LayerIFError(f"--lissa-tol must be >= 0, got {settings.tol}")
    if settings.repeats < 1 or batch_size < 1:
        raise LayerIFError(f"--lissa-repeats and --lissa-batch must be >= 1, got {settings.repeats} and {batch_size}")
    generator = torch.Generator().manual_seed(settings.seed)
    full_batch = batch_size >= n_active
    # each step's H_B = (n_active / n_effective) mean over B of g g^T, an unbiased draw of H
    divisor = n_effective if full_batch else batch_size * n_effective / max(n_active, 1)
    estimate, automatic, restarts = None, scale is None, 0
    if automatic:
        first = n_active if kernel_plan else min(POWER_SAMPLES, n_active)  # the kernel plan sees all of H cheaply
        estimate = _probe_top_eigenvalue(top, problem, active, batch_size, generator, first)
        scale = SCALE_SAFETY * (estimate + lam)
    repeats = 1 if full_batch else settings.repeats  # full batches make every recursion the same
    seeds = torch.randint(1 << 62, (repeats,), generator=generator).tolist()
    series = _Series(space, active, lam, batch_size, divisor)
    while True:
        try:
            outcome = series.run(scale, depth, settings.tol, [torch.Generator().manual_seed(s) for s in seeds])
            break
        except _Diverged as diverged:
            # an automatic scale comes from a few probes; a mini-batch may still have a larger top eigenvalue
            if not automatic or restarts == MAX_RESTARTS:
                hint = "pass a larger --lissa-scale" if not automatic else "pass --lissa-scale explicitly"
                raise LayerIFError(f"LiSSA diverged (|h| = {diverged.size:.3g} after {diverged.step} steps with "
                                   f"scale {scale:.3g}); {hint}") from None
            scale *= 4.0
            restarts += 1
    info = LissaInfo(float(scale), depth, n_active if full_batch else batch_size, outcome.change, outcome.h_change,
                     estimate, restarts, outcome.steps, settings.tol, repeats,
                     settings.tol > 0 and outcome.change < settings.tol, "kernel" if kernel_plan else "factors")
    return outcome.h, info


def _probe_top_eigenvalue(top, problem: LissaProblem, active: torch.Tensor, batch_size: int,
                          generator: torch.Generator, first: int) -> float:
    """Largest top eigenvalue of H over a `first`-sample probe and a few mini-batch-sized probes."""
    n_active, n_effective = int(active.numel()), problem.n_effective
    sizes = [first] + ([batch_size] * PROBE_BATCHES if batch_size < n_active else [])
    start = torch.randn(problem.weight_shape, generator=generator, dtype=torch.float64)
    largest = 0.0
    for size in sizes:  # a handful of probes, each vectorised over its samples
        probe = None if size >= n_active else active[torch.randperm(n_active, generator=generator)[:size]]
        # on the same footing as H: (1/|probe|) sum g g^T times the active share
        largest = max(largest, top(probe, max(size, 1) * n_effective / max(n_active, 1), start))
    return largest


@dataclass
class _Outcome:
    h: torch.Tensor  # the estimate of scale * (H + lambda I)^-1 v for the stack, in the space's coordinates
    change: float  # relative change of G h over the last window
    h_change: float  # the same for h
    steps: int


@dataclass
class _FactorSpace:
    """h as (k, d_out, d_in) weight-shaped vectors; H_B h from the token factors."""

    tokens: TokenFactors
    stack: torch.Tensor

    def start(self) -> torch.Tensor:
        return self.stack.clone()

    def hvp(self, h: torch.Tensor, samples: torch.Tensor | None, divisor: float) -> torch.Tensor:
        batch = self.tokens if samples is None else self.tokens.subset(samples)
        return batch.hvp(h, divisor)

    def first_dots(self, h: torch.Tensor) -> torch.Tensor:
        return self.tokens.dots(h[:1])[0]

    def norms(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(h.shape[0], -1).norm(dim=1)


@dataclass
class _KernelSpace:
    """h_k = a_k v_k + sum_j c_kj g_j as coordinates (k, 1 + n): the same iterates, formed from K = G G^T and G v.

    Every iterate of the recursion lies in span{v_k, g_1..g_n} (h_0 = v_k, each step adds v_k and multiples of
    the g_i), so with n training samples against d_W parameters a step costs O(|B| n k) instead of a pass over
    the factors.
    """

    kernel: torch.Tensor  # (n, n) float64
    dots: torch.Tensor  # (n, k) g_i . v_k
    v_sq: torch.Tensor  # (k,) ||v_k||^2

    def start(self) -> torch.Tensor:
        start = torch.zeros(self.dots.shape[1], 1 + self.dots.shape[0], dtype=torch.float64)
        start[:, 0] = 1.0
        return start

    def _gh(self, h: torch.Tensor, samples: torch.Tensor | None) -> torch.Tensor:
        """(k, |B|) g_i . h_k for the samples (all when None)."""
        rows = self.kernel if samples is None else self.kernel[samples]
        dots = self.dots if samples is None else self.dots[samples]
        return h[:, :1] * dots.t() + h[:, 1:] @ rows.t()

    def hvp(self, h: torch.Tensor, samples: torch.Tensor | None, divisor: float) -> torch.Tensor:
        out = torch.zeros_like(h)
        if samples is None:
            out[:, 1:] = self._gh(h, None) / divisor
        else:
            out[:, 1 + samples] = self._gh(h, samples) / divisor
        return out

    def first_dots(self, h: torch.Tensor) -> torch.Tensor:
        return self._gh(h[:1], None)[0]

    def norms(self, h: torch.Tensor) -> torch.Tensor:
        a, c = h[:, 0], h[:, 1:]
        squares = a * a * self.v_sq + 2 * a * (c * self.dots.t()).sum(1) + ((c @ self.kernel) * c).sum(1)
        return squares.clamp_min(0).sqrt()

    def influence(self, h: torch.Tensor) -> torch.Tensor:
        """(n, k) g_i . h_k."""
        return self._gh(h, None).t()


@dataclass
class _Series:
    """One matrix's recursions h_{k+1} = v + (I - (H_B + lambda I) / scale) h_k over a stack of vectors v."""

    space: _FactorSpace | _KernelSpace
    active: torch.Tensor  # samples that may be drawn
    lam: float
    batch_size: int
    divisor: float  # H_B = (1 / divisor) sum_{i in B} g_i g_i^T

    def run(self, scale: float, depth: int, tol: float, generators: list[torch.Generator]) -> _Outcome:
        """Run one recursion per generator in lockstep until the estimate settles or `depth` steps; raises _Diverged.

        The estimate is the last iterate with full batches. With mini-batches the iterate keeps fluctuating
        around the solution, so it is the mean over the recursions of the average iterate over the last half
        to three quarters of the steps (two running sums, shifted whenever the step count doubles).
        """
        space, lam = self.space, self.lam
        stack = space.start()
        n_active = int(self.active.numel())
        full_batch = self.batch_size >= n_active
        bound = 10.0 * scale * float(space.norms(stack).norm()) / max(lam, torch.finfo(torch.float64).tiny)
        tiny = torch.finfo(stack.dtype).tiny
        h = [stack.clone() for _ in generators]
        older, newer = torch.zeros_like(stack), torch.zeros_like(stack)
        counts, boundary = [0, 0], 1
        marker_step, marker_h = 0, stack[:1].clone()
        marker_dots = space.first_dots(stack)
        change = h_change = float("inf")
        step = 0
        for step in range(1, depth + 1):
            for r, generator in enumerate(generators):
                samples = None if full_batch else self.active[torch.randperm(n_active, generator=generator)[:self.batch_size]]
                h[r] = stack + h[r] - (space.hvp(h[r], samples, self.divisor) + lam * h[r]) / scale
            if not full_batch:
                if step == 2 * boundary:
                    older, newer, counts, boundary = newer, older.zero_(), [counts[1], 0], step
                newer += sum(h) / len(h)
                counts[1] += 1
            if step % CHECK_EVERY and step != depth:
                continue
            size = max(float(space.norms(part).norm()) for part in h)
            if not size < bound:  # also catches NaN
                raise _Diverged(size, step)
            if step - marker_step < max(1, step // 10):
                continue
            current = h[0] if full_batch else (older + newer) / (counts[0] + counts[1])
            # what the scores see is G h, not h: components of h that no training gradient reaches converge
            # at the slow rate lambda / scale but never change an influence
            dots = space.first_dots(current)
            change = float((dots - marker_dots).norm() / dots.norm().clamp_min(tiny))
            h_change = float(space.norms(current[:1] - marker_h)[0] / space.norms(current[:1])[0].clamp_min(tiny))
            marker_step, marker_h, marker_dots = step, current[:1].clone(), dots
            if change < tol:
                break
        estimate = h[0] if full_batch else (older + newer) / (counts[0] + counts[1])
        return _Outcome(estimate, change, h_change, step)


def convergence_summary(estimator_info: dict[str, dict]) -> dict | None:
    """How many matrices' LiSSA recursions did not converge and the worst last-window change (None: no LiSSA info)."""
    entries = [entry for entry in estimator_info.values() if "converged" in entry]
    if not entries:
        return None
    missed = [entry for entry in entries if not entry["converged"]]
    steps = [entry["steps"] for entry in entries]
    return {"matrices": len(entries), "not_converged": len(missed),
            "worst_change": max(entry["relative_change"] for entry in entries),
            "tol": entries[0]["tol"], "max_depth": entries[0]["depth"],
            "steps_mean": sum(steps) / len(steps), "steps_max": max(steps)}


def convergence_warning(summary: dict | None, estimator: str = "lissa") -> str | None:
    """The one line a run prints when some matrix did not converge (None when all did)."""
    if not summary or not summary["not_converged"]:
        return None
    return (f"warning: {estimator} did not converge on {summary['not_converged']} of {summary['matrices']} matrices "
            f"(worst relative change {summary['worst_change']:.2g}, --lissa-tol {summary['tol']:g}, "
            f"--lissa-depth {summary['max_depth']}); raise --lissa-depth, see run.json")

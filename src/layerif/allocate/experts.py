"""Per-layer LoRA expert counts: LayerIF, its controls, AlphaLoRA, MoLA shapes, uniform, or an explicit list.

Controls (DESIGN §7) use the LayerIF map itself: `depth` takes a straight ramp over the layer index as the score.
Given layer scores, the ramp runs from their minimum to their maximum, so the s^β map sees the same spread as
LayerIF and only the placement (by depth) differs; without scores it is the index 0..L-1 itself (layer 0 then
keeps the minimum of one expert and β alone sets the spread, a much steeper profile). `random` is the LayerIF counts
permuted across layers by a seeded permutation (same counts, random placement); `reversed` mirrors the scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from layerif.errors import LayerIFError
from layerif.io import atomic_write_json

MOLA_SHAPES = {"mola-2468": (2, 4, 6, 8), "mola-8642": (8, 6, 4, 2), "mola-5555": (5, 5, 5, 5)}
METHODS = ("layerif", "reversed", "uniform", "alphalora", "depth", "random", *MOLA_SHAPES)
NEEDS_SCORES = ("layerif", "reversed", "random")


@dataclass
class ExpertAllocation:
    """Experts per layer, top-k per layer, and how they were obtained."""

    method: str
    counts: list[int]
    top_k: list[int]
    scores: list[float] | None = None  # the per-layer values the counts were derived from
    arguments: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.counts)

    @property
    def budget(self) -> int:
        return int(sum(self.counts))

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, directory: str | Path) -> Path:
        """Write `experts.json` into `directory` (atomically)."""
        return atomic_write_json(Path(directory) / "experts.json", self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ExpertAllocation:
        """Read an `experts.json` (or the folder holding one)."""
        import json

        path = Path(path)
        if path.is_dir():
            path = path / "experts.json"
        if not path.is_file():
            raise LayerIFError(f"no expert allocation at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{key: data[key] for key in ("method", "counts", "top_k", "scores", "arguments") if key in data})
        except (ValueError, TypeError, KeyError) as exc:
            raise LayerIFError(f"{path}: not an experts.json written by layerif ({exc})") from exc


def _check_budget(budget: int, n_layers: int) -> None:
    if n_layers < 1:
        raise LayerIFError("cannot allocate experts to a model with no layers")
    if int(budget) != budget or budget < n_layers:
        raise LayerIFError(
            f"--budget must be an integer >= the number of layers ({n_layers}) so every layer gets an expert; "
            f"got {budget}"
        )


def _check_beta(beta: float) -> None:
    if not np.isfinite(beta) or beta <= 0:
        raise LayerIFError(f"--beta must be > 0, got {beta}")


def _check_scores(scores, what: str = "scores") -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise LayerIFError(f"no {what} given")
    if not np.all(np.isfinite(values)):
        raise LayerIFError(f"{what} contain NaN or infinite values")
    return values


def top_k_for(counts: list[int] | np.ndarray, top_k: int | None = None) -> list[int]:
    """Per-layer top-k: min(k, n_l); k defaults to 2, and an explicit k above every layer's count is an error."""
    if top_k is None:
        return [int(min(2, n)) for n in counts]
    if int(top_k) != top_k or top_k < 1:
        raise LayerIFError(f"--top-k must be a positive integer, got {top_k}")
    if top_k > max(counts):
        raise LayerIFError(f"--top-k {top_k} is more than the experts of any layer (at most {max(counts)})")
    return [int(min(top_k, n)) for n in counts]


def layerif_counts(scores, budget: int, beta: float = 2.5) -> np.ndarray:
    """DESIGN §4: n_l = floor(f_l) + 1 with f = s^β / Σ s^β · (T − L), remainder by largest fraction."""
    values = _check_scores(scores)
    n_layers = len(values)
    _check_budget(budget, n_layers)
    _check_beta(beta)
    if values.min() < 0:
        # S_all can be negative; shift so the lowest layer has weight 0 (recorded by the caller).
        values = values - values.min()
    with np.errstate(over="ignore"):
        powered = values**beta
        total = powered.sum()
    spare = int(budget) - n_layers
    if total <= 0 or not np.isfinite(total):
        if not np.isfinite(total):  # overflow of s^β: rescale first, the shares are scale-free
            powered = (values / values.max()) ** beta
            total = powered.sum()
        else:
            powered, total = np.ones(n_layers), float(n_layers)
    shares = powered / total * spare
    counts = np.floor(shares).astype(np.int64) + 1
    remainder = shares - np.floor(shares)
    left = int(budget) - int(counts.sum())
    # Largest remainder first; ties go to the higher score, then the earlier layer (stable).
    order = np.lexsort((np.arange(n_layers), -values, -remainder))
    if left > 0:
        counts[order[:left]] += 1
    elif left < 0:  # only reachable through floating-point error; take back from the smallest remainders
        removable = [i for i in order[::-1] if counts[i] > 1]
        counts[removable[:-left]] -= 1
    return counts


def reversed_scores(scores) -> np.ndarray:
    """The control of the paper: s ↦ max s + min s − s (highest and lowest swap)."""
    values = _check_scores(scores)
    return values.max() + values.min() - values


def round_to_total(weights, budget: int, rounding: str = "floor", tie_order=None) -> np.ndarray:
    """Integers ∝ weights summing to `budget`, each >= 1: floor (or round) then a ±1 fix-up by largest error.

    Ties in the fix-up go to the lowest `tie_order` first (default: the earliest layer).
    """
    weights = _check_scores(weights, "weights")
    n_layers = len(weights)
    _check_budget(budget, n_layers)
    if weights.min() < 0:
        raise LayerIFError("weights for an allocation must be >= 0")
    total = weights.sum()
    ideal = np.full(n_layers, budget / n_layers) if total <= 0 else weights / total * budget
    counts = (np.floor(ideal) if rounding == "floor" else np.round(ideal)).astype(np.int64)
    counts = np.maximum(counts, 1)
    index = np.arange(n_layers) if tie_order is None else np.asarray(tie_order)
    while counts.sum() < budget:  # at most n_layers rounds: each adds one per chosen layer
        deficit = ideal - counts
        order = np.lexsort((index, -deficit))
        counts[order[: budget - counts.sum()]] += 1
    while counts.sum() > budget:
        excess = np.where(counts > 1, counts - ideal, -np.inf)
        order = np.lexsort((index, -excess))
        take = order[: min(counts.sum() - budget, int((counts > 1).sum()))]
        counts[take] -= 1
    return counts


def mola_counts(shape: str, n_layers: int, budget: int) -> np.ndarray:
    """MoLA shape (e.g. 2-4-6-8) over four groups of layers as equal as possible, scaled to `budget`."""
    if shape not in MOLA_SHAPES:
        raise LayerIFError(f"unknown MoLA shape {shape!r}; choose from {', '.join(MOLA_SHAPES)}")
    _check_budget(budget, n_layers)
    groups = np.array_split(np.arange(n_layers), 4)
    weights = np.zeros(n_layers)
    for group, value in zip(groups, MOLA_SHAPES[shape], strict=True):
        weights[group] = value
    # Spare experts inside a group go to its end that the shape grows towards, so the shape stays monotone.
    values = MOLA_SHAPES[shape]
    tie_order = -np.arange(n_layers) if values[-1] > values[0] else np.arange(n_layers)
    return round_to_total(weights, budget, tie_order=tie_order)


def uniform_counts(n_layers: int, budget: int) -> np.ndarray:
    """Budget spread evenly; any remainder goes to the earliest layers."""
    return round_to_total(np.ones(n_layers), budget)


def alphalora_counts(alphas, budget: int, beta: float = 2.5) -> np.ndarray:
    """AlphaLoRA: n_l = round(T α_l^β / Σ α^β) with a ±1 fix-up (and >= 1 per layer)."""
    alphas = _check_scores(alphas, "PL_Alpha_Hill values")
    _check_beta(beta)
    if alphas.min() <= 0:
        raise LayerIFError("PL_Alpha_Hill values must be positive")
    return round_to_total(alphas**beta, budget, rounding="round")


def parse_counts(text: str) -> list[int]:
    """Parse an explicit comma list of expert counts, e.g. "4,4,6,6"."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise LayerIFError(f"--allocation: {text!r} is not a method name nor a comma list of integers") from exc
    if not counts or min(counts) < 1:
        raise LayerIFError(f"--allocation: every layer needs >= 1 expert, got {text!r}")
    return counts


def allocate_experts(
    method: str,
    n_layers: int | None = None,
    budget: int | None = None,
    scores=None,
    beta: float = 2.5,
    top_k: int | None = None,
    alphas=None,
    arguments: dict | None = None,
    seed: int = 0,
) -> ExpertAllocation:
    """Expert counts per layer by `method` (a name in METHODS or a comma list of counts); `seed` places `random`."""
    from layerif.allocate.sparsity import placement

    arguments = dict(arguments or {})
    arguments.update({"beta": beta, "budget": budget, "top_k": top_k})
    if method not in METHODS:
        counts = parse_counts(method)
        if n_layers is not None and len(counts) != n_layers:
            raise LayerIFError(f"--allocation lists {len(counts)} counts but the model has {n_layers} layers")
        if budget is not None and sum(counts) != budget:
            raise LayerIFError(f"--allocation sums to {sum(counts)} experts but --budget is {budget}")
        return ExpertAllocation("explicit", counts, top_k_for(counts, top_k), None, arguments)
    if method in NEEDS_SCORES:
        if scores is None:
            raise LayerIFError(f"--allocation {method} needs layer scores (--scores)")
        values = _check_scores(scores)
        if n_layers is not None and len(values) != n_layers:
            raise LayerIFError(f"the scores cover {len(values)} layers but the model has {n_layers}")
        if budget is None:
            raise LayerIFError("--budget is required")
        used = reversed_scores(values) if method == "reversed" else values
        counts = layerif_counts(used, budget, beta)
        if values.min() < 0:
            arguments["note"] = "negative scores were shifted by -min before s^beta"
        if method == "random":
            order = placement(len(values), seed)
            counts, used = counts[order], used[order]
            arguments.update(seed=seed, placement=order.tolist())
        return ExpertAllocation(method, counts.tolist(), top_k_for(counts, top_k), used.tolist(), arguments)
    if n_layers is None:
        n_layers = len(alphas) if alphas is not None else (len(scores) if scores is not None else None)
    if n_layers is None:
        raise LayerIFError(f"--allocation {method} needs the number of layers")
    if budget is None:
        raise LayerIFError("--budget is required")
    if method == "depth":
        from layerif.allocate.sparsity import depth_scores

        used = depth_scores(n_layers)
        if scores is not None:
            values = _check_scores(scores)
            if len(values) != n_layers:
                raise LayerIFError(f"the scores cover {len(values)} layers but the model has {n_layers}")
            used = values.min() + (values.max() - values.min()) * used / max(n_layers - 1, 1)
            arguments["ramp"] = "scores' range"
        counts = layerif_counts(used, budget, beta)
        return ExpertAllocation(method, counts.tolist(), top_k_for(counts, top_k), used.tolist(), arguments)
    if method == "uniform":
        return ExpertAllocation(method, (c := uniform_counts(n_layers, budget)).tolist(), top_k_for(c, top_k), None,
                                arguments)
    if method in MOLA_SHAPES:
        counts = mola_counts(method, n_layers, budget)
        return ExpertAllocation(method, counts.tolist(), top_k_for(counts, top_k), None, arguments)
    # alphalora
    if alphas is None:
        raise LayerIFError("--allocation alphalora needs the model (its PL_Alpha_Hill values)")
    alphas = _check_scores(alphas, "PL_Alpha_Hill values")
    if len(alphas) != n_layers:
        raise LayerIFError(f"got {len(alphas)} PL_Alpha_Hill values for {n_layers} layers")
    counts = alphalora_counts(alphas, budget, beta)
    return ExpertAllocation(method, counts.tolist(), top_k_for(counts, top_k), alphas.tolist(), arguments)


def model_alphas(model, modules: str = "all") -> np.ndarray:
    """Block-mean PL_Alpha_Hill of a model (the AlphaLoRA metric), from the shared metrics module."""
    from layerif.allocate.metrics import block_alpha_hill

    return np.asarray(block_alpha_hill(model, modules=modules), dtype=np.float64)

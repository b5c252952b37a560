"""Per-block pruning ratios: LayerIF, its controls (reversed, depth, random), uniform, OWL, AlphaPruning, or a list.

The controls of DESIGN §7 go through the LayerIF map itself, so only the per-block input differs:
`depth` feeds the block index 0..L-1 (min-max normalised, smoothed — a no-op on a straight line — and mapped
with the same ε); `random` feeds the LayerIF input permuted across blocks by a seeded permutation, so its ratios
are the LayerIF ratios permuted whenever the blocks have equal sizes (and still meet the target exactly when not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from layerif.errors import LayerIFError
from layerif.io import atomic_write_json
from layerif.scores import AGGREGATIONS, minmax, smooth

ALLOCATIONS = ("layerif", "uniform", "owl", "alphapruning", "reversed", "depth", "random")
NEEDS_SCORES = ("layerif", "reversed", "random")
MAX_RATIO = 0.99
TOLERANCE = 1e-9


def check_sparsity(sparsity: float) -> float:
    """Validate a target sparsity: inside (0, 1) and reachable with every ratio at most MAX_RATIO."""
    if not np.isfinite(sparsity) or not 0 < sparsity < 1:
        raise LayerIFError(f"--sparsity must be inside (0, 1), got {sparsity}")
    if sparsity > MAX_RATIO:
        raise LayerIFError(f"--sparsity {sparsity} is above the largest per-block ratio {MAX_RATIO}")
    return float(sparsity)


def check_epsilon(epsilon: float) -> float:
    """Validate the spread ε of the linear map: inside [0, 1)."""
    if not np.isfinite(epsilon) or not 0 <= epsilon < 1:
        raise LayerIFError(f"--epsilon must be inside [0, 1), got {epsilon}")
    return float(epsilon)


def _weights(block_params) -> np.ndarray:
    weights = np.asarray(block_params, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0 or (weights <= 0).any():
        raise LayerIFError("every block needs a positive number of prunable parameters")
    return weights


def weighted_mean(ratios, block_params) -> float:
    """Parameter-weighted mean sparsity Σ d_l r_l / Σ d_l."""
    weights = _weights(block_params)
    return float(np.dot(weights, ratios) / weights.sum())


def fit_mean(offset: np.ndarray, slope: np.ndarray, block_params, target: float) -> np.ndarray:
    """Find θ so that clip(offset + slope·θ, 0, MAX_RATIO) has parameter-weighted mean `target`; return it.

    The weighted mean is continuous and non-decreasing in θ (slope > 0): bisection finds the clipping
    pattern, then θ is solved in closed form on the unclipped blocks so the mean is exact.
    """
    weights = _weights(block_params)
    offset, slope = np.asarray(offset, dtype=np.float64), np.asarray(slope, dtype=np.float64)
    if (slope <= 0).any():
        raise ValueError("fit_mean needs positive slopes")
    total = target * weights.sum()

    def ratios_at(theta: float) -> np.ndarray:
        return np.clip(offset + slope * theta, 0.0, MAX_RATIO)

    low = float(np.min(-offset / slope)) - 1.0
    high = float(np.max((MAX_RATIO - offset) / slope)) + 1.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if np.dot(weights, ratios_at(middle)) < total:
            low = middle
        else:
            high = middle
    theta = 0.5 * (low + high)
    raw = offset + slope * theta
    free = (raw > 0.0) & (raw < MAX_RATIO)
    if free.any():
        fixed = np.clip(raw, 0.0, MAX_RATIO)
        rest = total - np.dot(weights[~free], fixed[~free])
        theta = (rest - np.dot(weights[free], offset[free])) / np.dot(weights[free], slope[free])
    ratios = ratios_at(theta)
    if abs(weighted_mean(ratios, weights) - target) > TOLERANCE:
        raise LayerIFError(f"cannot reach a mean sparsity of {target} with ratios in [0, {MAX_RATIO}]")
    return ratios


def linear_map_ratios(metric, block_params, sparsity: float, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """AlphaPruning's map: r = (1-ε) + 2ε·minmax(metric), scaled by η to the target; clipped and re-balanced.

    Returns (ratios, unclipped) where `unclipped` is η·r without clipping (the reference implementation's
    output, recorded for comparison).
    """
    check_sparsity(sparsity)
    check_epsilon(epsilon)
    weights = _weights(block_params)
    metric = np.asarray(metric, dtype=np.float64)
    if metric.shape != weights.shape or not np.isfinite(metric).all():
        raise LayerIFError(f"need one finite metric value per block ({len(weights)}), got shape {metric.shape}")
    shape = (1 - epsilon) + 2 * epsilon * minmax(metric)
    eta = sparsity * weights.sum() / np.dot(weights, shape)
    return fit_mean(np.zeros_like(shape), shape, weights, sparsity), eta * shape


def smoothed_scores(scores, smooth_scores: bool = True, window: int = 7, order: int = 3) -> np.ndarray:
    """|s| min-max normalised to [0, 1], then Savitzky-Golay smoothed (window 7, order 3) when asked."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) == 0 or not np.isfinite(scores).all():
        raise LayerIFError("layer scores must be a non-empty list of finite numbers")
    normalised = minmax(np.abs(scores))
    return smooth(normalised, window, order) if smooth_scores else normalised


def placement(n_blocks: int, seed: int) -> np.ndarray:
    """The seeded permutation of the `random` control: block l takes the input of block placement[l]."""
    return np.random.default_rng(seed).permutation(n_blocks)


def depth_scores(n_blocks: int) -> np.ndarray:
    """The data-free `depth` input: the block index 0..L-1."""
    return np.arange(n_blocks, dtype=np.float64)


def layerif_ratios(scores, block_params, sparsity: float, epsilon: float = 0.3, smooth_scores: bool = True,
                   reverse: bool = False, permutation=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LayerIF ratios (higher score ⇒ more pruning) -> (ratios, unclipped, s̃).

    `reverse` mirrors the processed scores; `permutation` places block permutation[l]'s input on block l.
    """
    processed = smoothed_scores(scores, smooth_scores)
    if reverse:
        # s ↦ max + min − s; the linear map is invariant to the shift, so this mirrors the ratio profile
        processed = processed.max() + processed.min() - processed
    if permutation is not None:
        processed = processed[np.asarray(permutation)]
    ratios, unclipped = linear_map_ratios(processed, block_params, sparsity, epsilon)
    return ratios, unclipped, processed


def owl_ratios(outlier, block_params, sparsity: float, lam: float = 0.08) -> np.ndarray:
    """OWL: density ∝ outlier ratio, min-max scaled to [0, 2λ] and shifted so the mean sparsity is the target."""
    check_sparsity(sparsity)
    if not np.isfinite(lam) or lam < 0:
        raise LayerIFError(f"OWL λ must be >= 0, got {lam}")
    outlier = np.asarray(outlier, dtype=np.float64)
    weights = _weights(block_params)
    if outlier.shape != weights.shape or not np.isfinite(outlier).all():
        raise LayerIFError(f"need one outlier ratio per block ({len(weights)}), got shape {outlier.shape}")
    spread = minmax(outlier) * 2 * lam
    # sparsity_l = θ − spread_l; θ solved for the weighted mean (equals OWL's plain mean for equal blocks)
    return fit_mean(-spread, np.ones_like(spread), weights, sparsity)


def uniform_ratios(block_params, sparsity: float) -> np.ndarray:
    """The same ratio for every block."""
    check_sparsity(sparsity)
    return np.full(len(_weights(block_params)), float(sparsity))


def read_ratio_list(path: str | Path, n_blocks: int) -> np.ndarray:
    """Per-block ratios from a JSON list (or a ratios.json with `block_ratios`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayerIFError(f"{path}: not a readable JSON list of ratios ({exc})") from exc
    if isinstance(data, dict) and "block_ratios" in data:
        data = data["block_ratios"]
    if not isinstance(data, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data):
        raise LayerIFError(f"{path}: expected a JSON list of numbers")
    ratios = np.asarray(data, dtype=np.float64)
    if len(ratios) != n_blocks:
        raise LayerIFError(f"{path}: {len(ratios)} ratios for a model with {n_blocks} blocks")
    if not np.isfinite(ratios).all() or (ratios < 0).any() or (ratios > MAX_RATIO).any():
        raise LayerIFError(f"{path}: every ratio must be inside [0, {MAX_RATIO}]")
    return ratios


@dataclass
class SparsityAllocation:
    """Per-block (and per-matrix) pruning ratios and what produced them."""

    allocation: str
    target: float
    block_ratios: np.ndarray
    block_params: list[int]
    matrix_ratios: dict[str, float]
    metric_name: str | None = None
    metric: list[float] | None = None
    unclipped_ratios: list[float] | None = None
    arguments: dict = field(default_factory=dict)

    @property
    def mean_sparsity(self) -> float:
        return weighted_mean(self.block_ratios, self.block_params)

    @property
    def clipped(self) -> list[int]:
        """Blocks whose unclipped ratio lay outside [0, MAX_RATIO]."""
        if self.unclipped_ratios is None:
            return []
        raw = np.asarray(self.unclipped_ratios)
        return [int(i) for i in np.flatnonzero((raw > MAX_RATIO) | (raw < 0))]

    def to_dict(self) -> dict:
        """JSON-ready content of ratios.json."""
        return {
            "format": "layerif.ratios/1",
            "allocation": self.allocation,
            "target_sparsity": self.target,
            "mean_sparsity": self.mean_sparsity,
            "block_ratios": [float(r) for r in self.block_ratios],
            "block_params": [int(d) for d in self.block_params],
            "matrix_ratios": {name: float(r) for name, r in self.matrix_ratios.items()},
            "metric_name": self.metric_name,
            "metric": None if self.metric is None else [float(v) for v in self.metric],
            "unclipped_ratios": None if self.unclipped_ratios is None else [float(v) for v in self.unclipped_ratios],
            "clipped_blocks": self.clipped,
            "max_ratio": MAX_RATIO,
            "arguments": self.arguments,
        }

    def save(self, path: str | Path) -> Path:
        """Write ratios.json atomically (a directory gets `ratios.json` inside it)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "ratios.json"
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> SparsityAllocation:
        """Read a ratios.json written by `save`."""
        path = Path(path)
        if path.is_dir():
            path = path / "ratios.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LayerIFError(f"{path}: not a readable ratios.json ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != "layerif.ratios/1":
            raise LayerIFError(f"{path}: not a layerif ratios.json")
        return cls(data["allocation"], data["target_sparsity"], np.asarray(data["block_ratios"]),
                   data["block_params"], data["matrix_ratios"], data.get("metric_name"), data.get("metric"),
                   data.get("unclipped_ratios"), data.get("arguments", {}))


def block_ratios(
    allocation: str,
    sparsity: float,
    block_params,
    *,
    scores=None,
    epsilon: float = 0.3,
    smooth_scores: bool = True,
    alpha=None,
    outlier=None,
    owl_lambda: float = 0.08,
    seed: int = 0,
) -> tuple[np.ndarray, str | None, np.ndarray | None, np.ndarray | None]:
    """Ratios for one allocation from precomputed per-block inputs -> (ratios, metric name, metric, unclipped).

    `seed` picks the permutation of the `random` control.
    """
    n_blocks = len(_weights(block_params))
    check_sparsity(sparsity)
    check_epsilon(epsilon)
    if allocation in NEEDS_SCORES:
        if scores is None:
            raise LayerIFError(f"the {allocation} allocation needs layer scores (--scores)")
        scores = np.asarray(scores, dtype=np.float64)
        if len(scores) != n_blocks:
            raise LayerIFError(f"the layer scores cover {len(scores)} blocks but the model has {n_blocks}")
        ratios, unclipped, processed = layerif_ratios(
            scores, block_params, sparsity, epsilon, smooth_scores, reverse=allocation == "reversed",
            permutation=placement(n_blocks, seed) if allocation == "random" else None)
        return ratios, "layer_score_processed", processed, unclipped
    if allocation == "depth":
        ratios, unclipped, processed = layerif_ratios(depth_scores(n_blocks), block_params, sparsity, epsilon,
                                                      smooth_scores)
        return ratios, "block_index_processed", processed, unclipped
    if allocation == "alphapruning":
        if alpha is None:
            raise LayerIFError("the alphapruning allocation needs PL_Alpha_Hill values")
        ratios, unclipped = linear_map_ratios(alpha, block_params, sparsity, epsilon)
        return ratios, "pl_alpha_hill", np.asarray(alpha, dtype=np.float64), unclipped
    if allocation == "owl":
        if outlier is None:
            raise LayerIFError("the owl allocation needs outlier ratios from calibration data (--calib)")
        return owl_ratios(outlier, block_params, sparsity, owl_lambda), "owl_outlier_ratio", np.asarray(outlier), None
    if allocation == "uniform":
        return uniform_ratios(block_params, sparsity), None, None, None
    raise LayerIFError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)} or a JSON file")


def is_ratio_file(allocation: str) -> bool:
    """True when `allocation` names a JSON file rather than a built-in allocation."""
    return allocation not in ALLOCATIONS and (allocation.endswith(".json") or Path(allocation).is_file())


def allocate_from_scores(
    scores,
    sparsity: float,
    epsilon: float = 0.3,
    score_name: str = "S_pos",
    smooth_scores: bool = True,
    reverse: bool = False,
    allocation: str | None = None,
    seed: int = 0,
) -> SparsityAllocation:
    """LayerIF (or a control: reversed, depth, random) from a LayerScores alone, weighting blocks by its parameters."""
    if score_name not in AGGREGATIONS:
        raise LayerIFError(f"unknown score {score_name!r}; choose from {', '.join(AGGREGATIONS)}")
    allocation = allocation or ("reversed" if reverse else "layerif")
    if allocation not in (*NEEDS_SCORES, "depth"):
        raise LayerIFError(f"--allocation {allocation} needs --model")
    block_params = [int(n) for n in scores.n_params]
    if len(block_params) != scores.n_layers:
        raise LayerIFError("the layer scores record parameters for a different number of blocks than they score")
    ratios, metric_name, metric, unclipped = block_ratios(
        allocation, sparsity, block_params, scores=scores.scores(score_name), epsilon=epsilon,
        smooth_scores=smooth_scores, seed=seed)
    # the model's own module names when the run recorded where its blocks live (as allocate_sparsity names them)
    model_record = scores.metadata.get("model") if isinstance(scores.metadata.get("model"), dict) else {}
    prefix = model_record.get("blocks_path") or "blocks"
    matrix_ratios = {f"{prefix}.{layer}.{name}": float(ratios[layer])
                     for layer in range(scores.n_layers) for name in scores.module_names}
    arguments = {"sparsity": sparsity, "epsilon": epsilon, "score": score_name, "smooth": smooth_scores,
                 "smoothing": "savgol(7, 3)" if smooth_scores else None, "block_params_from": "scores"}
    if allocation == "random":
        arguments.update(seed=seed, placement=placement(len(block_params), seed).tolist())
    return SparsityAllocation(allocation, sparsity, ratios, block_params, matrix_ratios, metric_name,
                              list(metric), list(unclipped), arguments)


def allocate_sparsity(
    model,
    allocation: str,
    sparsity: float,
    *,
    scores=None,
    score_name: str = "S_pos",
    epsilon: float = 0.3,
    smooth_scores: bool = True,
    modules: str = "all",
    calib_ids=None,
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    batch_size: int = 8,
    alpha=None,
    outlier=None,
    quiet: bool = True,
    seed: int = 0,
) -> SparsityAllocation:
    """Per-block and per-matrix ratios for `model` (`scores`: LayerScores or an array; `calib_ids` for OWL).

    `alpha` / `outlier` take precomputed PL_Alpha_Hill / OWL values per block (they are computed when absent);
    `seed` picks the placement of the `random` control.
    """
    from layerif.models import find_blocks, select_matrices

    if score_name not in AGGREGATIONS:
        raise LayerIFError(f"unknown score {score_name!r}; choose from {', '.join(AGGREGATIONS)}")
    per_block = select_matrices(model, modules=modules)
    block_params = [sum(ref.n_params for ref in refs) for refs in per_block]
    arguments: dict = {"sparsity": sparsity, "modules": modules}
    score_values = None
    if is_ratio_file(allocation):
        ratios = read_ratio_list(allocation, len(per_block))
        metric_name = metric = unclipped = None
        arguments.update(source=str(allocation), note="ratios taken as given; target not enforced")
        sparsity = weighted_mean(ratios, block_params)
        name = "file"
    else:
        name = allocation
        if allocation in NEEDS_SCORES and scores is not None:
            score_values = scores.scores(score_name) if hasattr(scores, "scores") else np.asarray(scores)
            arguments.update(epsilon=epsilon, score=score_name, smooth=smooth_scores,
                             smoothing="savgol(7, 3)" if smooth_scores else None)
            if allocation == "random":
                arguments.update(seed=seed, placement=placement(len(per_block), seed).tolist())
        elif allocation == "depth":
            arguments.update(epsilon=epsilon, smooth=smooth_scores, smoothing="savgol(7, 3)" if smooth_scores else None)
        elif allocation == "alphapruning":
            from layerif.allocate.metrics import block_alpha_hill

            check_sparsity(sparsity)
            if alpha is None:
                alpha = block_alpha_hill(model, modules=modules, quiet=quiet)
            arguments.update(epsilon=epsilon, fit="xmin_peak")
        elif allocation == "owl":
            check_sparsity(sparsity)
            if outlier is None:
                if calib_ids is None:
                    raise LayerIFError("the owl allocation needs calibration text (--calib)")
                from layerif.allocate.metrics import owl_outlier_ratios

                outlier = owl_outlier_ratios(model, calib_ids, m=owl_m, modules=modules, batch_size=batch_size,
                                             quiet=quiet)
            arguments.update(owl_m=owl_m, owl_lambda=owl_lambda)
        ratios, metric_name, metric, unclipped = block_ratios(
            allocation, sparsity, block_params, scores=score_values, epsilon=epsilon,
            smooth_scores=smooth_scores, alpha=alpha, outlier=outlier, owl_lambda=owl_lambda, seed=seed)
    path, _ = find_blocks(model)
    matrix_ratios = {f"{path}.{ref.layer}.{ref.name}": float(ratios[ref.layer]) for refs in per_block for ref in refs}
    return SparsityAllocation(name, float(sparsity), ratios, block_params, matrix_ratios, metric_name,
                              None if metric is None else list(metric),
                              None if unclipped is None else list(unclipped), arguments)

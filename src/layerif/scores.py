"""Layer scores from per-layer influence: S_pos, S_top25, S_all, bootstrap intervals, normalisation and smoothing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from layerif.errors import LayerIFError
from layerif.io import atomic_save_tensors, atomic_write_text

AGGREGATIONS = ("S_pos", "S_top25", "S_all")


def s_pos(q: torch.Tensor) -> torch.Tensor:
    """Sum of the positive (beneficial) values of q along the last axis ("+VE", the paper's default)."""
    return q.clamp(min=0).sum(dim=-1)


def s_all(q: torch.Tensor) -> torch.Tensor:
    """Sum of all values of q along the last axis ("ALL")."""
    return q.sum(dim=-1)


def n_positive(q: torch.Tensor) -> torch.Tensor:
    """Number of positive values along the last axis."""
    return (q > 0).sum(dim=-1)


def s_top25(q: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """Sum of the largest `fraction` (ceil) of the positive values along the last axis ("TOP 25%")."""
    positive_count = n_positive(q)
    keep = torch.ceil(positive_count.to(torch.float64) * fraction).to(torch.long)
    ordered = q.clamp(min=0).sort(dim=-1, descending=True).values
    rank = torch.arange(q.shape[-1], device=q.device)
    return (ordered * (rank < keep.unsqueeze(-1))).sum(dim=-1)


def aggregate(q: torch.Tensor, how: str) -> torch.Tensor:
    """One of S_pos / S_top25 / S_all of q along the last axis."""
    functions = {"S_pos": s_pos, "S_top25": s_top25, "S_all": s_all}
    if how not in functions:
        raise LayerIFError(f"unknown score {how!r}; choose from {', '.join(AGGREGATIONS)}")
    return functions[how](q)


BOOTSTRAP_COLUMNS = ("S_pos_lo", "S_pos_hi", "S_top25_lo", "S_top25_hi", "S_all_lo", "S_all_hi",
                     "rank_lo", "rank_hi", "p_above_median")
BOOTSTRAP_LEVEL = 0.95
_BOOTSTRAP_CHUNK_BYTES = 256 << 20  # fixed, so that the resamples depend only on (n, B, seed)


def _resampled_scores(q: torch.Tensor, counts: torch.Tensor, fraction: float = 0.25) -> dict[str, torch.Tensor]:
    """S_pos / S_top25 / S_all [b, L] of q [L, n] for each row of `counts` [b, n] (times each sample is drawn).

    S_top25 takes, per resample, the largest ceil(fraction * positives) values counting repeats: q is sorted
    once per layer, and each resample takes as many copies of each sorted value as fit under its k.
    """
    positive = q.clamp(min=0)
    ordered, order = positive.sort(dim=1, descending=True)
    n_pos = counts @ (q > 0).to(counts.dtype).T
    keep = torch.ceil(n_pos * fraction)
    copies = counts[:, order]  # [b, L, n]: draws of each layer's sorted values
    room = copies.cumsum(dim=-1).sub_(copies).neg_().add_(keep.unsqueeze(-1)).clamp_(min=0)  # k - draws before
    taken = torch.minimum(room, copies, out=room)
    top = torch.einsum("bln,ln->bl", taken, ordered)
    return {"S_pos": counts @ positive.T, "S_top25": top, "S_all": counts @ q.T}


def bootstrap_scores(q: torch.Tensor, resamples: int, seed: int = 0,
                     keep: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Percentile-bootstrap intervals of every layer score, resampling training samples with replacement.

    Returns one array [L] per BOOTSTRAP_COLUMNS entry: the 2.5 / 97.5 % quantiles of S_pos, S_top25 and S_all;
    the 2.5 / 97.5 % quantiles of the layer's rank by S_pos (1 = highest score, as `rank_S_pos`; rank_lo is
    the better end); and the share of resamples in which the layer's S_pos is above the median layer's.
    `keep` ([n] bool) restricts the resampling to the samples that took part (left-out samples excluded).
    """
    if resamples < 1:
        raise LayerIFError(f"bootstrap needs at least one resample, got {resamples}")
    q = q.double() if keep is None else q.double()[:, keep]
    n_layers, n = q.shape
    if n == 0:
        raise LayerIFError("no training samples to resample")
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_BYTES // (8 * n_layers * n * 3))  # ~3 live [chunk, L, n] float64 tensors
    parts: dict[str, list[torch.Tensor]] = {how: [] for how in AGGREGATIONS}
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        picks = torch.randint(n, (size, n), generator=generator)
        counts = torch.zeros(size, n, dtype=torch.float64).scatter_add_(1, picks, torch.ones(size, n, dtype=torch.float64))
        for how, values in _resampled_scores(q, counts).items():
            parts[how].append(values)
    draws = {how: torch.cat(values) for how, values in parts.items()}  # [B, L] each
    tails = torch.tensor([(1 - BOOTSTRAP_LEVEL) / 2, (1 + BOOTSTRAP_LEVEL) / 2], dtype=torch.float64)
    result: dict[str, np.ndarray] = {}
    for how, values in draws.items():
        low, high = torch.quantile(values, tails, dim=0)
        result[f"{how}_lo"], result[f"{how}_hi"] = low.numpy(), high.numpy()
    s = draws["S_pos"]
    rank = 1.0 + (s.unsqueeze(1) > s.unsqueeze(2)).sum(dim=2).double()  # layers scoring strictly higher, + 1
    result["rank_lo"] = torch.quantile(rank, tails[0], dim=0, interpolation="lower").long().numpy()
    result["rank_hi"] = torch.quantile(rank, tails[1], dim=0, interpolation="higher").long().numpy()
    median = torch.quantile(s, 0.5, dim=1, keepdim=True)
    result["p_above_median"] = (s > median).double().mean(dim=0).numpy()
    return {column: result[column] for column in BOOTSTRAP_COLUMNS}


def minmax(values: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1] (all-equal input maps to zeros)."""
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min()
    return np.zeros_like(values) if span == 0 else (values - values.min()) / span


def smooth(values: np.ndarray, window: int = 7, order: int = 3) -> np.ndarray:
    """Savitzky-Golay smoothing (scipy's default `interp` mode); window shrinks for short inputs."""
    from scipy.signal import savgol_filter

    values = np.asarray(values, dtype=np.float64)
    window = min(window, len(values) if len(values) % 2 == 1 else len(values) - 1)
    if window <= order:
        return values.copy()
    return savgol_filter(values, window, order)


@dataclass
class LayerScores:
    """Per-sample, per-layer influence (q = -I, positive = beneficial) and the scores derived from it."""

    q: torch.Tensor  # [L, n_train] float32
    module_names: list[str]  # names of the matrices of a block, e.g. ["self_attn.q_proj", ...]
    q_modules: torch.Tensor  # [L, len(module_names), n_train]; NaN where a block lacks that module
    n_params: list[int]  # parameters per block in the scored space
    n_val: int
    q_pairwise: torch.Tensor | None = None  # [L, n_train, n_val]
    metadata: dict = field(default_factory=dict)
    intervals: dict[str, np.ndarray] | None = None  # BOOTSTRAP_COLUMNS -> [L], after `bootstrap`

    @property
    def n_layers(self) -> int:
        return int(self.q.shape[0])

    @property
    def n_train(self) -> int:
        return int(self.q.shape[1])

    def scores(self, how: str = "S_pos") -> np.ndarray:
        """One score per layer (numpy, float64)."""
        return aggregate(self.q.double(), how).numpy()

    def bootstrap(self, resamples: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
        """Compute and keep bootstrap intervals of the scores (see `bootstrap_scores`); left-out samples excluded."""
        left_out = (self.metadata.get("left_out") or {}).get("training") or {}
        keep = torch.ones(self.n_train, dtype=torch.bool)
        keep[[int(index) for index in left_out]] = False
        self.intervals = bootstrap_scores(self.q, resamples, seed, keep=None if bool(keep.all()) else keep)
        self.metadata["bootstrap"] = {"resamples": resamples, "seed": seed, "level": BOOTSTRAP_LEVEL,
                                      "rank_by": "S_pos", "samples": int(keep.sum())}
        return self.intervals

    def module_scores(self, how: str = "S_pos") -> np.ndarray:
        """[L, n_modules] score of each matrix of each block."""
        return aggregate(torch.nan_to_num(self.q_modules.double(), nan=0.0), how).numpy()

    def to_pandas(self):
        """One row per layer (WeightWatcher-style): scores, counts and each module's share of S_pos."""
        import pandas as pd

        q = self.q.double()
        table = pd.DataFrame(
            {
                "layer": np.arange(self.n_layers),
                "S_pos": s_pos(q).numpy(),
                "S_top25": s_top25(q).numpy(),
                "S_all": s_all(q).numpy(),
                "n_pos": n_positive(q).numpy(),
                "n_train": self.n_train,
                "n_val": self.n_val,
                "n_params": self.n_params,
            }
        )
        per_module = self.module_scores("S_pos")
        for column, name in enumerate(self.module_names):
            table[f"S_pos[{name.split('.')[-1] if name.count('.') < 2 else name}]"] = per_module[:, column]
        table["rank_S_pos"] = table["S_pos"].rank(ascending=False, method="min").astype(int)
        for column, values in (self.intervals or {}).items():
            table[column] = values
        return table

    def save(self, directory: str | Path, suffix: str | None = None) -> None:
        """Write influence.safetensors and layer_scores.csv (atomically) into `directory`.

        With `suffix` (an estimator's name) the files are influence.<suffix>.safetensors and layer_scores.<suffix>.csv.
        """
        directory = Path(directory)
        ending = f".{suffix}" if suffix else ""
        tensors = {"q": self.q.float(), "q_modules": self.q_modules.float()}
        if self.q_pairwise is not None:
            tensors["q_pairwise"] = self.q_pairwise.float()
        if self.intervals is not None:
            tensors["bootstrap"] = torch.from_numpy(np.stack([np.asarray(self.intervals[c], dtype=np.float64)
                                                              for c in BOOTSTRAP_COLUMNS]))
        metadata = {
            "format": "layerif.influence/1",
            "sign": "q = -I (positive = beneficial; I uses the Koh & Liang sign)",
            "module_names": json.dumps(self.module_names),
            "n_params": json.dumps(self.n_params),
            "n_val": str(self.n_val),
            "metadata": json.dumps(self.metadata, default=str),
        }
        if self.intervals is not None:
            metadata["bootstrap_columns"] = json.dumps(list(BOOTSTRAP_COLUMNS))
        atomic_save_tensors(directory / f"influence{ending}.safetensors", tensors, metadata)
        atomic_write_text(directory / f"layer_scores{ending}.csv", self.to_pandas().to_csv(index=False))

    @classmethod
    def load(cls, directory: str | Path, estimator: str | None = None) -> LayerScores:
        """Read scores saved by `save` (a run directory of `layerif score`; `estimator`: one of several)."""
        from safetensors import safe_open

        path = Path(directory) / (f"influence.{estimator}.safetensors" if estimator else "influence.safetensors")
        if not path.is_file():
            raise LayerIFError(f"no layer scores in {directory}: {path.name} is missing (run `layerif score` first)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:
            raise LayerIFError(f"{path}: not a readable safetensors file ({exc})") from exc
        if meta.get("format") != "layerif.influence/1" or "q" not in tensors:
            raise LayerIFError(f"{path}: not a layerif influence file")
        intervals = None
        if "bootstrap" in tensors:
            columns = json.loads(meta.get("bootstrap_columns", "[]"))
            intervals = {column: values.numpy() for column, values in zip(columns, tensors["bootstrap"])}
            for column in ("rank_lo", "rank_hi"):
                if column in intervals:
                    intervals[column] = intervals[column].astype(np.int64)
        return cls(
            q=tensors["q"],
            module_names=json.loads(meta["module_names"]),
            q_modules=tensors["q_modules"],
            n_params=json.loads(meta["n_params"]),
            n_val=int(meta["n_val"]),
            q_pairwise=tensors.get("q_pairwise"),
            metadata=json.loads(meta.get("metadata", "{}")),
            intervals=intervals,
        )


def estimator_agreement(by_estimator: dict[str, LayerScores]) -> list[dict]:
    """Spearman correlation of the layer profiles of every pair of estimators, per aggregation.

    One row per pair, in the order given: {"a", "b", "S_pos", "S_top25", "S_all"}; None where a profile is
    constant (no ranking to compare).
    """
    from scipy.stats import spearmanr

    names = list(by_estimator)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            row: dict = {"a": a, "b": b}
            for how in AGGREGATIONS:
                first, second = by_estimator[a].scores(how), by_estimator[b].scores(how)
                constant = np.ptp(first) == 0 or np.ptp(second) == 0
                row[how] = None if constant else float(spearmanr(first, second).statistic)
            rows.append(row)
    return rows

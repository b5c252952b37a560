"""Layer scores from per-layer influence: S_pos, S_top25, S_all, normalisation and smoothing."""

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

    @property
    def n_layers(self) -> int:
        return int(self.q.shape[0])

    @property
    def n_train(self) -> int:
        return int(self.q.shape[1])

    def scores(self, how: str = "S_pos") -> np.ndarray:
        """One score per layer (numpy, float64)."""
        return aggregate(self.q.double(), how).numpy()

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
        return table

    def save(self, directory: str | Path) -> None:
        """Write influence.safetensors and layer_scores.csv (atomically) into `directory`."""
        directory = Path(directory)
        tensors = {"q": self.q.float(), "q_modules": self.q_modules.float()}
        if self.q_pairwise is not None:
            tensors["q_pairwise"] = self.q_pairwise.float()
        metadata = {
            "format": "layerif.influence/1",
            "sign": "q = -I (positive = beneficial; I uses the Koh & Liang sign)",
            "module_names": json.dumps(self.module_names),
            "n_params": json.dumps(self.n_params),
            "n_val": str(self.n_val),
            "metadata": json.dumps(self.metadata, default=str),
        }
        atomic_save_tensors(directory / "influence.safetensors", tensors, metadata)
        atomic_write_text(directory / "layer_scores.csv", self.to_pandas().to_csv(index=False))

    @classmethod
    def load(cls, directory: str | Path) -> LayerScores:
        """Read scores saved by `save` (a run directory of `layerif score`)."""
        from safetensors import safe_open

        path = Path(directory) / "influence.safetensors"
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
        return cls(
            q=tensors["q"],
            module_names=json.loads(meta["module_names"]),
            q_modules=tensors["q_modules"],
            n_params=json.loads(meta["n_params"]),
            n_val=int(meta["n_val"]),
            q_pairwise=tensors.get("q_pairwise"),
            metadata=json.loads(meta.get("metadata", "{}")),
        )

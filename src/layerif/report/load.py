"""Read a finished `layerif score` run folder for reporting: its table, its record and its scores."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from layerif.errors import LayerIFError
from layerif.scores import AGGREGATIONS, LayerScores

REQUIRED_COLUMNS = ("layer", *AGGREGATIONS, "n_pos", "n_train", "n_params")
MODULE_PREFIX = "S_pos["


@dataclass
class RunView:
    """One run as the report sees it: layer_scores.csv as a table, run.json as a dict, and the scores."""

    name: str
    path: Path
    frame: object  # pandas.DataFrame of layer_scores.csv, one row per layer
    record: dict
    scores: LayerScores
    notes: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.frame)

    def values(self, column: str) -> np.ndarray:
        """One CSV column as float64."""
        return self.frame[column].to_numpy(dtype=np.float64)

    def has_interval(self, how: str) -> bool:
        """True when the run carries a bootstrap interval for aggregation `how`."""
        return f"{how}_lo" in self.frame.columns and f"{how}_hi" in self.frame.columns

    def module_columns(self) -> list[str]:
        """The per-module S_pos columns, e.g. `S_pos[q_proj]`, in CSV order."""
        return [c for c in self.frame.columns if c.startswith(MODULE_PREFIX) and c.endswith("]")]

    @property
    def task(self) -> str:
        """A short description of the training data the run used."""
        train = (self.record.get("data") or {}).get("train") or {}
        return str(train.get("source", "?"))

    @property
    def model(self) -> str:
        return str((self.record.get("model") or {}).get("source", "?"))


def load_run(path: str | Path, name: str | None = None) -> RunView:
    """Open a run folder; anything that is not a complete run is a LayerIFError naming what is missing."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise LayerIFError(f"run folder {path} does not exist")
    if not path.is_dir():
        raise LayerIFError(f"{path} is not a run folder (expected a directory written by `layerif score`)")
    record_path, table_path = path / "run.json", path / "layer_scores.csv"
    if not record_path.is_file():
        raise LayerIFError(f"{path} is not a finished run: run.json is missing (run `layerif score` first)")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayerIFError(f"{record_path}: not readable JSON ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != "layerif.run/1":
        raise LayerIFError(f"{record_path}: not a layerif run record")
    if not table_path.is_file():
        raise LayerIFError(f"{path} is not a finished run: layer_scores.csv is missing")
    try:
        frame = pd.read_csv(table_path)
    except (OSError, ValueError) as exc:
        raise LayerIFError(f"{table_path}: not a readable CSV ({exc})") from exc
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise LayerIFError(f"{table_path}: missing column(s) {', '.join(missing)}")
    if len(frame) == 0:
        raise LayerIFError(f"{table_path}: no layers")
    numeric = frame[list(REQUIRED_COLUMNS)].to_numpy(dtype=np.float64)
    if not np.isfinite(numeric).all():
        raise LayerIFError(f"{table_path}: non-finite values in the score columns")
    frame = frame.sort_values("layer").reset_index(drop=True)
    scores = LayerScores.load(path)
    if scores.n_layers != len(frame):
        raise LayerIFError(f"{path}: layer_scores.csv has {len(frame)} layers but influence.safetensors has "
                           f"{scores.n_layers}")
    return RunView(name=name or path.resolve().name, path=path, frame=frame, record=record, scores=scores)


def unique_names(paths: list[str | Path]) -> list[str]:
    """Short display names for run folders: the folder name, qualified by its parent when names repeat."""
    resolved = [Path(p).resolve() for p in paths]
    plain = [p.name for p in resolved]
    names = [f"{path.parent.name}/{name}" if plain.count(name) > 1 else name for path, name in zip(resolved, plain)]
    seen: dict[str, int] = {}
    for index, name in enumerate(names):  # still equal (same folder given twice): number them
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[index] = f"{name} ({seen[name]})"
    return names

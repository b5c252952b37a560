"""Stability of layer profiles across data: score K disjoint train/validation splits and compare the profiles.

Per aggregation, every pair of splits gets the Spearman and Kendall correlation of its two layer profiles.
The mean pairwise Spearman r is the reliability of a profile scored from one split's n_train rows (the
correlation of two parallel measurements). Spearman-Brown then gives the reliability of a profile from
k times as many rows, k r / (1 + (k - 1) r): k = 2 is the split-half reliability, and solving it for a
target reliability R gives k = R (1 - r) / (r (1 - R)), hence the recommended n_train = ceil(k n_train).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from layerif.args import ScoreConfig
from layerif.errors import LayerIFError
from layerif.io import atomic_write_json, atomic_write_text
from layerif.scores import AGGREGATIONS, LayerScores

TARGET_RELIABILITY = 0.9
OUTPUT_FILES = ("stability.json", "stability.csv")  # plus split_<k>/ with each split's scores


@dataclass
class StabilityRun:
    """Model, data, split sizes and output folder of a `layerif stability` run."""

    model: str
    train: str
    val: str
    out: str
    splits: int = 2
    n_train: int = 150  # rows per split
    n_val: int = 25
    split_seed: int = 0
    train_split: str | None = None
    val_split: str | None = None
    gguf_file: str | None = None
    dtype: str | None = None
    device: str | None = None
    overwrite: bool = False
    config: ScoreConfig = field(default_factory=ScoreConfig)

    def validate(self) -> None:
        """Raise LayerIFError on bad split settings (the scoring config validates itself)."""
        if self.splits < 2:
            raise LayerIFError(f"--splits must be at least 2 to compare profiles, got {self.splits}")
        for name in ("n_train", "n_val"):
            if getattr(self, name) < 1:
                raise LayerIFError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        self.config.validate()
        if len(self.config.estimators) > 1:
            raise LayerIFError(f"layerif stability scores one estimator; --estimator {self.config.estimator} names several")


def disjoint_splits(n_rows: int, splits: int, size: int, seed: int, what: str) -> list[list[int]]:
    """`splits` disjoint lists of `size` row numbers from a seeded shuffle of range(n_rows)."""
    if splits * size > n_rows:
        raise LayerIFError(f"{splits} splits of {size} {what} need {splits * size} rows; the data has only {n_rows}")
    order = np.random.default_rng(seed).permutation(n_rows)
    return [sorted(order[k * size:(k + 1) * size].tolist()) for k in range(splits)]


def spearman_brown(r: float, factor: float) -> float:
    """Reliability of a measurement `factor` times as long as one of reliability r."""
    return factor * r / (1 + (factor - 1) * r)


def rows_for_reliability(r: float, n: int, target: float = TARGET_RELIABILITY) -> int | None:
    """Rows needed for a profile of reliability `target`, from reliability r at n rows (None when r <= 0)."""
    if not r > 0:
        return None
    if r >= 1:
        return n
    return math.ceil(round(n * target * (1 - r) / (r * (1 - target)), 9))  # round: 900.0000000001 is 900


def profile_agreement(profiles: np.ndarray) -> tuple[list[dict], dict]:
    """(one row per pair of splits, summary) for profiles [K, L] of one aggregation."""
    from scipy.stats import kendalltau, spearmanr

    pairs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant profile has no rank correlation: reported as NaN
        for first, second in combinations(range(len(profiles)), 2):
            rho = spearmanr(profiles[first], profiles[second])
            tau = kendalltau(profiles[first], profiles[second])
            pairs.append({"split_a": first, "split_b": second, "spearman": float(rho.statistic),
                          "spearman_p": float(rho.pvalue), "kendall": float(tau.statistic),
                          "kendall_p": float(tau.pvalue)})
    mean_rho = float(np.mean([pair["spearman"] for pair in pairs]))
    mean_tau = float(np.mean([pair["kendall"] for pair in pairs]))
    summary = {"mean_spearman": mean_rho, "mean_kendall": mean_tau,
               "split_half_reliability": spearman_brown(mean_rho, 2) if np.isfinite(mean_rho) else float("nan")}
    return pairs, summary


@dataclass
class StabilityResult:
    """Profiles per split and their agreement, per aggregation."""

    n_train: int
    n_val: int
    profiles: dict[str, np.ndarray]  # aggregation -> [K, L]
    pairs: dict[str, list[dict]]
    summary: dict[str, dict]
    splits: list[LayerScores]
    rows: dict[str, list[list[int]]]  # "train" / "val" -> row numbers of each split

    def sentence(self, how: str = "S_pos") -> str:
        """A plain-language verdict for one aggregation."""
        summary = self.summary[how]
        rho, tau, half = summary["mean_spearman"], summary["mean_kendall"], summary["split_half_reliability"]
        text = (f"{how}: profiles of {len(self.splits)} disjoint splits of {self.n_train} training rows agree at "
                f"rho = {rho:.2f} (Kendall tau = {tau:.2f}); split-half reliability (Spearman-Brown, "
                f"{2 * self.n_train} rows) {half:.2f}; ")
        needed = summary["recommended_n_train"]
        if needed is None:
            return text + "no agreement to extrapolate from: these profiles look like noise at this n_train."
        return text + (f"n_train >= {needed} recommended for a reliability of {TARGET_RELIABILITY} "
                       f"(Spearman-Brown prophecy from rho at n = {self.n_train}).")


def compare_splits(split_scores: list[LayerScores], n_train: int) -> tuple[dict, dict, dict]:
    """(profiles, pairs, summary) per aggregation for the scores of each split."""
    profiles, pairs, summary = {}, {}, {}
    for how in AGGREGATIONS:
        profiles[how] = np.stack([scores.scores(how) for scores in split_scores])
        pairs[how], summary[how] = profile_agreement(profiles[how])
        summary[how]["recommended_n_train"] = rows_for_reliability(summary[how]["mean_spearman"], n_train)
    return profiles, pairs, summary


def _csv(pairs: dict[str, list[dict]]) -> str:
    lines = ["aggregation,split_a,split_b,spearman,spearman_p,kendall,kendall_p"]
    for how, rows in pairs.items():
        for row in rows:
            lines.append(f"{how},{row['split_a']},{row['split_b']},{row['spearman']!r},{row['spearman_p']!r},"
                         f"{row['kendall']!r},{row['kendall_p']!r}")
    return "\n".join(lines) + "\n"


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_stability(run: StabilityRun) -> tuple[StabilityResult, Path]:
    """Score each split, compare the profiles, and write stability.json / .csv and split_<k>/ into run.out."""
    from layerif.api import score_layers
    from layerif.data import load_rows
    from layerif.models import load_model
    from layerif.runs import check_output_dir

    out = Path(run.out)
    check_output_dir(out, run.overwrite)
    run.validate()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    train_rows, val_rows = load_rows(run.train, run.train_split), load_rows(run.val, run.val_split)
    rows = {"train": disjoint_splits(len(train_rows), run.splits, run.n_train, run.split_seed, "training rows"),
            "val": disjoint_splits(len(val_rows), run.splits, run.n_val, run.split_seed + 1, "validation rows")}
    timings["load_data_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    device = run.device or ("cuda" if _cuda_available() else "cpu")
    loaded = load_model(run.model, run.gguf_file, run.dtype, device, quiet=run.config.quiet)
    timings["load_model_s"] = time.perf_counter() - clock
    config = dataclasses.replace(run.config, n_train=None, n_val=None, sample_seed=None)
    split_scores = []
    for k in range(run.splits):
        clock = time.perf_counter()
        split_scores.append(score_layers(loaded.model, loaded.tokenizer, [train_rows[i] for i in rows["train"][k]],
                                         [val_rows[i] for i in rows["val"][k]], config))
        timings[f"split_{k}_s"] = time.perf_counter() - clock
    profiles, pairs, summary = compare_splits(split_scores, run.n_train)
    result = StabilityResult(run.n_train, run.n_val, profiles, pairs, summary, split_scores, rows)

    (out / "stability.json").unlink(missing_ok=True)  # its presence marks a complete result
    for k, scores in enumerate(split_scores):
        scores.save(out / f"split_{k}")
    atomic_write_text(out / "stability.csv", _csv(pairs))
    record = {
        "format": "layerif.stability/1",
        "model": run.model,
        "data": {"train": run.train, "val": run.val, "train_split": run.train_split, "val_split": run.val_split},
        "splits": run.splits, "n_train_per_split": run.n_train, "n_val_per_split": run.n_val,
        "split_seed": run.split_seed,
        "config": dataclasses.asdict(config),
        "target_reliability": TARGET_RELIABILITY,
        "method": "per aggregation: Spearman / Kendall of the layer profiles of every pair of splits; "
                  "split-half reliability = 2r/(1+r) on the mean pairwise Spearman r; recommended n_train = "
                  "ceil(n * R(1-r) / (r(1-R))) from the Spearman-Brown prophecy for reliability R",
        "aggregations": {how: {**{key: _finite_or_none(value) for key, value in summary[how].items()},
                               "sentence": result.sentence(how),
                               "pairs": [{key: _finite_or_none(value) for key, value in pair.items()}
                                         for pair in pairs[how]],
                               "profiles": profiles[how].tolist()} for how in AGGREGATIONS},
        "rows": rows,
        "timings_s": {key: round(value, 3) for key, value in timings.items()},
        "outputs": [*OUTPUT_FILES, *(f"split_{k}" for k in range(run.splits))],
    }
    atomic_write_json(out / "stability.json", record)
    return result, out


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()

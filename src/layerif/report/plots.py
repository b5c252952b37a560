"""Plots of layer scores."""

from __future__ import annotations

from pathlib import Path

from layerif.io import atomic_savefig
from layerif.scores import AGGREGATIONS, LayerScores, minmax


def plot_layer_scores(scores: LayerScores, path: str | Path, title: str = "") -> Path:
    """S_pos / S_top25 / S_all per layer, each min-max normalised, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6.0, scores.n_layers * 0.25), 3.6))
    for how, marker in zip(AGGREGATIONS, ("o", "s", "^")):
        axis.plot(range(scores.n_layers), minmax(scores.scores(how)), marker=marker, markersize=3, label=how)
    axis.set_xlabel("layer")
    axis.set_ylabel("score (min-max normalised)")
    axis.set_title(title or "LayerIF layer scores (higher = more sensitive to the data = less well trained)",
                   fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    try:
        return atomic_savefig(path, figure)
    finally:
        plt.close(figure)

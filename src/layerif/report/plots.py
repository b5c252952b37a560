"""Plots of layer scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from layerif.io import atomic_savefig
from layerif.scores import AGGREGATIONS, LayerScores


def plot_layer_scores(scores: LayerScores, path: str | Path, title: str = "") -> Path:
    """S_pos / S_top25 / S_all per layer, each min-max normalised, one line each (with its bootstrap band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6.0, scores.n_layers * 0.25), 3.6))
    layers = np.arange(scores.n_layers)
    for how, marker in zip(AGGREGATIONS, ("o", "s", "^")):
        values = scores.scores(how)
        low, span = values.min(), values.max() - values.min()
        scale = 1.0 / span if span > 0 else 0.0  # the band goes through the same min-max map as its line
        (line,) = axis.plot(layers, (values - low) * scale, marker=marker, markersize=3, label=how)
        if scores.intervals is not None:
            band_low = (scores.intervals[f"{how}_lo"] - low) * scale
            band_high = (scores.intervals[f"{how}_hi"] - low) * scale
            axis.fill_between(layers, band_low, band_high, color=line.get_color(), alpha=0.15, linewidth=0)
    axis.set_xlabel("layer")
    ylabel = "score (min-max normalised)"
    if scores.intervals is not None:
        ylabel += f"\nbands: {scores.metadata.get('bootstrap', {}).get('level', 0.95):.0%} bootstrap intervals"
    axis.set_ylabel(ylabel, fontsize=8)
    axis.set_title(title or "LayerIF layer scores (higher = more sensitive to the data = less well trained)",
                   fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    try:
        return atomic_savefig(path, figure)
    finally:
        plt.close(figure)

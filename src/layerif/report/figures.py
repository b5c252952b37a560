"""Figures of the HTML report as inline SVG (text kept as text, no fonts or links embedded)."""

from __future__ import annotations

import io
import re

import numpy as np

from layerif.report.compare import AllocationTable, TaskComparison
from layerif.report.load import RunView
from layerif.report.reading import module_shares
from layerif.scores import AGGREGATIONS

_PROLOGUE = re.compile(r"^.*?(?=<svg)", re.DOTALL)
_NAMESPACES = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')
_METADATA = re.compile(r"<metadata>.*?</metadata>", re.DOTALL)


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def to_svg(figure, salt: str) -> str:
    """Render a figure as an `<svg>` element for inline use: ids salted per figure, no XML prologue or URLs."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = _METADATA.sub("", _PROLOGUE.sub("", buffer.getvalue(), count=1))
    # Inline SVG in HTML needs no namespace declarations; dropping them leaves no URL in the page.
    return _NAMESPACES.sub("", text)


def _layer_axis(axis, n_layers: int) -> None:
    axis.set_xlabel("block")
    step = max(1, int(np.ceil(n_layers / 15)))
    axis.set_xticks(range(0, n_layers, step))
    axis.set_xlim(-0.6, n_layers - 0.4)
    axis.grid(alpha=0.3)


def profile_svg(view: RunView, salt: str) -> str:
    """One panel per aggregation: the score per block, with its bootstrap band when the run has one."""
    figure = _new_figure(11, 3.0)
    axes = figure.subplots(1, len(AGGREGATIONS))
    layers = view.values("layer")
    for axis, how, colour in zip(axes, AGGREGATIONS, ("C0", "C1", "C2")):
        if view.has_interval(how):
            axis.fill_between(layers, view.values(f"{how}_lo"), view.values(f"{how}_hi"), color=colour, alpha=0.25,
                              linewidth=0, label="95 % bootstrap interval")
            axis.legend(fontsize=7, loc="best")
        axis.plot(layers, view.values(how), marker="o", markersize=3, color=colour)
        axis.set_title(how, fontsize=10)
        axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        _layer_axis(axis, view.n_layers)
    axes[0].set_ylabel("score")
    return to_svg(figure, salt)


def module_share_svg(view: RunView, salt: str) -> str | None:
    """Heatmap: each module's share of the summed per-module S_pos, per block."""
    labels, shares = module_shares(view)
    if not labels:
        return None
    figure = _new_figure(11, 0.28 * len(labels) + 1.0)
    axis = figure.subplots()
    image = axis.imshow(shares.T, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    axis.set_xlabel("block")
    step = max(1, int(np.ceil(view.n_layers / 15)))
    axis.set_xticks(range(0, view.n_layers, step))
    figure.colorbar(image, ax=axis, label="share of block", pad=0.01)
    return to_svg(figure, salt)


def n_pos_svg(view: RunView, salt: str) -> str:
    """Bars: training samples with q > 0 per block, against n_train."""
    figure = _new_figure(11, 2.2)
    axis = figure.subplots()
    n_train = view.values("n_train").max()
    axis.bar(view.values("layer"), view.values("n_pos"), color="C0", width=0.8)
    axis.axhline(n_train, color="0.3", linestyle="--", linewidth=1, label=f"n_train = {int(n_train)}")
    axis.set_ylabel("n_pos")
    axis.set_ylim(0, n_train * 1.08)
    axis.legend(fontsize=7, loc="lower right")
    _layer_axis(axis, view.n_layers)
    return to_svg(figure, salt)


def allocation_svg(table: AllocationTable, salt: str) -> str | None:
    """Lines: each method's per-block value (LayerIF drawn thicker)."""
    if not table.values:
        return None
    figure = _new_figure(11, 2.8)
    axis = figure.subplots()
    n_layers = len(next(iter(table.values.values())))
    for method, values in table.values.items():
        scale = 100.0 if table.kind == "sparsity" else 1.0
        axis.plot(range(n_layers), values * scale, drawstyle="steps-mid" if table.kind == "experts" else "default",
                  linewidth=2.4 if method == "layerif" else 1.1, label=method, zorder=3 if method == "layerif" else 2)
    axis.set_ylabel("experts" if table.kind == "experts" else "sparsity (%)")
    axis.legend(fontsize=7, ncol=min(5, len(table.values)), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _layer_axis(axis, n_layers)
    return to_svg(figure, salt)


def task_profile_svg(comparison: TaskComparison, score: str, salt: str) -> str:
    """Heatmap: runs (clustered order) x blocks, each profile min-max normalised."""
    names = [comparison.names[i] for i in comparison.order]
    figure = _new_figure(11, 0.4 * len(names) + 1.3)
    axis = figure.subplots()
    image = axis.imshow(comparison.profiles[comparison.order], aspect="auto", cmap="magma", vmin=0, vmax=1,
                        interpolation="nearest")
    axis.set_yticks(range(len(names)), names, fontsize=8)
    axis.set_xlabel("block")
    n_layers = comparison.profiles.shape[1]
    axis.set_xticks(range(0, n_layers, max(1, int(np.ceil(n_layers / 15)))))
    figure.colorbar(image, ax=axis, label=f"{score} (min-max per run)", pad=0.01)
    return to_svg(figure, salt)


def similarity_svg(comparison: TaskComparison, salt: str) -> str:
    """Heatmap of the Spearman matrix in clustered order, each cell annotated."""
    order = comparison.order
    names = [comparison.names[i] for i in order]
    matrix = comparison.similarity[np.ix_(order, order)]
    size = 1.2 + 0.55 * len(names)
    figure = _new_figure(size + 1.5, size)
    axis = figure.subplots()
    image = axis.imshow(matrix, cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest")
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(names)), names, fontsize=8)
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(column, row, "n/a" if not np.isfinite(value) else f"{value:.2f}", ha="center", va="center",
                  fontsize=7, color="black")
    figure.colorbar(image, ax=axis, label="Spearman ρ", pad=0.02)
    return to_svg(figure, salt)

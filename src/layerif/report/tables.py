"""Readable terminal tables."""

from __future__ import annotations

from layerif.scores import LayerScores


def print_layer_table(scores: LayerScores, title: str = "LayerIF layer scores") -> None:
    """Print one row per layer with a bar for the normalised S_pos."""
    from rich.console import Console
    from rich.table import Table

    frame = scores.to_pandas()
    peak = max(float(frame["S_pos"].max()), 1e-300)
    table = Table(title=title, title_style="bold", caption="higher S = more sensitive to the data = less well trained")
    for column in ("layer", "S_pos", "S_top25", "S_all", "n_pos", "rank"):
        table.add_column(column, justify="right")
    table.add_column("S_pos", justify="left")
    for row in frame.itertuples():
        bar = "█" * max(0, round(20 * row.S_pos / peak))
        table.add_row(str(row.layer), f"{row.S_pos:.4g}", f"{row.S_top25:.4g}", f"{row.S_all:.4g}",
                      f"{row.n_pos}/{row.n_train}", str(row.rank_S_pos), bar)
    Console().print(table)

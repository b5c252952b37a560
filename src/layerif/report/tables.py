"""Readable terminal tables."""

from __future__ import annotations

import numpy as np

from layerif.scores import LayerScores

BAR_WIDTH = 16
_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar_lengths(values, width: int = BAR_WIDTH) -> np.ndarray:
    """Bar length in eighths of a character, min-max scaled: the column minimum draws 1/8, the maximum `width`."""
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min() if len(values) else 0.0
    scaled = np.zeros_like(values) if span == 0 else (values - values.min()) / span
    return 1 + np.round(scaled * (8 * width - 1)).astype(np.int64)


def bar(eighths: int) -> str:
    """A horizontal bar of `eighths`/8 characters."""
    full, rest = divmod(int(eighths), 8)
    return "█" * full + (_EIGHTHS[rest] if rest else "")


def interval_strip(low: float, value: float, high: float, start: float, stop: float, width: int = BAR_WIDTH) -> str:
    """The interval [low, high] and the estimate on a shared scale [start, stop]: `   ├──●───┤  `."""
    span = stop - start
    position = (lambda x: 0) if span <= 0 else (lambda x: int(round((x - start) / span * (width - 1))))
    left, middle, right = position(low), position(value), position(high)
    cells = [" "] * width
    for index in range(left, right + 1):
        cells[index] = "─"
    cells[left], cells[right] = "├", "┤"
    cells[middle] = "●"
    return "".join(cells).rstrip()


def short_number(value: float, digits: int = 4) -> str:
    """A compact `g` format without exponent padding: 193600 -> 1.936e5, 2.4e10 -> 2.4e10."""
    text = f"{value:.{digits}g}"
    mantissa, _, exponent = text.partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else text


def print_layer_table(scores, title: str = "LayerIF layer scores", console=None) -> None:
    """Print one row per layer: scores, counts, rank and a min-max bar of S_pos (its interval when there is one).

    `scores` is a LayerScores or a table with the columns of layer_scores.csv. With bootstrap columns the bar
    becomes the interval drawn on a shared scale, and the rank shows its range over resamples.
    """
    from rich.console import Console
    from rich.table import Table

    frame = scores.to_pandas() if isinstance(scores, LayerScores) else scores
    s_pos = frame["S_pos"].to_numpy(dtype=np.float64)
    has_interval = "S_pos_lo" in frame.columns and "S_pos_hi" in frame.columns
    has_rank_range = "rank_lo" in frame.columns and "rank_hi" in frame.columns
    rank = frame["rank_S_pos"] if "rank_S_pos" in frame.columns else frame["S_pos"].rank(ascending=False, method="min")
    if has_interval:
        low, high = frame["S_pos_lo"].to_numpy(dtype=np.float64), frame["S_pos_hi"].to_numpy(dtype=np.float64)
        start, stop = min(low.min(), s_pos.min()), max(high.max(), s_pos.max())
        graphic = [interval_strip(lo, value, hi, start, stop) for lo, value, hi in zip(low, s_pos, high)]
        heading = "S_pos ├─●─┤"
        caption = (f"├ ┤ 95 % bootstrap interval and ● estimate on a scale from {short_number(start)} to "
                   f"{short_number(stop)}")
    else:
        graphic = [bar(length) for length in bar_lengths(s_pos)]
        heading = "S_pos (min → max)"
        caption = f"bar from the column minimum {short_number(s_pos.min())} to the maximum {short_number(s_pos.max())}"
    table = Table(title=title, title_style="bold",
                  caption=f"higher S = more sensitive to the data = less well trained; {caption}")
    for column in ("layer", "S_pos", "S_top25", "S_all", "n_pos", "rank (range)" if has_rank_range else "rank"):
        table.add_column(column, justify="right")
    table.add_column(heading, justify="left", no_wrap=True, min_width=BAR_WIDTH)
    for position, row in enumerate(frame.itertuples(index=False)):
        ranked = str(int(rank.iloc[position]))
        if has_rank_range:
            ranked += f" ({int(frame['rank_lo'].iloc[position])}–{int(frame['rank_hi'].iloc[position])})"
        table.add_row(str(int(row.layer)), short_number(row.S_pos), short_number(row.S_top25), short_number(row.S_all),
                      f"{int(row.n_pos)}/{int(row.n_train)}", ranked, graphic[position])
    (console or Console()).print(table)

"""The terminal table: bars drawn from the column minimum, intervals when the run has them."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from rich.console import Console

from layerif.report.tables import BAR_WIDTH, bar, bar_lengths, interval_strip, print_layer_table

BLOCKS = "█▏▎▍▌▋▊▉"


def _frame(values, intervals: bool = False, spread: float = 0.25) -> pd.DataFrame:
    values = np.asarray(values, dtype=np.float64)
    frame = pd.DataFrame({"layer": range(len(values)), "S_pos": values, "S_top25": values / 4, "S_all": values,
                          "n_pos": 10, "n_train": 10, "rank_S_pos": pd.Series(-values).rank(method="min").astype(int)})
    if intervals:
        frame["S_pos_lo"], frame["S_pos_hi"] = values * (1 - spread), values * (1 + spread)
        frame["rank_lo"], frame["rank_hi"] = 1, len(values)
    return frame


def _render(frame) -> list[str]:
    buffer = io.StringIO()
    print_layer_table(frame, console=Console(file=buffer, width=140, color_system=None))
    return buffer.getvalue().splitlines()


def _bar_of(line: str) -> str:
    return line.split("│")[-2].strip()


def test_bars_follow_the_profile_from_the_minimum():
    values = [2.4e10, 2.5e10, 2.7e10, 3.0e10]  # the demo's case: drawn from zero these were all the same length
    lines = [line for line in _render(_frame(values)) if line.startswith("│")]
    lengths = [sum(8 if ch == "█" else BLOCKS.index(ch) for ch in _bar_of(line)) for line in lines]
    assert len(set(lengths)) == len(values)
    assert lengths == sorted(lengths) and lengths[0] == 1 and lengths[-1] == 8 * BAR_WIDTH
    np.testing.assert_allclose(np.diff(lengths) / (lengths[-1] - lengths[0]), np.diff(values) / 0.6e10, atol=0.01)


def test_short_number():
    from layerif.report.tables import short_number

    assert short_number(193600.0) == "1.936e5" and short_number(2.4e10) == "2.4e10"
    assert short_number(-3.2e-7) == "-3.2e-7" and short_number(12.5) == "12.5"


def test_bar_lengths_edge_cases():
    assert bar_lengths([5.0, 5.0]).tolist() == [1, 1]
    assert bar(17) == "██▏"


def test_interval_is_shown_when_present():
    lines = _render(_frame([1.0, 2.0, 4.0], intervals=True))
    rows = [line for line in lines if line.startswith("│")]
    strips = [_bar_of(line) for line in rows]
    assert all("├" in s and "┤" in s and "●" in s for s in strips)
    assert [s.index("●") for s in strips] == sorted(s.index("●") for s in strips)
    assert strips[0].index("●") < strips[-1].index("●")
    assert "(1–3)" in rows[0] and "95 % bootstrap" in " ".join(lines)
    narrow = [_bar_of(line) for line in _render(_frame([1.0, 2.0, 4.0], True, 0.001)) if line.startswith("│")]
    assert all("●" in s for s in narrow)  # an interval narrower than a cell still shows the estimate


def test_interval_strip_positions():
    strip = interval_strip(1.0, 2.0, 3.0, 0.0, 4.0, width=9)
    assert strip == "  ├─●─┤"


def test_layer_scores_object_prints_its_profile():
    import torch

    from layerif.scores import LayerScores

    q = torch.arange(1, 6, dtype=torch.float32)[:, None] * torch.ones(5, 8) + 100.0  # S_pos 808 ... 840
    scores = LayerScores(q=q, module_names=["mlp.down_proj"], q_modules=q[:, None, :], n_params=[10] * 5, n_val=2)
    buffer = io.StringIO()
    print_layer_table(scores, console=Console(file=buffer, width=140, color_system=None))
    bars = [_bar_of(line) for line in buffer.getvalue().splitlines() if line.startswith("│")]
    assert [len(b) for b in bars] == sorted(len(b) for b in bars) and len(bars[0]) < len(bars[-1]) == BAR_WIDTH

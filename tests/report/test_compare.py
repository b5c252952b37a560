"""Cross-run comparison: Spearman matrix, clustered order, runs of another depth left out; the reading's numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from layerif.report.compare import cluster_order, compare_tasks, spearman_matrix
from layerif.report.load import RunView, unique_names
from layerif.report.reading import describe_tasks


def _view(name: str, values) -> RunView:
    values = np.asarray(values, dtype=np.float64)
    frame = pd.DataFrame({"layer": np.arange(len(values)), "S_pos": values, "S_top25": values, "S_all": values,
                          "n_pos": 5, "n_train": 5, "n_params": 10})
    return RunView(name=name, path=Path(name), frame=frame, record={}, scores=None)


def test_spearman_matrix_equals_scipy():
    rows = np.random.default_rng(0).normal(size=(4, 12))
    np.testing.assert_allclose(spearman_matrix(rows), spearmanr(rows, axis=1).statistic, atol=1e-12)


def test_similar_runs_cluster_together_and_other_depths_are_left_out():
    rising = np.arange(10.0)
    views = [_view("rise", rising), _view("fall", rising[::-1]), _view("rise2", rising + np.r_[0, 0, 3, 0, 0, 0, 0, 0, 0, 0]),
             _view("fall2", rising[::-1] ** 1.5), _view("short", np.arange(6.0))]
    comparison = compare_tasks(views, "S_pos")
    assert comparison.names == ["rise", "fall", "rise2", "fall2"] and comparison.excluded == ["short"]
    order = [comparison.names[i] for i in comparison.order]
    position = {name: order.index(name) for name in order}
    assert abs(position["rise"] - position["rise2"]) == 1 and abs(position["fall"] - position["fall2"]) == 1
    np.testing.assert_allclose(comparison.profiles.min(axis=1), 0) and np.testing.assert_allclose(
        comparison.profiles.max(axis=1), 1)
    text = " ".join(describe_tasks(comparison))
    assert "fall and fall2 (Spearman ρ = 1.00)" in text
    assert "Left out of the comparison (another number of blocks): short." in text
    assert "rise at block 9" in text and "fall at block 0" in text


def test_cluster_order_is_a_permutation():
    rho = spearman_matrix(np.random.default_rng(1).normal(size=(5, 8)))
    assert sorted(cluster_order(rho)) == list(range(5))
    assert cluster_order(rho[:2, :2]) == [0, 1]


def test_single_depth_run_gives_no_comparison():
    assert compare_tasks([_view("a", [1.0, 2.0, 3.0]), _view("b", [1.0, 2.0])], "S_pos") is None


def test_unique_names(tmp_path):
    (tmp_path / "x" / "run").mkdir(parents=True)
    (tmp_path / "y" / "run").mkdir(parents=True)
    assert unique_names([tmp_path / "x" / "run", tmp_path / "y" / "run"]) == ["x/run", "y/run"]
    assert unique_names([tmp_path / "x", tmp_path / "x"]) == [f"{tmp_path.name}/x", f"{tmp_path.name}/x (2)"]

"""`layerif stability`: disjoint seeded splits, rank agreement of profiles, Spearman-Brown, outputs, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from layerif.errors import LayerIFError
from layerif.stability import disjoint_splits, profile_agreement, rows_for_reliability, spearman_brown
from tests.helpers import instruction_rows, run_cli, save_tiny_model, write_jsonl


def test_spearman_brown_and_the_recommended_rows():
    assert spearman_brown(0.5, 2) == pytest.approx(2 / 3)
    assert spearman_brown(0.3, 1) == pytest.approx(0.3)
    for r, n in ((0.5, 100), (0.2, 150), (0.85, 40), (0.95, 60)):
        needed = rows_for_reliability(r, n)
        assert spearman_brown(r, needed / n) >= 0.9 - 1e-12
        assert spearman_brown(r, (needed - 1) / n) < 0.9
    assert rows_for_reliability(0.5, 100) == 900
    assert rows_for_reliability(0.0, 100) is None and rows_for_reliability(-0.3, 100) is None
    assert rows_for_reliability(float("nan"), 100) is None and rows_for_reliability(1.0, 100) == 100


def test_splits_are_disjoint_seeded_and_checked():
    splits = disjoint_splits(25, 3, 8, seed=1, what="training rows")
    assert [len(split) for split in splits] == [8, 8, 8]
    assert len(set().union(*splits)) == 24 and max(max(split) for split in splits) < 25
    assert splits == disjoint_splits(25, 3, 8, seed=1, what="training rows")
    assert splits != disjoint_splits(25, 3, 8, seed=2, what="training rows")
    with pytest.raises(LayerIFError, match="3 splits of 9 training rows need 27 rows; the data has only 25"):
        disjoint_splits(25, 3, 9, seed=1, what="training rows")


def test_profile_agreement_matches_scipy():
    rng = np.random.default_rng(0)
    profiles = rng.normal(size=(3, 10))
    profiles[1] = profiles[0] + 0.1 * rng.normal(size=10)
    pairs, summary = profile_agreement(profiles)
    assert [(p["split_a"], p["split_b"]) for p in pairs] == [(0, 1), (0, 2), (1, 2)]
    for pair in pairs:
        a, b = profiles[pair["split_a"]], profiles[pair["split_b"]]
        assert pair["spearman"] == pytest.approx(spearmanr(a, b).statistic)
        assert pair["kendall"] == pytest.approx(kendalltau(a, b).statistic)
    r = np.mean([p["spearman"] for p in pairs])
    assert summary["mean_spearman"] == pytest.approx(r)
    assert summary["split_half_reliability"] == pytest.approx(2 * r / (1 + r))
    same, _ = profile_agreement(np.stack([np.arange(5.0), np.arange(5.0) * 3]))
    flipped, _ = profile_agreement(np.stack([np.arange(5.0), -np.arange(5.0)]))
    assert same[0]["spearman"] == pytest.approx(1) and flipped[0]["kendall"] == pytest.approx(-1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stability")
    save_tiny_model(root / "model", layers=4)
    write_jsonl(root / "train.jsonl", instruction_rows(20, seed=3))
    write_jsonl(root / "val.jsonl", instruction_rows(7, seed=4))
    return root


def stability_args(root, out, *extra):
    return ["stability", "--model", str(root / "model"), "--train", str(root / "train.jsonl"), "--val",
            str(root / "val.jsonl"), "--splits", "3", "--n-train", "6", "--n-val", "2", "--out", str(out),
            "--quiet", *extra]


def test_stability_end_to_end(data, capsys):
    import pandas as pd

    out = data / "stab"
    assert run_cli(*stability_args(data, out, "--estimator", "exact")) == 0
    printed = capsys.readouterr().out
    assert "S_pos: profiles of 3 disjoint splits of 6 training rows agree at rho = " in printed
    assert ("recommended" in printed) or ("no agreement" in printed)
    record = json.loads((out / "stability.json").read_text())
    assert record["config"]["estimator"] == "exact" and record["n_train_per_split"] == 6
    train_rows = record["rows"]["train"]
    assert [len(rows) for rows in train_rows] == [6, 6, 6] and len(set().union(*train_rows)) == 18
    assert len(set().union(*record["rows"]["val"])) == 6
    # the reported agreement is that of the profiles saved for each split
    profiles = np.stack([pd.read_csv(out / f"split_{k}" / "layer_scores.csv")["S_pos"].to_numpy() for k in range(3)])
    entry = record["aggregations"]["S_pos"]
    np.testing.assert_allclose(profiles, np.array(entry["profiles"]), rtol=1e-6)
    expected = np.mean([spearmanr(profiles[a], profiles[b]).statistic for a, b in ((0, 1), (0, 2), (1, 2))])
    assert entry["mean_spearman"] == pytest.approx(expected)
    assert entry["recommended_n_train"] == rows_for_reliability(expected, 6)
    table = pd.read_csv(out / "stability.csv")
    assert len(table) == 9 and set(table["aggregation"]) == {"S_pos", "S_top25", "S_all"}
    assert record["timings_s"]["split_2_s"] > 0


@pytest.mark.parametrize("change, message", [
    (("--n-train", "7"), "3 splits of 7 training rows need 21 rows; the data has only 20"),
    (("--n-val", "3"), "3 splits of 3 validation rows need 9 rows; the data has only 7"),
    (("--splits", "1"), "--splits must be at least 2"),
    (("--estimator", "nosuch"), "unknown estimator 'nosuch'"),
])
def test_bad_input_exits_2_before_loading_the_model(data, capsys, monkeypatch, change, message):
    import layerif.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(layerif.models, "load_model", no_model)
    out = data / "bad"
    args = stability_args(data, out)
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_existing_output_is_refused(data, capsys):
    out = data / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli(*stability_args(data, out)) == 2
    assert "already holds other files" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

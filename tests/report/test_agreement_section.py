"""The report's estimator-agreement table, for a run scored with several estimators."""

from __future__ import annotations

import json

from tests.helpers import run_cli


def test_a_run_with_several_estimators_shows_their_agreement(runs):
    root, scored, _ = runs
    several = root / "several"
    assert run_cli("score", "--model", str(root / "model"), "--train", str(root / "train.jsonl"), "--val",
                   str(root / "val.jsonl"), "--n-train", "12", "--n-val", "4", "--out", str(several), "--quiet",
                   "--estimator", "datainf,identity") == 0
    pair = json.loads((several / "run.json").read_text())["agreement"]["pairs"][0]
    assert run_cli("report", str(several), str(scored), "--out", str(root / "several.html")) == 0
    html = (root / "several.html").read_text()
    assert html.count("Estimator agreement") == 1  # the single-estimator run has no such table
    row = html[html.index("data-pair='datainf,identity'"):]
    row = row[:row.index("</tr>")]
    assert row.count("<td data-value=") == 3 and f"data-value='{pair['S_all']!r}'" in row

"""`layerif report`: every section present, numbers equal to the CSVs and the library, no external URL."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from layerif.allocate.experts import allocate_experts
from layerif.allocate.sparsity import allocate_from_scores
from layerif.report.reading import block_ranges
from layerif.scores import LayerScores
from tests.helpers import run_cli
from tests.report.conftest import N_LAYERS

RUN_SECTIONS = ("reading", "profile", "modules", "npos", "experts", "sparsity", "table", "details")
TASK_SECTIONS = ("tasks", "tasks-reading", "tasks-profiles", "tasks-similarity")


class Page(HTMLParser):
    """Collects element ids, tables (rows of data-value cells) and the text of each element id."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.tables: list[dict] = []  # {"attrs": ..., "rows": [[(data-value, text), ...]]}
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self._cell: list | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("src", "href", "xlink:href", "action", "data"):
            if key in attrs:
                self.urls.append(attrs[key])
        if tag == "table":
            self.tables.append({"attrs": attrs, "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
            self.tables[-1]["rows"][-1].append(attrs.get("data-method"))
        elif tag in ("td", "th") and self.tables:
            self._cell = [attrs.get("data-value"), ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append(tuple(self._cell))
            self._cell = None


def _tables(page, css_class):
    return [t for t in page.tables if t["attrs"].get("class") == css_class]


def _row(table, method):
    for row in table["rows"]:
        if row[0] == method:
            return [float(cell[0]) for cell in row[2:-1]]  # skip the name cell and the total / range cell
    raise AssertionError(f"no row {method}")


@pytest.fixture(scope="module")
def report(runs):
    root, scored, synthetic = runs
    out = root / "report.html"
    assert run_cli("report", str(scored), str(synthetic), "--out", str(out)) == 0
    text = out.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return text, page


def test_every_section_is_present(report):
    text, page = report
    for index in range(2):
        for section in RUN_SECTIONS:
            assert f"run{index}-{section}" in page.ids, section
    for section in TASK_SECTIONS:
        assert section in page.ids
    assert text.count("<svg") == 2 * 5 + 2  # per run: profile, modules, n_pos, experts, sparsity; plus two across runs
    assert "<details" in text and "<summary>" in text


def test_no_external_resources(report):
    text, page = report
    assert page.urls and all(url.startswith(("#", "data:image/png;base64,")) for url in page.urls), page.urls
    assert not re.search(r"https?://", text)
    assert "script" not in page.tags and "link" not in page.tags and "img" not in page.tags
    assert "@import" not in text and re.findall(r"url\((?!#)", text) == []  # only in-page references


def test_text_is_escaped(report):
    text, _ = report
    assert "synthetic &lt;model&gt; &amp; co" in text and "<model>" not in text


def test_layer_tables_equal_the_csvs(report, runs):
    _, page = report
    _, scored, synthetic = runs
    tables = _tables(page, "csv")
    assert len(tables) == 2
    for table, run in zip(tables, (scored, synthetic)):
        frame = pd.read_csv(run / "layer_scores.csv")
        header = [cell[1] for cell in table["rows"][0][1:]]
        assert header == list(frame.columns)
        body = np.array([[float(cell[0]) for cell in row[1:]] for row in table["rows"][1:]])
        np.testing.assert_array_equal(body, frame.to_numpy(dtype=np.float64))
    assert "S_pos_lo" in header and "p_above_median" in header  # the synthetic run's bootstrap columns


def test_allocations_equal_the_library(report, runs):
    _, page = report
    _, scored, synthetic = runs
    experts, sparsity = _tables(page, "allocation")[0::2], _tables(page, "allocation")[1::2]
    for index, run in enumerate((scored, synthetic)):
        values = pd.read_csv(run / "layer_scores.csv")["S_pos"].to_numpy()
        expected = allocate_experts("layerif", n_layers=N_LAYERS, budget=5 * N_LAYERS, scores=values, beta=2.5)
        assert _row(experts[index], "layerif") == expected.counts
        assert sum(_row(experts[index], "uniform")) == 5 * N_LAYERS
        plan = allocate_from_scores(LayerScores.load(run), 0.5, 0.3, "S_pos", True)
        np.testing.assert_allclose(_row(sparsity[index], "layerif"), plan.block_ratios, rtol=0, atol=1e-15)
        reverse = allocate_from_scores(LayerScores.load(run), 0.5, 0.3, "S_pos", True, reverse=True)
        np.testing.assert_allclose(_row(sparsity[index], "reversed"), reverse.block_ratios, rtol=0, atol=1e-15)
        for method in ("mola-2468", "mola-8642", "mola-5555"):
            assert sum(_row(experts[index], method)) == 5 * N_LAYERS
    for table in experts:
        assert "alphalora" not in [row[0] for row in table["rows"]]  # needs --model


def test_similarity_is_spearman_of_the_profiles(report, runs):
    _, page = report
    _, scored, synthetic = runs
    rho = spearmanr(pd.read_csv(scored / "layer_scores.csv")["S_pos"],
                    pd.read_csv(synthetic / "layer_scores.csv")["S_pos"]).statistic
    table = _tables(page, "similarity")[0]
    matrix = np.array([[float(cell[0]) for cell in row[2:]] for row in table["rows"][1:]])
    np.testing.assert_allclose(matrix, [[1.0, rho], [rho, 1.0]], atol=1e-12)


def test_reading_is_computed_from_the_numbers(report, runs):
    text, _ = report
    _, scored, synthetic = runs
    frame = pd.read_csv(synthetic / "layer_scores.csv")
    top = int(frame["S_pos"].idxmax())
    below = [i for i in range(N_LAYERS) if i != top and frame["S_pos_hi"][i] < frame["S_pos_lo"][top]]
    assert below  # the synthetic profile rises steeply, so the top interval clears the others
    assert f"The bootstrap intervals of block {top} lie above those of blocks {block_ranges(below)}" in text
    scored_values = pd.read_csv(scored / "layer_scores.csv")["S_pos"]
    assert f"spans a factor of {scored_values.max() / scored_values.min():.3g}" in text
    assert "This run has no bootstrap intervals" in text  # the CLI run has none
    assert text.count("95 % bootstrap interval") >= 1  # band legend of the synthetic run


def test_block_ranges():
    assert block_ranges([5, 0, 1, 2, 7, 8]) == "0–2, 5, 7–8"
    assert block_ranges([3]) == "3"


def test_model_adds_alpha_baselines(runs):
    root, scored, _ = runs
    out = root / "with_model.html"
    assert run_cli("report", str(scored), "--out", str(out), "--model", str(root / "model"), "--budget", "9") == 0
    page = Page()
    page.feed(out.read_text(encoding="utf-8"))
    experts, sparsity = _tables(page, "allocation")
    assert sum(_row(experts, "alphalora")) == 9 and sum(_row(experts, "layerif")) == 9
    assert len(_row(sparsity, "alphapruning")) == N_LAYERS
    assert "tasks" not in page.ids  # one run: no cross-run section


@pytest.mark.parametrize("case", ["missing", "not_a_run", "foreign_out", "small_budget", "bad_score"])
def test_bad_input_exits_2_without_output(runs, capsys, case):
    root, scored, _ = runs
    out = root / f"bad_{case}.html"
    args = {"missing": [str(root / "nowhere")], "not_a_run": [str(root / "model")],
            "foreign_out": [str(scored)], "small_budget": [str(scored), "--budget", "2"],
            "bad_score": [str(scored), "--score", "S_max"]}[case]
    if case == "foreign_out":
        out = root / "train.jsonl"
    before = out.read_bytes() if out.exists() else None
    capsys.readouterr()
    assert run_cli("report", *args, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert (out.read_bytes() if out.exists() else None) == before
    assert not list(root.glob(f".{out.name}.*"))


def _browser() -> str | None:
    return next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)


@pytest.mark.skipif(_browser() is None, reason="no chromium or chromium-browser on PATH")
def test_headless_browser_renders_without_errors(report, runs, tmp_path):
    from PIL import Image

    root, _, _ = runs
    shot = tmp_path / "shot.png"
    command = [_browser(), "--headless", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1600",
               "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}",
               f"--screenshot={shot}", (root / "report.html").as_uri()]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # the sandbox refuses to run as root (containers, CI)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Failed to load" in line]
    assert console == []
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text and figures, not a blank page

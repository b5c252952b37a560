"""The prepared GPU check at its smoke size on CPU: every stage runs and the figures follow from its timings."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=180,
                          env=env, cwd=REPO)


def smoke_sizes() -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return module.SMOKE


def test_smoke_writes_figures_computed_from_its_own_timings(tmp_path):
    out = tmp_path / "gpu.md"
    done = run_script("--smoke", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    page = out.read_text()
    sizes = smoke_sizes()
    assert report["smoke"] and report["sizes"] == sizes
    a, b, c = report["a_layerif"], report["b_released"], report["c_plain"]
    assert a["blocks_scored"] == sizes["layers"] and a["rows"] == [sizes["n_train"], sizes["n_val"]]
    assert c["rows"] == sizes["n_train"] + sizes["n_val"] and a["passes"] >= 1 and a["finite"]
    for seconds in (a["seconds"], c["seconds"], b["gradients_s"], b["datainf_s"]):
        assert math.isfinite(seconds) and seconds > 0
    ratio = report["ratios"]["a_over_c"]
    assert ratio == pytest.approx(a["seconds"] / c["seconds"], rel=1e-12)
    # (b) is measured on the whole smoke data: no scaling, and one block times the number of blocks
    assert b["measured_on"] == [sizes["n_train"], sizes["n_val"]] and b["gradient_scale"] == b["loop_scale"] == 1.0
    assert b["per_block_s"] == pytest.approx(b["gradients_s"] + b["datainf_s"])
    assert b["all_blocks_s"] == pytest.approx(b["per_block_s"] * sizes["layers"])
    assert report["ratios"]["b_over_a"] == pytest.approx(b["all_blocks_s"] / a["seconds"])
    # both methods score the same block from bf16 gradients: they agree to a few bf16 roundings (2^-8)
    assert b["max_rel_diff_vs_layerif"] < 2e-2
    goals = {goal["name"]: goal for goal in report["goals"]}
    assert goals["(a)/(c)"]["value"] == ratio and goals["(a)/(c)"]["met"] == (ratio <= 1.8)
    assert goals["(a)"]["value"] == a["seconds"] and goals["(a)"]["met"] == (a["seconds"] <= 120)
    assert report["goals_met"] == (goals["(a)/(c)"]["met"] and goals["(a)"]["met"])
    assert "SMOKE" in page and f"(a)/(c) = **{ratio:.2f}**" in page
    assert ("PASS" if goals["(a)/(c)"]["met"] else "FAIL") in page.split("(a)/(c) = ")[1].splitlines()[0]
    assert f"wrote {out}" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the full check")
def test_without_a_gpu_the_full_check_stops_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.md"
    done = run_script("--out", str(out))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: no GPU found: this check needs one "
                                                "(python bench/gpu_check.py --smoke checks the script)"]
    assert list(tmp_path.iterdir()) == []

"""bench/moe_speed.py --smoke times both heads on one batch and names the profiler's largest costs."""

from __future__ import annotations

import importlib.util
import re

from tests.conftest import REPO
from tests.helpers import instruction_rows, save_tiny_model, write_jsonl


def load_bench():
    spec = importlib.util.spec_from_file_location("moe_speed", REPO / "bench" / "moe_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_writes_both_step_times_and_the_profile(tmp_path):
    bench = load_bench()
    model = save_tiny_model(tmp_path / "model", layers=2)
    (tmp_path / "task").mkdir()
    write_jsonl(tmp_path / "task" / "train.jsonl", instruction_rows(4))
    assert bench.main(["--smoke", "--model", str(model), "--task", str(tmp_path / "task"), "--threads", "1",
                       "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "moe_speed.md").read_text()
    medians = {name: float(value) for name, value in
               re.findall(r"\| (everywhere|answer positions) \S* \| ([0-9.]+) \|", page)}
    assert set(medians) == {"everywhere", "answer positions"} and all(v > 0 for v in medians.values())
    assert "batch of 2 rows" in page and "Speed-up ×" in page
    profile = page.split("| op | self CPU (ms) | share | calls |")[1].strip().splitlines()[1:]
    assert len(profile) >= 3 and any("aten::" in line for line in profile)

"""The MoE study reuses its validation curve's run as the uniform MoE's seed-0 run only when that is exact."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from types import SimpleNamespace

from tests.conftest import REPO, TinyTokenizer, tiny_llama


def load_bench():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("moe_standard", REPO / "bench" / "moe_standard.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("moe_standard", module)
    spec.loader.exec_module(module)
    return module


def write_task(folder, n_rows: int = 12) -> None:
    rng = random.Random(0)
    words = "cat dog sun tree rock fish bird".split()
    for split in ("train", "validation", "test"):
        lines = []
        for _ in range(n_rows):
            answer = rng.choice(["yes", "no"])
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
            lines.append(json.dumps({"instruction": f"Is it true?\nSentence: {text}\n", "input": "",
                                     "output": f"Answer: {answer}.", "answer": answer}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def test_curve_run_is_the_uniform_seed0_run(tmp_path, monkeypatch):
    bench = load_bench()
    from study import Units

    (tmp_path / "data" / "toy").mkdir(parents=True)
    write_task(tmp_path / "data" / "toy")
    monkeypatch.setattr(bench, "DATA", tmp_path / "data")
    monkeypatch.setattr(bench, "MAX_STEPS", 4)
    monkeypatch.setattr(bench, "EVAL_EVERY", 2)
    monkeypatch.setattr(bench, "BATCH", 2)
    monkeypatch.setattr(bench, "BUDGET", 8)
    monkeypatch.setattr(bench, "N_VAL", 6)
    study = bench.MoEStudy(Units(tmp_path / "units"))
    study._loaded = SimpleNamespace(model=tiny_llama(layers=2, seed=1), tokenizer=TinyTokenizer())

    curve = study.curve("toy")
    assert [p["step"] for p in curve["points"]] == [2, 4]
    final = curve["final_run"]
    # a run trained on its own with the same seed and steps gives the same test predictions and loss
    model, _, log = study.train("toy", "uniform", 0, 4)
    model.eval()
    assert study.accuracy_rows(model, study.rows("toy", "test")) == final["correct"]
    assert log["final_loss"] == final["final_loss"]
    # another number of steps or another seed is trained, not reused
    assert "from_curve" not in study.run_unit("toy", "uniform", 0, 2)
    assert "from_curve" not in study.run_unit("toy", "uniform", 1, 4)
    study.units.path("run-toy-uniform-s0").unlink()
    reused = study.run_unit("toy", "uniform", 0, 4)
    assert reused["from_curve"] and reused["correct"] == final["correct"]

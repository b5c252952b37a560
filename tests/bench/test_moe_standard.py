"""The MoE study preset is sizes over `layerif compare moe`: the screen decides which tasks run, stages share units."""

from __future__ import annotations

import importlib.util
import sys

from tests.compare.test_compare_moe import task_rows
from tests.conftest import REPO
from tests.helpers import save_tiny_model, write_jsonl


def load_bench():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("moe_standard", REPO / "bench" / "moe_standard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_task(folder, constant_validation: bool = False) -> None:
    folder.mkdir(parents=True)
    for split, n, seed in (("train", 40, 1), ("validation", 12, 2), ("test", 12, 3)):
        rows = task_rows(n, seed)
        if constant_validation and split == "validation":
            rows = [{**row, "output": "answer red", "answer": "red"} for row in rows]
        write_jsonl(folder / f"{split}.jsonl", rows)


def test_a_task_no_model_can_beat_the_constant_label_is_left_out(tmp_path):
    bench = load_bench()
    model = save_tiny_model(tmp_path / "model", layers=3)
    write_task(tmp_path / "data" / "prior", constant_validation=True)  # always "red": 100 % for the constant
    study = bench.Study(smoke=True, model=str(model), work=tmp_path / "work", data=tmp_path / "data",
                        tasks=("prior",))
    study.run()
    screen = study.screens["prior"].curve["screen"]
    assert screen["constant_accuracy"] == 1.0 and not screen["kept"]
    assert study.kept() == [] and not (tmp_path / "work" / "prior-core").exists()
    page = (tmp_path / "work" / "moe_standard.md").read_text()
    assert "**left out**" in page and "No task passed the screen" in page


def test_kept_task_runs_the_core_first_and_the_later_stage_reuses_its_units(tmp_path):
    bench = load_bench()
    model = save_tiny_model(tmp_path / "model", layers=3)
    write_task(tmp_path / "data" / "toy")
    study = bench.Study(smoke=True, model=str(model), work=tmp_path / "work", data=tmp_path / "data",
                        tasks=("toy",), keep_all=True)
    jobs, pages = [], []
    study.job = lambda *args, original=study.job, **kwargs: jobs.append(original(*args, **kwargs)) or jobs[-1]
    study.write = lambda original=study.write: (original(), pages.append(
        (tmp_path / "work" / "moe_standard.md").read_text()))
    study.run()
    screen_job, core, everything = jobs
    assert screen_job.store.computed == ["curve-e2"]
    # the core four at both smoke seeds, then every allocation at seed 0: only the new allocations train
    assert sorted(key for key in core.store.computed if key.startswith("run-")) == sorted(
        f"run-{name}-s{seed}" for name in ("layerif", "depth", "random", "uniform") for seed in (0, 1))
    assert sorted(everything.store.computed) == sorted(
        ["alphas"] + [f"run-{name}-s0" for name in ("mola-2468", "mola-8642", "alphalora", "layerif.S_top25",
                                                 "plain-lora")])
    assert core.steps == study.screens["toy"].curve["steps"]
    assert "**Partial tables**" in pages[1] and "**Partial tables**" not in pages[-1]
    assert "layerif vs depth" in pages[-1] and "Validation curve" in pages[-1]
    rows = (tmp_path / "work" / "moe_standard.csv").read_text().splitlines()
    assert rows[0].startswith("task,allocation,seed") and len(rows) == 1 + 9
    assert (tmp_path / "work" / "moe_standard.png").is_file()
    # a fresh study object finds the published screen and comparison without running anything
    again = bench.Study(smoke=True, model=str(model), work=tmp_path / "work", data=tmp_path / "data",
                        tasks=("toy",), keep_all=True)
    again.load_finished()
    assert again.latest["toy"].complete and len(again.latest["toy"].arms) == 9


def test_first_kept_task_is_decided_before_the_next_screen(tmp_path):
    bench = load_bench()
    kept = {"hard": False, "first": True, "second": True}
    study = bench.Study(smoke=True, model="unused", work=tmp_path / "work", data=tmp_path / "data",
                        tasks=tuple(kept))
    order: list[str] = []

    class Job:  # records the order of the stages; a screen keeps the tasks marked kept
        def __init__(self, task, folder, **arguments):
            self.task, self.folder = task, folder

        def run(self):
            order.append(self.folder)
            screen = {"kept": kept[self.task]}
            return type("Result", (), {"curve": {"screen": screen, "steps": 3}})()

    study.job = Job
    study.write = lambda: None
    study.update = lambda task, result: None
    study.stages = (("core", "layerif", 3), ("all-s1", "layerif,plain-lora", 1), ("all", "layerif,plain-lora", 3))
    study.run()
    assert order == ["screen-hard", "screen-first", "first-core", "first-all-s1", "screen-second",
                     "second-core", "second-all-s1", "first-all", "second-all"]

"""`layerif compare moe` end to end on a tiny local model: API, resume after SIGKILL, bad input, the screen."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from layerif.errors import LayerIFError
from tests.conftest import tiny_texts
from tests.helpers import kill_after_units, save_tiny_model, write_jsonl

REPO = Path(__file__).resolve().parents[2]
ALLOCATIONS = "layerif,depth,random,uniform,plain-lora,mola-2468,alphalora"


def task_rows(n: int, seed: int) -> list[dict]:
    """A two-label task the tiny tokenizer reads word by word: is the first word a colour?"""
    rows = []
    for text in tiny_texts(n, seed=seed):
        label = "red" if text.split()[0] in ("red", "green", "blue", "cat", "dog", "bird", "fish", "tree") else "blue"
        rows.append({"instruction": f"what is {text}", "input": "", "output": f"answer {label}", "answer": label})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-moe")
    save_tiny_model(root / "model", layers=4)
    (root / "task").mkdir()
    for split, n, seed in (("train", 40, 1), ("validation", 12, 2), ("test", 12, 3)):
        write_jsonl(root / "task" / f"{split}.jsonl", task_rows(n, seed))
    return root


def sizes(root: Path) -> dict:
    """Job arguments of a tiny comparison (seconds, not hours)."""
    return dict(model=str(root / "model"), task=str(root / "task"), seeds=2, steps=3, batch_size=4, n_train=16,
                n_test=12, score_train=6, score_val=3, resamples=300, eval_batch_size=8, quiet=True)


def stable(data: dict) -> dict:
    """compare.json without what legitimately differs between two runs of the same grid (timings, machine)."""
    timing = ("seconds", "train_s", "eval_s")
    runs = [{k: v for k, v in run.items() if k not in timing} for run in data["runs"]]
    setting = {k: v for k, v in data["setting"].items() if k != "machine"}
    base = {k: v for k, v in (data["base"] or {}).items() if k not in timing}
    return {"setting": setting, "runs": runs, "verdicts": data["verdicts"], "allocations": data["allocations"],
            "base": base, "constant_label": data["constant_label"]}


@pytest.fixture(scope="module")
def finished(setup):
    from layerif.compare import CompareMoEJob

    seen = []
    job = CompareMoEJob(out=str(setup / "api"), allocations=ALLOCATIONS, on_unit=seen.append, **sizes(setup))
    result = job.run()
    return setup / "api", job, result, seen


def test_every_output_and_a_verdict_per_pair(finished):
    out, job, result, seen = finished
    data = json.loads((out / "compare.json").read_text())
    assert data["complete"] and data["format"] == "layerif.compare-moe/1"
    assert [arm["allocation"] for arm in data["allocations"]] == ALLOCATIONS.split(",")
    assert len(data["runs"]) == 2 * 7 and {r["seed"] for r in data["runs"]} == {0, 1}
    assert len(data["verdicts"]) == 7 * 6 // 2  # every pair once
    for verdict in data["verdicts"]:
        assert {"allocation", "baseline", "difference_points", "lo", "hi", "p", "reading"} <= set(verdict)
        assert "points" in verdict["measure"] and verdict["paired_seeds"]
        assert verdict["lo"] <= verdict["difference_points"] <= verdict["hi"] and 0 <= verdict["p"] <= 1
        expected = "better" if verdict["lo"] > 0 else "worse" if verdict["hi"] < 0 else "not distinguishable"
        assert verdict["reading"] == expected
        mine = [r["accuracy"] for r in data["runs"] if r["allocation"] == verdict["allocation"]]
        theirs = [r["accuracy"] for r in data["runs"] if r["allocation"] == verdict["baseline"]]
        assert verdict["difference_points"] == pytest.approx(100 * (np.mean(mine) - np.mean(theirs)))
    budget = data["setting"]["budget"]
    assert budget == 20 and data["setting"]["n_layers"] == 4
    counts = {(r["allocation"], r["seed"]): r["counts"] for r in data["runs"]}
    for (allocation, _seed), value in counts.items():
        assert sum(value) == (4 if allocation == "plain-lora" else budget), allocation
    # random: the LayerIF counts placed by the training seed
    assert sorted(counts[("random", 0)]) == sorted(counts[("layerif", 0)])
    assert counts[("layerif", 0)] == counts[("layerif", 1)]
    # depth ramps over the LayerIF scores' range: same spread, placement by depth (counts rise with the layer)
    assert next(arm for arm in data["allocations"] if arm["allocation"] == "depth")["score"] == "S_pos"
    assert counts[("depth", 0)] == sorted(counts[("depth", 0)]) and counts[("depth", 0)] != counts[("uniform", 0)]
    # the plain LoRA has about the uniform MoE's trainable parameters
    params = {r["allocation"]: r["trainable_parameters"] for r in data["runs"]}
    assert params["plain-lora"] == pytest.approx(params["uniform"], rel=0.35)
    assert data["constant_label"]["label"] in ("red", "blue") and data["base"]["accuracy"] >= 0
    for arm in data["allocations"]:
        assert {"kept", "label", "lo", "hi"} <= set(arm["vs_constant"])
    rows = (out / "row_correct.csv").read_text().splitlines()
    assert rows[0] == "allocation,seed,row,correct" and len(rows) == 1 + 14 * 12
    assert "allocation" in (out / "runs.csv").read_text().splitlines()[0]
    page = (out / "compare.md").read_text()
    assert "layerif vs depth" in page and "Always answering" in page and "two-level" in page
    assert not (out / ".checkpoint").exists()  # a finished comparison keeps no units
    # the partial results after each new unit, the last one complete
    assert len(seen) == len(job.schedule()) and not seen[0].complete and seen[-1].complete
    table = result.table()
    assert list(table["allocation"]) == ALLOCATIONS.split(",") and set(table["runs"]) == {2}


def test_resume_after_sigkill_gives_the_same_table(setup, finished, tmp_path):
    out = tmp_path / "killed"
    kill_after_units("CompareMoEJob", "tests.compare.test_compare_moe", out, setup, "compare-run",
                     "allocations=" + repr(ALLOCATIONS) + ", ")
    from layerif.compare import CompareMoEJob

    job = CompareMoEJob(out=str(out), allocations=ALLOCATIONS, **sizes(setup))
    job.run()
    assert len(job.store.computed) < len(job.schedule())  # the saved units were reused
    assert stable(json.loads((out / "compare.json").read_text())) == stable(
        json.loads((finished[0] / "compare.json").read_text()))


@pytest.mark.parametrize("change, message", [
    ({"allocations": "layerif,bogus"}, "unknown allocation 'bogus'"),
    ({"allocations": "layerif"}, "at least two allocations"),
    ({"allocations": "depth:S_top25,uniform"}, "only layerif, reversed, random take :score"),
    ({"task": "/no/such/task"}, "not a folder"),
    ({"seeds": 0}, "--seeds must be an integer >= 1"),
    ({"steps": 0}, "--steps must be an integer >= 1"),
    ({"n_test": 500}, "--n-test 500: test.jsonl has only 12 rows"),
    ({"lr": -1.0}, "--lr must be a finite number > 0"),
    ({"screen_only": True}, "--screen-only needs --curve-every"),
    ({"scores": "/no/such/scores"}, "not a `layerif score` run folder"),
])
def test_bad_input_is_refused_before_loading_the_model(setup, tmp_path, monkeypatch, change, message):
    import layerif.models
    from layerif.compare import CompareMoEJob

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(layerif.models, "load_model", no_loading)
    started = time.perf_counter()
    with pytest.raises(LayerIFError) as error:
        CompareMoEJob(out=str(tmp_path / "out"), **{**sizes(setup), **change}).run()
    assert time.perf_counter() - started < 2
    assert message in str(error.value) and len(str(error.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_task_without_answers_is_refused(setup, tmp_path):
    from layerif.compare import CompareMoEJob

    task = tmp_path / "task"
    task.mkdir()
    for split in ("train", "validation", "test"):
        rows = task_rows(6, seed=1)
        if split == "test":
            rows[2]["answer"] = ""
        write_jsonl(task / f"{split}.jsonl", rows)
    with pytest.raises(LayerIFError, match="1 test row"):
        CompareMoEJob(out=str(tmp_path / "out"), **{**sizes(setup), "task": str(task)}).validate()


def test_constant_label_screen():
    from layerif.compare import beats_constant_label
    from layerif.compare.moe import choose_steps

    rng = np.random.default_rng(0)
    answers = list(rng.choice(["yes", "no"], 200, p=[0.7, 0.3]))
    prior = [float(a == "yes") for a in answers]  # a model that learned the majority label and nothing else
    screen = beats_constant_label(prior, answers, resamples=500)
    assert not screen["kept"] and screen["label"] == "yes" and screen["difference_points"] == 0
    assert screen["constant_accuracy"] == pytest.approx(np.mean(prior))
    learned = np.array(prior)
    learned[np.flatnonzero(learned == 0)[:40]] = 1  # right on 40 of the minority rows as well
    kept = beats_constant_label(np.stack([learned, learned]), answers, resamples=500)
    assert kept["kept"] and kept["lo"] > 0 and kept["reading"] == "better"
    # the base model's prior in the other direction (always the minority) is worse than the constant
    assert beats_constant_label([1 - p for p in prior], answers, resamples=500)["reading"] == "worse"
    points = [{"step": 10, "correct": [0] * 50 + [1] * 50}, {"step": 20, "correct": [0] * 30 + [1] * 70},
              {"step": 30, "correct": [0] * 28 + [1] * 72}]
    assert choose_steps(points) == 20  # within one standard error of the best (72 %)


def test_screen_only_writes_the_validation_curve(setup, tmp_path):
    from layerif.compare import CompareMoEJob

    job = CompareMoEJob(out=str(tmp_path / "screen"), curve_every=2, n_val=12, screen_only=True,
                        allocations="uniform,depth", **{**sizes(setup), "steps": 4})
    result = job.run()
    assert job.store.computed == ["curve-e2"] and result.complete and result.runs == []
    curve = json.loads((tmp_path / "screen" / "compare.json").read_text())["curve"]
    assert [p["step"] for p in curve["points"]] == [2, 4] and curve["steps"] in (2, 4)
    assert curve["screen"]["kept"] == (curve["screen"]["lo"] > 0)
    assert "Validation curve" in (tmp_path / "screen" / "compare.md").read_text()


def test_cli_gives_the_api_table(setup, finished, tmp_path, capsys):
    from layerif.cli import main

    out = tmp_path / "cli"
    size = sizes(setup)
    argv = ["compare", "moe", "--model", size["model"], "--task", size["task"], "--out", str(out),
            "--allocations", ALLOCATIONS, "--seeds", "2", "--steps", "3", "--batch-size", "4", "--n-train", "16",
            "--n-test", "12", "--score-train", "6", "--score-val", "3", "--resamples", "300", "--quiet"]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert f"wrote compare.json, compare.md, runs.csv and row_correct.csv to {out}" in printed
    assert "layerif vs depth:" in printed
    api = json.loads((finished[0] / "compare.json").read_text())
    cli = json.loads((out / "compare.json").read_text())
    assert stable(cli)["runs"] == stable(api)["runs"]  # same seeds, same data: the same runs, row by row


def test_cli_bad_input_exits_2_with_one_line(setup, tmp_path, capsys):
    from layerif.cli import main

    size = sizes(setup)
    with pytest.raises(SystemExit) as done:
        main(["compare", "moe", "--model", size["model"], "--task", size["task"], "--out", str(tmp_path / "o"),
              "--allocations", "layerif,bogus"])
    assert done.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "unknown allocation 'bogus'" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "o").exists()

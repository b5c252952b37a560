"""`layerif compare prune` end to end on a tiny local model: CLI, API, resume after SIGKILL, bad input, report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from layerif.scores import LayerScores
from tests.conftest import tiny_texts
from tests.helpers import kill_after_units, run_cli, save_tiny_model

REPO = Path(__file__).resolve().parents[2]
NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    save_tiny_model(root / "model", layers=3)
    (root / "calib.txt").write_text("\n".join(tiny_texts(400, seed=4)))
    (root / "test.txt").write_text("\n".join(tiny_texts(400, seed=5)))
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 10, generator=generator) + torch.tensor([[0.0], [1.0], [2.0]])
    LayerScores(q=q, module_names=NAMES, q_modules=q.unsqueeze(1).repeat(1, 7, 1) / 7, n_params=[15360] * 3,
                n_val=4).save(root / "scores")
    return root


def sizes(root: Path) -> dict:
    """Job arguments of a tiny comparison (seconds, not hours)."""
    return dict(model=str(root / "model"), calib=str(root / "calib.txt"), test=str(root / "test.txt"),
                scores=(str(root / "scores"),), sparsity=0.5, calib_seeds=2, random_seeds=2, epsilon_grid="0.1,0.3",
                valid_windows=4, test_windows=8, window_length=16, calib_sequences=4, calib_length=16,
                block_windows=2, resamples=300, quiet=True)


def cli_args(root: Path, out: Path, allocations: str = "layerif,depth,random,uniform,owl,alphapruning") -> list[str]:
    job = sizes(root)
    return ["compare", "prune", "--model", job["model"], "--scores", job["scores"][0], "--calib", job["calib"],
            "--test", job["test"], "--sparsity", "0.5", "--allocations", allocations, "--calib-seeds", "2",
            "--random-seeds", "2", "--epsilon-grid", "0.1,0.3", "--valid-windows", "4", "--test-windows", "8",
            "--window-length", "16", "--calib-sequences", "4", "--calib-length", "16", "--block-windows", "2",
            "--resamples", "300", "--out", str(out), "--quiet"]


def stable(data: dict) -> dict:
    """compare.json without what legitimately differs between two runs of the same grid (timings, machine)."""
    runs = [{k: v for k, v in run.items() if k not in ("seconds", "mask_reused", "prune_s", "eval_s")} for run in data["runs"]]
    setting = {k: v for k, v in data["setting"].items() if k != "machine"}
    dense = {k: v for k, v in (data["dense"] or {}).items() if k != "seconds"}
    return {"setting": setting, "runs": runs, "verdicts": data["verdicts"], "allocations": data["allocations"],
            "dense": dense}


@pytest.fixture(scope="module")
def finished(setup):
    out = setup / "cli"
    assert run_cli(*cli_args(setup, out)) == 0
    return out


def test_cli_writes_every_output_and_a_verdict_per_pair(finished):
    data = json.loads((finished / "compare.json").read_text())
    assert data["complete"] and data["format"] == "layerif.compare/1"
    names = [arm["allocation"] for arm in data["allocations"]]
    assert names == ["layerif", "depth", "random", "uniform", "owl", "alphapruning"]
    # 2 calibration seeds for each allocation, 2 placements for random
    assert len(data["runs"]) == 12
    assert {(r["calib_seed"], r["place_seed"]) for r in data["runs"] if r["allocation"] == "random"} == {(0, 0), (1, 1)}
    assert len(data["verdicts"]) == 15  # every pair once
    for verdict in data["verdicts"]:
        assert {"allocation", "baseline", "ratio", "lo", "hi", "p", "reading"} <= set(verdict)
        assert verdict["lo"] <= verdict["ratio"] <= verdict["hi"] and 0 <= verdict["p"] <= 1
        expected = "better" if verdict["hi"] < 1 else "worse" if verdict["lo"] > 1 else "not distinguishable"
        assert verdict["reading"] == expected
        one = verdict["one_level"]
        assert one["lo"] <= one["ratio"] <= one["hi"]
    for arm in data["allocations"]:  # ε from the grid for the tuned ones, none for uniform/owl
        if arm["allocation"] in ("uniform", "owl"):
            assert arm["epsilon"] is None
        else:
            assert arm["epsilon"] in (0.1, 0.3)
    random_arm = next(arm for arm in data["allocations"] if arm["allocation"] == "random")
    assert random_arm["epsilon"] == data["allocations"][0]["epsilon"] and random_arm["epsilon_from"] == "layerif"
    for run in data["runs"]:
        assert run["measured_sparsity"] == pytest.approx(0.5, abs=0.02)
    windows = (finished / "window_nll.csv").read_text().splitlines()
    assert len(windows) == 1 + 12 * 8 + 8 + 4  # test windows of every run, dense test and validation
    assert "allocation" in (finished / "runs.csv").read_text().splitlines()[0]
    assert "layerif vs depth" in (finished / "compare.md").read_text()
    assert not (finished / ".checkpoint").exists()  # a finished comparison keeps no units


def test_api_gives_the_same_numbers_and_a_table(setup, finished):
    from layerif.compare import ComparePruneJob

    seen = []
    job = ComparePruneJob(out=str(setup / "api"), allocations="layerif,depth,random,uniform,owl,alphapruning",
                          on_unit=seen.append, **sizes(setup))
    result = job.run()
    assert stable(result.to_dict()) == stable(json.loads((finished / "compare.json").read_text()))
    assert len(seen) == len(job.schedule()) and not seen[0].complete and seen[-1].complete
    table = result.table()
    assert list(table["allocation"]) == [arm["allocation"] for arm in result.arms]
    assert table.loc[table["allocation"] == "depth", "runs"].item() == 2


def test_resume_after_sigkill_gives_the_same_table(setup, finished, tmp_path):
    out = tmp_path / "killed"
    kill_after_units("ComparePruneJob", "tests.compare.test_compare_prune", out, setup, "compare-test",
                     "allocations='layerif,depth,random,uniform,owl,alphapruning', ")
    assert run_cli(*cli_args(setup, out)) == 0
    assert stable(json.loads((out / "compare.json").read_text())) == stable(
        json.loads((finished / "compare.json").read_text()))


@pytest.mark.parametrize("change, message", [
    (["--allocations", "layerif,bogus"], "unknown allocation 'bogus'"),
    (["--test", "/no/such/test.txt"], "--test text not found"),
    (["--sparsity", "1.5"], "--sparsity must be inside (0, 1)"),
    (["--sparsity", "0"], "--sparsity must be inside (0, 1)"),
    (["--allocations", "layerif"], "at least two allocations"),
    (["--epsilon-grid", "0.2,x"], "comma-separated numbers"),
    (["--calib-seeds", "0"], "--calib-seeds must be an integer >= 1"),
])
def test_bad_input_exits_2_fast_before_loading_the_model(setup, tmp_path, capsys, monkeypatch, change, message):
    import layerif.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(layerif.models, "load_model", no_loading)
    args = cli_args(setup, tmp_path / "out")
    for flag, value in zip(change[::2], change[1::2], strict=True):
        args[args.index(flag) + 1] = value
    started = time.perf_counter()
    assert run_cli(*args) == 2
    assert time.perf_counter() - started < 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_text_and_scores_exit_2(setup, tmp_path, capsys):
    args = cli_args(setup, tmp_path / "out")
    at = args.index("--test")
    assert run_cli(*(args[:at] + args[at + 2 :])) == 2
    assert "--test is required" in capsys.readouterr().err
    at = args.index("--scores")
    assert run_cli(*(args[:at] + args[at + 2 :])) == 2
    assert "needs LayerIF scores" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_report_renders_the_comparison(finished, tmp_path):
    assert run_cli("report", str(finished), "--out", str(tmp_path / "report.html")) == 0
    page = (tmp_path / "report.html").read_text()
    assert "comparison" in page and "layerif vs depth" in page and "ε sweep" in page


def test_a_units_folder_is_shared_and_units_of_changed_scores_are_recomputed(setup, tmp_path):
    from layerif.compare import ComparePruneJob

    scores = tmp_path / "scores"
    LayerScores.load(setup / "scores").save(scores)
    args = {**sizes(setup), "scores": (str(scores),), "calib_seeds": 1, "random_seeds": 1}
    first = ComparePruneJob(out=str(tmp_path / "a"), allocations="layerif,depth", units=str(tmp_path / "units"),
                            **args)
    first.run()
    computed_first = set(first.store.computed)
    assert {"test-layerif-c0-r0", "test-depth-c0-r0", "dense"} <= computed_first
    # another comparison on the same units: depth and the dense model come back, only uniform is new
    second = ComparePruneJob(out=str(tmp_path / "b"), allocations="layerif,depth,uniform",
                             units=str(tmp_path / "units"), **args)
    second.run()
    assert second.store.computed == ["test-uniform-c0-r0"]
    # new scores in the same run folder: every unit that used them is stale, the others stay
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(3, 10, generator=generator)
    LayerScores(q=q, module_names=NAMES, q_modules=q.unsqueeze(1).repeat(1, 7, 1) / 7, n_params=[15360] * 3,
                n_val=4).save(scores)
    third = ComparePruneJob(out=str(tmp_path / "c"), allocations="layerif,depth", units=str(tmp_path / "units"),
                            **args)
    third.run()
    recomputed = {key for key in third.store.computed if not key.startswith("mask-")}
    assert recomputed == {"select-layerif-e0.1", "select-layerif-e0.3", "test-layerif-c0-r0"}
    assert "test-depth-c0-r0" not in third.store.computed


def test_a_grid_that_moves_the_chosen_epsilon_redoes_the_runs_pruned_at_the_old_one(setup, tmp_path):
    from layerif.compare import ComparePruneJob

    args = {**sizes(setup), "calib_seeds": 1, "random_seeds": 1}
    first = ComparePruneJob(out=str(tmp_path / "a"), allocations="layerif,uniform", units=str(tmp_path / "units"),
                            **args)
    chosen = first.run().arms[0]["epsilon"]
    other = 0.3 if chosen == 0.1 else 0.1
    # a grid holding only the ε that lost: the sweep now chooses it, so LayerIF's run at the old ε is stale
    second = ComparePruneJob(out=str(tmp_path / "b"), allocations="layerif,uniform", units=str(tmp_path / "units"),
                             **{**args, "epsilon_grid": f"{other:g}"})
    result = second.run()
    assert "test-layerif-c0-r0" in second.store.computed and "test-uniform-c0-r0" not in second.store.computed
    layerif_runs = [run for run in result.runs if run["allocation"] == "layerif"]
    assert [run["epsilon"] for run in layerif_runs] == [other]


def test_an_epsilon_chosen_at_an_end_of_the_grid_is_flagged_in_the_page():
    from layerif.compare.results import CompareResult, at_grid_edge, markdown

    grid = [0.2, 0.3, 0.4, 0.5]
    assert at_grid_edge(0.2, grid) and at_grid_edge(0.5, grid)
    assert not at_grid_edge(0.3, grid) and not at_grid_edge(None, grid)
    assert not at_grid_edge(0.3, [0.1, 0.3])  # two values: every choice is an end, nothing to say
    setting = {"method": "wanda", "sparsity": 0.7, "model": "m", "block_windows": 8, "epsilon_grid": grid}
    sweep = {f"{e:g}": 100 + 10 * e for e in grid}
    arms = [{"allocation": name, "epsilon": eps, "epsilon_from": name, "valid_ppl": sweep[f"{eps:g}"],
             "sweep": sweep, "epsilon_at_edge": at_grid_edge(eps, grid)}
            for name, eps in (("layerif", 0.3), ("depth", 0.2))]
    page = "\n".join(markdown(CompareResult(setting, arms, [], [])))
    assert "Grid edge" in page and "for depth:" in page and "layerif," not in page.split("Grid edge")[1]
    arms[1] = {**arms[1], "epsilon": 0.4, "epsilon_at_edge": False}
    assert "Grid edge" not in "\n".join(markdown(CompareResult(setting, arms, [], [])))
    unfinished = {**arms[1], "epsilon": 0.2, "sweep": {"0.2": 120.0}}  # a partial sweep decides nothing yet
    assert "Grid edge" not in "\n".join(markdown(CompareResult(setting, [arms[0], unfinished], [], [])))

"""`layerif compare prune --zeroshot`: zero-shot accuracy of each allocation's first run, on the right model."""

from __future__ import annotations

import json
import time

import pytest
import torch

import layerif.evaluate.zeroshot as zeroshot_module
from tests.compare.test_compare_prune import cli_args, setup, sizes  # noqa: F401 (setup is a fixture)
from tests.evaluate.test_zeroshot import mc_rows
from tests.helpers import run_cli, write_jsonl


@pytest.fixture(scope="module")
def tasks(setup):  # noqa: F811
    write_jsonl(setup / "mc.jsonl", mc_rows(10, seed=1))
    write_jsonl(setup / "mc3.jsonl", mc_rows(8, n_choices=3, seed=2))
    return f"{setup / 'mc.jsonl'},{setup / 'mc3.jsonl'}"


def weights_digest(model: torch.nn.Module) -> tuple[int, float]:
    """(zeros, a position-weighted sum) of every weight: equal only for the same pruned model."""
    zeros, total = 0, 0.0
    for parameter in model.parameters():
        flat = parameter.detach().double().reshape(-1)
        zeros += int((flat == 0).sum())
        total += float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum())
    return zeros, total


def test_zeroshot_scores_the_first_run_and_a_resumed_unit_prunes_the_same_model(setup, tasks, tmp_path,  # noqa: F811
                                                                                 monkeypatch):
    from layerif.compare import ComparePruneJob

    seen: list[tuple[int, float]] = []
    original = zeroshot_module.zeroshot_accuracy
    monkeypatch.setattr(zeroshot_module, "zeroshot_accuracy",
                        lambda model, *a, **k: (seen.append(weights_digest(model)), original(model, *a, **k))[1])
    args = {**sizes(setup), "allocations": "layerif,depth", "zeroshot": tasks, "zeroshot_limit": 6,
            "units": str(tmp_path / "units")}
    first = ComparePruneJob(out=str(tmp_path / "a"), **args)
    result = first.run()
    # each allocation's zero-shot unit runs right after its first test run, the dense one after the dense model
    order = [key for key, _, _ in first.schedule()]
    assert order.index("zeroshot-layerif") == order.index("test-layerif-c0-r0") + 1
    assert order[-2:] == ["dense", "zeroshot-dense"]
    section = result.zeroshot
    assert [row["allocation"] for row in section["rows"]] == ["layerif", "depth", "dense"]
    assert section["tasks"] == ["mc", "mc3"] and section["limit"] == 6
    for row in section["rows"]:
        assert {task: entry["n"] for task, entry in row["tasks"].items()} == {"mc": 6, "mc3": 6}
        assert row["mean_acc"] == pytest.approx((row["tasks"]["mc"]["acc"] + row["tasks"]["mc3"]["acc"]) / 2)
    layerif, depth, dense = seen
    assert layerif[0] > dense[0] and depth[0] > dense[0] and layerif != depth  # pruned models, not the dense one
    record = first.store.get("zeroshot-layerif")[0]
    assert record["pruned_again"] is False and record["epsilon"] == first.chosen_epsilon(first.arms[0])

    verdict = section["verdicts"][0]
    assert (verdict["allocation"], verdict["baseline"]) == ("layerif", "depth")
    assert verdict["lo"] <= verdict["difference"] <= verdict["hi"]
    expected = "better" if verdict["lo"] > 0 else "worse" if verdict["hi"] < 0 else "not distinguishable"
    assert verdict["reading"] == expected
    depth_row = section["rows"][1]
    assert verdict["difference"] == pytest.approx(section["rows"][0]["mean_acc"] - depth_row["mean_acc"])

    # a resumed run whose zero-shot unit is missing prunes that model again: the same weights, the same numbers
    first.store.drop("zeroshot-layerif")
    seen.clear()
    second = ComparePruneJob(out=str(tmp_path / "b"), **args)
    again = second.run()
    assert second.store.computed == ["zeroshot-layerif"] and seen == [layerif]
    assert second.store.get("zeroshot-layerif")[0]["pruned_again"] is True
    assert again.zeroshot["rows"] == [{**row, "seconds": new["seconds"]} for row, new in
                                      zip(section["rows"], again.zeroshot["rows"], strict=True)]

    # another row limit makes every zero-shot unit stale and leaves the perplexity units alone
    third = ComparePruneJob(out=str(tmp_path / "c"), **{**args, "zeroshot_limit": 5})
    third.run()
    assert sorted(third.store.computed) == ["zeroshot-dense", "zeroshot-depth", "zeroshot-layerif"]


def test_cli_writes_the_zeroshot_section_and_the_report_shows_it(setup, tasks, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    args = cli_args(setup, out, "layerif,uniform")
    args[args.index("--calib-seeds") + 1] = "1"
    assert run_cli(*args, "--zeroshot", tasks, "--zeroshot-limit", "4") == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["complete"] and [row["allocation"] for row in data["zeroshot"]["rows"]] == ["layerif", "uniform",
                                                                                           "dense"]
    page = (out / "compare.md").read_text()
    assert "Zero-shot accuracy" in page and "- layerif vs uniform: **" in page
    assert run_cli("report", str(out), "--out", str(tmp_path / "report.html")) == 0
    assert "Zero-shot accuracy (first run of each allocation)" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--zeroshot", "nosuchtask"], "pass --data-dir"),
    (["--zeroshot", "/no/such/task.jsonl"], "task file not found"),
    (["--zeroshot-limit", "5"], "need --zeroshot TASKS"),
    (["--zeroshot", "{tasks}", "--zeroshot-limit", "0"], "--zeroshot-limit must be an integer >= 1"),
])
def test_bad_zeroshot_input_exits_2_before_loading(setup, tasks, tmp_path, capsys, monkeypatch,  # noqa: F811
                                                    extra, message):
    import layerif.models

    monkeypatch.setattr(layerif.models, "load_model", lambda *a, **k: pytest.fail("loaded before checking"))
    started = time.perf_counter()
    assert run_cli(*cli_args(setup, tmp_path / "out"), *(part.format(tasks=tasks) for part in extra)) == 2
    assert time.perf_counter() - started < 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()

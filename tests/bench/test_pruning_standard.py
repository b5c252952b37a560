"""The pruning study preset is sizes over `layerif compare prune`: a tiny run writes the study's tables."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO
from tests.helpers import save_tiny_model

DATA = REPO.parent / "shared" / "data"


def load_bench():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("pruning_standard", REPO / "bench" / "pruning_standard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (DATA / "text" / "wikitext2" / "valid.txt").is_file() or not (DATA / "zeroshot").is_dir(),
                    reason="benchmark data not present")
def test_smoke_study_writes_partial_then_complete_tables(tmp_path):
    bench = load_bench()
    model = save_tiny_model(tmp_path / "model", layers=3)
    (tmp_path / "pruning_full.notes.md").write_text("**Machine: idle.**\n")  # where the pages' pointer leads
    study = bench.Study(smoke=True, model=str(model), work=tmp_path / "work")
    seen = []
    study.write = lambda original=study.write: (seen.append(dict(study.latest)), original())
    study.run([("wanda", 0.7)], variants=True)
    page = (tmp_path / "work" / "pruning_full.md").read_text()
    assert "**Partial tables**" in page  # the other two settings never ran
    assert "## wanda at 70%" in page and "layerif vs depth" in page
    rows = (tmp_path / "work" / "pruning_full.csv").read_text().splitlines()
    assert rows[0].startswith("comparison,") and len(rows) > 10
    assert (tmp_path / "work" / "pruning_full.png").is_file()
    # the comparison page points to the machine notes, once, under its title
    compare_page = (tmp_path / "work" / "wanda-70" / "compare.md").read_text().splitlines()
    assert compare_page[:3] == ["# layerif compare prune", "", bench.NOTES_POINTER]
    study.write()
    assert (tmp_path / "work" / "wanda-70" / "compare.md").read_text().count("Machine state when") == 1
    # the first tables were written after the first unit, from a partial comparison
    first = next(iter(seen[0].values()))
    assert not first.complete and len(first.runs) <= 1
    # a fresh study object finds the published comparisons without running anything
    again = bench.Study(smoke=True, model=str(model), work=tmp_path / "work")
    again.load_finished()
    assert "wanda-70" in again.latest and again.latest["wanda-70"].complete
    # a stopped study publishes nothing: the tables are rebuilt from its units, not written empty
    published = (tmp_path / "work" / "wanda-70" / "compare.json").read_text()
    (tmp_path / "work" / "wanda-70" / "compare.json").unlink()
    stopped = bench.Study(smoke=True, model=str(model), work=tmp_path / "work")
    stopped.load_finished()
    stopped.load_saved()
    assert stopped.latest["wanda-70"].to_dict()["runs"] == json.loads(published)["runs"]
    stopped.write()
    assert "## wanda at 70%" in (tmp_path / "work" / "pruning_full.md").read_text()


def test_study_page_keeps_the_hand_written_machine_notes(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from bench_tables import write_study

    (tmp_path / "study.notes.md").write_text("**Machine: idle for every unit.**\n")
    write_study(tmp_path, "study", {}, "python bench/pruning.py --standard", "now", 1.0, ["wanda-70"])
    page = (tmp_path / "study.md").read_text().splitlines()
    assert page[:3] == ["# Pruning study — study", "", "**Machine: idle for every unit.**"]
    (tmp_path / "study.notes.md").unlink()
    write_study(tmp_path, "study", {}, "python bench/pruning.py --standard", "now", 1.0, ["wanda-70"])
    assert "Machine: idle" not in (tmp_path / "study.md").read_text()


def test_study_page_ranks_each_score_profile_against_the_default_and_depth(tmp_path):
    import torch

    from layerif.scores import LayerScores

    bench = load_bench()
    names = ["self_attn.q_proj", "mlp.down_proj"]
    for folder, ramp in (("scores-tasks", torch.arange(6.0)), ("scores-tasks-identity", -torch.arange(6.0))):
        q = (ramp.unsqueeze(1) + 10.0).repeat(1, 8)  # every validation row: this block's ramp value
        LayerScores(q=q, module_names=names, q_modules=q.unsqueeze(1).repeat(1, 2, 1) / 2, n_params=[64] * 6,
                    n_val=8).save(tmp_path / folder)
        (tmp_path / folder / "run.json").write_text("{}")
    lines = bench.Study(work=tmp_path).profile_lines()
    assert "| default | 1.00 | 1.00 |" in lines and "| identity | -1.00 | -1.00 |" in lines
    assert not any(line.startswith("| attn") for line in lines)  # never scored: no row
    (tmp_path / "scores-tasks" / "run.json").unlink()
    assert bench.Study(work=tmp_path).profile_lines() == []

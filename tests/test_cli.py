"""`layerif score` end to end on a tiny local model: outputs, table, errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from layerif.scores import LayerScores
from tests.helpers import instruction_rows, run_cli, save_tiny_model, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model(root / "model", layers=3)
    write_jsonl(root / "train.jsonl", instruction_rows(12, seed=1))
    write_jsonl(root / "val.jsonl", instruction_rows(4, seed=2))
    return root



def score_args(root, out, *extra):
    return ["score", "--model", str(root / "model"), "--train", str(root / "train.jsonl"), "--val",
            str(root / "val.jsonl"), "--n-train", "12", "--n-val", "4", "--out", str(out), "--quiet", *extra]


def test_score_writes_all_outputs(setup, capsys):
    out = setup / "run1"
    assert run_cli(*score_args(setup, out, "--pairwise")) == 0
    outputs = ["influence.safetensors", "layer_scores.csv", "layer_scores.png", "run.json"]
    assert sorted(p.name for p in out.iterdir() if p.name != ".layerif.json") == outputs
    assert sorted(json.loads((out / ".layerif.json").read_text())["files"]) == outputs  # the files we own
    tensors = load_file(out / "influence.safetensors")
    assert tensors["q"].shape == (3, 12) and tensors["q"].dtype == torch.float32
    assert tensors["q_pairwise"].shape == (3, 12, 4)
    record = json.loads((out / "run.json").read_text())
    assert record["passes"] >= 1 and record["data"]["train"]["sha256"] and record["versions"]["torch"]
    assert record["config"]["estimator"] == "datainf" and "load_model_s" in record["timings_s"]
    assert 0 < record["peak_rss_scoring_bytes"] <= record["peak_rss_bytes"]
    assert record["left_out"] == {"training": {}, "validation": {}} and record["world_size"] == 1
    csv_head = (out / "layer_scores.csv").read_text().splitlines()[0].split(",")
    for column in ("layer", "S_pos", "S_top25", "S_all", "n_pos", "n_train", "n_val", "n_params"):
        assert column in csv_head
    scores = LayerScores.load(out)
    torch.testing.assert_close(scores.q, tensors["q"])
    assert "wrote" in capsys.readouterr().out


def test_existing_run_is_refused_then_overwritten(setup, capsys):
    out = setup / "run2"
    assert run_cli(*score_args(setup, out)) == 0
    before = (out / "run.json").read_text()
    assert run_cli(*score_args(setup, out)) == 2
    assert "already holds another run" in capsys.readouterr().err
    assert (out / "run.json").read_text() == before
    assert run_cli(*score_args(setup, out, "--overwrite", "--estimator", "identity")) == 0
    assert json.loads((out / "run.json").read_text())["config"]["estimator"] == "identity"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--train": "missing.jsonl"}, "data file not found"),
        ({"--n-train": "500"}, "asked for 500 training rows but the data has only 12"),
        ({"--estimator": "nosuch"}, "unknown estimator"),  # not "lissa": the registry may hold it
        ({"--modules": "ffn"}, "--modules must be"),
        ({"--max-memory": "lots"}, "cannot read memory size"),
        ({"--model": "./no/such/dir"}, "model directory not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(setup, capsys, change, message):
    out = setup / "bad"
    args = score_args(setup, out)
    for flag, value in change.items():
        value = value if not value.endswith(".jsonl") else str(setup / value)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert not list(setup.glob(".bad.partial-*"))


def test_wrong_columns(setup, capsys):
    write_jsonl(setup / "odd.jsonl", [{"question": "x"}])
    args = score_args(setup, setup / "odd")
    args[args.index("--train") + 1] = str(setup / "odd.jsonl")
    assert run_cli(*args) == 2
    assert "rows need a 'text' column" in capsys.readouterr().err


def test_console_script_runs_as_module(setup):
    done = subprocess.run([sys.executable, "-m", "layerif", "score", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--max-memory" in done.stdout


def test_outputs_are_readable_by_others(setup):
    import stat

    out = setup / "run1"
    if not out.exists():
        assert run_cli(*score_args(setup, out)) == 0
    mode = (out / "layer_scores.csv").stat().st_mode
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH


def test_token_id_rows_equal_text_rows():
    from layerif.api import ScoreConfig, score_layers
    from tests.conftest import TinyTokenizer, tiny_llama, tiny_texts

    tok = TinyTokenizer()
    train, val = tiny_texts(6, seed=80), tiny_texts(2, seed=81)
    as_text = score_layers(tiny_llama(layers=2), tok, train, val, ScoreConfig(quiet=True)).q
    as_ids = score_layers(tiny_llama(layers=2), None, [torch.tensor(tok._encode(t)) for t in train],
                          [tok._encode(t) for t in val], ScoreConfig(quiet=True)).q
    torch.testing.assert_close(as_ids, as_text)


def test_unconverged_lissa_says_so_in_one_line_and_in_run_json(setup, capsys):
    out = setup / "lissa5"
    assert run_cli(*score_args(setup, out, "--estimator", "lissa", "--lissa-depth", "5")) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "did not converge" in line]
    assert len(lines) == 1 and "on 21 of 21 matrices" in lines[0] and "--lissa-depth 5" in lines[0]
    convergence = json.loads((out / "run.json").read_text())["convergence"]
    assert convergence["not_converged"] == 21 and convergence["worst_change"] > convergence["tol"] > 0
    converged = setup / "lissa-default"
    assert run_cli(*score_args(setup, converged, "--estimator", "lissa")) == 0
    assert "did not converge" not in capsys.readouterr().err
    assert json.loads((converged / "run.json").read_text())["convergence"]["not_converged"] == 0


def test_several_estimators_write_one_table_each_and_their_agreement(setup, capsys):
    out = setup / "several"
    assert run_cli(*score_args(setup, out, "--estimator", "datainf,identity,exact")) == 0
    record = json.loads((out / "run.json").read_text())
    names = ["datainf", "identity", "exact"]
    assert record["estimators"] == names
    written = {p.name for p in out.iterdir() if p.name != ".layerif.json"}
    assert written == set(record["outputs"]) and {f"layer_scores.{name}.csv" for name in names} <= written
    assert [(pair["a"], pair["b"]) for pair in record["agreement"]["pairs"]] == [
        ("datainf", "identity"), ("datainf", "exact"), ("identity", "exact")]
    assert (out / "layer_scores.csv").read_text() == (out / "layer_scores.datainf.csv").read_text()
    for name in names:
        alone = setup / f"alone-{name}"
        assert run_cli(*score_args(setup, alone, "--estimator", name)) == 0
        want = LayerScores.load(alone).q
        torch.testing.assert_close(LayerScores.load(out, name).q, want, rtol=0, atol=1e-6 * want.abs().max().item())


def test_a_bad_name_in_the_estimator_list_exits_2_with_one_line(setup, capsys):
    out = setup / "bad-list"
    assert run_cli(*score_args(setup, out, "--estimator", "datainf,tracin")) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "unknown estimator 'tracin'" in err
    assert not out.exists()


"""`layerif allocate sparsity`, `layerif prune` and `layerif evaluate` end to end on a tiny local model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerif.scores import LayerScores
from tests.conftest import WORDS, tiny_texts
from tests.helpers import run_cli, save_tiny_model, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_cli")
    save_tiny_model(root / "model", layers=3)
    (root / "calib.txt").write_text("\n".join(tiny_texts(200, seed=4)))
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 10, generator=generator) + torch.tensor([[0.0], [1.0], [2.0]])
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    LayerScores(q=q, module_names=names, q_modules=q.unsqueeze(1).repeat(1, 7, 1) / 7,
                n_params=[15360] * 3, n_val=4).save(root / "scores")
    LayerScores(q=torch.randn(5, 10), module_names=names, q_modules=torch.randn(5, 7, 10), n_params=[1] * 5,
                n_val=4).save(root / "scores5")
    rows = [{"instruction": f"Please choose the correct answer to the question: {w} tree?\n\nAnswer1: red cat "
                            f"Answer2: blue dog\n\nAnswer format: answer1/answer2", "input": "", "output": "",
             "answer": f"answer{i % 2 + 1}"} for i, w in enumerate(WORDS[:8])]
    write_jsonl(root / "mc.jsonl", rows)
    return root


def prune_args(root, out, *extra):
    return ["prune", "--model", str(root / "model"), "--calib", str(root / "calib.txt"), "--calib-sequences", "6",
            "--calib-length", "16", "--batch-size", "4", "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize("method,allocation", [("sparsegpt", "layerif"), ("wanda", "owl"), ("magnitude", "alphapruning")])
def test_prune_saves_model_with_measured_ratios(setup, method, allocation):
    from transformers import AutoModelForCausalLM

    out = setup / f"pruned_{method}"
    code = run_cli(*prune_args(setup, out, "--method", method, "--allocation", allocation, "--scores",
                               str(setup / "scores"), "--sparsity", "0.6", "--save-model"))
    assert code == 0
    ratios = json.loads((out / "ratios.json").read_text())
    assert ratios["allocation"] == allocation and abs(ratios["mean_sparsity"] - 0.6) < 1e-6
    model = AutoModelForCausalLM.from_pretrained(out)
    modules = dict(model.named_modules())
    for name, ratio in ratios["matrix_ratios"].items():
        weight = modules[name].weight
        assert abs(float((weight == 0).double().mean()) - ratio) < 0.005
    report = json.loads((out / "prune.json").read_text())
    assert report["method"] == method and report["max_abs_deviation"] < 0.005
    if allocation == "layerif":  # the highest-scored block gets the highest ratio
        assert np.argmax(ratios["block_ratios"]) == 2


def test_allocate_sparsity_and_evaluate(setup, capsys):
    out = setup / "alloc"
    assert run_cli("allocate", "sparsity", "--scores", str(setup / "scores"), "--sparsity", "0.5", "--epsilon",
                   "0.2", "--out", str(out)) == 0
    data = json.loads((out / "ratios.json").read_text())
    assert len(data["block_ratios"]) == 3 and abs(data["mean_sparsity"] - 0.5) < 1e-6
    assert "mean sparsity" in capsys.readouterr().out
    pruned = setup / "pruned_ev"
    assert run_cli(*prune_args(setup, pruned, "--method", "wanda", "--allocation", str(out / "ratios.json"),
                               "--sparsity", "0.5", "--save-model")) == 0
    assert run_cli("evaluate", "--model", str(pruned), "--ppl", str(setup / "calib.txt"), "--ppl-length", "16",
                   "--ppl-windows", "5", "--tasks", str(setup / "mc.jsonl"), "--limit", "6", "--quiet") == 0
    result = json.loads((pruned / "eval.json").read_text())
    assert result["perplexity"]["windows"] == 5 and result["perplexity"]["perplexity"] > 1
    assert result["zeroshot"]["tasks"]["mc"]["n"] == 6
    assert 0 <= result["zeroshot"]["mean_acc"] <= 1


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "wanda", "--sparsity", "1.0"], "--sparsity"),
        (["--method", "wanda", "--sparsity", "0"], "--sparsity"),
        (["--method", "wanda", "--sparsity", "0.5", "--epsilon", "1"], "--epsilon"),
        (["--method", "random", "--sparsity", "0.5"], "unknown pruning method"),
        (["--method", "wanda", "--sparsity", "0.5", "--allocation", "magic"], "unknown allocation"),
        (["--method", "wanda", "--sparsity", "0.5", "--allocation", "layerif"], "--scores"),
        (["--method", "wanda", "--sparsity", "0.5", "--allocation", "layerif", "--scores", "SCORES5"], "blocks"),
        (["--method", "wanda", "--sparsity", "0.5", "--calib-length", "100000"], "fewer than one sequence"),
    ],
)
def test_prune_errors_exit_2_and_write_nothing(setup, capsys, extra, message):
    out = setup / "never"
    extra = [str(setup / "scores5") if item == "SCORES5" else item for item in extra]
    assert run_cli(*prune_args(setup, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not out.exists() or not any(out.iterdir())


def test_evaluate_task_without_choices_exits_2(setup, capsys):
    write_jsonl(setup / "bad.jsonl", [{"instruction": "Say it.", "output": "x", "answer": "x"}] * 2)
    assert run_cli("evaluate", "--model", str(setup / "model"), "--tasks", str(setup / "bad.jsonl"),
                   "--out", str(setup / "ev_bad")) == 2
    err = capsys.readouterr().err.strip()
    assert "no choices" in err and "\n" not in err
    assert not (setup / "ev_bad" / "eval.json").exists()


def _weighted_mean(ratios: dict) -> float:
    weights = np.asarray(ratios["block_params"], dtype=np.float64)
    return float(np.dot(weights, ratios["block_ratios"]) / weights.sum())


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_prune_depth_and_random_controls(setup, sparsity):
    """Controls through `layerif prune`: exact mean, random = permuted layerif ratios, depth rises with depth."""
    def prune(allocation, *extra):
        out = setup / f"control_{allocation}_{sparsity}_{'_'.join(extra)}"
        assert run_cli(*prune_args(setup, out, "--method", "wanda", "--allocation", allocation, "--scores",
                                   str(setup / "scores"), "--sparsity", str(sparsity), "--epsilon", "0.2",
                                   *extra)) == 0
        return json.loads((out / "ratios.json").read_text())

    reference = prune("layerif")
    depth = prune("depth")
    assert depth["allocation"] == "depth"
    assert abs(_weighted_mean(depth) - sparsity) < 1e-9
    assert np.all(np.diff(depth["block_ratios"]) > 0)  # strictly deeper ⇒ more pruning
    orders = set()
    for seed in range(4):
        shuffled = prune("random", "--seed", str(seed))
        assert shuffled["allocation"] == "random" and shuffled["arguments"]["placement"]
        assert abs(_weighted_mean(shuffled) - sparsity) < 1e-9
        placement = shuffled["arguments"]["placement"]
        np.testing.assert_allclose(shuffled["block_ratios"], np.asarray(reference["block_ratios"])[placement],
                                   rtol=0, atol=1e-12)
        orders.add(tuple(placement))
    assert len(orders) > 1  # the seed moves the placement


def test_allocate_sparsity_controls_without_model(setup):
    out = setup / "alloc_depth"
    assert run_cli("allocate", "sparsity", "--scores", str(setup / "scores"), "--sparsity", "0.6", "--allocation",
                   "depth", "--out", str(out), "--quiet") == 0
    data = json.loads((out / "ratios.json").read_text())
    assert abs(_weighted_mean(data) - 0.6) < 1e-9 and np.all(np.diff(data["block_ratios"]) > 0)
    assert run_cli("allocate", "sparsity", "--scores", str(setup / "scores"), "--sparsity", "0.6", "--allocation",
                   "random", "--seed", "3", "--out", str(out), "--overwrite", "--quiet") == 0
    data = json.loads((out / "ratios.json").read_text())
    assert data["allocation"] == "random" and data["arguments"]["seed"] == 3

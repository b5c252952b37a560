"""`layerif export peft` (a LoraConfig PEFT accepts, with LayerIF ranks) and `layerif export sparsity`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from layerif.allocate.experts import layerif_counts
from layerif.export import lora_parameter_count
from layerif.models import select_matrices
from layerif.scores import LayerScores
from tests.conftest import tiny_llama
from tests.helpers import run_cli
from tests.report.conftest import N_LAYERS


@pytest.mark.parametrize("blocks_path", [None, "model.layers"])
def test_peft_config_gives_each_block_its_rank(runs, blocks_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    _, scored, _ = runs
    out = tmp_path / "lora_config.json"
    extra = ["--blocks-path", blocks_path] if blocks_path else []
    assert run_cli("export", "peft", "--scores", str(scored), "--total-rank", "14", "--beta", "2", "--out",
                   str(out), *extra) == 0
    config = json.loads(out.read_text())
    ranks = layerif_counts(LayerScores.load(scored).scores("S_pos"), 14, 2.0)
    assert ranks.sum() == 14 and ranks.min() >= 1

    model = tiny_llama(layers=N_LAYERS)  # the architecture the run scored (same config as the saved model)
    refs = select_matrices(model)
    peft_model = get_peft_model(model, LoraConfig(**config))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    expected = sum(int(ranks[layer]) * sum(ref.d_in + ref.d_out for ref in block) for layer, block in enumerate(refs))
    assert trainable == expected == lora_parameter_count(ranks, [[(r.d_in, r.d_out) for r in b] for b in refs])
    for layer, block in enumerate(peft_model.base_model.model.model.layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            module = block.get_submodule(name)
            assert module.r["default"] == ranks[layer]
            assert module.scaling["default"] == pytest.approx(2.0)  # alpha = 2 x rank everywhere


def test_peft_export_refuses_bad_input(runs, tmp_path, capsys):
    _, scored, _ = runs
    out = tmp_path / "taken.json"
    out.write_text("mine")
    capsys.readouterr()
    assert run_cli("export", "peft", "--scores", str(scored), "--total-rank", "3", "--out", str(tmp_path / "x.json")) == 2
    assert "--total-rank" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    assert run_cli("export", "peft", "--scores", str(scored), "--total-rank", "8", "--out", str(out)) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "mine"
    assert run_cli("export", "peft", "--scores", str(tmp_path), "--total-rank", "8", "--out", str(tmp_path / "y.json")) == 2


@pytest.fixture(scope="module")
def ratio_files(runs):
    root, scored, _ = runs
    alone, with_model = root / "ratios_alone", root / "ratios_model"
    assert run_cli("allocate", "sparsity", "--scores", str(scored), "--sparsity", "0.4", "--out", str(alone),
                   "--quiet") == 0
    assert run_cli("allocate", "sparsity", "--scores", str(scored), "--sparsity", "0.4", "--model",
                   str(root / "model"), "--out", str(with_model), "--quiet") == 0
    return alone / "ratios.json", with_model / "ratios.json"


@pytest.mark.parametrize("fmt", ["yaml", "json", "csv"])
def test_sparsity_export_round_trips(ratio_files, fmt, tmp_path):
    for source, blocks_path in ((ratio_files[0], "model.layers"), (ratio_files[1], None)):
        out = tmp_path / f"{source.parent.name}.{fmt}"
        extra = ["--blocks-path", blocks_path] if blocks_path else []
        assert run_cli("export", "sparsity", "--ratios", str(source), "--format", fmt, "--out", str(out), *extra) == 0
        plan = json.loads(source.read_text())
        expected = {name.replace("blocks.", "model.layers.", 1): ratio for name, ratio in plan["matrix_ratios"].items()}
        if fmt == "csv":
            rows = list(csv.DictReader(out.open()))
            assert {row["module"]: float(row["sparsity"]) for row in rows} == expected
            assert all(plan["block_ratios"][int(row["layer"])] == float(row["sparsity"]) for row in rows)
            continue
        data = yaml.safe_load(out.read_text()) if fmt == "yaml" else json.loads(out.read_text())
        assert data["module_sparsity"] == expected
        assert data["layer_sparsity"] == plan["block_ratios"] and len(data["layer_sparsity"]) == N_LAYERS
        assert data["target_sparsity"] == 0.4


def test_sparsity_export_feeds_torch_pruning(ratio_files, tmp_path):
    """The docs' recipe: per-module amounts into torch.nn.utils.prune reach each module's ratio."""
    from torch.nn.utils import prune

    out = tmp_path / "sparsity.json"
    assert run_cli("export", "sparsity", "--ratios", str(ratio_files[1]), "--format", "json", "--out", str(out)) == 0
    plan = json.loads(out.read_text())
    model = tiny_llama(layers=N_LAYERS)
    pruned = 0
    for name, module in model.named_modules():
        if name in plan["module_sparsity"]:
            prune.l1_unstructured(module, "weight", amount=plan["module_sparsity"][name])
            prune.remove(module, "weight")
            zeros = float((module.weight == 0).double().mean())
            assert abs(zeros - plan["module_sparsity"][name]) <= 1.0 / module.weight.numel()
            pruned += 1
    assert pruned == len(plan["module_sparsity"]) == 7 * N_LAYERS
    weights = [m.weight for n, m in model.named_modules() if n in plan["module_sparsity"]]
    overall = float(sum((w == 0).sum() for w in weights)) / sum(w.numel() for w in weights)
    assert overall == pytest.approx(plan["mean_sparsity"], abs=1e-2)
    assert torch.isfinite(model(torch.tensor([[2, 5, 7]])).logits).all()


def test_sparsity_export_bad_input(ratio_files, tmp_path, capsys):
    capsys.readouterr()
    assert run_cli("export", "sparsity", "--ratios", str(ratio_files[0]), "--format", "xml", "--out",
                   str(tmp_path / "a.xml")) == 2
    assert "--format" in capsys.readouterr().err and not (tmp_path / "a.xml").exists()
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"format": "layerif.ratios/1"}))
    assert run_cli("export", "sparsity", "--ratios", str(bogus), "--out", str(tmp_path / "b.yaml")) == 2
    assert run_cli("export", "sparsity", "--ratios", str(tmp_path / "none.json"), "--out", str(tmp_path / "c.yaml")) == 2
    assert not (tmp_path / "b.yaml").exists() and not (tmp_path / "c.yaml").exists()
    assert np.all([line.startswith("error:") for line in capsys.readouterr().err.strip().splitlines()])


def test_peft_keys_use_a_recorded_block_path(runs, tmp_path):
    import shutil

    _, scored, _ = runs
    copy = tmp_path / "run"
    shutil.copytree(scored, copy)
    record = json.loads((copy / "run.json").read_text())
    record["model"]["blocks_path"] = "model.layers"
    (copy / "run.json").write_text(json.dumps(record))
    out = tmp_path / "lora.json"
    assert run_cli("export", "peft", "--scores", str(copy), "--total-rank", "8", "--out", str(out)) == 0
    keys = list(json.loads(out.read_text())["rank_pattern"])
    assert len(keys) == 7 * N_LAYERS and all(key.startswith("model.layers.") for key in keys)

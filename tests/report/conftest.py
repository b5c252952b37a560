"""Two tiny runs for the report and export tests: one scored by the CLI, one written with bootstrap columns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerif.scores import LayerScores
from tests.helpers import instruction_rows, run_cli, save_tiny_model, write_jsonl

N_LAYERS = 4


def write_synthetic_run(directory, n_layers: int = N_LAYERS, n_train: int = 40, seed: int = 0, resamples: int = 400):
    """A run folder whose scores rise steeply with depth, with bootstrap columns computed from its own q."""
    generator = torch.Generator().manual_seed(seed)
    depth = torch.linspace(1.0, 4.0, n_layers) ** 2
    q_modules = (torch.rand(n_layers, 2, n_train, generator=generator) + 0.5) * depth[:, None, None]
    q_modules[0, 0, :3] = -1.0  # a few harmful samples so n_pos varies
    scores = LayerScores(q=q_modules.sum(dim=1), module_names=["self_attn.q_proj", "mlp.down_proj"],
                         q_modules=q_modules, n_params=[96 * (i + 1) for i in range(n_layers)], n_val=5)
    scores.save(directory)
    frame = scores.to_pandas()
    rng = np.random.default_rng(seed)
    q = scores.q.double().numpy()
    picks = rng.integers(0, n_train, size=(resamples, n_train))
    resampled = q[:, picks]  # [L, B, n]
    for how, values in (("S_pos", np.clip(resampled, 0, None).sum(-1)), ("S_all", resampled.sum(-1)),
                        ("S_top25", np.sort(np.clip(resampled, 0, None), -1)[..., -n_train // 4:].sum(-1))):
        frame[f"{how}_lo"], frame[f"{how}_hi"] = np.percentile(values, [2.5, 97.5], axis=1)
        if how == "S_pos":
            ranks = (-values).argsort(0).argsort(0) + 1
            frame["rank_lo"], frame["rank_hi"] = ranks.min(1), ranks.max(1)
            frame["p_above_median"] = (values > np.median(values, axis=0)).mean(1)
    frame.to_csv(directory / "layer_scores.csv", index=False)
    record = {"format": "layerif.run/1", "config": {"estimator": "datainf", "bootstrap": resamples},
              "model": {"source": "synthetic <model> & co", "n_layers": n_layers},
              "data": {"train": {"source": "synthetic.jsonl", "sha256": "ab" * 32}, "n_train": n_train, "n_val": 5},
              "plan": {"mode": "store"}, "timings_s": {"influence_s": 0.5}}
    (directory / "run.json").write_text(json.dumps(record))
    return directory


@pytest.fixture(scope="package")
def runs(tmp_path_factory):
    """(root, scored run, synthetic run with intervals) on a tiny Llama."""
    root = tmp_path_factory.mktemp("report")
    save_tiny_model(root / "model", layers=N_LAYERS)
    write_jsonl(root / "train.jsonl", instruction_rows(12, seed=1))
    write_jsonl(root / "val.jsonl", instruction_rows(4, seed=2))
    scored = root / "scored"
    assert run_cli("score", "--model", str(root / "model"), "--train", str(root / "train.jsonl"), "--val",
                   str(root / "val.jsonl"), "--n-train", "12", "--n-val", "4", "--out", str(scored), "--quiet") == 0
    synthetic = root / "synthetic"
    synthetic.mkdir()
    write_synthetic_run(synthetic)
    return root, scored, synthetic

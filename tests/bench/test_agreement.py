"""The agreement benchmark's shared capture: every estimator gets the q its own scoring run would give."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from tests.conftest import REPO, TinyTokenizer, tiny_llama, tiny_texts

pytest.importorskip("scipy")


def load_bench():
    spec = importlib.util.spec_from_file_location("agreement", REPO / "bench" / "agreement.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("agreement", module)
    spec.loader.exec_module(module)
    return module


def test_shared_capture_gives_each_estimator_its_own_runs_scores():
    from layerif.api import ScoreConfig, score_layers

    bench = load_bench()
    model, tokenizer = tiny_llama(layers=2, seed=1), TinyTokenizer()
    train, val = tiny_texts(10, seed=2), tiny_texts(3, seed=3)
    settings = {"batch_size": 4, "compute_dtype": "float64", "lissa_depth": 20}
    estimators = ["identity", "datainf", "exact", "lissa", "ekfac"]
    shared = bench.shared_capture_scores(model, tokenizer, train, val, estimators, settings)
    assert shared["capture_seconds"] > 0
    for name in estimators:
        alone = score_layers(model, tokenizer, train, val,
                             ScoreConfig(estimator=name, strategy="spill", quiet=True, **settings))
        got = shared["estimators"][name]
        torch.testing.assert_close(got["q"], alone.q.double(), rtol=1e-5, atol=1e-6 * alone.q.abs().max().item())
        assert got["influence_s"] > 0 and got["seconds"] > got["influence_s"]
    assert shared["estimators"]["lissa"]["lissa_worst_change"] is not None
    assert shared["estimators"]["exact"]["lissa_worst_change"] is None
    # the estimators do differ, so equality above is not a trivial one
    assert not torch.allclose(shared["estimators"]["identity"]["q"], shared["estimators"]["exact"]["q"])


def test_peer_rows_get_a_value_gap_line_against_their_layerif_namesake():
    q = torch.tensor([[1.0, -2.0, 4.0], [0.5, 0.5, -1.0]])
    peer = q.clone()
    peer[0, 2] += 0.04  # 1 % of block 0's largest |q|; block 1 unchanged
    entry = {"seconds": 1.0, "influence_s": 1.0, "plan": "x", "lissa_worst_change": None}
    lines = load_bench().agreement_tables("t", {"identity": {"q": q, **entry}, "kf-identity": {"q": peer, **entry}})
    gap = [line for line in lines if line.startswith("kf-identity against identity")]
    assert gap == ["kf-identity against identity: largest per-block |q difference| over the block's largest |q|, "
                   "median 0.0e+00, max 1.0e-02."]

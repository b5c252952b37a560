"""kronfluence as a peer in the agreement benchmark: its identity scores are ours, and --peer without it says why."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from tests.conftest import REPO, TinyTokenizer, tiny_llama, tiny_texts

pytest.importorskip("scipy")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.cuda.amp.GradScaler:FutureWarning")  # kronfluence's, on CPU

# layerif keeps q in float32: a float64 run agrees with an exact peer to float32 rounding (about 1e-7 of the
# largest value; the float64 runs below measured at most 2e-7), so 1e-6 leaves room without hiding a real difference
RELATIVE = 1e-6


def load_peer():
    spec = importlib.util.spec_from_file_location("agreement_peer", REPO / "bench" / "agreement_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    pytest.importorskip("kronfluence")
    from layerif.api import ScoreConfig, score_layers

    model, tokenizer = tiny_llama(layers=2, seed=1, dtype=torch.float64), TinyTokenizer()
    train, val = tiny_texts(10, seed=2), tiny_texts(3, seed=3)
    settings = {"batch_size": 4, "compute_dtype": "float64"}
    peer = load_peer().kronfluence_scores(model, tokenizer, train, val, settings, query_batch=2,
                                          work=tmp_path_factory.mktemp("kronfluence"))
    ours = score_layers(model, tokenizer, train, val,
                        ScoreConfig(estimator="identity,ekfac", pairwise=True, quiet=True, **settings))
    return peer, ours


def test_kronfluence_identity_is_layerif_identity_per_block_and_pair(both):
    peer, ours = both
    got, want = peer["identity"], ours["identity"]
    assert got["q"].shape == want.q.shape and got["pairwise"].shape == want.q_pairwise.shape
    # same sign: kronfluence's g_val . g_train is layerif's q = -I (positive = lowers the validation loss)
    assert relative_error(got["q"], want.q.double()) < RELATIVE
    assert relative_error(got["pairwise"], want.q_pairwise.double()) < RELATIVE
    assert got["seconds"] > 0


def test_kronfluence_ekfac_is_layerif_ekfac_except_the_query_matrices(both):
    peer, ours = both
    got, want = peer["ekfac"], ours["ekfac"]
    query = want.module_names.index("self_attn.q_proj")
    for layer in range(want.n_layers):
        for slot, name in enumerate(want.module_names):
            error = relative_error(got["q_modules"][layer][slot], want.q_modules[layer, slot].double())
            if slot == query:
                # kronfluence's activation covariance keeps each row's first token, whose query gets no gradient
                # (a softmax over one key); ours leaves it out, so the EK-FAC bases of q_proj differ
                assert error > 1e-3, (layer, name)
            else:
                assert error < RELATIVE, (layer, name, error)


def test_peer_flag_without_kronfluence_says_why_and_runs_nothing(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("agreement_for_peer", REPO / "bench" / "agreement.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setitem(sys.modules, "kronfluence", None)  # import kronfluence now raises ImportError
    monkeypatch.setattr(sys, "path", list(sys.path))  # _peer puts bench/ on it
    assert bench._peer(True) is None
    assert bench._peer(False) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("--peer: kronfluence not used (ModuleNotFoundError: ")

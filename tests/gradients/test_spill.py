"""Factors spilled to disk: exact round trip, shared inputs stored once, files cleaned up, plans that pick it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import layerif.influence.engine as engine
from layerif.api import ScoreConfig, score_layers
from layerif.errors import LayerIFError
from layerif.gradients.factors import FactorChunk, MatrixFactors, chunk_sq_norms
from layerif.gradients.plan import plan_passes
from layerif.gradients.spill import SpillStore, remove_stale_spills
from tests.conftest import TinyTokenizer, tiny_llama, tiny_texts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spilled_factors_equal_in_memory_factors(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    store = SpillStore(tmp_path)
    in_memory = [MatrixFactors(7, 5, 3), MatrixFactors(7, 5, 4)]
    for index in (torch.tensor([4, 0, 6]), torch.tensor([1, 2, 3, 5])):
        x = torch.randn(len(index), 6, 5, generator=generator).to(dtype)
        cache: dict = {}
        for position, d_out in enumerate((3, 4)):  # both matrices read the same x, like q and k
            delta = torch.randn(len(index), 6, d_out, generator=generator).to(dtype)
            store.write("train", 0, position, FactorChunk(index, x, delta), cache)
            in_memory[position].add(FactorChunk(index, x, delta), chunk_sq_norms(x.float(), delta.float()))
    store.finish_writing()
    itemsize = torch.empty((), dtype=dtype).element_size()
    # x once per batch for both matrices, delta per matrix
    assert store.path("train", 0).stat().st_size == 7 * 6 * (5 + 3 + 4) * itemsize
    weights = torch.randn(7, generator=generator, dtype=torch.float64)
    for position, d_out in enumerate((3, 4)):
        spilled = store.factors("train", 0, position,
                                MatrixFactors(7, 5, d_out, torch.float32, sq_norms=in_memory[position].sq_norms))
        matrix = torch.randn(d_out, 5, generator=generator)
        torch.testing.assert_close(spilled.dots(matrix), in_memory[position].dots(matrix), rtol=0, atol=0)
        torch.testing.assert_close(spilled.weighted_sum(weights), in_memory[position].weighted_sum(weights),
                                   rtol=0, atol=0)
    store.drop_layer(0)
    assert not store.path("train", 0).exists()
    store.close()
    assert not store.directory.exists()


def test_stale_spill_of_a_dead_process_is_removed(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    stale = tmp_path / f".layerif-spill-{dead_pid}-abc"
    live = tmp_path / f".layerif-spill-{os.getpid()}-def"
    stale.mkdir()
    live.mkdir()
    remove_stale_spills(tmp_path)
    assert not stale.exists() and live.exists()


def test_plan_spills_when_disk_is_cheaper_than_extra_passes():
    cheap = plan_passes("datainf", False, [10] * 6, 30, spill_io_cost=0.5)
    assert cheap.mode == "spill" and cheap.passes == 1 and "spill to disk" in cheap.reason
    assert cheap.estimated_cost["spill"] == 3.5
    assert plan_passes("datainf", False, [10] * 6, 30, spill_io_cost=20.0).mode == "store"
    assert plan_passes("datainf", False, [10] * 6, 5, spill_io_cost=20.0).mode == "stream"
    # exact cannot stream: over the budget it spills rather than overrun memory with a too-large layer
    assert plan_passes("exact", False, [10] * 6, 5, spill_io_cost=20.0).mode == "spill"
    # everything fits: one pass in memory beats any disk traffic
    assert plan_passes("datainf", False, [10] * 6, 100, spill_io_cost=0.0).mode == "store"
    assert plan_passes("datainf", False, [10] * 6, 5, spill_io_cost=None).mode == "stream"


@pytest.mark.parametrize("estimator", ["datainf", "exact", "identity"])
def test_spill_equals_store_with_pairwise(tmp_path, estimator):
    tok = TinyTokenizer()
    train, val = tiny_texts(9, seed=60), tiny_texts(3, seed=61)
    store = score_layers(tiny_llama(layers=3, seed=6), tok, train, val,
                         ScoreConfig(quiet=True, batch_size=4, estimator=estimator, pairwise=True, strategy="store"))
    spill = score_layers(tiny_llama(layers=3, seed=6), tok, train, val,
                         ScoreConfig(quiet=True, batch_size=4, estimator=estimator, pairwise=True, strategy="spill"),
                         spill_dir=str(tmp_path))
    assert spill.metadata["plan"]["mode"] == "spill" and spill.metadata["train_passes"] == 1
    torch.testing.assert_close(spill.q, store.q, rtol=1e-6, atol=1e-7 * store.q.abs().max().item())
    torch.testing.assert_close(spill.q_pairwise, store.q_pairwise, rtol=1e-6,
                               atol=1e-7 * store.q_pairwise.abs().max().item())
    assert list(tmp_path.iterdir()) == []  # nothing left on disk


def test_auto_plan_measures_disk_and_records_why(tmp_path):
    scores = score_layers(tiny_llama(layers=3, seed=7), TinyTokenizer(), tiny_texts(8, seed=70), tiny_texts(2, seed=71),
                          ScoreConfig(quiet=True, batch_size=4, max_memory=1), spill_dir=str(tmp_path))
    plan = scores.metadata["plan"]
    assert plan["estimated_cost"]["spill_disk_write_bytes_per_s"] > 0
    assert plan["estimated_cost"]["spill"] is not None
    assert plan["mode"] in ("spill", "stream") and plan["reason"]


def test_forced_spill_without_disk_room_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("layerif.gradients.spill.free_disk_bytes", lambda directory: 1 << 20)
    with pytest.raises(LayerIFError, match="needs .* MiB of free disk"):
        score_layers(tiny_llama(layers=2), TinyTokenizer(), tiny_texts(6, seed=72), tiny_texts(2, seed=73),
                     ScoreConfig(quiet=True, max_memory=1, strategy="spill"), spill_dir=str(tmp_path))


def test_spill_crash_resumes_from_finished_layers(tmp_path, monkeypatch):
    train, val = tiny_texts(10, seed=74), tiny_texts(3, seed=75)
    config = ScoreConfig(quiet=True, batch_size=4, strategy="spill")
    clean = score_layers(tiny_llama(layers=3, seed=8), TinyTokenizer(), train, val, config)
    real, calls = engine.influence_from_factors, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 10:  # past the first layer's 7 matrices, inside the second layer
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "influence_from_factors", failing)
    checkpoint, spill = tmp_path / "checkpoint", tmp_path / "spill"
    with pytest.raises(KeyboardInterrupt):
        score_layers(tiny_llama(layers=3, seed=8), TinyTokenizer(), train, val, config,
                     checkpoint_dir=str(checkpoint), spill_dir=str(spill))
    monkeypatch.undo()
    resumed = score_layers(tiny_llama(layers=3, seed=8), TinyTokenizer(), train, val, config,
                           checkpoint_dir=str(checkpoint), spill_dir=str(spill))
    assert resumed.metadata["resumed"]["units_loaded"] == ["layer-0000"]
    assert resumed.metadata["plan"]["groups"] == [[1, 2]]
    torch.testing.assert_close(resumed.q, clean.q, rtol=1e-6, atol=0)
    assert list(spill.iterdir()) == []


def test_small_budget_shrinks_the_batch_without_changing_scores():
    tok = TinyTokenizer()
    train, val = tiny_texts(9, seed=76), tiny_texts(3, seed=77)
    roomy = score_layers(tiny_llama(layers=2, seed=9), tok, train, val, ScoreConfig(quiet=True, batch_size=4))
    tight = score_layers(tiny_llama(layers=2, seed=9), tok, train, val,
                         ScoreConfig(quiet=True, batch_size=4, max_memory=1))
    assert roomy.metadata["plan"]["batch_size"] == 4
    assert tight.metadata["plan"]["batch_size"] == 1 and "batches of 1 instead of 4" in tight.metadata["plan"]["reason"]
    torch.testing.assert_close(tight.q, roomy.q, rtol=1e-5, atol=1e-5 * roomy.q.abs().max().item())


def test_measured_pass_memory_grows_with_the_batch():
    from layerif.data.tokens import EncodedSet, make_batches
    from layerif.gradients.passes import measure_pass

    model = tiny_llama(layers=2, seed=10)
    model.model.norm.weight.requires_grad_(False)
    flags = [param.requires_grad for param in model.parameters()]
    ids = [torch.randint(3, 60, (16,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    small, large = make_batches(EncodedSet(ids[:2]), 2, 0)[0], make_batches(EncodedSet(ids), 8, 0)[0]
    small_bytes, _ = measure_pass(model, small)
    large_bytes, seconds = measure_pass(model, large)
    assert small_bytes > 0 and seconds > 0
    assert 3.0 < large_bytes / small_bytes < 5.0  # activations scale with the samples in the batch
    assert [param.requires_grad for param in model.parameters()] == flags  # weights' flags are restored


def test_unwritable_spill_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(LayerIFError, match="cannot write spilled gradients under"):
        score_layers(tiny_llama(layers=2), TinyTokenizer(), tiny_texts(6, seed=78), tiny_texts(2, seed=79),
                     ScoreConfig(quiet=True, strategy="spill"), spill_dir=str(blocker / "spill"))

"""Block-by-block calibration and whole-model pruning on a tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerif.calibration import BlockRunner, InputStats, calibration_ids, input_hooks
from layerif.errors import LayerIFError
from layerif.models import find_blocks, select_matrices
from layerif.models.blocks import weight_of
from layerif.prune import prune_model
from tests.conftest import tiny_llama, tiny_texts
from tests.helpers import hf_tokenizer


@pytest.fixture
def model():
    return tiny_llama(layers=3, hidden=32)


def calib(n: int = 6, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 64, (n, length), generator=torch.Generator().manual_seed(0))


def test_block_runner_reproduces_the_full_forward(model):
    ids = calib()
    runner = BlockRunner(model, ids, batch_size=4)  # batches of 4 and 2: kwargs kept per batch size
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    _, blocks = find_blocks(model)
    for layer in range(len(blocks)):
        torch.testing.assert_close(torch.cat(runner.hidden), hidden[layer], atol=1e-5, rtol=1e-5)
        runner.advance(blocks[layer])


def test_block_stats_equal_full_forward_stats(model):
    ids = calib()
    refs = select_matrices(model)[1]
    full = InputStats(gram=True)
    with input_hooks({ref.name: ref.module for ref in refs}, full), torch.no_grad():
        model(input_ids=ids)
    runner = BlockRunner(model, ids, batch_size=5)
    runner.advance(runner.blocks[0])
    blockwise = InputStats(gram=True)
    with input_hooks({ref.name: ref.module for ref in refs}, blockwise):
        runner.forward(runner.blocks[1])
    for ref in refs:
        torch.testing.assert_close(blockwise.mean_sq(ref.name), full.mean_sq(ref.name), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(blockwise.hessian(ref.name), full.hessian(ref.name), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_model_hits_every_matrix_ratio(model, method):
    path, _ = find_blocks(model)
    refs = [ref for block in select_matrices(model) for ref in block]
    rng = np.random.default_rng(1)
    ratios = {f"{path}.{ref.layer}.{ref.name}": float(rng.uniform(0.1, 0.9)) for ref in refs}
    report = prune_model(model, ratios, method, calib(), batch_size=4, block_size=16, quiet=True)
    for ref in refs:
        name = f"{path}.{ref.layer}.{ref.name}"
        measured = float((weight_of(ref) == 0).double().mean())
        assert abs(measured - ratios[name]) < 0.005
        assert report.measured[name] == pytest.approx(measured)
    assert report.max_deviation < 0.005


def test_calibration_aware_pruning_keeps_outputs_closer(model):
    ids = calib(8, 16)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    errors = {}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path, _ = find_blocks(model)
    ratios = {f"{path}.{ref.layer}.{ref.name}": 0.6 for block in select_matrices(model) for ref in block}
    for method in ("magnitude", "sparsegpt"):
        model.load_state_dict(state)
        prune_model(model, ratios, method, ids, batch_size=8, block_size=16, quiet=True)
        with torch.no_grad():
            errors[method] = float(((model(input_ids=ids).logits - dense) ** 2).mean())
    assert errors["sparsegpt"] < errors["magnitude"]


def test_prune_model_rejects_bad_input(model):
    path, _ = find_blocks(model)
    name = f"{path}.0.self_attn.q_proj"
    with pytest.raises(LayerIFError, match="unknown pruning method"):
        prune_model(model, {name: 0.5}, "random")
    with pytest.raises(LayerIFError, match="lacks"):
        prune_model(model, {"model.layers.9.mlp.up_proj": 0.5}, "magnitude")
    with pytest.raises(LayerIFError, match="inside"):
        prune_model(model, {name: 1.2}, "magnitude")
    with pytest.raises(LayerIFError, match="calibration"):
        prune_model(model, {name: 0.5}, "wanda")


def test_calibration_windows(tmp_path):
    tokenizer = hf_tokenizer()
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(tiny_texts(60, seed=1)))
    ids = calibration_ids(text, tokenizer, n_sequences=5, length=20, seed=3)
    assert ids.shape == (5, 20)
    assert torch.equal(ids, calibration_ids(text, tokenizer, n_sequences=5, length=20, seed=3))
    assert not torch.equal(ids, calibration_ids(text, tokenizer, n_sequences=5, length=20, seed=4))
    full = tokenizer("\n\n".join(text.read_text().splitlines()), return_tensors="pt")["input_ids"][0].tolist()
    for row in ids.tolist():  # every window is a contiguous slice of the tokenised text
        assert any(full[i : i + 20] == row for i in range(len(full) - 19))
    with pytest.raises(LayerIFError, match="fewer than one sequence"):
        calibration_ids(text, tokenizer, n_sequences=5, length=10_000)
    with pytest.raises(LayerIFError):
        calibration_ids(tmp_path / "missing.txt", tokenizer)


@pytest.mark.parametrize("builder", ["tiny_gpt2", "tiny_neox"])
def test_other_architectures(builder):
    import tests.helpers as helpers

    model = getattr(helpers, builder)(layers=2)
    ids = calib(5, 10)
    runner = BlockRunner(model, ids, batch_size=2)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    runner.advance(runner.blocks[0])
    torch.testing.assert_close(torch.cat(runner.hidden), hidden[1], atol=1e-5, rtol=1e-5)
    for method in ("wanda", "sparsegpt"):
        model = getattr(helpers, builder)(layers=2)
        path, _ = find_blocks(model)
        refs = [ref for block in select_matrices(model) for ref in block]
        ratios = {f"{path}.{ref.layer}.{ref.name}": 0.4 for ref in refs}
        report = prune_model(model, ratios, method, ids, batch_size=2, block_size=16, quiet=True)
        assert report.max_deviation < 0.005
        for ref in refs:
            assert abs(float((weight_of(ref) == 0).double().mean()) - 0.4) < 0.005

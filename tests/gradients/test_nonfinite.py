"""--on-nonfinite skip: a sample with a non-finite loss or gradient is left out exactly as if it were not in the data."""

from __future__ import annotations

import pytest
import torch

from layerif.api import ScoreConfig, score_layers
from layerif.errors import LayerIFError
from layerif.models.blocks import find_blocks
from tests.conftest import TinyTokenizer, tiny_llama

TRAIN = ["alpha beta gamma", "delta red blue green", "cat omega dog", "tree fish bird", "red green alpha beta",
         "gamma delta cat", "dog tree fish red blue", "bird alpha"]
VAL = ["alpha beta", "red green cat", "dog fish"]
BAD = 2  # the training sample holding "omega"


def poisoned_embedding_model(tok: TinyTokenizer, seed: int = 8):
    """A model whose "omega" embedding is NaN: every sample containing it has a non-finite loss."""
    model = tiny_llama(layers=3, seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight[tok.vocab["omega"]] = float("nan")
    return model


class _InfGradient(torch.autograd.Function):
    """Identity forward; backward makes the gradient of the given rows infinite (like a bf16 overflow)."""

    @staticmethod
    def forward(ctx, hidden, rows):
        ctx.rows = rows
        return hidden.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[ctx.rows] = float("inf")
        return grad, None


def overflowing_gradient_model(tok: TinyTokenizer, block: int = 1, seed: int = 8):
    """A model whose backward overflows at `block`'s output for samples containing "omega"; losses stay finite."""
    model = tiny_llama(layers=3, seed=seed)
    seen: dict = {}
    poison = tok.vocab["omega"]

    def remember_ids(module, args, kwargs):
        seen["rows"] = (kwargs["input_ids"] == poison).any(dim=1)

    def overflow(module, args, output):
        rows = seen["rows"]
        if not torch.is_grad_enabled() or not bool(rows.any()):
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = _InfGradient.apply(hidden, rows)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    model.register_forward_pre_hook(remember_ids, with_kwargs=True)
    find_blocks(model)[1][block].register_forward_hook(overflow)
    return model


CASES = [("datainf", "store"), ("datainf", "spill"), ("datainf", "stream"), ("exact", "store"),
         ("identity", "stream")]


@pytest.mark.parametrize("estimator, strategy", CASES)
def test_skipped_non_finite_loss_equals_scoring_without_the_sample(estimator, strategy):
    tok = TinyTokenizer()
    config = dict(quiet=True, batch_size=3, estimator=estimator, strategy=strategy)
    skipped = score_layers(poisoned_embedding_model(tok), tok, TRAIN, VAL, ScoreConfig(on_nonfinite="skip", **config))
    without = score_layers(poisoned_embedding_model(tok), tok, TRAIN[:BAD] + TRAIN[BAD + 1:], VAL, ScoreConfig(**config))
    assert list(skipped.metadata["left_out"]["training"]) == [str(BAD)]
    assert "loss" in skipped.metadata["left_out"]["training"][str(BAD)]
    assert "layer 0" in skipped.metadata["left_out"]["training"][str(BAD)]
    assert torch.all(skipped.q[:, BAD] == 0)
    kept = [i for i in range(len(TRAIN)) if i != BAD]
    torch.testing.assert_close(skipped.q[:, kept], without.q, rtol=1e-5, atol=1e-6 * without.q.abs().max().item())
    for how in ("S_pos", "S_top25", "S_all"):
        torch.testing.assert_close(skipped.scores(how), without.scores(how), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("strategy", ["store", "stream"])
def test_skipped_overflowing_gradient_is_named_by_layer_and_left_out_everywhere(strategy):
    tok = TinyTokenizer()
    config = dict(quiet=True, batch_size=3, strategy=strategy)
    skipped = score_layers(overflowing_gradient_model(tok), tok, TRAIN, VAL, ScoreConfig(on_nonfinite="skip", **config))
    where = skipped.metadata["left_out"]["training"][str(BAD)]
    assert where.startswith("gradient in layer 1 ")  # the top block above the overflow stays finite, so layer 1
    without = score_layers(overflowing_gradient_model(tok), tok, TRAIN[:BAD] + TRAIN[BAD + 1:], VAL,
                           ScoreConfig(**config))
    kept = [i for i in range(len(TRAIN)) if i != BAD]
    # left out of every layer, including layer 2 where its own gradient was finite
    torch.testing.assert_close(skipped.q[:, kept], without.q, rtol=1e-5, atol=1e-6 * without.q.abs().max().item())


def test_error_mode_names_the_overflowing_layer():
    tok = TinyTokenizer()
    with pytest.raises(LayerIFError, match=r"non-finite gradient for training sample 2 in layer 1 "):
        score_layers(overflowing_gradient_model(tok), tok, TRAIN, VAL, ScoreConfig(quiet=True, batch_size=3))


def test_skipped_validation_sample_is_left_out_of_v():
    tok = TinyTokenizer()
    val = VAL + ["omega cat"]
    config = dict(quiet=True, batch_size=3)
    skipped = score_layers(poisoned_embedding_model(tok), tok, TRAIN[:2] + TRAIN[3:], val,
                           ScoreConfig(on_nonfinite="skip", **config))
    without = score_layers(poisoned_embedding_model(tok), tok, TRAIN[:2] + TRAIN[3:], VAL, ScoreConfig(**config))
    assert list(skipped.metadata["left_out"]["validation"]) == ["3"]
    torch.testing.assert_close(skipped.q, without.q, rtol=1e-5, atol=1e-6 * without.q.abs().max().item())


def test_all_samples_non_finite_is_a_clear_error():
    tok = TinyTokenizer()
    with pytest.raises(LayerIFError, match="every training sample has a non-finite loss or gradient"):
        score_layers(poisoned_embedding_model(tok), tok, ["omega cat", "dog omega"], VAL,
                     ScoreConfig(quiet=True, on_nonfinite="skip"))

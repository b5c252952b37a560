"""Pluggable loss: `answer` (only the output's tokens) is exact against the naive reference; bad rows are clear."""

from __future__ import annotations

import pytest
import torch

from layerif.api import ScoreConfig, score_layers
from layerif.data.loading import row_text
from layerif.data.tokens import per_sample_loss
from layerif.errors import LayerIFError
from layerif.models.blocks import select_matrices
from tests.conftest import tiny_llama
from tests.helpers import instruction_rows
from tests.influence.test_exactness import naive_gradients, naive_influence


def answer_starts(rows):
    """Position of each row's first answer token for the test tokenizer: BOS + one token per prompt word."""
    return [1 + len(row["instruction"].split()) + len(row["input"].split()) for row in rows]


@pytest.mark.parametrize("estimator, strategy", [("datainf", "store"), ("datainf", "stream"), ("exact", "spill")])
def test_answer_loss_matches_naive_reference(estimator, strategy, tokenizer):
    train, val = instruction_rows(12, seed=20), instruction_rows(4, seed=21)
    model = tiny_llama(layers=3, seed=22)
    refs = [ref for layer in select_matrices(model, "all", "full") for ref in layer]
    train_grads = naive_gradients(model, tokenizer, [row_text(r) for r in train], refs, answer_starts(train))
    val_grads = naive_gradients(model, tokenizer, [row_text(r) for r in val], refs, answer_starts(val))
    expected = torch.zeros(3, len(train), dtype=torch.float64)
    for position, ref in enumerate(refs):
        expected[ref.layer] -= naive_influence(train_grads[position], val_grads[position], estimator)

    config = ScoreConfig(loss="answer", estimator=estimator, strategy=strategy, batch_size=5, quiet=True)
    got = score_layers(tiny_llama(layers=3, seed=22), tokenizer, train, val, config).q.double()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())
    # the prompt tokens really are left out: the token loss gives other scores
    everything = score_layers(tiny_llama(layers=3, seed=22), tokenizer, train, val,
                              ScoreConfig(estimator=estimator, batch_size=5, quiet=True)).q.double()
    assert (everything - got).abs().max() > 0.1 * got.abs().max()


def test_answer_loss_refuses_plain_text_rows(tokenizer):
    val = instruction_rows(2, seed=23)
    train = instruction_rows(3, seed=24) + [{"text": "alpha beta gamma"}]
    with pytest.raises(LayerIFError, match="training row 3 is plain text"):
        score_layers(tiny_llama(layers=1), tokenizer, train, val, ScoreConfig(loss="answer", quiet=True))
    with pytest.raises(LayerIFError, match="validation row 0"):
        score_layers(tiny_llama(layers=1), tokenizer, instruction_rows(3, seed=24), ["alpha beta"],
                     ScoreConfig(loss="answer", quiet=True))


def test_answer_cut_by_truncation_is_named(tokenizer):
    rows = instruction_rows(3, seed=25)
    long = {"instruction": "what is " + " ".join(["alpha"] * 20), "input": "", "output": "answer beta"}
    with pytest.raises(LayerIFError, match="training sample 1 has no answer token left after truncation to 16"):
        score_layers(tiny_llama(layers=1), tokenizer, [rows[0], long, rows[1]], rows,
                     ScoreConfig(loss="answer", max_length=16, quiet=True))


def test_callable_loss_is_used_for_train_and_val(tokenizer):
    train, val = instruction_rows(8, seed=26), instruction_rows(3, seed=27)

    def doubled(logits, batch):
        return 2 * per_sample_loss(logits, batch.labels)

    config = dict(estimator="identity", batch_size=4, quiet=True)
    plain = score_layers(tiny_llama(layers=2, seed=28), tokenizer, train, val, ScoreConfig(**config)).q
    scaled = score_layers(tiny_llama(layers=2, seed=28), tokenizer, train, val, ScoreConfig(loss=doubled, **config))
    # identity influence is g_i . v: both gradients double
    torch.testing.assert_close(scaled.q, 4 * plain, rtol=1e-5, atol=1e-6 * plain.abs().max().item())
    assert scaled.metadata["config"]["loss"].endswith("doubled")


def test_unknown_loss_is_a_clear_error(tokenizer):
    with pytest.raises(LayerIFError, match="--loss must be tokens or answer"):
        score_layers(tiny_llama(layers=1), tokenizer, ["alpha beta"], ["beta gamma"], ScoreConfig(loss="words"))

"""Other architectures and the LoRA space against naive per-sample gradients; plans; bad gradients."""

from __future__ import annotations

import pytest
import torch

from layerif.api import ScoreConfig, score_layers
from layerif.gradients.passes import NonFiniteGradient
from layerif.gradients.plan import plan_passes
from layerif.models.blocks import select_matrices
from tests.conftest import TinyTokenizer, tiny_llama, tiny_texts
from tests.helpers import tiny_gpt2, tiny_neox
from tests.influence.test_exactness import naive_gradients, naive_influence


@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_neox])
def test_other_architectures_match_naive(builder):
    tok = TinyTokenizer()
    train, val = tiny_texts(8, seed=20), tiny_texts(3, seed=21)
    model = builder(layers=2, seed=3)
    reference = builder(layers=2, seed=3)
    ref_refs = [r for layer in select_matrices(reference) for r in layer]
    g_train = naive_gradients(reference, tok, train, ref_refs)
    g_val = naive_gradients(reference, tok, val, ref_refs)
    expected = torch.zeros(2, 8, dtype=torch.float64)
    for position, ref in enumerate(ref_refs):
        expected[ref.layer] -= naive_influence(g_train[position], g_val[position], "datainf")
    got = score_layers(model, tok, train, val, ScoreConfig(batch_size=3, quiet=True)).q.double()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())


def test_lora_space_scores_adapters_and_restores_model():
    tok = TinyTokenizer()
    train, val = tiny_texts(10, seed=30), tiny_texts(3, seed=31)
    model = tiny_llama(layers=2, seed=5)
    before = {name: p.clone() for name, p in model.named_parameters()}
    scores = score_layers(model, tok, train, val,
                          ScoreConfig(params="lora", finetune_epochs=1, batch_size=5, quiet=True))
    assert scores.q.shape == (2, 10) and torch.isfinite(scores.q).all() and scores.q.abs().sum() > 0
    assert any("lora_A" in name for name in scores.module_names)
    assert scores.n_params[0] == sum(8 * (ref.d_in + ref.d_out) for ref in select_matrices(model, "all")[0])
    after = dict(model.named_parameters())
    assert set(after) == set(before) and all(torch.equal(before[n], after[n]) for n in before)


def test_untrained_lora_gives_zero_influence_through_A():
    tok = TinyTokenizer()
    scores = score_layers(tiny_llama(layers=1, seed=6), tok, tiny_texts(6, seed=1), tiny_texts(2, seed=2),
                          ScoreConfig(params="lora", quiet=True))
    a_rows = [i for i, name in enumerate(scores.module_names) if "lora_A" in name]
    assert torch.all(scores.q_modules[0, a_rows] == 0)


def test_group_passes_equal_single_pass():
    tok = TinyTokenizer()
    train, val = tiny_texts(9, seed=40), tiny_texts(3, seed=41)
    one = score_layers(tiny_llama(layers=4, seed=7), tok, train, val, ScoreConfig(quiet=True))
    tight = score_layers(tiny_llama(layers=4, seed=7), tok, train, val,
                         ScoreConfig(quiet=True, max_memory=1, strategy="store"))
    assert tight.metadata["plan"]["mode"] == "store" and tight.metadata["train_passes"] == 4
    torch.testing.assert_close(tight.q, one.q, rtol=1e-5, atol=1e-5 * one.q.abs().max().item())


def test_plan_prefers_fewest_passes():
    assert plan_passes("datainf", False, [10] * 6, 100).passes == 1
    grouped = plan_passes("datainf", False, [10] * 6, 30)
    assert grouped.mode == "store" and grouped.groups == [[3, 4, 5], [0, 1, 2]]
    assert plan_passes("datainf", False, [10] * 6, 5).mode == "stream"
    assert plan_passes("exact", False, [10] * 6, 5).mode == "store"
    assert plan_passes("identity", False, [10] * 6, 5).passes == 1


def test_non_finite_gradient_names_sample_and_layer():
    tok = TinyTokenizer()
    model = tiny_llama(layers=2, seed=8)
    poison = tok.vocab["omega"]
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    train = ["alpha beta gamma", "delta red blue", "cat omega dog", "tree fish bird"]
    with pytest.raises(NonFiniteGradient, match=r"non-finite loss for training sample 2 \(.*layer 0\)"):
        score_layers(model, tok, train, ["alpha beta", "red green"], ScoreConfig(quiet=True, batch_size=4))


def test_lora_finetuning_trains_on_the_scoring_loss():
    """With loss="answer" the LoRA-space fine-tuning sees only the answer tokens, like the scores it precedes."""
    from dataclasses import replace

    from layerif.data.loading import row_text
    from layerif.data.tokens import answer_loss, encode_answers, make_batches, token_loss
    from layerif.gradients.lora import Finetuning, attach_lora, finetune_lora
    from tests.helpers import instruction_rows

    tok = TinyTokenizer()
    rows = instruction_rows(8, seed=60)
    prompts = [row_text(row).removesuffix(row["output"]) for row in rows]
    batches = make_batches(encode_answers(prompts, [row_text(r) for r in rows], tok), 4, 0)
    # the same batches with every prompt token's label hidden: the token loss on them is the answer loss
    hidden = []
    for batch in batches:
        positions = torch.arange(batch.labels.shape[1]).unsqueeze(0)
        hidden.append(replace(batch, labels=batch.labels.masked_fill(positions < batch.answer_start[:, None], -100)))

    def finetune(loss_fn, data):
        wrapped = attach_lora(tiny_llama(layers=2, seed=61), "all", 4, 8, seed=0)
        settings = Finetuning(epochs=2, lr=1e-2, seed=0, quiet=True)
        losses = finetune_lora(wrapped, data, settings, loss_fn=loss_fn)
        return losses, {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}

    answer_losses, answer_weights = finetune(answer_loss, batches)
    hidden_losses, hidden_weights = finetune(token_loss, hidden)
    token_losses, token_weights = finetune(token_loss, batches)
    assert answer_losses == pytest.approx(hidden_losses, rel=1e-5)
    for name, weight in answer_weights.items():
        torch.testing.assert_close(weight, hidden_weights[name], rtol=1e-4, atol=1e-6)
    assert answer_losses != pytest.approx(token_losses, rel=1e-3)
    assert any(not torch.allclose(weight, token_weights[name]) for name, weight in answer_weights.items())

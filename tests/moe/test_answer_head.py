"""The LM head at the answer positions only gives the loss and gradients of the full head (and of training)."""

from __future__ import annotations

import pytest
import torch

from layerif.moe import MoEConfig, TrainConfig, inject_moe, moe_layers, train_moe
from layerif.moe.train import _collate, encode_training_rows, separable_head, token_loss
from tests.moe.tiny import char_tokenizer, task_rows, tiny_gpt2, tiny_llama


def moe_model(build, seed: int = 0):
    """A float64 tiny model with a LoRA-MoE whose B matrices are non-zero (so every parameter has a gradient)."""
    model = build(layers=3, seed=seed).double()
    inject_moe(model, MoEConfig(counts=[3, 1, 2], top_k=2, dropout=0.0), seed=seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.1)
    return model.train()


def loss_and_grads(model, batch, full_head: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # GPT-2 trains with dropout: the same masks for both heads
    loss = token_loss(model, batch, full_head=full_head)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("train_on_inputs", [False, True], ids=["answer-only", "whole-text"])
def test_answer_positions_give_the_full_head_loss_and_gradients(build, train_on_inputs):
    model = moe_model(build)
    assert separable_head(model) is not None
    items = encode_training_rows(task_rows(6, seed=1), char_tokenizer(), cutoff=64, train_on_inputs=train_on_inputs)
    batch = _collate(items, pad_id=0)  # rows of different lengths: padding is never a target
    full_loss, full_grads = loss_and_grads(model, batch, full_head=True)
    loss, grads = loss_and_grads(model, batch, full_head=False)
    assert float(full_loss) > 0
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    # A and B of every MoE layer, and the router where a layer has more than one expert
    expected = sum(2 + (layer.router is not None) for layer in moe_layers(model).values())
    assert set(grads) == set(full_grads) and len(grads) == expected
    for name, grad in grads.items():
        assert full_grads[name].abs().max() > 0, name
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-6, atol=1e-6, msg=name)
    # the full head agrees with the model's own forward (HF logits), so the baseline is the real loss
    torch.manual_seed(0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                  batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                                  reduction="sum")
    torch.testing.assert_close(full_loss, reference.detach(), rtol=1e-9, atol=1e-9)


def test_a_head_that_scales_its_logits_uses_the_full_forward():
    model = moe_model(tiny_llama)
    model.config.logit_scale = 0.5
    assert separable_head(model) is None
    model.config.logit_scale = None
    model.config.final_logit_softcapping = 30.0
    assert separable_head(model) is None


def test_training_with_the_answer_head_is_training_with_the_full_head(monkeypatch):
    """Two training runs, one forced onto the full head, end with the same adapter weights and losses."""
    import layerif.moe.train as train

    def run(force_full: bool):
        model = tiny_llama(layers=2, seed=3).double()
        inject_moe(model, MoEConfig(counts=[2, 2], top_k=1, dropout=0.0), seed=0)
        if force_full:
            monkeypatch.setattr(train, "separable_head", lambda _model: None)
        log = train_moe(model, char_tokenizer(), task_rows(8, seed=2),
                        TrainConfig(steps=3, batch_size=4, micro_batch_size=2, train_on_inputs=False, lr=1e-2),
                        quiet=True)
        monkeypatch.undo()
        return log["losses"], {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    losses, weights = run(force_full=False)
    full_losses, full_weights = run(force_full=True)
    assert losses == pytest.approx(full_losses, rel=1e-6, abs=1e-9)
    assert any(w.abs().max() > 0 for n, w in weights.items() if "lora_B" in n)  # training moved the adapters
    for name, value in weights.items():
        torch.testing.assert_close(value, full_weights[name], rtol=1e-6, atol=1e-6, msg=name)

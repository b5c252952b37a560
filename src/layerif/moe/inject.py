"""Put LoRA-MoE layers into a loaded model, freeze the base, and save / load the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from layerif.errors import LayerIFError
from layerif.io import atomic_save_tensors, atomic_write_json
from layerif.models import find_blocks, select_matrices
from layerif.moe.config import MoEConfig
from layerif.moe.layer import LoRAMoELinear

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "layerif.lora-moe/1"


def moe_layers(model: nn.Module) -> dict[str, LoRAMoELinear]:
    """All LoRA-MoE layers of a model by their module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRAMoELinear)}


def _targets(model: nn.Module, config: MoEConfig):
    per_layer = select_matrices(model, modules=config.modules, space="full")
    if len(per_layer) != config.n_layers:
        raise LayerIFError(
            f"the allocation has {config.n_layers} layers but the model has {len(per_layer)} blocks"
        )
    if config.target_modules:
        wanted = set(config.target_modules)
        per_layer = [[ref for ref in refs if ref.name in wanted or ref.short in wanted] for refs in per_layer]
        if not any(per_layer):
            raise LayerIFError(f"no projection of the model matches target modules {sorted(wanted)}")
    return per_layer


def inject_moe(model: nn.Module, config: MoEConfig, freeze: bool = True, seed: int | None = None) -> nn.Module:
    """Wrap the selected projections of each block in LoRA-MoE layers (in place) and freeze everything else."""
    if moe_layers(model):
        raise LayerIFError("this model already has LoRA-MoE layers")
    per_layer = _targets(model, config)
    block_path, blocks = find_blocks(model)
    if freeze:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    generator_state = torch.random.get_rng_state() if seed is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for layer, refs in enumerate(per_layer):
            block = blocks[layer]
            for ref in refs:
                parent_name, _, child = ref.name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                wrapper = LoRAMoELinear(
                    ref.module, ref.d_in, ref.d_out, config.counts[layer], config.top_k[layer],
                    rank=config.rank, alpha=config.alpha, dropout=config.dropout, init=config.init,
                )
                wrapper.train(model.training)  # a new module defaults to training mode (dropout on)
                setattr(parent, child, wrapper)
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    for module in moe_layers(model).values():
        module.compute_aux = config.load_balancing > 0
    model.moe_config = config
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_parameters(model: nn.Module, config: MoEConfig) -> int:
    """Adapter size implied by an allocation: Σ_l Σ_W n_l r (d_in + d_out) + (n_l > 1) n_l d_in."""
    total = 0
    for layer, refs in enumerate(_targets(model, config)):
        n = config.counts[layer]
        for ref in refs:
            total += n * config.rank * (ref.d_in + ref.d_out) + (n * ref.d_in if n > 1 else 0)
    return total


def set_token_mask(model: nn.Module, mask: torch.Tensor | None) -> None:
    """Tell every MoE layer which positions are real tokens (for the load-balancing loss)."""
    for module in moe_layers(model).values():
        module.token_mask = mask


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean Switch load-balancing loss over the MoE layers of the last forward (None when off)."""
    losses = [m.aux_loss for m in moe_layers(model).values() if m.aux_loss is not None]
    for module in moe_layers(model).values():
        module.aux_loss = None
    return torch.stack(losses).mean() if losses else None


def base_fingerprint(model: nn.Module) -> dict:
    """What identifies a base model for an adapter: architecture, block count, shapes and a weight checksum."""
    block_path, blocks = find_blocks(model)
    per_layer = select_matrices(model, modules="all", space="full")
    first, last = per_layer[0][0], per_layer[-1][-1]
    with torch.no_grad():
        checksum = [float(ref.module.weight.detach().double().abs().sum()) for ref in (first, last)]
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "n_layers": len(blocks),
        "hidden_size": getattr(config, "hidden_size", None) or getattr(config, "n_embd", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "shapes": {ref.name: [ref.d_in, ref.d_out] for ref in per_layer[0]},
        "checksum": checksum,
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model: str | None = None, extra: dict | None = None) -> Path:
    """Write adapter.safetensors (the LoRA-MoE weights) and adapter_config.json into `directory`."""
    layers = moe_layers(model)
    config: MoEConfig | None = getattr(model, "moe_config", None)
    if not layers or config is None:
        raise LayerIFError("the model has no LoRA-MoE layers to save")
    directory = Path(directory)
    tensors = {}
    for name, module in layers.items():
        tensors[f"{name}.lora_A"] = module.lora_A
        tensors[f"{name}.lora_B"] = module.lora_B
        if module.router is not None:
            tensors[f"{name}.router"] = module.router
    atomic_save_tensors(directory / ADAPTER_WEIGHTS, tensors, {"format": FORMAT})
    payload = {
        "format": FORMAT,
        "base_model": base_model,
        "base": base_fingerprint(model),
        "moe": config.to_dict(),
        "modules": {name: [m.d_in, m.d_out, m.n_experts] for name, m in layers.items()},
        "trainable_parameters": sum(m.n_trainable() for m in layers.values()),
        **(extra or {}),
    }
    atomic_write_json(directory / ADAPTER_CONFIG, payload)
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    """The adapter_config.json of an adapter folder."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise LayerIFError(f"no LoRA-MoE adapter in {directory}: {ADAPTER_CONFIG} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LayerIFError(f"{path}: not valid JSON ({exc})") from exc
    if data.get("format") != FORMAT:
        raise LayerIFError(f"{path}: not a layerif LoRA-MoE adapter")
    return data


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~"))


def _check_base(saved: dict, model: nn.Module, base_model: str | None, saved_name: str | None) -> None:
    current = base_fingerprint(model)
    for key in ("model_type", "n_layers", "hidden_size", "vocab_size", "shapes"):
        if saved.get(key) != current.get(key):
            raise LayerIFError(
                f"the adapter was trained on another base model ({saved_name or 'unknown'}): "
                f"{key} is {saved.get(key)} there but {current.get(key)} here"
            )
    # A local folder or file is identified by its content (checked here), never by how its path is spelled;
    # two different hub ids still name two different models.
    if base_model and saved_name and base_model != saved_name and not (_is_local(base_model) or _is_local(saved_name)):
        raise LayerIFError(f"the adapter was trained on {saved_name}, not on {base_model}")
    for old, new in zip(saved.get("checksum", []), current["checksum"], strict=False):
        if abs(old - new) > 1e-3 * max(abs(old), 1e-12):
            raise LayerIFError(
                f"the adapter was trained on another base model ({saved_name or 'unknown'}): same shapes, different weights"
            )


def load_adapter(model: nn.Module, directory: str | Path, base_model: str | None = None) -> nn.Module:
    """Inject the saved LoRA-MoE into `model` and load its weights; refuses another base model."""
    from safetensors.torch import load_file

    data = read_adapter_config(directory)
    _check_base(data.get("base", {}), model, base_model, data.get("base_model"))
    config = MoEConfig.from_dict(data["moe"])
    inject_moe(model, config)
    weights_path = Path(directory) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise LayerIFError(f"no adapter weights in {directory}: {ADAPTER_WEIGHTS} is missing")
    tensors = load_file(str(weights_path))
    layers = moe_layers(model)
    expected = {f"{name}.{part}" for name, m in layers.items() for part in ("lora_A", "lora_B", "router")
                if part != "router" or m.router is not None}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise LayerIFError(f"{weights_path}: tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, module in layers.items():
            for part in ("lora_A", "lora_B", "router"):
                target = getattr(module, part)
                if target is None:
                    continue
                source = tensors[f"{name}.{part}"]
                if source.shape != target.shape:
                    raise LayerIFError(f"{weights_path}: {name}.{part} has shape {tuple(source.shape)}, "
                                       f"expected {tuple(target.shape)}")
                target.copy_(source.to(target.dtype))
    return model

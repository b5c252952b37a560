"""LoRA-MoE with a different number of LoRA experts per layer: config, layer, injection, training."""

from layerif.moe.config import MoEConfig
from layerif.moe.inject import (
    expected_parameters,
    inject_moe,
    load_adapter,
    moe_layers,
    save_adapter,
    trainable_parameters,
)
from layerif.moe.layer import LoRAMoELinear
from layerif.moe.train import TrainConfig, train_moe

__all__ = [
    "LoRAMoELinear",
    "MoEConfig",
    "TrainConfig",
    "expected_parameters",
    "inject_moe",
    "load_adapter",
    "moe_layers",
    "save_adapter",
    "train_moe",
    "trainable_parameters",
]

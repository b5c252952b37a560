"""Find the decoder blocks of a causal LM and the weight matrices inside each block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layerif.errors import LayerIFError

# Attribute paths (from the CausalLM wrapper) where known architectures keep their block list.
BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi3, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.language_model.layers",  # some multimodal wrappers
    "transformer.blocks",  # MPT
    "base_model.model.model.layers",  # PEFT-wrapped Llama family
    "base_model.model.transformer.h",
    "base_model.model.gpt_neox.layers",
)

# Substrings of a module's path inside a block that mark it as attention or MLP.
ATTN_KEYS = ("attn", "attention")
MLP_KEYS = ("mlp", "feed_forward", "ffn")


@dataclass
class MatrixRef:
    """One weight matrix inside a block, in the linear convention W: (d_out, d_in)."""

    layer: int
    name: str  # path inside the block, e.g. "self_attn.q_proj"
    kind: str  # "attn" or "mlp"
    module: nn.Module
    transposed: bool  # True for GPT-2 Conv1D, whose weight is stored (d_in, d_out)
    d_in: int
    d_out: int

    @property
    def short(self) -> str:
        """Last path component, e.g. "q_proj" or "lora_A" parent-qualified."""
        parts = self.name.split(".")
        if parts[-1] in ("default",) and len(parts) >= 3:
            return ".".join(parts[-3:-1])
        return parts[-1]

    @property
    def n_params(self) -> int:
        return self.d_in * self.d_out


def _get_attr_path(obj: object, path: str):
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (attribute path, block list) of the model's decoder blocks."""
    for path in BLOCK_PATHS:
        blocks = _get_attr_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    raise LayerIFError(
        f"cannot find the decoder blocks of {type(model).__name__}: looked for a non-empty ModuleList at "
        + ", ".join(BLOCK_PATHS)
    )


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _matrix_kind(name: str) -> str | None:
    lowered = name.lower()
    if any(key in lowered for key in ATTN_KEYS):
        return "attn"
    if any(key in lowered for key in MLP_KEYS):
        return "mlp"
    return None


def select_matrices(model: nn.Module, modules: str = "all", space: str = "full") -> list[list[MatrixRef]]:
    """List the weight matrices of each block: `modules` in attn|mlp|all, `space` in full|lora."""
    if modules not in ("attn", "mlp", "all"):
        raise LayerIFError(f"--modules must be attn, mlp or all, got {modules!r}")
    if space not in ("full", "lora"):
        raise LayerIFError(f"--params must be full or lora, got {space!r}")
    _, blocks = find_blocks(model)
    per_layer: list[list[MatrixRef]] = []
    for layer_index, block in enumerate(blocks):
        refs: list[MatrixRef] = []
        for name, module in block.named_modules():
            is_lora_part = ".lora_A." in f".{name}." or ".lora_B." in f".{name}."
            if space == "lora" and not is_lora_part:
                continue
            if space == "full" and ("lora_" in name):
                continue
            if isinstance(module, nn.Linear):
                transposed, d_out, d_in = False, module.out_features, module.in_features
            elif _is_conv1d(module):
                transposed, (d_in, d_out) = True, tuple(module.weight.shape)
            else:
                continue
            if space == "full" and hasattr(module, "base_layer"):
                continue
            if name.endswith("base_layer"):
                name = name[: -len(".base_layer")]
            kind = _matrix_kind(name)
            if kind is None or (modules != "all" and kind != modules):
                continue
            refs.append(MatrixRef(layer_index, name, kind, module, transposed, d_in, d_out))
        if not refs:
            raise LayerIFError(
                f"block {layer_index} of {type(model).__name__} has no {modules} linear modules in the "
                f"{space} parameter space (looked for nn.Linear / Conv1D under names containing "
                f"{'/'.join(ATTN_KEYS + MLP_KEYS)})"
            )
        per_layer.append(refs)
    return per_layer


def weight_of(ref: MatrixRef) -> torch.Tensor:
    """The matrix in the linear convention (d_out, d_in)."""
    weight = ref.module.weight
    return weight.t() if ref.transposed else weight

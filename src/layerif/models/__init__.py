"""Load causal LMs (hub id, local dir, GGUF, built-in default) and find their blocks and linear modules."""

from layerif.models.blocks import MatrixRef, find_blocks, select_matrices
from layerif.models.load import BUILTIN_MODELS, LoadedModel, builtin_gguf_path, load_model

__all__ = [
    "BUILTIN_MODELS",
    "LoadedModel",
    "MatrixRef",
    "builtin_gguf_path",
    "find_blocks",
    "load_model",
    "select_matrices",
]

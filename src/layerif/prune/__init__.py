"""Unstructured pruning with per-matrix ratios: magnitude, Wanda, SparseGPT (block-by-block calibration)."""

from layerif.prune.pruners import METHODS, magnitude_mask, sparsegpt_prune, wanda_mask
from layerif.prune.run import PruneReport, prune_model, prune_with_allocation, save_pruned_model

__all__ = [
    "METHODS",
    "PruneReport",
    "magnitude_mask",
    "prune_model",
    "prune_with_allocation",
    "save_pruned_model",
    "sparsegpt_prune",
    "wanda_mask",
]

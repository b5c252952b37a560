"""Controlled comparisons of allocations: `layerif compare prune` and `layerif compare moe` (units, resumable
runs, two-level intervals)."""

from layerif.compare.moe import CompareMoEJob, MoECompareResult, beats_constant_label
from layerif.compare.prune import ComparePruneJob
from layerif.compare.results import CompareResult, load_compare

__all__ = ["CompareMoEJob", "ComparePruneJob", "CompareResult", "MoECompareResult", "beats_constant_label",
           "load_compare"]

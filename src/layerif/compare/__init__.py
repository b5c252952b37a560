"""Controlled comparisons of allocations: `layerif compare prune` (units, resumable runs, two-level intervals)."""

from layerif.compare.prune import ComparePruneJob
from layerif.compare.results import CompareResult, load_compare

__all__ = ["ComparePruneJob", "CompareResult", "load_compare"]

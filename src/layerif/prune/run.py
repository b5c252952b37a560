"""Prune a model's block matrices to per-matrix ratios, calibrating block by block on cached layer inputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layerif.errors import LayerIFError
from layerif.prune.pruners import METHODS, magnitude_mask, sparsegpt_prune, wanda_mask


@dataclass
class PruneReport:
    """What was pruned: per-matrix target and measured sparsity, and how."""

    method: str
    targets: dict[str, float]
    measured: dict[str, float]
    n_params: dict[str, int]
    seconds: float
    details: dict = field(default_factory=dict)

    @property
    def overall(self) -> float:
        """Measured sparsity over all pruned matrices (parameter-weighted)."""
        total = sum(self.n_params.values())
        return sum(self.measured[name] * self.n_params[name] for name in self.measured) / max(total, 1)

    @property
    def max_deviation(self) -> float:
        return max(abs(self.measured[name] - self.targets[name]) for name in self.targets)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "overall_sparsity": self.overall,
            "max_abs_deviation": self.max_deviation,
            "seconds": self.seconds,
            "details": self.details,
            "matrices": {name: {"target": self.targets[name], "measured": self.measured[name],
                                "n_params": self.n_params[name]} for name in self.targets},
        }


def check_method(method: str) -> str:
    """Validate a pruning method name."""
    if method not in METHODS:
        raise LayerIFError(f"unknown pruning method {method!r}; choose from {', '.join(METHODS)}")
    return method


def measured_sparsity(weight: torch.Tensor) -> float:
    """Share of exact zeros in a weight."""
    return float((weight == 0).double().mean())


def prune_model(
    model: nn.Module,
    matrix_ratios: dict[str, float],
    method: str = "wanda",
    calib_ids: torch.Tensor | None = None,
    batch_size: int = 8,
    block_size: int = 128,
    damp: float = 0.01,
    quiet: bool = False,
) -> PruneReport:
    """Prune in place every matrix named in `matrix_ratios` (full module names) to its ratio."""
    from tqdm.auto import tqdm

    from layerif.calibration import BlockRunner, InputStats, input_hooks
    from layerif.models import find_blocks, select_matrices
    from layerif.models.blocks import weight_of

    check_method(method)
    path, _ = find_blocks(model)
    per_block = select_matrices(model, modules="all")
    by_name = {f"{path}.{ref.layer}.{ref.name}": ref for refs in per_block for ref in refs}
    unknown = sorted(set(matrix_ratios) - set(by_name))
    if unknown:
        raise LayerIFError(f"{len(unknown)} ratio(s) name matrices this model lacks, e.g. {unknown[0]}")
    for name, ratio in matrix_ratios.items():
        if not np.isfinite(ratio) or not 0 <= ratio < 1:
            raise LayerIFError(f"ratio of {name} must be inside [0, 1), got {ratio}")
    if method != "magnitude" and calib_ids is None:
        raise LayerIFError(f"{method} needs calibration text (--calib)")

    started = time.perf_counter()
    layers = sorted({by_name[name].layer for name in matrix_ratios})
    runner = BlockRunner(model, calib_ids, batch_size) if method != "magnitude" else None
    targets, measured, sizes = {}, {}, {}
    for layer in tqdm(range(len(per_block)), desc=f"prune ({method})", disable=quiet, unit="block"):
        named = {name: by_name[name] for name in matrix_ratios if by_name[name].layer == layer}
        if named and method != "magnitude":
            stats = InputStats(gram=method == "sparsegpt")
            with input_hooks({name: ref.module for name, ref in named.items()}, stats):
                runner.forward(runner.blocks[layer])
        with torch.no_grad():
            for name, ref in named.items():
                weight = weight_of(ref)
                ratio = float(matrix_ratios[name])
                if method == "magnitude":
                    weight.masked_fill_(magnitude_mask(weight, ratio), 0.0)
                elif method == "wanda":
                    weight.masked_fill_(wanda_mask(weight, stats.mean_sq(name), ratio), 0.0)
                else:
                    weight.copy_(sparsegpt_prune(weight, stats.hessian(name), ratio, block_size, damp))
                targets[name], measured[name], sizes[name] = ratio, measured_sparsity(weight), weight.numel()
        if runner is not None and layer < max(layers, default=-1):
            runner.advance(runner.blocks[layer])  # the next block sees this block's pruned outputs
    details = {"block_size": block_size, "damp": damp} if method == "sparsegpt" else {}
    if calib_ids is not None and method != "magnitude":
        details.update(calib_sequences=int(calib_ids.shape[0]), calib_length=int(calib_ids.shape[1]))
    return PruneReport(method, targets, measured, sizes, time.perf_counter() - started, details)


def save_pruned_model(model: nn.Module, tokenizer, directory: str | Path, quiet: bool = False) -> None:
    """save_pretrained model + tokenizer into `directory` (a staging folder of the output-folder policy)."""
    from transformers.utils import logging as hf_logging

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    finally:
        if quiet and bars_were_on:
            hf_logging.enable_progress_bar()


def prune_with_allocation(
    model: nn.Module,
    tokenizer,
    allocation: str,
    method: str,
    sparsity: float,
    *,
    scores=None,
    score_name: str = "S_pos",
    epsilon: float = 0.3,
    smooth_scores: bool = True,
    calib: str | Path | None = None,
    calib_sequences: int = 128,
    calib_length: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    quiet: bool = False,
):
    """Allocate ratios (any allocation) and prune `model` in place -> (SparsityAllocation, PruneReport)."""
    from layerif.allocate.sparsity import (
        ALLOCATIONS,
        allocate_sparsity,
        check_epsilon,
        check_sparsity,
        is_ratio_file,
    )
    from layerif.calibration import calibration_ids, default_length

    check_method(method)
    if not is_ratio_file(allocation):
        if allocation not in ALLOCATIONS:
            raise LayerIFError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)} or a JSON file")
        check_sparsity(sparsity)
        check_epsilon(epsilon)
    needs_calib = method != "magnitude" or allocation == "owl"
    if needs_calib and calib is None:
        raise LayerIFError(f"{method if method != 'magnitude' else 'the owl allocation'} needs calibration text (--calib)")
    calib_ids = None
    if calib is not None and needs_calib:
        calib_ids = calibration_ids(calib, tokenizer, calib_sequences, calib_length or default_length(model), seed)
    plan = allocate_sparsity(model, allocation, sparsity, scores=scores, score_name=score_name, epsilon=epsilon,
                             smooth_scores=smooth_scores, calib_ids=calib_ids, batch_size=batch_size, quiet=quiet,
                             seed=seed)
    if calib_ids is not None:
        plan.arguments.update(calib=str(calib), calib_sequences=int(calib_ids.shape[0]),
                              calib_length=int(calib_ids.shape[1]), seed=seed)
    report = prune_model(model, plan.matrix_ratios, method, calib_ids, batch_size=batch_size, quiet=quiet)
    return plan, report

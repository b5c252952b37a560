"""`layerif prune` end to end: load, allocate, prune, measure, write ratios.json / prune.json (and the model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layerif.errors import LayerIFError
from layerif.io import atomic_write_json


@dataclass
class PruneJob:
    """Everything `layerif prune` needs."""

    model: str
    allocation: str
    method: str
    sparsity: float
    out: str
    scores: str | None = None
    score_name: str = "S_pos"
    epsilon: float = 0.3
    smooth: bool = True
    calib: str | None = None
    calib_sequences: int = 128
    calib_length: int | None = None
    seed: int = 0
    batch_size: int = 8
    save_model: bool = False
    dtype: str | None = None
    device: str | None = None
    quiet: bool = False


def validate(job: PruneJob) -> None:
    """Check the arguments that can be checked before loading anything."""
    from layerif.allocate.sparsity import (
        ALLOCATIONS,
        NEEDS_SCORES,
        check_epsilon,
        check_sparsity,
        is_ratio_file,
    )
    from layerif.prune.run import check_method

    check_method(job.method)
    if is_ratio_file(job.allocation):
        if not Path(job.allocation).is_file():
            raise LayerIFError(f"allocation file not found: {job.allocation}")
    elif job.allocation not in ALLOCATIONS:
        raise LayerIFError(f"unknown allocation {job.allocation!r}; choose from {', '.join(ALLOCATIONS)} or a JSON file")
    else:
        check_sparsity(job.sparsity)
        check_epsilon(job.epsilon)
    if job.allocation in NEEDS_SCORES and job.scores is None:
        raise LayerIFError(f"--allocation {job.allocation} needs --scores (a `layerif score` run folder)")
    if (job.method != "magnitude" or job.allocation == "owl") and job.calib is None:
        raise LayerIFError("this method/allocation needs calibration text: pass --calib")
    if job.calib is not None and not Path(job.calib).is_file():
        raise LayerIFError(f"calibration file not found: {job.calib}")
    if job.calib_sequences < 1:
        raise LayerIFError(f"--calib-sequences must be >= 1, got {job.calib_sequences}")
    if job.calib_length is not None and job.calib_length < 2:
        raise LayerIFError(f"--calib-length must be >= 2, got {job.calib_length}")
    if Path(job.out).exists() and not Path(job.out).is_dir():
        raise LayerIFError(f"--out {job.out} exists and is not a folder")


def run_prune(job: PruneJob):
    """Prune as the job says; write ratios.json, prune.json (and the model) into job.out -> (plan, report)."""
    from layerif.models import load_model
    from layerif.prune.run import prune_with_allocation, save_pruned_model
    from layerif.scores import LayerScores

    validate(job)
    scores = LayerScores.load(job.scores) if job.scores is not None else None
    loaded = load_model(job.model, dtype=job.dtype, device=job.device, quiet=job.quiet)
    plan, report = prune_with_allocation(
        loaded.model, loaded.tokenizer, job.allocation, job.method, job.sparsity, scores=scores,
        score_name=job.score_name, epsilon=job.epsilon, smooth_scores=job.smooth, calib=job.calib,
        calib_sequences=job.calib_sequences, calib_length=job.calib_length, seed=job.seed,
        batch_size=job.batch_size, quiet=job.quiet)
    out = Path(job.out)
    if job.save_model:
        save_pruned_model(loaded.model, loaded.tokenizer, out)
    plan.arguments.update(model=loaded.source, method=job.method, scores=job.scores)
    plan.save(out / "ratios.json")
    summary = report.to_dict()
    summary.update(model=loaded.source, allocation=plan.allocation, target_sparsity=plan.target,
                   model_saved=job.save_model)
    atomic_write_json(out / "prune.json", summary)
    return plan, report

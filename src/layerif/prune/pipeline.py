"""`layerif prune` end to end: load, allocate, prune, measure, write ratios.json / prune.json (and the model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layerif.errors import LayerIFError
from layerif.io import atomic_write_json
from layerif.outdir import OutputFolder

OUTPUTS = ("ratios.json", "prune.json")


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
    overwrite: bool = False

    def output_folder(self) -> OutputFolder:
        """--out under the output-folder policy (never the model's own folder)."""
        return OutputFolder(self.out, "prune", overwrite=self.overwrite, inputs=[self.model], names=OUTPUTS)

    def validate(self) -> OutputFolder:
        """Check every argument that can be checked before loading anything; the checked --out folder."""
        from layerif.allocate.sparsity import (
            ALLOCATIONS,
            NEEDS_SCORES,
            check_epsilon,
            check_sparsity,
            is_ratio_file,
        )
        from layerif.models.load import check_device, check_model_source, resolve_dtype
        from layerif.prune.run import check_method

        check_method(self.method)
        if is_ratio_file(self.allocation):
            if not Path(self.allocation).is_file():
                raise LayerIFError(f"allocation file not found: {self.allocation}")
        elif self.allocation not in ALLOCATIONS:
            raise LayerIFError(f"unknown allocation {self.allocation!r}; choose from {', '.join(ALLOCATIONS)} "
                               "or a JSON file")
        else:
            check_sparsity(self.sparsity)
            check_epsilon(self.epsilon)
        if self.allocation in NEEDS_SCORES and self.scores is None:
            raise LayerIFError(f"--allocation {self.allocation} needs --scores (a `layerif score` run folder)")
        if (self.method != "magnitude" or self.allocation == "owl") and self.calib is None:
            raise LayerIFError("this method/allocation needs calibration text: pass --calib")
        from layerif.calibration import check_calibration_arguments

        check_calibration_arguments(self.calib, self.calib_sequences, self.calib_length)
        if self.batch_size < 1:
            raise LayerIFError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.seed < 0:
            raise LayerIFError(f"--seed must be >= 0, got {self.seed}")
        resolve_dtype(self.dtype)
        check_device(self.device)
        check_model_source(self.model)
        folder = self.output_folder()
        folder.check()
        return folder

    def run(self):
        """Prune as the job says; publish ratios.json, prune.json (and the model) into --out -> (plan, report)."""
        from layerif.models import load_model
        from layerif.prune.run import prune_with_allocation, save_pruned_model
        from layerif.scores import LayerScores

        folder = self.validate()
        scores = LayerScores.load(self.scores) if self.scores is not None else None
        with folder:
            loaded = load_model(self.model, dtype=self.dtype, device=self.device, quiet=self.quiet)
            plan, report = prune_with_allocation(
                loaded.model, loaded.tokenizer, self.allocation, self.method, self.sparsity, scores=scores,
                score_name=self.score_name, epsilon=self.epsilon, smooth_scores=self.smooth, calib=self.calib,
                calib_sequences=self.calib_sequences, calib_length=self.calib_length, seed=self.seed,
                batch_size=self.batch_size, quiet=self.quiet)
            staging = folder.staging
            if self.save_model:
                save_pruned_model(loaded.model, loaded.tokenizer, staging, quiet=self.quiet)
            plan.arguments.update(model=loaded.source, method=self.method, scores=self.scores)
            plan.save(staging / "ratios.json")
            summary = report.to_dict()
            summary.update(model=loaded.source, allocation=plan.allocation, target_sparsity=plan.target,
                           model_saved=self.save_model)
            atomic_write_json(staging / "prune.json", summary)
            folder.publish()
        return plan, report

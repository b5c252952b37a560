"""`layerif allocate sparsity` and `layerif allocate experts` as job objects: validate, run, publish."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from layerif.errors import LayerIFError
from layerif.outdir import OutputFolder
from layerif.scores import AGGREGATIONS


def check_aggregation(name: str) -> str:
    """Validate a layer-score aggregation name."""
    if name not in AGGREGATIONS:
        raise LayerIFError(f"unknown score {name!r}; choose from {', '.join(AGGREGATIONS)}")
    return name


def check_scores_folder(scores: str | None) -> None:
    """Refuse a --scores that is not a `layerif score` run folder, before anything is loaded."""
    if scores is not None and not (Path(scores) / "influence.safetensors").is_file():
        raise LayerIFError(f"--scores {scores} is not a `layerif score` run folder (no influence.safetensors)")


def check_model_argument(model: str | None, trust_remote_code: bool = False) -> None:
    """Fail fast on a model that cannot be found or must not be read (no loading)."""
    from layerif.models.load import check_model_source

    if model is not None:
        check_model_source(model, trust_remote_code=trust_remote_code)


def expert_allocation(
    method: str,
    budget: int | None,
    beta: float = 2.5,
    top_k: int | None = None,
    scores_dir: str | Path | None = None,
    score: str = "S_pos",
    n_layers: int | None = None,
    model=None,
    alpha_modules: str = "all",
    seed: int = 0,
):
    """Expert counts for `method`, reading layer scores from a `layerif score` run folder when needed."""
    from layerif.allocate.experts import METHODS, allocate_experts, model_alphas

    scores = None
    arguments: dict = {"allocation": method, "score": score}
    if method in ("layerif", "reversed", "random") or (method == "depth" and scores_dir is not None):
        if scores_dir is None:
            raise LayerIFError(f"--allocation {method} needs --scores (a folder written by `layerif score`)")
        from layerif.scores import LayerScores

        scores = LayerScores.load(scores_dir).scores(score)
        arguments["scores_dir"] = str(scores_dir)
    alphas = None
    if method == "alphalora":
        if model is None:
            raise LayerIFError("--allocation alphalora needs the model to compute PL_Alpha_Hill")
        alphas = model_alphas(model, modules=alpha_modules)
    if n_layers is None and scores is None and alphas is None and method in METHODS:
        raise LayerIFError(f"--allocation {method} needs the number of layers (give --scores or the model)")
    return allocate_experts(method, n_layers=n_layers, budget=budget, scores=scores, beta=beta, top_k=top_k,
                            alphas=alphas, arguments=arguments, seed=seed)


@dataclass
class SparsityJob:
    """Everything `layerif allocate sparsity` needs."""

    sparsity: float
    scores: str | None = None
    allocation: str = "layerif"
    epsilon: float = 0.3
    score: str = "S_pos"
    smooth: bool = True
    model: str | None = None
    calib: str | None = None
    calib_sequences: int = 128
    calib_length: int | None = None
    out: str | None = None
    overwrite: bool = False
    quiet: bool = False
    seed: int = 0
    trust_remote_code: bool = False  # run code shipped in a model folder (--trust-remote-code)

    def output_folder(self) -> OutputFolder:
        """--out, else the --scores folder (ratios.json is added beside the scores)."""
        if self.out is None and self.scores is None:
            raise LayerIFError("pass --out (or --scores, whose folder then receives ratios.json)")
        out = self.out if self.out is not None else self.scores
        return OutputFolder(out, "allocate sparsity", overwrite=self.overwrite, inputs=[self.model],
                            names=["ratios.json"], shared=self.out is None)

    def validate(self) -> OutputFolder:
        """Check the arguments before loading anything; the checked output folder."""
        from layerif.allocate.sparsity import ALLOCATIONS, NEEDS_SCORES, check_epsilon, check_sparsity

        check_sparsity(self.sparsity)
        check_epsilon(self.epsilon)
        check_aggregation(self.score)
        if self.allocation not in ALLOCATIONS:
            raise LayerIFError(f"unknown allocation {self.allocation!r}; choose from {', '.join(ALLOCATIONS)}")
        if self.model is None and self.allocation not in (*NEEDS_SCORES, "depth"):
            raise LayerIFError(f"--allocation {self.allocation} needs --model")
        if (self.allocation in NEEDS_SCORES or (self.allocation == "depth" and self.model is None)) \
                and self.scores is None:
            raise LayerIFError(f"--allocation {self.allocation} needs --scores")
        if self.allocation == "owl" and self.calib is None:
            raise LayerIFError("--allocation owl needs --calib")
        from layerif.calibration import check_calibration_arguments

        check_calibration_arguments(self.calib, self.calib_sequences, self.calib_length)
        check_scores_folder(self.scores)
        check_model_argument(self.model, self.trust_remote_code)
        folder = self.output_folder()
        folder.check()
        return folder

    def run(self):
        """Compute the ratios and publish ratios.json -> (SparsityAllocation, its path)."""
        from layerif.allocate.sparsity import allocate_from_scores, allocate_sparsity
        from layerif.scores import LayerScores

        folder = self.validate()
        loaded_scores = LayerScores.load(self.scores) if self.scores is not None else None
        with folder:
            if self.model is None:
                plan = allocate_from_scores(loaded_scores, self.sparsity, self.epsilon, self.score, self.smooth,
                                            allocation=self.allocation, seed=self.seed)
            else:
                from layerif.calibration import calibration_ids, default_length
                from layerif.models import load_model

                loaded = load_model(self.model, quiet=True, trust_remote_code=self.trust_remote_code)
                calib_ids = None
                if self.allocation == "owl":
                    calib_ids = calibration_ids(self.calib, loaded.tokenizer, self.calib_sequences,
                                                self.calib_length or default_length(loaded.model))
                plan = allocate_sparsity(loaded.model, self.allocation, self.sparsity, scores=loaded_scores,
                                         score_name=self.score, epsilon=self.epsilon, smooth_scores=self.smooth,
                                         calib_ids=calib_ids, quiet=self.quiet, seed=self.seed)
            plan.save(folder.staging / "ratios.json")
            folder.publish()
        return plan, folder.out / "ratios.json"


@dataclass
class ExpertsJob:
    """Everything `layerif allocate experts` needs."""

    scores: str | None = None
    budget: int | None = None
    beta: float = 2.5
    score: str = "S_pos"
    allocation: str = "layerif"
    top_k: int | None = None
    layers: int | None = None
    model: str | None = None
    out: str | None = None
    overwrite: bool = False
    seed: int = 0
    trust_remote_code: bool = False  # run code shipped in a model folder (--trust-remote-code)

    def output_folder(self) -> OutputFolder | None:
        """--out (None: the counts are only printed)."""
        if self.out is None:
            return None
        return OutputFolder(self.out, "allocate experts", overwrite=self.overwrite, inputs=[self.model],
                            names=["experts.json"])

    def validate(self) -> OutputFolder | None:
        """Check the arguments before loading anything; the checked output folder (or None)."""
        check_aggregation(self.score)
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise LayerIFError(f"--beta must be a finite number > 0, got {self.beta}")
        if self.layers is not None and self.layers < 1:
            raise LayerIFError(f"--layers must be >= 1, got {self.layers}")
        if self.allocation == "alphalora" and self.model is None:
            raise LayerIFError("--allocation alphalora needs --model")
        check_scores_folder(self.scores)
        check_model_argument(self.model, self.trust_remote_code)
        folder = self.output_folder()
        if folder is not None:
            folder.check()
        return folder

    def allocate(self, model=None):
        """The expert allocation (model: the loaded model for alphalora)."""
        layers = self.layers
        if layers is None and self.scores is not None and self.allocation not in ("layerif", "reversed", "random"):
            from layerif.scores import LayerScores

            layers = LayerScores.load(self.scores).n_layers
        return expert_allocation(self.allocation, self.budget, self.beta, self.top_k, scores_dir=self.scores,
                                 score=self.score, n_layers=layers, model=model, seed=self.seed)

    def run(self):
        """Allocate, and publish experts.json when --out is given -> (ExpertAllocation, its path or None)."""
        folder = self.validate()
        model = None
        if self.allocation == "alphalora":
            from layerif.models import load_model

            model = load_model(self.model, quiet=True, trust_remote_code=self.trust_remote_code).model
        if folder is None:
            return self.allocate(model), None
        with folder:
            result = self.allocate(model)
            result.save(folder.staging)
            folder.publish()
        return result, folder.out / "experts.json"

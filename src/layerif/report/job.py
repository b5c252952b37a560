"""The `layerif report` job: run folders in, one self-contained HTML page out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ReportJob:
    """Everything `layerif report` needs."""

    runs: list[str] = field(default_factory=list)
    out: str = "report.html"
    budget: int | None = None
    beta: float = 2.5
    sparsity: float = 0.5
    epsilon: float = 0.3
    score: str = "S_pos"
    model: str | None = None
    calib: str | None = None
    calib_sequences: int = 128

    def run(self) -> Path:
        """Check the settings, load the model's inputs when asked, write the page; its path."""
        from layerif.report.html import ReportOptions, build_report, model_inputs

        options = ReportOptions(budget=self.budget, beta=self.beta, sparsity=self.sparsity, epsilon=self.epsilon,
                                score=self.score)
        options.validate()
        return build_report(self.runs, self.out, options, model_inputs(self.model, self.calib, self.calib_sequences))

"""Per-sample gradients of every selected block matrix, captured as factors in batched passes."""

from layerif.gradients.factors import FactorChunk, MatrixFactors
from layerif.gradients.passes import NonFiniteGradient, run_pass
from layerif.gradients.plan import PassPlan, estimate_factor_bytes, plan_passes

__all__ = [
    "FactorChunk",
    "MatrixFactors",
    "NonFiniteGradient",
    "PassPlan",
    "estimate_factor_bytes",
    "plan_passes",
    "run_pass",
]

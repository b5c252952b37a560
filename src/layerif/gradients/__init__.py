"""Per-sample gradients of every selected block matrix, captured as factors in batched passes."""

from layerif.gradients.context import RunContext
from layerif.gradients.factors import FactorChunk, MatrixFactors
from layerif.gradients.passes import NonFiniteGradient, PassSpec, run_pass
from layerif.gradients.plan import PassPlan, PlanInputs, estimate_factor_bytes, make_plan, plan_passes

__all__ = [
    "FactorChunk",
    "MatrixFactors",
    "NonFiniteGradient",
    "PassPlan",
    "PassSpec",
    "PlanInputs",
    "RunContext",
    "estimate_factor_bytes",
    "make_plan",
    "plan_passes",
    "run_pass",
]

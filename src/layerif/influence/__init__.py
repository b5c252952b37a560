"""Influence estimators (DataInf, exact, identity) on per-sample gradient factors, and the pass engine."""

from layerif.influence.estimators import ESTIMATORS, damping, influence_from_factors
from layerif.influence.streaming import StreamingInfluence

__all__ = ["ESTIMATORS", "StreamingInfluence", "damping", "influence_from_factors"]

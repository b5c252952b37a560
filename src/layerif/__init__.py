"""layerif: which layers of a language model are well trained for your data (LayerIF), and acting on it."""

from layerif.args import DataArguments, EstimatorArguments, ExecutionArguments, ScoreConfig, SpaceArguments
from layerif.errors import LayerIFError
from layerif.scores import LayerScores

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy imports (transformers) only when the scoring entry point is used.
    if name == "score_layers":
        from layerif import api

        return api.score_layers
    raise AttributeError(name)


__all__ = ["DataArguments", "EstimatorArguments", "ExecutionArguments", "LayerIFError", "LayerScores", "ScoreConfig",
           "SpaceArguments", "score_layers", "__version__"]

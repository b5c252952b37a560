"""layerif: which layers of a language model are well trained for your data (LayerIF), and acting on it."""

from layerif.errors import LayerIFError
from layerif.scores import LayerScores

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy imports (transformers) only when the scoring entry points are used.
    if name in ("score_layers", "ScoreConfig"):
        from layerif import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["LayerIFError", "LayerScores", "ScoreConfig", "score_layers", "__version__"]

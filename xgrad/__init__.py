"""XGrad: weight prediction for gradient-based optimizers (see README and PAPER.md)."""

from xgrad.predict import WeightPredictor

__all__ = ["WeightPredictor"]

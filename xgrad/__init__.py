"""XGrad: weight prediction for gradient-based optimizers (see README.md and docs/)."""

from xgrad import rules
from xgrad.predict import WeightPredictor
from xgrad.rules import register_rule

__all__ = ["WeightPredictor", "register_rule", "rules"]

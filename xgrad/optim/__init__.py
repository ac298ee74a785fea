"""Optimizers torch lacks that the XGrad paper compares: AdaBelief and AdaM3."""

from xgrad.optim.adabelief import AdaBelief
from xgrad.optim.adam3 import AdaM3

__all__ = ["AdaBelief", "AdaM3"]

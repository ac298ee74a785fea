"""The statistics behind every verdict, on plain numbers (no runs, no tables).

A table used to call XGrad "better" when its mean over three seeds was higher:
with run-to-run noise that is a coin toss. A verdict here is a statistic
(DESIGN.md, "Engineering conventions"):

- per comparison, the paired differences XGrad − baseline (one per seed: the
  two runs of a pair share the seed), their mean and 95% t interval
  (``scipy.stats.ttest_rel``); ``better``/``worse`` only when the interval
  excludes 0, in the metric's own direction; ``no clear difference`` when it
  contains 0; ``too few seeds`` below :data:`MIN_PAIRS` pairs, where no
  interval is computed (:func:`paired_difference`);
- across a figure's cells, a Wilcoxon signed-rank test on the cells' mean
  differences as a fraction of the baseline (:func:`across_cells`), and the
  per-comparison p-values adjusted for their number (Benjamini–Hochberg,
  :func:`bh_adjust`);
- convergence speed: when a validation curve first reaches a target
  (:func:`epochs_to_reach`) and the mean of a curve over epochs
  (:func:`curve_mean`), an area under the curve per epoch.

Distributions come from ``scipy.stats``; nothing here is hand-rolled.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

BETTER, WORSE, NO_CLEAR_DIFFERENCE, TOO_FEW_SEEDS = "better", "worse", "no clear difference", "too few seeds"
#: the only words a verdict column may hold
VERDICTS = (BETTER, WORSE, NO_CLEAR_DIFFERENCE, TOO_FEW_SEEDS)
#: fewer complete pairs than this: no interval, verdict ``too few seeds``
MIN_PAIRS = 3
#: coverage of every interval, and 1 − the level of every test
CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
#: a two-sided signed-rank test on fewer non-zero differences than this cannot reach p < 0.05 (2 / 2^5 = 0.0625)
MIN_CELLS_FOR_SIGNIFICANCE = 6


@dataclass(frozen=True)
class Paired:
    """XGrad − baseline over seed pairs: ``n`` pairs, the mean difference, its interval and the verdict.

    ``low``/``high``/``p`` are None below :data:`MIN_PAIRS` pairs; ``mean`` is
    None without any pair.
    """

    n: int
    mean: float | None
    low: float | None
    high: float | None
    p: float | None
    verdict: str


def direction_sign(mode: str) -> int:
    """+1 when higher is better (``max``), −1 when lower is (``min``); refuses anything else."""
    if mode == "max":
        return 1
    if mode == "min":
        return -1
    raise ValueError(f"metric direction must be 'max' or 'min', got {mode!r}")


def paired_difference(baseline: Sequence[float], xgrad: Sequence[float], mode: str) -> Paired:
    """Compare ``xgrad[i]`` with ``baseline[i]`` (the runs of seed ``i``) under ``mode``.

    The interval is the 95% t interval of the mean of the paired differences
    (``ttest_rel(xgrad, baseline).confidence_interval()``), and ``p`` the paired
    t-test's two-sided p-value: the interval excludes 0 exactly when p < 0.05.
    Differences that are all zero give the interval [0, 0] and p = 1.
    """
    sign = direction_sign(mode)
    base, ours = np.asarray(baseline, dtype=float), np.asarray(xgrad, dtype=float)
    if base.shape != ours.shape or base.ndim != 1:
        raise ValueError(f"paired values need two equal-length lists, got {base.shape} and {ours.shape}")
    n = len(base)
    if n == 0:
        return Paired(0, None, None, None, None, TOO_FEW_SEEDS)
    differences = ours - base
    mean = float(differences.mean())
    if n < MIN_PAIRS:
        return Paired(n, mean, None, None, None, TOO_FEW_SEEDS)
    if not differences.any():  # t is 0/0: nothing differs
        return Paired(n, 0.0, 0.0, 0.0, 1.0, NO_CLEAR_DIFFERENCE)
    with warnings.catch_warnings():  # identical non-zero differences: t is infinite, scipy says so; the result is right
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_rel(ours, base)
        interval = result.confidence_interval(CONFIDENCE)
    low, high, p = float(interval.low), float(interval.high), float(result.pvalue)
    if low > 0 or high < 0:
        verdict = BETTER if sign * mean > 0 else WORSE
    else:
        verdict = NO_CLEAR_DIFFERENCE
    return Paired(n, mean, low, high, p, verdict)


def mean_interval(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(mean, low, high): the 95% t interval of the mean of ``values``; None below two values."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    mean = float(values.mean())
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * stats.sem(values))
    return mean, mean - half, mean + half


def bh_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Benjamini–Hochberg adjusted p-values (``scipy.stats.false_discovery_control``); None stays None.

    The family is every p-value given: the rows of one table.
    """
    present = [i for i, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    if present:
        for i, q in zip(present, stats.false_discovery_control([p_values[i] for i in present], method="bh")):
            adjusted[i] = float(q)
    return adjusted


@dataclass(frozen=True)
class AcrossCells:
    """A Wilcoxon signed-rank test over cells' relative differences (positive = XGrad better).

    ``n`` cells entered, ``nonzero`` of them differ (the test drops zeros);
    ``favours`` is ``"xgrad"`` or ``"baseline"`` by the larger signed-rank sum,
    None when they tie; ``p`` is two-sided, 1.0 when nothing differs.
    """

    n: int
    nonzero: int
    p: float
    favours: str | None
    median: float | None

    @property
    def can_reach_significance(self) -> bool:
        return self.nonzero >= MIN_CELLS_FOR_SIGNIFICANCE


def across_cells(relative: Sequence[float]) -> AcrossCells:
    """Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided) of ``relative`` against 0.

    ``relative`` holds one number per cell: its mean paired difference as a
    fraction of the baseline mean, signed so that positive means XGrad better.
    """
    values = np.asarray(relative, dtype=float)
    nonzero = values[values != 0]
    median = float(np.median(values)) if len(values) else None
    if not len(nonzero):
        return AcrossCells(len(values), 0, 1.0, None, median)
    ranks = stats.rankdata(np.abs(nonzero))
    plus, minus = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
    favours = "xgrad" if plus > minus else "baseline" if minus > plus else None
    with warnings.catch_warnings():  # a single cell: scipy warns that the normal approximation is poor; p is exact
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.wilcoxon(nonzero, alternative="two-sided").pvalue)
    return AcrossCells(len(values), len(nonzero), 1.0 if math.isnan(p) else p, favours, median)


def epochs_to_reach(values: Sequence[float], target: float, mode: str) -> int | None:
    """How many epochs (counting from 1) a curve takes to first reach ``target``; None: never.

    Reaching means at least as good under ``mode``: ``>=`` for ``max``, ``<=`` for ``min``.
    """
    sign = direction_sign(mode)
    for position, value in enumerate(values, start=1):
        if sign * (value - target) >= 0:
            return position
    return None


def curve_mean(values: Sequence[float]) -> float | None:
    """The mean of a validation curve over its epochs: its area per epoch (None for an empty curve)."""
    return float(np.mean(values)) if len(values) else None

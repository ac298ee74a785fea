"""The statistics behind every verdict, on plain numbers (no runs, no tables).

A verdict is a statistic, never a comparison of two means:

- per comparison, the paired differences XGrad − baseline (one per seed: the
  two runs of a pair share the seed), their mean and 95% t interval
  (``scipy.stats.ttest_rel``); ``better``/``worse`` only when the interval
  excludes 0, in the metric's own direction; ``equivalent`` when the 90%
  interval lies inside the metric's margin declared beforehand
  (:data:`MARGINS`; two one-sided tests at α = 0.05); ``no clear difference``
  otherwise; ``too few seeds`` below :data:`MIN_PAIRS` pairs, where no
  interval is computed (:func:`paired_difference`); with each, the minimum
  detectable effect at 80% power (:func:`minimum_detectable_effect`);
- across a figure's cells, a random-effects pooled estimate of the cells'
  standardised paired effects (:func:`pooled`), which weighs each cell by its
  precision, and the per-comparison p-values adjusted for their number
  (Benjamini–Hochberg, :func:`bh_adjust`);
- convergence speed: when each run first reaches a target fixed per cell
  from both arms' mean curve (:func:`pooled_target`, :func:`epochs_to_reach`),
  in epochs, optimizer steps and seconds, censored runs kept
  (:func:`time_to_target`), and the mean of a curve over epochs
  (:func:`curve_mean`), an area under the curve per epoch.

Distributions come from ``scipy.stats``, the pooling from ``statsmodels``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

BETTER, WORSE, EQUIVALENT = "better", "worse", "equivalent"
NO_CLEAR_DIFFERENCE, TOO_FEW_SEEDS = "no clear difference", "too few seeds"
#: the only words a verdict column may hold
VERDICTS = (BETTER, WORSE, EQUIVALENT, NO_CLEAR_DIFFERENCE, TOO_FEW_SEEDS)
#: the equivalence margin of each metric, declared before any run: (size, "points" | "relative"); "relative" is a
#: fraction of the baseline's mean. Accuracy (and BLEU) ±0.5 points, perplexity and loss ±1%.
MARGINS = {"acc": (0.5, "points"), "acc5": (0.5, "points"), "bleu": (0.5, "points"), "ppl": (0.01, "relative"),
           "loss": (0.01, "relative")}  # fmt: skip
#: the power at which a row's minimum detectable effect is computed
POWER = 0.8
#: differences whose spread is below this fraction of the values are equal but for rounding: a degenerate row
DEGENERATE = 1e-9
#: fewer complete pairs than this: no interval, verdict ``too few seeds``
MIN_PAIRS = 3
#: coverage of every interval, and 1 − the level of every test
CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE


@dataclass(frozen=True)
class Paired:
    """XGrad − baseline over seed pairs: ``n`` pairs, the mean difference, its interval and the verdict.

    ``low``/``high``/``p`` are None below :data:`MIN_PAIRS` pairs; ``mean`` is
    None without any pair. ``low90``/``high90``: the 90% interval that the
    equivalence test (TOST at α = 0.05) compares with ``±margin``; ``mde``: the
    smallest true difference the paired t-test detects with 80% power at these
    seeds' spread; ``degenerate``: every pair differs by the same amount, so
    the spread is zero and no t statistic exists (never better/worse/equivalent).
    """

    n: int
    mean: float | None
    low: float | None
    high: float | None
    p: float | None
    verdict: str
    low90: float | None = None
    high90: float | None = None
    margin: float | None = None
    mde: float | None = None
    degenerate: bool = False


def margin_for(metric: str | None, baseline_mean: float | None, margins: dict | None = None) -> float | None:
    """The equivalence margin of ``metric`` in its own units (:data:`MARGINS`, or ``margins`` given); None: none declared."""
    size, kind = (margins or MARGINS).get(metric or "", (None, None))
    if size is None:
        return None
    if kind == "relative":
        return None if baseline_mean is None else abs(size * baseline_mean)
    return float(size)


def minimum_detectable_effect(sd: float, n: int, power: float = POWER) -> float | None:
    """The true mean difference a two-sided paired t-test at α = 0.05 detects with ``power``, for ``n`` pairs of
    differences with standard deviation ``sd`` (the noncentral t, ``scipy.stats.nct``); None below two pairs."""
    if n < 2 or not sd > 0:
        return None
    df, critical = n - 1, stats.t.ppf(1 - ALPHA / 2, n - 1)

    def shortfall(effect: float) -> float:
        shift = effect * math.sqrt(n) / sd
        upper, lower = stats.nct.sf(critical, df, shift), stats.nct.cdf(-critical, df, shift)
        # far from 0, scipy's noncentral t may give NaN for a tail that is 0 or 1 to double precision
        return np.nan_to_num(upper, nan=1.0) + np.nan_to_num(lower, nan=0.0) - power

    from scipy.optimize import brentq

    # the normal-theory estimate (t quantiles for z) bounds the search from above twice over
    rough = (critical + stats.t.ppf(power, df)) * sd / math.sqrt(n)
    return float(brentq(shortfall, 1e-9 * rough, 2 * rough))


def direction_sign(mode: str) -> int:
    """+1 when higher is better (``max``), −1 when lower is (``min``); refuses anything else."""
    if mode == "max":
        return 1
    if mode == "min":
        return -1
    raise ValueError(f"metric direction must be 'max' or 'min', got {mode!r}")


def paired_difference(baseline: Sequence[float], xgrad: Sequence[float], mode: str,
                      margin: float | None = None) -> Paired:  # fmt: skip
    """Compare ``xgrad[i]`` with ``baseline[i]`` (the runs of seed ``i``) under ``mode``.

    The interval is the 95% t interval of the mean of the paired differences
    (``ttest_rel(xgrad, baseline).confidence_interval()``), and ``p`` the paired
    t-test's two-sided p-value: the interval excludes 0 exactly when p < 0.05
    (``better``/``worse``). Otherwise, with a ``margin``, two one-sided tests
    at α = 0.05 — the 90% interval inside ``±margin`` — give ``equivalent``.
    Differences all equal (zero spread) are ``degenerate``: ``no clear
    difference``, with no p-value (all zero: the interval [0, 0]).
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
    if np.ptp(differences) <= DEGENERATE * max(np.abs(base).max(), np.abs(ours).max()):  # no spread: no t exists
        at = float(differences[0])
        return Paired(n, mean, at, at, None, NO_CLEAR_DIFFERENCE, at, at, margin, None, degenerate=True)
    result = stats.ttest_rel(ours, base)
    interval, interval90 = result.confidence_interval(CONFIDENCE), result.confidence_interval(1 - 2 * ALPHA)
    low, high, p = float(interval.low), float(interval.high), float(result.pvalue)
    low90, high90 = float(interval90.low), float(interval90.high)
    if low > 0 or high < 0:
        verdict = BETTER if sign * mean > 0 else WORSE
    elif margin is not None and -margin <= low90 and high90 <= margin:
        verdict = EQUIVALENT
    else:
        verdict = NO_CLEAR_DIFFERENCE
    mde = minimum_detectable_effect(float(differences.std(ddof=1)), n)
    return Paired(n, mean, low, high, p, verdict, low90, high90, margin, mde)


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


def standardised_effect(differences: Sequence[float]) -> tuple[float, float] | None:
    """Hedges' g of one cell's paired differences (mean / sd, small-sample corrected) and its sampling variance.

    ``differences`` are signed so that positive favours XGrad. The variance is
    the usual large-sample one for a paired standardised mean, 1/n + g²/(2n).
    None below :data:`MIN_PAIRS` pairs or without spread (a degenerate cell).
    """
    values = np.asarray(differences, dtype=float)
    n = len(values)
    if n < MIN_PAIRS or not values.std(ddof=1) > 0:
        return None
    g = (1 - 3 / (4 * (n - 1) - 1)) * float(values.mean() / values.std(ddof=1))
    return g, 1 / n + g**2 / (2 * n)


@dataclass(frozen=True)
class Pooled:
    """A figure's cells pooled: the random-effects mean of their standardised effects (positive: XGrad better).

    ``effect`` [``low``, ``high``]: the cells' Hedges' g weighted by
    1 / (variance + τ²), τ² by Paule–Mandel, with its 95% t interval on
    (cells − 1) degrees of freedom (``statsmodels``' ``combine_effects``); None
    below two cells. ``favours_xgrad`` / ``favours_baseline``: the plain sign
    count of the pooled cells; ``left_out``: cells without a standardised
    effect (under three pairs, or degenerate).
    """

    cells: int
    effect: float | None
    low: float | None
    high: float | None
    tau2: float | None
    favours_xgrad: int
    favours_baseline: int
    left_out: int


def pooled(cells: Sequence[Sequence[float] | None]) -> Pooled:
    """Pool cells given as their paired differences (signed: positive favours XGrad); None marks a degenerate cell."""
    effects = [standardised_effect(d) if d is not None else None for d in cells]
    present = [e for e in effects if e is not None]
    g = np.array([e[0] for e in present])
    signs = (int((g > 0).sum()), int((g < 0).sum()))
    if len(present) < 2:
        return Pooled(len(present), None, None, None, None, *signs, len(cells) - len(present))
    from statsmodels.stats.meta_analysis import combine_effects

    with warnings.catch_warnings():  # the per-cell intervals it also computes would want each cell's n: not used here
        warnings.simplefilter("ignore")
        result = combine_effects(g, np.array([e[1] for e in present]), method_re="iterated", use_t=True)
        low, high = result.conf_int(alpha=ALPHA, use_t=True)[1]
    return Pooled(len(present), float(result.mean_effect_re), float(low), float(high), float(result.tau2), *signs,
                  len(cells) - len(present))  # fmt: skip


#: a cell's target lies this fraction of the way from its pooled mean curve's first value to its best
TARGET_FRACTION = 0.9


def pooled_target(curves: Sequence[Sequence[float]], mode: str) -> float | None:
    """The value every run of a cell is timed to, fixed without either arm's own best.

    The mean curve over all runs of both arms (epoch by epoch, over the epochs
    they all have), and the value :data:`TARGET_FRACTION` of the way from its
    first epoch to its best: symmetric in the arms, and below the noisy
    maxima that a run's own best would be. None below two common epochs.
    """
    length = min((len(c) for c in curves), default=0)
    if length < 2:
        return None
    mean = np.mean([list(c)[:length] for c in curves], axis=0)
    best = float(mean.max() if direction_sign(mode) > 0 else mean.min())
    return float(mean[0]) + TARGET_FRACTION * (best - float(mean[0]))


@dataclass(frozen=True)
class TimeToTarget:
    """Per pair, when each run first reached a target in one measure (epochs, steps, seconds); None: never.

    A run that never reached it is censored, not dropped: it counts as slower
    than any run that did. ``p``: the two-sided Wilcoxon signed-rank test of the
    paired differences (censored ones ranked largest), None below
    :data:`MIN_PAIRS` pairs.
    """

    baseline: list[float | None]
    xgrad: list[float | None]
    p: float | None

    @staticmethod
    def median(values: Sequence[float | None]) -> float | None:
        """The median, a censored value counted as infinitely late; None when that median is a censored one."""
        median = float(np.median([math.inf if v is None else v for v in values])) if len(values) else math.inf
        return None if math.isinf(median) or math.isnan(median) else median


def time_to_target(baseline: Sequence[float | None], xgrad: Sequence[float | None]) -> TimeToTarget:
    """Compare paired times to a target (lower is faster), censored times (None) kept as the slowest."""
    finite = [abs(v) for v in (*baseline, *xgrad) if v is not None]
    late = 1 + 2 * max(finite, default=0.0)  # larger than any difference of two finite times

    def difference(b: float | None, x: float | None) -> float:  # censored pairs tie: their order is unknown
        return 0.0 if b is None and x is None else late if x is None else -late if b is None else x - b

    differences = np.array([difference(b, x) for b, x in zip(baseline, xgrad)])
    p = None
    if len(differences) >= MIN_PAIRS:
        p = 1.0 if not differences.any() else float(
            stats.wilcoxon(differences, zero_method="zsplit", alternative="two-sided").pvalue)
    return TimeToTarget(list(baseline), list(xgrad), p)


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


#: a curve counts as flat (trained to its plateau) when it moved less than this fraction over its last quarter
PLATEAU = 0.01


def last_quarter_change(epochs: Sequence[int], values: Sequence[float]) -> tuple[int, int, float] | None:
    """How far a curve moved over its last quarter: (first epoch, last epoch, (last − first) / |first|).

    The last quarter is the last ⌈n/4⌉ of the curve's n epochs, compared from its
    first epoch to its last; None when it holds a single epoch (nothing to
    compare) or starts at 0 (no relative change).
    """
    quarter = math.ceil(len(values) / 4)
    if quarter < 2 or values[-quarter] == 0:
        return None
    first, last = values[-quarter], values[-1]
    return epochs[-quarter], epochs[-1], (last - first) / abs(first)

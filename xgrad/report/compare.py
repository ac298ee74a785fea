"""Cells of runs → one :class:`Comparison` per (cell, s), and a figure's :class:`GroupSummary` s.

This is where runs meet :mod:`xgrad.report.stats`: which runs pair up (same
seed on both sides; anything else is listed, never counted), which value is
compared (the basis), and how a figure's comparisons add up to a verdict per
optimizer.

The basis of a verdict is the test metric at the epoch the validation split
selected (``Run.test``). When a comparison's runs do not all carry it (runs
written before the engine recorded it, data without a test split), the basis
is the best validation value instead, and :attr:`Comparison.basis` says so.
The best test value over epochs (the optimizer papers' habit, where the test
set picks the epoch) is carried along for display only.

A figure's verdict for one optimizer (and one ``s``, when a figure sweeps it)
is "XGrad better" when the 95% interval of the random-effects pooled
standardised effect across its cells (:func:`xgrad.report.stats.pooled`) lies
above 0, "XGrad worse" when below, "inconclusive" otherwise; the counts of
verdicts, the plain sign count and the Benjamini–Hochberg counts come with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from xgrad.report.runs import Cell, Run
from xgrad.report.stats import (
    ALPHA, BETTER, EQUIVALENT, NO_CLEAR_DIFFERENCE, TOO_FEW_SEEDS, WORSE, Paired, Pooled, TimeToTarget, bh_adjust, curve_mean, direction_sign, epochs_to_reach, margin_for, paired_difference,
    last_quarter_change, pooled, pooled_target, time_to_target,
)  # fmt: skip

#: what a comparison's verdict rests on
BASIS_TEST = "test at val-selected epoch"
BASIS_VAL = "best val (no test metric)"


#: the measures of time to target: the name shown, and the position in Run.timeline's (epoch, steps, seconds)
TIME_MEASURES = {"epochs": 0, "optimizer steps": 1, "seconds": 2}


@dataclass
class Convergence:
    """How fast both arms of a cell's pairs reach one validation value, ``target`` (stats.pooled_target).

    ``times``: per measure of :data:`TIME_MEASURES`, each pair's times (None:
    never reached, censored) and their signed-rank test.
    """

    target: float
    times: dict[str, TimeToTarget]


@dataclass
class Comparison:
    """One row of a table: a cell's baseline against its XGrad runs at one ``s``."""

    cell: Cell
    steps: int | None
    pairs: list[tuple[Run, Run]]
    basis: str
    result: Paired
    convergence: Convergence | None
    auc: Paired | None
    #: the basis values of the pairs: (baseline, XGrad)
    values: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))
    #: each pair's validation-curve means over its common epochs: (baseline, XGrad)
    auc_values: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))
    #: how far each arm's mean validation curve moved over its last quarter (stats.last_quarter_change):
    #: (baseline, XGrad), None where it cannot tell
    plateau: tuple[tuple | None, tuple | None] = (None, None)
    #: Benjamini–Hochberg adjusted p across the table's rows; set by :func:`compare`
    p_adjusted: float | None = None

    @property
    def optimizer_setting(self) -> str:
        """The optimizer with what else sets the cell apart: rows are summarised per this label."""
        return self.cell.optimizer_setting

    @property
    def oriented_differences(self) -> list[float]:
        """XGrad − baseline per pair, signed so that positive favours XGrad (what the pooled estimate reads)."""
        sign = direction_sign(self.cell.mode)
        return [sign * (x - b) for b, x in zip(*self.values)]

    @property
    def significant(self) -> str | None:
        """``better``/``worse`` when the BH-adjusted p is below 0.05, else None."""
        if self.p_adjusted is None or self.p_adjusted >= ALPHA or self.result.verdict not in (BETTER, WORSE):
            return None
        return self.result.verdict


def compare(cells: Sequence[Cell]) -> list[Comparison]:
    """Every (cell, s) comparison of ``cells``, with p-values BH-adjusted across all of them.

    A cell without XGrad runs gives one comparison with ``steps`` None and no pairs.
    """
    rows = [compare_arm(cell, steps, runs) for cell in cells for steps, runs in (cell.xgrad.items() or [(None, [])])]
    for row, adjusted in zip(rows, bh_adjust([row.result.p for row in rows])):
        row.p_adjusted = adjusted
    return rows


def pair_up(baseline: Sequence[Run], xgrad: Sequence[Run]) -> list[tuple[Run, Run]]:
    """(baseline run, XGrad run) for each seed both sides ran, in seed order."""
    by_seed = {run.seed: run for run in baseline if run.seed is not None}
    pairs = [(by_seed[run.seed], run) for run in xgrad if run.seed in by_seed]
    return sorted(pairs, key=lambda pair: str(pair[0].seed).zfill(12))


def compare_arm(cell: Cell, steps: int | None, xgrad: Sequence[Run]) -> Comparison:
    """The baseline of ``cell`` against its XGrad runs ``xgrad`` (prediction step ``steps``)."""
    pairs = pair_up(cell.baseline, xgrad)
    with_test = pairs and all(b.test is not None and x.test is not None for b, x in pairs)
    basis = BASIS_TEST if with_test else BASIS_VAL
    attribute = "test" if with_test else "best"
    base = [getattr(b, attribute) for b, _ in pairs]
    ours = [getattr(x, attribute) for _, x in pairs]
    areas = curve_areas(pairs)
    return Comparison(
        cell=cell,
        steps=steps,
        pairs=pairs,
        basis=basis,
        result=paired_difference(base, ours, cell.mode, margin_for(cell.metric, float(np.mean(base)) if base else None)),
        convergence=convergence(pairs, cell.mode),
        auc=paired_difference(*areas, cell.mode) if areas[0] else None,
        values=(base, ours),
        auc_values=areas,
        plateau=(last_quarter_change(*mean_curve([b for b, _ in pairs])),
                 last_quarter_change(*mean_curve([x for _, x in pairs]))),
    )


def convergence(pairs: Sequence[tuple[Run, Run]], mode: str) -> Convergence | None:
    """Every run of the pairs timed to the cell's target (see :class:`Convergence`); None without a target."""
    target = pooled_target([[v for _, v in run.curve] for pair in pairs for run in pair], mode)
    if target is None:
        return None

    def when(run: Run) -> tuple | None:
        """The run's (epoch, steps, seconds) at the first epoch that reached the target; None: never."""
        position = epochs_to_reach([v for _, v in run.curve], target, mode)
        if position is None:
            return None
        epoch = run.curve[position - 1][0]
        return next((t for t in run.timeline if t[0] == epoch), (epoch, None, None))

    found = [(when(b), when(x)) for b, x in pairs]
    times = {}
    for name, measure in TIME_MEASURES.items():
        if any(at is not None and at[measure] is None for pair in found for at in pair):
            continue  # a run that reached the target without this measure recorded: the measure is not shown
        base, ours = ([None if at is None else at[measure] for at in side] for side in zip(*found))
        times[name] = time_to_target(base, ours)
    return Convergence(target, times)


def curve_areas(pairs: Sequence[tuple[Run, Run]]) -> tuple[list[float], list[float]]:
    """Per pair, each run's validation-curve mean over the epochs both runs have: (baseline, XGrad).

    Pairs without a common epoch are skipped.
    """
    base, ours = [], []
    for baseline, xgrad in pairs:
        theirs, mine = dict(baseline.curve), dict(xgrad.curve)
        common = sorted(set(theirs) & set(mine))
        if common:
            base.append(curve_mean([theirs[e] for e in common]))
            ours.append(curve_mean([mine[e] for e in common]))
    return base, ours


def mean_curve(runs: Sequence[Run]) -> tuple[list[int], list[float]]:
    """The runs' validation curves averaged per epoch, over the epochs every one of them has: (epochs, means)."""
    curves = [dict(run.curve) for run in runs]
    if not curves:
        return [], []
    epochs = sorted(set.intersection(*(set(curve) for curve in curves)))
    return epochs, [float(np.mean([curve[epoch] for curve in curves])) for epoch in epochs]


@dataclass
class GroupSummary:
    """One optimizer's comparisons (at one ``s`` when the figure has several): counts, tests, verdict."""

    label: str
    rows: list[Comparison]
    test: Pooled | None
    verdict: str
    explanation: str

    def count(self, verdict: str) -> int:
        return sum(row.result.verdict == verdict for row in self.rows if row.pairs)

    def significant(self, verdict: str) -> int:
        """Rows significantly ``better``/``worse`` after the BH correction."""
        return sum(row.significant == verdict for row in self.rows)

    @property
    def compared(self) -> int:
        return sum(bool(row.pairs) for row in self.rows)


def summarise(rows: Sequence[Comparison]) -> list[GroupSummary]:
    """One :class:`GroupSummary` per optimizer (per optimizer and ``s`` when it has several ``s``).

    A group also for all optimizers together (per ``s``) when the table holds
    more than one base optimizer: each cell is a distinct (data, model,
    optimizer, scale, setting), counted once; variants of one optimizer that
    share a baseline (an ``xgrad.rule`` sweep) are each a cell of their own.
    """
    groups: dict[tuple, list[Comparison]] = {}
    for row in rows:
        if row.steps is not None:  # a cell with no XGrad run yet compares nothing; its table row says so
            groups.setdefault((row.optimizer_setting, row.steps), []).append(row)
    several_steps = {opt for opt, steps in groups if sum(o == opt for o, _ in groups) > 1}
    summaries = []
    for (optimizer, steps), members in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        label = optimizer + (f", s={steps}" if optimizer in several_steps else "")
        summaries.append(summarise_group(label, members))
    optimizers = {row.cell.optimizer for row in rows}
    if len(optimizers) > 1:
        all_steps = sorted({row.steps for row in rows if row.steps is not None})
        for steps in all_steps:
            label = "all optimizers" + (f", s={steps}" if len(all_steps) > 1 else "")
            summaries.append(summarise_group(label, [row for row in rows if row.steps == steps]))
    return summaries


def summarise_group(label: str, rows: Sequence[Comparison]) -> GroupSummary:
    """The verdict of one group of comparisons (see the module docstring for the rule)."""
    rows = list(rows)
    compared = [row for row in rows if row.pairs]
    if not compared:
        return GroupSummary(label, rows, None, "no comparison", "no complete baseline/XGrad pair to compare.")
    test = pooled([None if row.result.degenerate else row.oriented_differences for row in compared])
    summary = GroupSummary(label, rows, test, "", "")
    counts = (
        f"better in {summary.count(BETTER)}, worse in {summary.count(WORSE)}, equivalent in {summary.count(EQUIVALENT)}, "
        f"no clear difference in {summary.count(NO_CLEAR_DIFFERENCE)}, too few seeds in {summary.count(TOO_FEW_SEEDS)} "
        f"of {summary.compared} comparison(s); significant after Benjamini–Hochberg: {summary.significant(BETTER)} "
        f"better, {summary.significant(WORSE)} worse; cells favouring XGrad / the baseline: "
        f"{test.favours_xgrad} / {test.favours_baseline}"
    )  # fmt: skip
    left_out = f"; {test.left_out} cell(s) without a standardised effect left out" if test.left_out else ""
    if test.effect is None:
        summary.verdict = "inconclusive"
        summary.explanation = f"{counts}{left_out}; no pooled estimate: it needs two cells with three pairs or more."
        return summary
    pooled_text = (f"pooled standardised effect g = {test.effect:+.3g} [{test.low:+.3g}, {test.high:+.3g}] over "
                   f"{test.cells} cell(s), τ² = {test.tau2:.3g}")  # fmt: skip
    summary.verdict = "XGrad better" if test.low > 0 else "XGrad worse" if test.high < 0 else "inconclusive"
    summary.explanation = f"{pooled_text}; {counts}{left_out}."
    return summary

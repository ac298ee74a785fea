"""Comparisons → the Markdown document a researcher reads (``results/<figure>.md``).

One renderer, :func:`markdown_table` (pandas' ``DataFrame.to_markdown``), draws
every table of the suite: this module's comparison tables (written by
``scripts/make_tables.py`` and by the end-of-sweep callback
``xgrad.callbacks.SweepReports``), the pages of the overhead, throughput and
scaling benchmarks (:func:`benchmark_page`) and the model check's
(``scripts/check_models.py``). :func:`render` is the whole document: a header
saying what the numbers are, one row per (cell, s) from
:mod:`xgrad.report.compare`, a summary per optimizer, the verdicts, and every
run that did not count with the reason.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from xgrad.report.cells import group_cells, problems, unpaired_seeds
from xgrad.report.compare import (
    BASIS_TEST, BASIS_VAL, TIME_MEASURES, Comparison, GroupSummary, compare, summarise,
)  # fmt: skip
from xgrad.report.runs import Cell, Run
from xgrad.report.stats import (
    ALPHA, BETTER, EQUIVALENT, MARGINS, MIN_PAIRS, NO_CLEAR_DIFFERENCE, PLATEAU, TARGET_FRACTION, TOO_FEW_SEEDS, WORSE,
    Paired, TimeToTarget,
)

#: the comparison table's columns, in order: what a reader needs to read a verdict (at most 10)
COLUMNS = [
    "data", "model", "optimizer", "s", "pairs", "baseline", "XGrad", "Δ XGrad − baseline [95% CI]", "verdict",
]  # fmt: skip
#: the details table's columns: one row per comparison, in the same order, keyed by the same cell and s
DETAIL_COLUMNS = [
    "data", "model", "optimizer", "s", "metric", "direction", "data variant (train / val / test)", "basis",
    "p (paired t)", "p (BH)", "Δ [90% CI] vs equivalence margin", "minimum detectable Δ (80% power)",
    "best test over epochs (paper's habit, not a verdict basis): base / XGrad",
    "val target (both arms' mean curve)", *(f"{m} to target: base vs XGrad median (reached), p" for m in TIME_MEASURES),
    "val AUC (mean over epochs): base / XGrad", "Δ val AUC [95% CI]", "AUC verdict",
    "val change over the last quarter (mean curve): base / XGrad", "epochs", "optimizer steps", "wall time s (base / XGrad)", "scale", "hardware",
]  # fmt: skip

#: the per-optimizer summary table's columns
SUMMARY_COLUMNS = [
    "optimizer", "comparisons", "better", "worse", "equivalent", "no clear difference", "too few seeds",
    "pooled effect g [95% CI]", "cells favouring XGrad / baseline", "BH-significant (better / worse)", "verdict",
]  # fmt: skip


def markdown_table(frame: pd.DataFrame) -> str:
    """``frame`` as a GitHub-flavoured Markdown table: every cell as given, unpadded, ``|`` escaped.

    Cells are shown as the strings they are (no re-parsing of numbers), and
    rows are not padded to column width, so a row reads the same whatever its
    neighbours hold.
    """
    text = frame.astype(str).replace(r"\|", r"\\|", regex=True)
    return text.to_markdown(index=False, disable_numparse=True, stralign=None, numalign=None)


def benchmark_page(title: str, method: Sequence[str], table: pd.DataFrame, not_measured: Sequence[str]) -> str:
    """A benchmark's page (scripts/bench_*.py): how it measured, the table, and what it could not measure."""
    skipped = [f"- {line}" for line in not_measured] or ["None."]
    return "\n".join([f"# {title}", "", *method, "", markdown_table(table), "", "## Not measured", "", *skipped, ""])


def spread(blocks: Sequence[float]) -> float:
    """How far a benchmark's repeated blocks differ, (largest − smallest) / median in percent: its noise column."""
    return 100 * (max(blocks) - min(blocks)) / statistics.median(blocks)


def render(runs: list[Run], title: str, notes: Iterable[str] = ()) -> str:
    """The whole Markdown document for ``runs``: header, table, summary, verdicts, left-out runs, notes."""
    cells = group_cells(runs)
    rows = compare(cells)
    summaries = summarise(rows)
    lines = [
        f"# {title}",
        "",
        *header(rows),
        *incomplete(runs),
        "",
        markdown_table(comparison_frame(rows)),
        "",
        "## Details",
        "",
        "The same comparisons, row for row: the tests behind each verdict, and how the runs were made.",
        "",
        markdown_table(details_frame(rows)),
        "",
        "## Summary",
        "",
        markdown_table(summary_frame(summaries)) if summaries else "No comparison.",
        "",
        "## Verdict",
        "",
        *verdict_lines(summaries),
        "",
        "## Missing or failed runs",
        "",
        *left_out(runs, cells),
        "",
    ]
    notes = list(notes)
    if notes:
        lines += ["## Notes", "", *(f"- {line}" for line in notes), ""]
    return "\n".join(lines)


def header(rows: Sequence[Comparison]) -> list[str]:
    """What the numbers in the table are: basis, seeds, interval, verdict rule, convergence, schedule length."""
    ns = sorted({row.result.n for row in rows if row.pairs})
    seeds = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}" if ns else "0"
    bases = {row.basis for row in rows if row.pairs}
    selected = "the test metric at the epoch selected on validation (the first epoch with the best validation value)"
    without = "runs that did not record it (written before the engine did, or data without a test split)"
    if bases == {BASIS_VAL}:
        basis = f"**Basis**: the best validation value, not {selected}: these are {without}."
    elif BASIS_VAL in bases:
        basis = (
            f"**Basis**: {selected}. Rows whose basis says \"{BASIS_VAL}\" hold {without};"
            " they compare the best validation value instead."
        )
    else:
        basis = f"**Basis**: {selected}."
    lines = [
        basis,
        f"**Seeds**: n = {seeds} complete seed pair(s) per row (the XGrad and baseline runs of a pair share the seed);"
        " baseline and XGrad are mean ± sample std over those pairs.",
        f"**Interval**: Δ is XGrad − baseline per pair, averaged; [low, high] is its {100 * (1 - ALPHA):.0f}% t"
        " interval (scipy.stats.ttest_rel). **Verdict**: `better` or `worse` (in the metric's direction) only when the interval"
        " excludes 0; `equivalent` when its 90% interval lies inside the metric's equivalence margin, declared before"
        f" the runs ({_margins()}; two one-sided tests at α = 0.05); `no clear difference` otherwise; `too few seeds`"
        f" below {MIN_PAIRS} pairs (no interval). The details give each row's 90% interval against its margin and the"
        " smallest difference the paired t-test would detect with 80% power at its seeds' spread; a row whose pairs"
        " all differ by the same amount is degenerate (no test) and says so."
        f" p (BH): the paired-t p-values adjusted for the {sum(row.result.p is not None for row in rows)} row(s) with"
        " one (Benjamini–Hochberg).",
        "**Figure verdict** (Summary, Verdict): each cell's paired differences as a standardised effect (Hedges' g,"
        " positive favours XGrad), pooled over the optimizer's cells by a random-effects model (each cell weighted by"
        " its precision; between-cell variance τ² by Paule–Mandel; 95% t interval on cells − 1 degrees of freedom):"
        " `XGrad better` when the interval lies above 0, `XGrad worse` below, `inconclusive` otherwise or under two"
        " cells; degenerate cells and cells under three pairs are left out and counted. The plain count of cells"
        " favouring each arm is given beside it.",
        "**Time to target**: each cell's target is fixed without either arm's own best: the validation value"
        f" {100 * TARGET_FRACTION:.0f}% of the way from the first epoch to the best of the mean curve over all runs of"
        " both arms. Every run is timed to the first epoch that reaches it, in epochs, optimizer steps and seconds"
        " (training and evaluation, XGrad's overhead included); a run that never does is kept as censored (slower"
        " than any that did), so a median is \"never\" when over half did not; p: Wilcoxon signed-rank test of the"
        " paired times, censored ones ranked last. **Val AUC**: the mean of the validation"
        " metric over the epochs both runs of a pair have (area under the curve per epoch), with its own paired"
        " interval and verdict. **Plateau**: each arm's mean validation curve's relative change across the last"
        " quarter of its epochs (the last ⌈epochs/4⌉, from the first to the last of them; — when that is one epoch);"
        f" `flat` when both arms moved less than {100 * PLATEAU:g}%, the criterion for a run trained to its plateau.",
    ]
    lines += [f"**Schedule**: {line}" for line in schedule_lines(rows)]
    return [f"- {line}" for line in lines]


def _margins() -> str:
    shown = [f"{metric} ±{size:g} points" if kind == "points" else f"{metric} ±{100 * size:g}% of the baseline's mean"
             for metric, (size, kind) in MARGINS.items()]  # fmt: skip
    return ", ".join(shown)


def schedule_lines(rows: Sequence[Comparison]) -> list[str]:
    """"these runs measure the first N epochs of a schedule whose paper length is M", per distinct (N, M)."""
    spans: dict[tuple[int, int], list[str]] = {}
    for row in rows:
        for run in (run for pair in row.pairs for run in pair):
            if run.paper_epochs and run.epochs and run.epochs < run.paper_epochs:
                cell = f"{row.cell.data} · {row.cell.model}"
                names = spans.setdefault((run.epochs, run.paper_epochs), [])
                if cell not in names:
                    names.append(cell)
    if len(spans) == 1:
        [(epochs, paper)] = spans
        return [f"these runs measure {_first(epochs, paper)}."]
    return [
        f"the runs of {', '.join(cells)} measure {_first(epochs, paper)}."
        for (epochs, paper), cells in sorted(spans.items())
    ]


def _first(epochs: int, paper: int) -> str:
    return (f"the first {epochs} epochs of a schedule whose paper length is {paper} epochs (the optimizer steps they"
            " trained are in the details table: a limit on the batches per epoch makes an epoch shorter than the"
            " data's)")  # fmt: skip


def comparison_frame(rows: Sequence[Comparison]) -> pd.DataFrame:
    """One table row per comparison, every cell already formatted."""
    return pd.DataFrame([_row(row) for row in rows], columns=COLUMNS)


def details_frame(rows: Sequence[Comparison]) -> pd.DataFrame:
    """The details of each comparison, in the comparison table's order."""
    return pd.DataFrame([_details(row) for row in rows], columns=DETAIL_COLUMNS)


def _row(row: Comparison) -> list[str]:
    cell, result = row.cell, row.result
    base, ours = row.values
    return [
        cell.data, cell.model, cell.optimizer_setting, "—" if row.steps is None else str(row.steps),
        str(result.n), mean_std(base), mean_std(ours), interval(result), result.verdict,
    ]  # fmt: skip


def _equivalence(result: Paired) -> str:
    if result.degenerate:
        return "degenerate: every pair differs by the same amount (no spread, no test)"
    if result.low90 is None:
        return "—"
    shown = f"{result.mean:+.4g} [{result.low90:+.4g}, {result.high90:+.4g}]"
    return shown + (f" vs ±{result.margin:.4g}" if result.margin is not None else " (no margin declared)")


def _details(row: Comparison) -> list[str]:
    cell, result = row.cell, row.result
    base_runs = [b for b, _ in row.pairs] or cell.baseline
    xgrad_runs = [x for _, x in row.pairs]
    everyone = base_runs + xgrad_runs
    return [
        cell.data, cell.model, cell.optimizer_setting, "—" if row.steps is None else str(row.steps),
        cell.metric, cell.direction, data_variant(everyone), row.basis if row.pairs else "—",
        number(result.p, ".2g"), number(row.p_adjusted, ".2g"), _equivalence(result), number(result.mde, ".3g"),
        f"{mean_std([r.test_best for r in base_runs])} / {mean_std([r.test_best for r in xgrad_runs])}"
        if any(r.test_best is not None for r in everyone) else "—",
        number(row.convergence.target, ".4g") if row.convergence else "—",
        *(_time_to_target(row, measure) for measure in TIME_MEASURES),
        f"{mean_std(row.auc_values[0])} / {mean_std(row.auc_values[1])}" if row.auc else "—",
        interval(row.auc) if row.auc else "—", row.auc.verdict if row.auc else "—", _plateau(row),
        distinct(run.epochs for run in everyone), distinct(run.optimizer_steps for run in everyone),
        f"{_mean(r.wall_time_s for r in base_runs)} / {_mean(r.wall_time_s for r in xgrad_runs)}",
        distinct(run.scale for run in everyone), distinct(run.where for run in everyone),
    ]  # fmt: skip


def _plateau(row: Comparison) -> str:
    """``epochs 8–10: +0.12% / +0.08% (flat)``: each arm's last-quarter change, and whether both are under PLATEAU."""
    base, ours = row.plateau
    if base is None or ours is None:
        return "—"
    flat = "flat" if max(abs(base[2]), abs(ours[2])) < PLATEAU else "still moving"
    return f"epochs {base[0]}–{base[1]}: {100 * base[2]:+.2f}% / {100 * ours[2]:+.2f}% ({flat})"


def _time_to_target(row: Comparison, measure: str) -> str:
    """``b (k/n) vs x (k/n), p = ...``: each arm's median time and how many of its runs reached the target."""
    times = row.convergence.times.get(measure) if row.convergence else None
    if times is None:
        return "—"

    def arm(values: list) -> str:
        median = TimeToTarget.median(values)
        reached = sum(v is not None for v in values)
        return f"{'never' if median is None else f'{median:.4g}'} ({reached}/{len(values)})"

    return f"{arm(times.baseline)} vs {arm(times.xgrad)}, p = {number(times.p, '.2g')}"


def summary_frame(summaries: Sequence[GroupSummary]) -> pd.DataFrame:
    """One row per optimizer (and ``s``): the counts, the across-cell test, the BH count, the verdict."""
    records = []
    for group in summaries:
        test = group.test
        records.append([
            group.label, str(group.compared), str(group.count(BETTER)), str(group.count(WORSE)),
            str(group.count(EQUIVALENT)), str(group.count(NO_CLEAR_DIFFERENCE)), str(group.count(TOO_FEW_SEEDS)),
            "—" if test is None or test.effect is None
            else f"{test.effect:+.3g} [{test.low:+.3g}, {test.high:+.3g}] ({test.cells} cells)",
            "—" if test is None else f"{test.favours_xgrad} / {test.favours_baseline}",
            f"{group.significant(BETTER)} / {group.significant(WORSE)}", group.verdict,
        ])  # fmt: skip
    return pd.DataFrame(records, columns=SUMMARY_COLUMNS)


def verdict_lines(summaries: Sequence[GroupSummary]) -> list[str]:
    """One line per summary group: the verdict in bold, then the numbers it rests on."""
    return [f"- **{group.label}**: {group.verdict} — {group.explanation}" for group in summaries] or [
        "- no completed runs."
    ]


def incomplete(runs: list[Run]) -> list[str]:
    """A header line when runs are not in the statistics (not started, interrupted, failed, ...): a page of a sweep
    that has not finished says so at its top, not only in its last section."""
    counts = Counter(run.status for run in runs if not run.usable)
    if not counts:
        return []
    shown = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return [f"- **Not complete**: runs that are not in the tables: {shown} (each under \"Missing or failed runs\"); "
            "the sweep's command, run again, trains those not started and continues those interrupted."]


def left_out(runs: list[Run], cells: list[Cell]) -> list[str]:
    """Every run not in the statistics, and every seed without its partner.

    The runs include the unreadable records and a sweep's jobs that never
    started (:func:`xgrad.report.readers.load_runs`), each described by itself.
    """
    cwd = Path.cwd()
    lines = []
    for run, why in problems(runs):
        where = run.path if str(run.path).startswith("wandb:") else os.path.relpath(run.path, cwd)
        seed = "?" if run.seed is None else run.seed
        what = run.described or f"{run.data} · {run.model} · {run.optimizer} · {run.arm} · seed {seed}"
        lines.append(f"- `{where}` ({what}): {why}")
    lines += [f"- {line}; not counted" for cell in cells for line in unpaired_seeds(cell)]
    return lines or ["None: every run completed and every seed has its pair."]


def data_variant(runs: Sequence[Run]) -> str:
    """What the runs read: the variant and its (train / val / test) sizes; "not recorded" for older runs."""
    shown = []
    for run in runs:
        if run.data_variant is None and run.data_sizes is None:
            text = "not recorded"
        else:
            text = run.data_variant or run.data
            sizes = run.data_sizes or {}
            if sizes:
                counts = " / ".join(
                    "—" if sizes.get(split) is None else f"{sizes[split]:,}" for split in ("train", "val", "test")
                )
                text += f" ({counts}{' ' + sizes['unit'] if sizes.get('unit') else ''})"
            limit, batch = run.config.get("trainer.limit_val_batches"), run.config.get("data.eval_batch_size")
            unit = sizes.get("unit") or "units"
            if run.evaluated:  # what the engine counted
                counts = " / ".join(f"{run.evaluated[s]:,}" if s in run.evaluated else "—" for s in ("val", "test"))
                text += f", evaluated on {counts} (val / test) {unit}"
            elif limit is not None:  # the engine evaluates at most this many batches of each split
                text += f", evaluated on at most {limit} batch(es) of {batch if batch is not None else '?'} per split"
        if text not in shown:
            shown.append(text)
    return "; ".join(shown) if shown else "—"


def interval(result: Paired | None) -> str:
    """``+mean [low, high]``; the mean alone below three pairs; "—" without pairs."""
    if result is None or result.mean is None:
        return "—"
    if result.low is None:
        return f"{result.mean:+.4g} (no interval)"
    return f"{result.mean:+.4g} [{result.low:+.4g}, {result.high:+.4g}]"


def mean_std(values: Iterable[float | None]) -> str:
    """Mean ± sample std (std from two values up); "—" when there is none."""
    present = [v for v in values if v is not None]
    if not present:
        return "—"
    if len(present) < 2:
        return number(present[0])
    return f"{number(float(np.mean(present)))} ± {number(float(np.std(present, ddof=1)))}"


def distinct(values: Iterable) -> str:
    present = sorted({str(value) for value in values if value is not None})
    return ", ".join(present) if present else "—"


def number(value: float | None, spec: str = ".4g") -> str:
    return "—" if value is None else format(value, spec)


def _mean(values: Iterable[float | None]) -> str:
    """The mean to one decimal (wall times), "—" without values."""
    present = [v for v in values if v is not None]
    return number(float(np.mean(present)), ".1f") if present else "—"


__all__ = [
    "BASIS_TEST", "BASIS_VAL", "COLUMNS", "SUMMARY_COLUMNS", "comparison_frame", "header", "markdown_table", "render",
    "summary_frame", "verdict_lines",
]  # fmt: skip

"""Baseline-versus-XGrad table (Markdown) from any set of run or sweep directories.

    python scripts/make_tables.py multirun/2025-01-01/12-00-00 --out results/adam.md
    python scripts/make_tables.py outputs/run_a outputs/run_b --title "Demo"
    python scripts/make_tables.py --wandb my-team/xgrad-repro --experiment adam

One row per cell (data, model, optimizer) and XGrad step ``s``: the best
validation metric of the baseline and of XGrad as mean ± sample std over seeds,
their difference said as better or worse in the metric's own direction, how
many paired seeds XGrad won, the final values, epochs, wall time, scale and
hardware. Then one verdict line per optimizer, and every run that did not count
(failed, died without a summary, duplicate, unpaired seed) with its reason.
The table is printed and, with ``--out`` (or when all runs name one
experiment: ``results/<experiment>.md``), written to a file. With ``--wandb`` the
runs are read from a W&B project instead of run directories (xgrad.reports.load_wandb_runs).
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path

from xgrad.reports import (
    Cell, Run, group_cells, is_better, load_runs, load_wandb_runs, mean_std, paired_wins, problems, unpaired_seeds,
)

COLUMNS = [
    "data", "model", "optimizer", "s", "metric", "direction", "runs (base / XGrad)",
    "baseline best", "XGrad best", "Δ XGrad − baseline", "XGrad wins (paired seeds)",
    "baseline final", "XGrad final", "epochs", "wall time s (base / XGrad)", "scale", "hardware",
]  # fmt: skip


def main(argv: list[str] | None = None) -> str:
    """Parse the command line, write the table where asked, print it, and return it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", help="run directories or sweep directories holding them")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from this W&B project instead")
    parser.add_argument("--experiment", help="with --wandb: only the runs tagged with this experiment name")
    parser.add_argument("--out", help="Markdown file to write (default: results/<experiment>.md when known)")
    parser.add_argument("--title", help="heading of the table (default: the experiment name)")
    args = parser.parse_args(argv)

    if bool(args.dirs) == bool(args.wandb):
        parser.error("give run directories or --wandb ENTITY/PROJECT, not both or neither")
    if args.experiment and not args.wandb:
        parser.error("--experiment selects W&B runs: use it with --wandb")
    try:
        runs = load_wandb_runs(args.wandb, args.experiment) if args.wandb else load_runs(args.dirs)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))  # one line and exit status 2, before anything is written
    experiments = {run.experiment for run in runs if run.experiment}
    experiment = experiments.pop() if len(experiments) == 1 else None
    title = args.title or (f"XGrad vs baseline: {experiment}" if experiment else "XGrad vs baseline")
    text = render(runs, title)
    out = args.out or (f"results/{experiment}.md" if experiment else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)
    return text


def render(runs: list[Run], title: str) -> str:
    """The whole Markdown document: table, verdicts, and what was left out."""
    cells = group_cells(runs)
    rows = [row for cell in cells for row in _rows(cell)]
    lines = [
        f"# {title}",
        "",
        "Best validation metric per run, mean ± sample std over seeds (std from two seeds up).",
        "Δ is XGrad − baseline on those means; a win is a seed whose XGrad run beats the baseline run of the same seed.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "## Verdict",
        "",
        *_verdicts(cells),
        "",
        "## Missing or failed runs",
        "",
        *_left_out(runs, cells),
        "",
    ]
    return "\n".join(lines)


def _rows(cell: Cell) -> list[list[str]]:
    """One row per XGrad step of the cell (one row with empty XGrad columns if it has none)."""
    arms = cell.xgrad.items() if cell.xgrad else [(None, [])]
    rows = []
    for steps, xgrad in arms:
        wins, pairs = paired_wins(cell.baseline, xgrad, cell.mode)
        base_wall, xgrad_wall = _mean_of(cell.baseline, "wall_time_s"), _mean_of(xgrad, "wall_time_s")
        everyone = cell.baseline + xgrad
        rows.append([
            cell.data, cell.model, cell.optimizer, "—" if steps is None else str(steps),
            cell.metric, cell.direction, f"{len(cell.baseline)} / {len(xgrad)}",
            _summary(cell.baseline, "best"), _summary(xgrad, "best"), _difference(cell, xgrad),
            f"{wins} / {pairs}" if pairs else "—",
            _summary(cell.baseline, "final"), _summary(xgrad, "final"),
            _distinct(run.epochs for run in everyone),
            f"{_number(base_wall, '.1f')} / {_number(xgrad_wall, '.1f')}",
            _distinct(run.scale for run in everyone), _distinct(run.hardware for run in everyone),
        ])  # fmt: skip
    return rows


def _verdicts(cells: list[Cell]) -> list[str]:
    """Per optimizer: in how many comparisons XGrad's mean is better, and how many paired seeds it won."""
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])  # better, worse, tied, wins, pairs
    for cell in cells:
        for xgrad in cell.xgrad.values():
            counts = tally[cell.optimizer]
            if cell.baseline and xgrad:
                base, xg = mean_std([r.best for r in cell.baseline])[0], mean_std([r.best for r in xgrad])[0]
                better = is_better(xg, base, cell.mode)
                worse = is_better(base, xg, cell.mode)
                counts[0 if better else 1 if worse else 2] += 1
            wins, pairs = paired_wins(cell.baseline, xgrad, cell.mode)
            counts[3] += wins
            counts[4] += pairs
    lines = []
    for optimizer in sorted({cell.optimizer for cell in cells}):
        better, worse, tied, wins, pairs = tally[optimizer]
        compared = better + worse + tied
        if not compared:
            lines.append(f"- **{optimizer}**: no complete baseline/XGrad pair to compare.")
            continue
        verdict = "XGrad better" if better > worse else "XGrad worse" if worse > better else "no clear winner"
        lines.append(
            f"- **{optimizer}**: {verdict} — XGrad's mean is better in {better} of {compared} comparison(s), "
            f"worse in {worse}" + (f", tied in {tied}" if tied else "") + f"; XGrad won {wins} of {pairs} paired seed(s)."
        )
    return lines or ["- no completed runs."]


def _left_out(runs: list[Run], cells: list[Cell]) -> list[str]:
    """Every run not in the statistics, and every seed without its partner."""
    cwd = Path.cwd()
    lines = []
    for run, why in problems(runs):
        where = os.path.relpath(run.path, cwd)
        seed = "?" if run.seed is None else run.seed
        lines.append(f"- `{where}` ({run.data} · {run.model} · {run.optimizer} · {run.arm} · seed {seed}): {why}")
    lines += [f"- {line}" for cell in cells for line in unpaired_seeds(cell)]
    return lines or ["None: every run completed and every seed has its pair."]


def _summary(runs: list[Run], attribute: str) -> str:
    values = [getattr(run, attribute) for run in runs if getattr(run, attribute) is not None]
    if not values:
        return "—"
    mean, std = mean_std(values)
    return _number(mean) if std is None else f"{_number(mean)} ± {_number(std)}"


def _difference(cell: Cell, xgrad: list[Run]) -> str:
    if not cell.baseline or not xgrad:
        return "—"
    base, xg = mean_std([r.best for r in cell.baseline])[0], mean_std([r.best for r in xgrad])[0]
    better = is_better(xg, base, cell.mode)
    word = "tie" if xg == base else "direction unknown" if better is None else "better" if better else "worse"
    return f"{xg - base:+.4g} ({word})"


def _mean_of(runs: list[Run], attribute: str) -> float | None:
    values = [getattr(run, attribute) for run in runs if getattr(run, attribute) is not None]
    return mean_std(values)[0] if values else None


def _distinct(values) -> str:
    present = sorted({str(value) for value in values if value is not None})
    return ", ".join(present) if present else "—"


def _number(value: float | None, spec: str = ".4g") -> str:
    return "—" if value is None else format(value, spec)


if __name__ == "__main__":
    main()

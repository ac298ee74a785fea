"""Paired validation curves, baseline versus XGrad, from any set of run or sweep directories.

    python scripts/plot_curves.py multirun/2025-01-01/12-00-00 --out results/adam/

One PNG per cell (data, model, optimizer): the validation metric over epochs
for the baseline and for XGrad at each step ``s``, each as the mean over seeds
with a min–max band, titled with the metric and which way is better; plus
``overview.png``, every cell in one grid. Only completed runs are drawn —
``scripts/make_tables.py`` lists the others. The output folder defaults to
``results/<experiment>/`` when all runs name one experiment.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: works on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from xgrad.reports import Cell, Run, group_cells, load_runs  # noqa: E402


def main(argv: list[str] | None = None) -> list[Path]:
    """Parse the command line, draw every cell and the overview, and return the PNG paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run directories or sweep directories holding them")
    parser.add_argument("--out", help="folder for the PNGs (default: results/<experiment>/ when known)")
    args = parser.parse_args(argv)

    try:
        runs = load_runs(args.dirs)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))  # one line and exit status 2, before anything is written
    experiments = {run.experiment for run in runs if run.experiment}
    if args.out is None and len(experiments) != 1:
        parser.error("--out is needed: the runs do not name one experiment")
    out = Path(args.out or f"results/{experiments.pop()}")
    cells = group_cells(runs)
    if not cells:
        parser.error(f"no completed run with a validation metric under {' '.join(args.dirs)}")
    out.mkdir(parents=True, exist_ok=True)

    written = []
    for cell in cells:
        figure, axes = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
        draw(axes, cell)
        axes.set_title(f"{cell.title}\nval/{cell.metric} ({cell.direction})")
        written.append(_save(figure, out / f"{_slug(cell)}.png"))

    columns = min(3, len(cells))
    rows = math.ceil(len(cells) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False, layout="constrained")
    for axes, cell in zip(grid.flat, cells):
        draw(axes, cell)
        axes.set_title(f"{cell.title}\nval/{cell.metric} ({cell.direction})", fontsize=10)
    for axes in grid.flat[len(cells) :]:
        axes.set_visible(False)
    figure.suptitle(f"Baseline vs XGrad{': ' + ', '.join(sorted(experiments)) if experiments else ''}")
    written.append(_save(figure, out / "overview.png"))
    for path in written:
        print(path)
    return written


def draw(axes, cell: Cell) -> None:
    """The baseline and every XGrad arm of one cell on ``axes``: mean line, min–max band over seeds."""
    arms = [("baseline", cell.baseline, "black")]
    colours = plt.get_cmap("tab10").colors
    arms += [(f"XGrad s={steps}", runs, colours[i % 10]) for i, (steps, runs) in enumerate(cell.xgrad.items())]
    for label, runs, colour in arms:
        epochs, mean, low, high = _band(runs)
        if not len(epochs):
            continue
        axes.plot(epochs, mean, color=colour, marker="o" if len(epochs) < 15 else None, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            axes.fill_between(epochs, low, high, color=colour, alpha=0.2, linewidth=0)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(f"val/{cell.metric}")
    axes.grid(alpha=0.3)
    several = any(len(runs) > 1 for _, runs, _ in arms)
    axes.legend(fontsize=8, title="mean; band: min–max over seeds" if several else None, title_fontsize=8)


def _band(runs: list[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs and the mean, min and max over the runs that reached each epoch."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for epoch, value in run.curve:
            by_epoch.setdefault(epoch, []).append(value)
    epochs = np.array(sorted(by_epoch))
    values = [np.array(by_epoch[e]) for e in epochs]
    return epochs, *(np.array([reduce(v) for v in values]) for reduce in (np.mean, np.min, np.max))


def _slug(cell: Cell) -> str:
    parts = [cell.data, cell.model, cell.optimizer] + ([cell.scale] if cell.scale else [])
    return re.sub(r"[^\w.-]+", "_", "-".join(parts))


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()

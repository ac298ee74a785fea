"""Validation curves, baseline versus XGrad, as PNGs: one per cell and an overview of all cells.

Each arm of a cell is drawn as its mean over seeds with a shaded band: the 95%
t interval of that mean across seeds at each epoch (no band from a single
seed), so two arms whose bands overlap throughout are not told apart by the
plot either. Only completed runs are drawn; the table lists the others.
Used by ``scripts/plot_curves.py`` and the end-of-sweep callback
(``xgrad.callbacks.SweepReports``). matplotlib runs on its file-only Agg
backend, so this works on servers and in tests.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from xgrad import atomic  # noqa: E402
from xgrad.report.runs import Cell, Run  # noqa: E402
from xgrad.report.stats import CONFIDENCE, mean_interval  # noqa: E402

BAND = f"mean over seeds; band: {100 * CONFIDENCE:.0f}% t interval of the mean"


def write_plots(cells: list[Cell], out: Path, title: str) -> list[Path]:
    """``<out>/<cell>.png`` for every cell and ``<out>/overview.png``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for cell in cells:
        figure, axes = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
        draw(axes, cell)
        axes.set_title(f"{cell.title}\nval/{cell.metric} ({cell.direction})")
        written.append(_save(figure, out / f"{slug(cell)}.png"))

    columns = min(3, len(cells))
    rows = math.ceil(len(cells) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False, layout="constrained")
    for axes, cell in zip(grid.flat, cells):
        draw(axes, cell)
        axes.set_title(f"{cell.title}\nval/{cell.metric} ({cell.direction})", fontsize=10)
    for axes in grid.flat[len(cells) :]:
        axes.set_visible(False)
    figure.suptitle(f"{title}\n({BAND})", fontsize=11)
    written.append(_save(figure, out / "overview.png"))
    return written


def draw(axes, cell: Cell) -> None:
    """The baseline and every XGrad arm of one cell on ``axes``: mean line and interval band over seeds."""
    arms = [("baseline", cell.baseline, "black")]
    colours = plt.get_cmap("tab10").colors
    arms += [(f"XGrad s={steps}", runs, colours[i % 10]) for i, (steps, runs) in enumerate(cell.xgrad.items())]
    for label, runs, colour in arms:
        epochs, mean, low, high = band(runs)
        if not len(epochs):
            continue
        marker = "o" if len(epochs) < 15 else None
        axes.plot(epochs, mean, color=colour, marker=marker, label=f"{label} (n={len(runs)})")
        drawn = ~np.isnan(low)
        if drawn.any():
            axes.fill_between(epochs, low, high, where=drawn, color=colour, alpha=0.2, linewidth=0)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(f"val/{cell.metric}")
    axes.grid(alpha=0.3)
    several = any(len(runs) > 1 for _, runs, _ in arms)
    axes.legend(fontsize=8, title=BAND if several else None, title_fontsize=8)


def band(runs: list[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, and per epoch the mean over the runs that reached it with its 95% t interval (NaN from one run)."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for epoch, value in run.curve:
            by_epoch.setdefault(epoch, []).append(value)
    epochs = np.array(sorted(by_epoch))
    mean, low, high = [], [], []
    for epoch in epochs:
        values = by_epoch[epoch]
        middle, bottom, top = mean_interval(values) or (values[0], np.nan, np.nan)  # one run: no interval
        mean.append(middle)
        low.append(bottom)
        high.append(top)
    return epochs, np.array(mean), np.array(low), np.array(high)


def slug(cell: Cell) -> str:
    """A file name per cell: cells told apart by a setting get distinct names."""
    setting = [f"{key}={value}" for key, value in cell.setting]
    parts = [cell.data, cell.model, cell.optimizer, *setting] + ([cell.scale] if cell.scale else [])
    return re.sub(r"[^\w.-]+", "_", "-".join(parts))


def _save(figure, path: Path) -> Path:
    """Write the figure as a PNG in one rename (a killed process never leaves half a plot), then close it."""
    atomic.replace(path, lambda f: figure.savefig(f, format="png", dpi=120))
    plt.close(figure)
    return path

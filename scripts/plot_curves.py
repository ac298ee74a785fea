"""Paired validation curves, baseline versus XGrad, from any set of run or sweep directories.

    python scripts/plot_curves.py multirun/2025-01-01/12-00-00 --out results/adam/

One PNG per cell (data, model, optimizer, scale): the validation metric over
epochs for the baseline and for XGrad at each step ``s``, each as the mean over
seeds with a band, the 95% t interval of that mean; plus ``overview.png``,
every cell in one grid. Drawn by :func:`xgrad.report.plots.write_plots`, as at
the end of a sweep. Only completed runs are drawn — ``scripts/make_tables.py``
lists the others. The output folder defaults to ``results/<experiment>/`` when
all runs name one experiment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xgrad.report import UNREADABLE, group_cells, load_runs
from xgrad.report.plots import write_plots


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
    for run in runs:
        if run.status == UNREADABLE:
            print(f"{parser.prog}: warning: unreadable, not drawn: {run.path}: {run.reason}", file=sys.stderr)
    experiments = {run.experiment for run in runs if run.experiment}
    if args.out is None and len(experiments) != 1:
        parser.error("--out is needed: the runs do not name one experiment")
    out = Path(args.out or f"results/{next(iter(experiments))}")
    cells = group_cells(runs)
    if not cells:
        parser.error(f"no completed run with a validation metric under {' '.join(args.dirs)}")
    title = f"Baseline vs XGrad{': ' + ', '.join(sorted(experiments)) if experiments else ''}"
    written = write_plots(cells, out, title)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()

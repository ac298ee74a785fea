"""Baseline-versus-XGrad table (Markdown) from any set of run or sweep directories.

    python scripts/make_tables.py multirun/2025-01-01/12-00-00 --out results/adam.md
    python scripts/make_tables.py outputs/run_a outputs/run_b --title "Demo"
    python scripts/make_tables.py --wandb my-team/xgrad-repro --experiment adam

One row per cell (data, model, optimizer, scale) and XGrad step ``s``: the
paired difference XGrad − baseline over seeds with its 95% interval and a
verdict (``better`` / ``worse`` / ``no clear difference`` / ``too few seeds``),
convergence speed and the area under the validation curve; then a summary and
a verdict per optimizer, and every run that did not count with its reason:
among them each job that a sweep directory's ``multirun.yaml`` defined but no
run directory holds, and each run directory with a record that cannot be read
(also named on stderr). The document is :func:`xgrad.report.tables.render`'s,
the same the end-of-sweep callback writes. It is printed and, with ``--out``
(or when all runs name one experiment: ``results/<experiment>.md``), written
to a file, and its raw data (``runs.csv``, ``curves.csv``, xgrad/report/raw.py)
into the folder of its name (``results/mine.md`` → ``results/mine/``). Given that
folder instead of run directories, the page is rebuilt from its raw data alone.
With ``--wandb`` the runs are read from a W&B project instead of run
directories (:func:`xgrad.report.load_wandb_runs`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xgrad import atomic
from xgrad.report import UNREADABLE, load_runs, load_wandb_runs, raw
from xgrad.report.tables import render


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
    raw_folders = [Path(d) for d in args.dirs if (Path(d) / raw.RUNS).is_file()]
    if raw_folders and len(raw_folders) != len(args.dirs):
        parser.error("give folders of raw data (runs.csv) or run directories, not both")
    try:
        if raw_folders:  # a page's raw data: the page again, from those files alone
            if len(raw_folders) != 1:
                parser.error("give one folder of raw data (runs.csv) at a time")
            text = raw.rebuild(raw_folders[0], args.title)
            runs, experiment = raw.read(raw_folders[0]), None
        else:
            runs = load_wandb_runs(args.wandb, args.experiment) if args.wandb else load_runs(args.dirs)
            experiments = {run.experiment for run in runs if run.experiment}
            experiment = experiments.pop() if len(experiments) == 1 else None
            title = args.title or (f"XGrad vs baseline: {experiment}" if experiment else "XGrad vs baseline")
            text = render(runs, title)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))  # one line and exit status 2, before anything is written
    for run in runs:
        if run.status == UNREADABLE:  # listed in the table too, with the runs that did not count
            print(f"{parser.prog}: warning: unreadable, not counted: {run.path}: {run.reason}", file=sys.stderr)
    out = args.out or (f"results/{experiment}.md" if experiment else None)
    if out and not raw_folders:  # the page, and its raw data in the folder of its name
        text = raw.publish(runs, Path(out), title, relative_to=Path.cwd())
    elif out:
        atomic.write_text(Path(out), text)
    print(text)
    return text


if __name__ == "__main__":
    main()

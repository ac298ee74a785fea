"""Run directories → statistics → tables and plots: what a sweep's ``results/<figure>.md`` says.

The tables are the product of this suite: a researcher reads them to learn
whether XGrad beats the base optimizer. So a verdict is a statistic, not the
sign of a difference of means (docs/design.md), and all
of it lives here, once, for every caller (``scripts/make_tables.py``,
``scripts/plot_curves.py``, the end-of-sweep callback
``xgrad.callbacks.SweepReports``, ``scripts/bench_overhead.py``):

- :mod:`xgrad.report.runs` holds the records, :class:`Run` and :class:`Cell`;
- :mod:`xgrad.report.readers` reads run directories, a sweep's job list (or
  W&B runs) into run records;
- :mod:`xgrad.report.cells` groups them into cells and lists the runs left
  out (failed, missing, repeated) and the seeds without their pair;
- :mod:`xgrad.report.stats` holds the statistics on plain numbers (paired t
  interval and verdict, a pooled estimate across cells, Benjamini–Hochberg, convergence);
- :mod:`xgrad.report.compare` pairs runs by seed and turns cells into
  comparisons and per-optimizer summaries;
- :mod:`xgrad.report.tables` renders them as Markdown through the one
  renderer, :func:`xgrad.report.tables.markdown_table` (pandas);
- :mod:`xgrad.report.plots` draws the curves (matplotlib, imported only there).

Only the records, the readers and the grouping are imported with the
package; pandas, scipy and matplotlib load when used.
"""

from xgrad.report.cells import group_cells, problems, unpaired_seeds
from xgrad.report.readers import find_run_dirs, load_run, load_runs, load_wandb_runs, sweep_jobs, unstarted_jobs
from xgrad.report.runs import NOT_STARTED, UNREADABLE, Cell, Run

__all__ = [
    "NOT_STARTED", "UNREADABLE", "Cell", "Run", "find_run_dirs", "group_cells", "load_run", "load_runs",
    "load_wandb_runs", "problems", "sweep_jobs", "unpaired_seeds", "unstarted_jobs",
]  # fmt: skip

"""Hydra callbacks of the paper-figure sweeps (registered by conf/sweep/figure.yaml).

- :class:`SweepReports` refuses a figure at a scale it has no cells for, and
  writes the figure's table and plots when its sweep ends.
- :class:`OneGpuPerProcess` spreads the worker processes of a parallel launcher
  over the GPUs of one machine, one GPU each.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import sys
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def require_cells(config: DictConfig) -> None:
    """Exit with one line when the figure lists no cells at the chosen scale.

    A figure names its cells per scale (``cells.<scale>``); ``null`` there means
    the scale has none, with the reason beside it in the experiment file (at
    quick scale, ``cifar100`` would only repeat ``cifar10``'s Fashion-MNIST
    cells). Without this check the sweeper fails on ``${cells.${scale}}`` with a
    page of OmegaConf internals. It exits rather than raises: Hydra turns an
    exception in a callback into a warning and goes on.
    """
    cells, scale = config.get("cells"), config.get("scale")
    if cells is None or scale is None or cells.get(scale) is not None:
        return
    experiment = config.hydra.runtime.choices.get("experiment")
    known = ", ".join(name for name, listed in cells.items() if listed is not None)
    print(
        f"error: experiment={experiment} has no cells at scale={scale} (it has: {known}); "
        f"experiments/{experiment}.yaml says why under cells.{scale}",
        file=sys.stderr,
    )
    raise SystemExit(2)


class SweepReports(Callback):
    """At the end of a multirun: ``<results>/<experiment>.md`` and ``<results>/<experiment>/*.png``.

    The table is :func:`xgrad.report.tables.render`'s (the document
    ``scripts/make_tables.py`` writes), followed by this scale's ``notes``
    (cells a scale leaves out, and why); the plots are
    :func:`xgrad.report.plots.write_plots`'s (as ``scripts/plot_curves.py``).
    The report modules (pandas, scipy, matplotlib) load only when a sweep ends.
    Both read the whole sweep directory, so a sweep run in several pieces (one
    process per GPU, or a rerun after a crash) ends with one complete table.

    Hydra skips ``on_multirun_end`` when a job failed: the sweeper re-raises the
    job's error first. A table that lists the failure is what is wanted then, so
    the reports are also written when the process exits without the sweep
    having ended normally.

    A sweep run by every process of a torchrun launch (each job trained by all
    of them together, xgrad/distributed.py) is reported by rank 0 alone.
    """

    def __init__(self, results: str, notes: dict[str, list[str]] | None = None):
        self.results = Path(results)
        self.notes = {scale: list(lines) for scale, lines in (notes or {}).items()}
        self._pending: tuple[str, str, str | None, dict | None] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        require_cells(config)
        if _rank() != 0:
            return
        self._pending = _describe(config)
        atexit.register(self._write_pending)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self._write_pending)
        self._pending = None
        if _rank() == 0:
            self.write(*_describe(config))

    def _write_pending(self) -> None:
        if self._pending is not None:
            log.warning("the sweep did not end normally; writing its reports with what it left")
            self.write(*self._pending)

    def write(self, sweep_dir: str, experiment: str, scale: str | None, tuned: dict | None = None) -> Path | None:
        """Write the table and the plots of ``sweep_dir``; return the table's path (None: no runs).

        ``tuned``: the ``tuned`` node of experiments/tuned.yaml's final stage, whose lr grid (each arm's
        validation scores and choice) the table's notes then list.
        """
        from xgrad.report import group_cells, load_runs, raw
        from xgrad.report.plots import write_plots
        from xgrad.report.tuning import grid_notes

        try:
            runs = load_runs([sweep_dir])
        except FileNotFoundError as error:
            log.warning("no reports: %s", error)
            return None
        title = f"XGrad vs baseline: {experiment}" + (f" ({scale} scale)" if scale else "")
        table = self.results / f"{experiment}.md"
        notes = self.notes.get(scale or "", [])
        if tuned is not None and tuned.get("stage") == "final":
            notes = [*notes, *grid_notes(Path(tuned["grid_dir"]), [float(f) for f in tuned["grid"]])]
        raw.publish(runs, table, title, notes, relative_to=Path.cwd())
        log.info("table: %s (raw data: %s)", table, table.with_suffix(""))
        cells = group_cells(runs)
        if cells:
            for path in write_plots(cells, self.results / experiment, f"Baseline vs XGrad: {experiment}"):
                log.info("plot: %s", path)
        else:  # no run completed: the table says why
            log.warning("no plots: no run of %s completed", sweep_dir)
        return table


def _rank() -> int:
    """This process's rank in a run trained by several processes (0 when it trains alone)."""
    from xgrad import distributed  # torch loads with the first job, not when Hydra loads its callbacks

    return distributed.launch().rank


def _describe(config: DictConfig) -> tuple[str, str, str | None, dict | None]:
    """(sweep directory, experiment name, scale, the ``tuned`` node if any) of a multirun's config."""
    from omegaconf import OmegaConf

    sweep_dir = str(config.hydra.sweep.dir)
    experiment = config.hydra.runtime.choices.get("experiment") or Path(sweep_dir).name
    tuned = config.get("tuned")
    tuned = {k: OmegaConf.to_container(tuned, resolve=False)[k] for k in ("stage", "grid", "grid_dir")} if tuned else None
    return sweep_dir, experiment, config.get("scale"), tuned


#: this process's GPU lock: (GPU index, the open lock file that holds it), once claimed
_claimed: tuple[int, IO] | None = None


def claim_slot(lock_dir: Path, count: int) -> tuple[int, IO] | None:
    """The first of ``count`` slots no other open lock holds: (index, the lock file to keep open).

    An exclusive ``flock`` on ``<lock_dir>/<index>.lock`` marks a slot taken for
    as long as the file stays open; the OS releases it when the process ends,
    however it ends. None when every slot is taken. (Not ``filelock``: where
    ``flock`` is missing it falls back to a lock file's existence, which a
    killed worker would leave behind, holding its GPU for every later sweep.)
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        handle = open(lock_dir / f"{index}.lock", "w")  # noqa: SIM115 -- kept open: it is the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return index, handle
    return None


class OneGpuPerProcess(Callback):
    """Give each process that runs jobs its own GPU for its whole life.

    A parallel launcher (``hydra/launcher=joblib hydra.launcher.n_jobs=N``) runs
    the jobs in N long-lived worker processes; with ``trainer.device=auto`` each
    would train on GPU 0. Before a process's first job this claims the first GPU
    that no other process of the sweep holds (:func:`claim_slot` on
    ``<sweep dir>/.gpus/``) and makes it the process's current CUDA device,
    which ``auto`` and ``cuda`` then use. Nothing happens with fewer than two
    visible GPUs (SLURM gives each job one), when ``trainer.device`` names a
    device itself, or when the job's processes train one run together (SLURM
    tasks of one job: each takes its local rank's GPU, xgrad/distributed.py).
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _claimed
        if _claimed is not None or config.trainer.device not in ("auto", "cuda"):
            return
        import torch

        from xgrad import distributed

        if distributed.launch().world_size > 1:
            return

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < 2:
            return
        _claimed = claim_slot(Path(config.hydra.sweep.dir) / ".gpus", count)
        if _claimed is None:
            log.warning("all %d GPUs are held by other workers: set hydra.launcher.n_jobs to at most %d", count, count)
            return
        torch.cuda.set_device(_claimed[0])
        log.info("this worker process trains on GPU %d", _claimed[0])

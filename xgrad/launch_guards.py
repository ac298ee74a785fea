"""Hydra callbacks of every run and sweep (conf/config.yaml, ``hydra.callbacks``): what Hydra's own start would get wrong.

- :class:`RunDirIsAFolder`: a ``hydra.run.dir`` or ``hydra.sweep.dir`` that is a
  file (or lies under one) is refused in one line, exit status 2, before Hydra's
  own ``mkdir`` fails on it with a traceback.
- :class:`StopWorkersWithTheSweep`: SIGTERM (or SIGHUP) to the process of a
  sweep whose launcher runs its jobs in worker processes (joblib's loky
  workers) reaches those workers: each finishes its step, writes its checkpoint
  and exits (xgrad/preemption.py); the sweep's process waits for them, then
  exits with 128 + the signal's number, as the workers do. Rerunning the sweep
  resumes every job. Without it the sweep's process exits at once and its
  workers train on, orphaned, holding their run directories' locks.

Only the direct children of the sweep's process that do not ignore the signal
are signalled and waited for (the launcher's workers; a pool's resource tracker
ignores it and ends with the sweep's process): each worker stops its own
children (data loaders) as it exits. Terminal Ctrl-C needs none of this: the terminal sends
SIGINT to the whole process group, workers included.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

#: the signals a scheduler or an operator stops a sweep with (SLURM's scancel, kill, a closed terminal)
FORWARDED = (signal.SIGTERM, signal.SIGHUP)


class RunDirIsAFolder(Callback):
    """Refuse, in one line, a run or sweep directory that is a file or lies under one."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_a_file("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_a_file("hydra.sweep.dir", config.hydra.sweep.dir)


def _refuse_a_file(key: str, value: str) -> None:
    path = Path(value).absolute()
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is a file" if existing == path else f"lies under {existing}, a file"
                print(f"error: {key}={value}: {where}, not a folder; pass another {key}", file=sys.stderr)
                raise SystemExit(2)
            return


class StopWorkersWithTheSweep(Callback):
    """In a sweep's process: forward SIGTERM and SIGHUP to the launcher's workers and wait for them to stop.

    ``wait_s``: how long the sweep's process waits for its workers to write
    their checkpoints before it exits anyway (a scheduler kills what is left
    after its own grace period: SLURM's KillWait is 30 s by default).
    """

    def __init__(self, wait_s: float = 120.0):
        self.wait_s = wait_s
        self._stopping = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in FORWARDED:
                signal.signal(signum, self._forward)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping:  # a second signal while the workers stop: they are stopping already
            return
        self._stopping = True
        deadline = time.monotonic() + self.wait_s
        workers = [child for child in psutil.Process().children() if not _ignores(child, signum)]
        while workers and time.monotonic() < deadline:
            # Again and again: a worker in a job checkpoints and finishes it on the first signal (more are
            # ignored), then, idle in its pool, ends on the next one; a job handed to it meanwhile stops too.
            for worker in workers:
                try:
                    worker.send_signal(signum)
                except psutil.NoSuchProcess:
                    pass
            _, workers = psutil.wait_procs(workers, timeout=0.5)
        if workers:
            print(f"{len(workers)} worker(s) still running {self.wait_s:g} s after {signal.Signals(signum).name}: "
                  f"left to their own stop (pids {', '.join(str(p.pid) for p in workers)})", file=sys.stderr)  # fmt: skip
        raise SystemExit(128 + signum)  # the workers have written their checkpoints: the sweep stops as they did


def _ignores(process: psutil.Process, signum: int) -> bool:
    """Whether ``process`` ignores ``signum`` (a pool's resource tracker does: it ends with its parent), on Linux."""
    try:
        with open(f"/proc/{process.pid}/status") as status:
            ignored = next(int(line.split()[1], 16) for line in status if line.startswith("SigIgn:"))
    except (OSError, StopIteration, ValueError):
        return False  # not Linux, or gone: waited for (at most wait_s)
    return bool(ignored >> (signum - 1) & 1)

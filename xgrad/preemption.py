"""Stopping on a signal without losing work: finish the step, checkpoint mid-epoch, exit to be resumed.

While a run trains, :class:`StopSignals` turns SIGTERM, SIGINT and submitit's
preemption signal (SIGUSR2, or ``$SUBMITIT_PREEMPT_SIGNAL``) into a request
that the engine reads after each optimizer step (and between evaluation
batches). The engine then writes a mid-epoch checkpoint (data position, every
RNG, the running loss sums), sets ``summary.json`` to ``interrupted`` and
raises :class:`Interrupted`; rerunning the same command continues the epoch at
the next batch. A second SIGINT stops at once (KeyboardInterrupt), as Ctrl-C
twice should; a second SIGTERM changes nothing, the first one is being served.

How the job comes back (what was read in submitit 1.5 and
hydra-submitit-launcher 1.2, and what was run here, without a SLURM cluster):

- The submitit launcher submits each job with ``--signal=USR2@<signal_delay_s>``.
  SLURM sends SIGUSR2 that long before the time limit, and at preemption too
  where the cluster sets ``PreemptParameters=send_user_signal``. submitit's
  handler for it, installed before the job starts, pickles the job again
  (``SlurmLauncher.checkpoint``: the same Hydra job), runs ``scontrol requeue``
  and exits; the requeued job runs the same overrides into the same run
  directory and resumes from the checkpoint. :meth:`Interrupted.hand_over`
  calls that handler once the checkpoint is written: no exit code makes
  submitit requeue, its handler does. Checked locally with
  ``hydra/launcher=submitit_local`` (whose handler requeues by exiting with
  code 144, after which its controller restarts the job): SIGUSR2 mid-epoch,
  then the requeued job ends identical to an uninterrupted run.
- submitit ignores SIGTERM (it only logs it). SLURM sends SIGTERM on
  ``scancel``, at preemption and at the time limit (then SIGKILL after
  ``KillWait``/``GraceTime``). Here the run checkpoints and exits with
  128 + the signal's number (143), the code of a process ended by that
  signal; a cluster whose preemption mode is REQUEUE requeues the job itself,
  and the rerun continues from the checkpoint.

A run on several processes (xgrad/distributed.py) stops as one: whichever
rank receives a signal, every rank learns of it at the next step (or the next
evaluation batch) and they stop together, rank 0 writing the one checkpoint.
``torchrun`` forwards the SIGTERM or SIGINT it receives to every process it
started (``--signals-to-handle`` adds SIGUSR2) and kills them
``--shutdown-timeout`` seconds later (30 by default); under submitit every
task receives SIGUSR2, and only the handler of rank 0 requeues the job.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

#: signals no process can catch: a checkpoint cannot be written on them
UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)


def preempt_signal() -> signal.Signals:
    """submitit's preemption signal, as ``$SUBMITIT_PREEMPT_SIGNAL`` names it (submitit reads the same variable).

    A name that is not a signal, or one that cannot be caught (KILL, STOP), is
    refused in one line (ValueError): no checkpoint could be written on it.
    """
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    signum = getattr(signal, "SIG" + name.upper().removeprefix("SIG"), None)
    if not isinstance(signum, signal.Signals):
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL={name!r} names no signal; unset it (submitit's default is USR2)")
    if signum in UNCATCHABLE:
        raise ValueError(
            f"SUBMITIT_PREEMPT_SIGNAL={name!r}: {signum.name} cannot be caught, so no checkpoint could be written "
            "before the job stops; unset it (USR2) or name a signal a process can handle"
        )
    return signum


try:
    PREEMPT_SIGNAL = preempt_signal()
except ValueError:  # refused when a run starts (xgrad/train.py); importing this module never fails
    PREEMPT_SIGNAL = signal.SIGUSR2


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; the message says where, in one line."""

    def __init__(self, signum: int, where: str, previous: Any = None):
        self.signum, self.previous = signum, previous
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; the same command continues it")

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: what a shell (and SLURM) reports for a process ended by that signal."""
        return 128 + self.signum

    def hand_over(self) -> None:
        """Let the handler that was installed before the run (submitit's: requeue the job) act on the signal."""
        if callable(self.previous) and self.previous is not signal.default_int_handler:
            self.previous(self.signum, None)


class StopSignals:
    """``with StopSignals() as stop:`` ... ``stop.requested`` is the first signal received, or None.

    Outside the main thread (where Python cannot install signal handlers)
    it installs nothing and never requests a stop.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, PREEMPT_SIGNAL)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def interrupted(self, where: str, signum: int) -> Interrupted:
        """The exception to raise once the checkpoint is written.

        ``signum``: the signal the ranks of a run agreed to stop on, which this
        process may not have received itself.
        """
        return Interrupted(signum, where, self._previous.get(signum))

"""One run on many processes: PyTorch's process group, set up from what torchrun or SLURM says; rank 0 writes.

A run is data-parallel over ``WORLD_SIZE`` processes, one per GPU (or, on a
CPU, one per core group): each holds the whole model, wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` (DDP), trains on its share
of every global batch, and DDP averages the gradients in the backward pass.
Where a process sits comes from its launcher (:func:`launch`):

- ``torchrun`` exports the ``env://`` variables (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) to every process it starts;
- under SLURM, the submitit launcher (``hydra/launcher=slurm`` with
  ``tasks_per_node`` > 1) starts one task per GPU; submitit's job environment
  (SLURM's ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the node
  list) gives the rank, and :class:`submitit.helpers.TorchDistributedEnvironment`
  exports the same variables, the first node as the rendezvous host;
- anything else (``python -m xgrad.train``, one task per job) is a world of
  one: no process group, no DDP wrapper, exactly the one-process run.

The backend follows the device: ``gloo`` on the CPU; on GPUs ``nccl`` for the
tensors on the device (gradients, the step's totals) with ``gloo`` beside it
for the few objects that live on the host (the run directory, checkpoint
states, stop signals), which is how ``init_process_group`` pairs them.

Every rank builds the same model from the same seed, and DDP copies rank 0's
weights to the others when it wraps the model; after that the random streams
of ranks other than 0 are reseeded apart (:func:`rank_seed`), so that dropout
draws different masks on each rank's share of the batch while rank 0 draws
what a one-process run draws.

Rank 0 alone holds the run directory's lock and writes its files (run record,
metrics, summary, checkpoints, W&B); the other ranks only read the checkpoint
when the run resumes. Whatever one rank decides alone reaches the others
through :meth:`World.from_rank_zero`, and a start that fails on any rank stops
every rank with one line (:class:`RankFailed`) instead of leaving the others
waiting in a collective.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from xgrad.messages import first_line

log = logging.getLogger(__name__)

T = TypeVar("T")


class RankFailed(Exception):
    """Another rank could not start (or refused to): this one stops too; the message is that rank's, in one line."""


@dataclass(frozen=True)
class Launch:
    """Where this process sits in its run, as the launcher's environment says (no process group yet)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str | None = None  # "torchrun" (or anything exporting the env:// variables) | "submitit"


class LaunchRefused(Exception):
    """The launcher's environment cannot be a run (variables left over from another launcher, say); one line."""


def launch() -> Launch:
    """This process's place: torchrun's variables, else submitit's job environment, else a world of one.

    torchrun's variables are checked: integers, a rank inside the world, and
    the rendezvous (``MASTER_ADDR``, ``MASTER_PORT``) of a world of several;
    anything else is :class:`LaunchRefused`, before a process group waits on it.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        given = " ".join(f"{k}={env[k]}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in env)
        try:
            rank, size, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        except ValueError:
            raise LaunchRefused(f"{given}: not integers; unset them, or start the run with torchrun") from None
        if not 0 <= rank < size or local < 0:
            raise LaunchRefused(f"{given}: the rank is not one of the world's; unset them, or start with torchrun")
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if size > 1 and not env.get(k)]
        if missing:
            raise LaunchRefused(
                f"{given} are set but {' and '.join(missing)} not: left over from another launcher? unset them "
                "for a run on one process, or start the run with torchrun"
            )
        return Launch(rank, size, local, "torchrun")
    if env.get("SUBMITIT_EXECUTOR"):
        import submitit

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            return Launch(job.global_rank, job.num_tasks, job.local_rank, "submitit")
    return Launch()


def rank_seed(seed: int, rank: int) -> int:
    """The seed that rank ``rank`` (> 0) draws from once the model is built and shared; rank 0 keeps the run's."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class Step:
    """One optimizer step over every rank, as the engine accumulates it without reading it.

    ``loss_sum`` is the step's mean loss times its samples, summed over the
    ranks (float64, on the loss's device); ``samples`` the samples summed over
    the ranks (an int counted on the host, or a tensor on the device when the
    task counts them there, e.g. target tokens, or when several ranks' counts
    were gathered). Neither is read here: the engine adds them up on the device
    and reads the sums every ``log_every_n_steps`` steps.
    """

    def __init__(self, loss_sum: torch.Tensor, samples: int | torch.Tensor, stop: Any,
                 signals: torch.Tensor | None = None):  # fmt: skip
        self.loss_sum, self.samples = loss_sum, samples
        self._stop, self._signals = stop, signals

    def signal(self, wait: bool = False) -> int | None:
        """The signal to stop on, or None.

        One process: whatever it has received until now (a host value, free
        to read after every step). Several: the first rank's that had received
        one when the ranks exchanged their totals. Those were gathered on the
        loss's device, so on a GPU reading them waits for the device: there
        they are read only when ``wait`` is true (the engine's reads, every
        ``log_every_n_steps`` steps and at the epoch's end, the same steps on
        every rank), and None is returned otherwise. On the CPU (gloo) they
        are read after every step, as one process reads its own.
        """
        if self._signals is None:
            return self._stop.requested
        if self._signals.device.type != "cpu" and not wait:
            return None
        return next((int(value) for value in self._signals.tolist() if value), None)


class World:
    """The ranks of one run, seen from one of them, and the collectives the engine needs.

    A world of one (the default) runs no collective: every method returns
    what one process has.
    """

    def __init__(self, rank: int = 0, size: int = 1, backend: str | None = None):
        self.rank, self.size, self.backend = rank, size, backend

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, backend={self.backend})"

    # ------------------------------------------------------------------ start-up

    def from_rank_zero(self, action: Callable[[], T]) -> T:
        """``action()`` run by rank 0 alone; its value on every rank.

        When it raises, rank 0 raises that error and every other rank
        :class:`RankFailed` with its message.
        """
        if self.size == 1:
            return action()
        outcome: list[Any] = [None]
        error = None
        if self.main:
            try:
                outcome = [(action(), None)]
            except Exception as raised:  # noqa: BLE001 -- whatever it is, the other ranks must hear of it
                error, outcome = raised, [(None, first_line(raised))]
        dist.broadcast_object_list(outcome, src=0)
        value, message = outcome[0]
        if error is not None:
            raise error
        if message is not None:
            raise RankFailed(f"rank 0 stopped: {message}")
        return value

    def on_every_rank(self, action: Callable[[], T]) -> T:
        """``action()`` on every rank; when it raises on one, every rank raises.

        The rank that failed raises its own error, the others
        :class:`RankFailed` naming it, so no rank goes on to wait in a
        collective for one that has stopped.
        """
        if self.size == 1:
            return action()
        error, value = None, None
        try:
            value = action()
        except Exception as raised:  # noqa: BLE001
            error = raised
        messages: list[Any] = [None] * self.size
        dist.all_gather_object(messages, None if error is None else first_line(error))
        if error is not None:
            raise error
        failed = next((rank for rank, message in enumerate(messages) if message is not None), None)
        if failed is not None:
            raise RankFailed(f"rank {failed} stopped: {messages[failed]}")
        return value

    # ------------------------------------------------------------------ training

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model as the ranks train it: DDP around it (the model itself in a world of one).

        DDP copies rank 0's parameters and buffers to every rank here, and
        all-reduces (averages) the gradients during each backward pass.
        """
        if self.size == 1:
            return model
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def weigh(self, loss: torch.Tensor, samples: int | torch.Tensor, stop: Any) -> tuple[torch.Tensor, Step]:
        """The loss this rank back-propagates, and the step over every rank (``stop``: this rank's StopSignals).

        Each rank's loss is the mean over its own ``samples`` (an int, or a
        0-dim tensor on the device); DDP averages the ranks' gradients.
        Weighted by ``world size · samples / all samples``, that average is the
        gradient of the mean over the whole global batch, as one process
        computes it, also where the shares differ in size (the tokens of
        sentence pairs, an epoch's last batch). Equal shares weigh 1.

        One all-gather of three numbers per rank, on the loss's device (no
        host synchronisation), carries the weights, the totals the engine
        accumulates and whether a rank has received a stop signal, so that
        every rank stops after the same step.
        """
        wide = loss.detach().double()
        if self.size == 1:
            return loss, Step(wide * samples, samples, stop)
        count = wide.new_full((), samples) if isinstance(samples, int) else samples.double()
        mine = torch.stack([wide * count, count, wide.new_full((), stop.requested or 0)])
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(parts, mine)
        gathered = torch.stack(parts)
        everyone = gathered[:, 1].sum()
        weight = count * self.size / everyone
        return loss * weight.to(loss.dtype), Step(gathered[:, 0].sum(), everyone, stop, gathered[:, 2])

    def stop_signal(self, requested: int | None) -> int | None:
        """The stop signal every rank acts on: the first rank's that has received one (None: none has)."""
        if self.size == 1:
            return requested
        parts = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(parts, torch.tensor([requested or 0]))
        return next((int(part) for part in parts if part), None)

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value``, in rank order, on rank 0 (None on the others)."""
        if self.size == 1:
            return [value]
        values: list[Any] | None = [None] * self.size if self.main else None
        dist.gather_object(value, values, dst=0)
        return values

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.size > 1:
            dist.barrier()


def start(where: Launch, device: torch.device) -> World:
    """The world of this process: join the run's process group (once per process) when there are several ranks."""
    if where.world_size == 1:
        return World()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if where.launcher == "submitit":
            from submitit.helpers import TorchDistributedEnvironment

            # MASTER_ADDR/PORT, RANK, WORLD_SIZE from the job; the GPU is picked by local rank, not by hiding the others
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo", init_method="env://")
        atexit.register(dist.destroy_process_group)
        if where.rank != 0:  # their lines would repeat rank 0's
            logging.getLogger("xgrad").setLevel(logging.WARNING)
    log.info("rank %d of %d (%s, %s)", where.rank, where.world_size, backend, device)
    return World(where.rank, where.world_size, backend)


"""The training loop: epochs of predicted steps, evaluation, checkpoints, resume.

The engine knows nothing of models or data: a task turns a batch into a loss
and a pass into metrics (``xgrad/tasks/base.py``), a data module hands out
batches (``xgrad/data/base.py``). One optimizer step is::

    predictor.predict()                  θ_t → θ̂_{t+s}      (XGrad only)
    loss = task.train_loss(model, batch)  (autocast)
    scaler.scale(loss).backward()        gradient at θ̂
    predictor.restore()                  θ̂ → θ_t, bit for bit
    scaler.unscale_(optimizer); clip     (when clipping)
    scaler.step(optimizer); scaler.update()
    optimizer.zero_grad(set_to_none=True)

so the gradient is taken at the predicted weights and the update is applied
to the real ones (the paper's Algorithm 1: docs/method.md). The scaler is only enabled for
``precision=16``; otherwise its calls pass straight through.

A step reads no value off the device (:meth:`Engine.train_step`), so on a GPU
the host queues the next step while the current one computes. Its loss is
added to a running sum where it was computed (xgrad/running_loss.py), and the
loop reads that sum every ``log_every_n_steps`` steps, at the epoch's end and
before any checkpoint: the progress bar, the W&B step log and the check for a
non-finite loss (which stops the run, naming the steps since the last read)
all work from those reads. (With ``precision=16`` the gradient scaler itself
reads whether the gradients overflowed, once per step.)

At each epoch end the engine evaluates the validation and the test split,
steps the scheduler, and writes
``checkpoints/last.pt`` with everything the next epoch depends on (weights,
optimizer/predictor/scheduler/scaler states, every RNG, the metrics so far),
so a run restarted from it, even after being killed mid-epoch, repeats the
interrupted epoch exactly and ends with the same metrics. The test split is
evaluated every epoch so that the summary can report it at the epoch the
validation split selects (never the other way round) without keeping a
second copy of the weights.

Mid-epoch checkpoints (on a stop signal, xgrad/preemption.py, and every
``checkpoint_every_n_steps`` steps) add the epoch's position: the batches done,
the running loss sums, the time spent and the task's carried state (a language
model's hidden state). A run resumed from one draws the epoch's batches again
from the same ``(seed, epoch)`` generator and discards those already trained
on, so the data order and the augmentation drawn per batch are those of the
uninterrupted run, and trains on from the next batch: no step is repeated.
Evaluation draws from no global generator, so an evaluation that a signal
cut short is simply run again.

On several processes (xgrad/distributed.py) every rank runs this loop on its
share of each global batch, with ``forward`` the model wrapped in DDP: every
rank predicts the same θ̂ from the same weights and state, DDP averages the
gradients at θ̂ during backward, every rank restores θ_t and applies the same
update. Why that is XGrad's step on one process, and how stop signals and
metrics cross the ranks: docs/design.md, "Training on several processes".
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from xgrad import checkpoint
from xgrad.distributed import Step, World
from xgrad.loggers import RunLogger
from xgrad.preemption import Interrupted, StopSignals
from xgrad.records import DIVERGED, Checkpoint, Summary
from xgrad.running_loss import RunningLoss
from xgrad.schema import Precision, Trainer

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """The run cannot go on (a non-finite loss); the message says at which step and why."""


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move a batch (tensor, or tuple/list/dict of them) to ``device``, images channels-last if asked."""
    if isinstance(batch, torch.Tensor):
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


class _EvaluationStopped(Exception):
    """A stop signal arrived during an evaluation pass (raised from its batches, caught by the engine)."""

    def __init__(self, signal: int):
        super().__init__(signal)
        self.signal = signal


class Engine:
    """Trains ``model`` on ``data`` for ``task`` into ``run_dir``; see the module docstring.

    ``forward`` is what runs the training batches: the model itself, its
    ``torch.compile`` wrapper, or (several ranks) DDP around either;
    ``evaluate`` runs the evaluation batches (default: ``forward``), without
    DDP, whose wrapper neither needs nor has a model's own methods (a
    translation model's beam search). ``model`` is kept for plain state dicts.
    ``trainer``: the config's typed ``trainer`` group (xgrad/schema.py);
    ``channels_last``: whether batches go channels-last, as resolved for the
    device (xgrad/performance.py). ``checkpoint_extra``: the entry point's
    fields of every :class:`xgrad.records.Checkpoint` (``config``, ``wandb_id``).
    ``stop`` is read after every step:
    when it holds a signal, the engine checkpoints and raises
    :class:`xgrad.preemption.Interrupted` (None: never stops early). ``world``:
    the ranks training together (default: this process alone).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        forward: nn.Module,
        task: Any,
        data: Any,
        optimizer: torch.optim.Optimizer,
        predictor: Any | None,
        scheduler: Any | None,
        device: torch.device,
        trainer: Trainer,
        channels_last: bool,
        seed: int,
        run_dir: Path,
        logger: RunLogger,
        checkpoint_extra: dict[str, Any],
        stop: StopSignals | None = None,
        evaluate: nn.Module | None = None,
        world: World | None = None,
    ):
        self.model, self.forward, self.task, self.data = model, forward, task, data
        self.evaluate_with = evaluate if evaluate is not None else forward
        self.world = world if world is not None else World()
        self.optimizer, self.predictor, self.scheduler = optimizer, predictor, scheduler
        self.device, self.trainer, self.channels_last, self.seed = device, trainer, channels_last, seed
        self.run_dir, self.logger, self.checkpoint_extra = run_dir, logger, checkpoint_extra
        self.stop = stop if stop is not None else StopSignals()  # a StopSignals not entered never requests a stop
        self.checkpoint_path = run_dir / "checkpoints" / "last.pt"
        self.scaler = torch.amp.GradScaler(device.type, enabled=trainer.precision is Precision.fp16)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.elapsed_s = 0.0  # wall time of earlier sessions of this run (resume)
        self.position: dict[str, Any] | None = None  # where in its epoch a mid-epoch checkpoint was taken
        self._started = time.perf_counter()

    # ------------------------------------------------------------------ state

    def load(self, state: Checkpoint) -> None:
        """Continue from a checkpoint written by :meth:`save` (by as many ranks as now, or not).

        Each rank takes back its own random state and carried task state when
        the checkpoint has one per rank of this world; otherwise rank 0 takes
        the one it holds and the other ranks keep drawing from their own seeds.
        (A checkpoint that carries task state across a change of world size is
        refused before this, by xgrad/run_dir.py.)
        """
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        if self.predictor is not None:
            self.predictor.load_state_dict(state.predictor)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state.scheduler)
        self.scaler.load_state_dict(state.scaler)
        self.step, self.history, self.elapsed_s = state.step, state.history, state.elapsed_s
        self.position = state.position
        ranks = state.ranks
        mine = ranks[self.world.rank] if ranks is not None and len(ranks) == self.world.size else None
        if mine is not None:
            checkpoint.set_rng_state(mine["rng"])
            if self.position is not None:
                self.position = self.position | {"task": mine["task"]}
        elif self.world.main:
            checkpoint.set_rng_state(state.rng)

    def save(self, elapsed_s: float, position: dict[str, Any] | None = None) -> None:
        """Write ``checkpoints/last.pt``: at an epoch end (no position) or mid-epoch (where in the epoch).

        With several ranks every rank calls this at the same point: their
        random states and carried task states (``ranks``, in rank order) go
        into the file, which rank 0 alone writes.
        """
        own = {"rng": checkpoint.rng_state(), "task": position.get("task") if position is not None else None}
        ranks = self.world.gather(own)
        if not self.world.main:
            return
        state = Checkpoint(
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            predictor=self.predictor.state_dict() if self.predictor is not None else None,
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            scaler=self.scaler.state_dict(),
            rng=own["rng"],
            epoch=len(self.history),
            step=self.step,
            history=self.history,
            elapsed_s=elapsed_s,
            position=position,
            world_size=self.world.size,
            ranks=ranks if self.world.size > 1 else None,
            **self.checkpoint_extra,
        )
        checkpoint.save(state, self.checkpoint_path)

    # ------------------------------------------------------------------ loop

    def fit(self) -> Summary:
        """Train the remaining epochs and return the summary.

        A stop signal leaves a checkpoint, ``summary.json`` with ``status:
        interrupted`` and raises :class:`Interrupted`; any other exception
        leaves ``status: failed`` and the reason, and is re-raised.
        """
        self._started = time.perf_counter()
        self.logger.start(self.history)
        try:
            for epoch in range(len(self.history), self.trainer.epochs):
                self._epoch(epoch)
                self.save(self._wall())
                reason = f"stopped after epoch {epoch + 1} of {self.trainer.epochs}"
                self.logger.write_summary(self.history, status="running", wall_time_s=self._wall(), reason=reason)
        except Interrupted as stopped:
            self.logger.write_summary(self.history, status="interrupted", wall_time_s=self._wall(), reason=str(stopped))
            raise
        except BaseException as error:
            reason = str(error) if isinstance(error, TrainingFailed) else f"{type(error).__name__}: {error}"
            with contextlib.suppress(Exception):  # the original error matters more than a summary that cannot be written
                self.logger.write_summary(self.history, status="failed", wall_time_s=self._wall(), reason=reason)
            raise
        return self.logger.write_summary(self.history, status="completed", wall_time_s=self._wall())

    def _wall(self) -> float:
        """Wall time of the whole run: earlier sessions and this one."""
        return self.elapsed_s + time.perf_counter() - self._started

    def _epoch(self, epoch: int) -> None:
        """One epoch of training, then validation, test and the scheduler step; appends to ``history``."""
        started = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch's updates use
        trained = self._train(epoch)
        train_s = trained["train_s"]
        try:
            metrics = self._evaluate(self.data.val_batches())
            test = self._evaluate(self.data.test_batches())
        except _EvaluationStopped as stopped:
            self.save(self._wall(), position=trained)  # every batch trained: the rerun evaluates, then goes on
            raise self.stop.interrupted(f"while evaluating epoch {epoch + 1}", stopped.signal) from None
        files = {}
        if hasattr(self.task, "on_evaluated") and self.world.main:
            with torch.no_grad():
                files = self.task.on_evaluated(self.model, str(self.run_dir), epoch + 1) or {}
        if self.scheduler is not None:
            self.scheduler.step()
        record = {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": lr,
            "train/loss": trained["loss_sum"] / max(trained["samples"], 1),
            **{f"val/{k}": v for k, v in metrics.items()},
            **{f"test/{k}": v for k, v in test.items()},
            "time/epoch_s": time.perf_counter() - started + trained["earlier_s"],
            "time/samples_per_s": trained["samples"] / train_s,
        }
        self.history.append(self.world.from_rank_zero(lambda: record))  # rank 0's timings; the metrics agree
        self.logger.log_epoch(self.history, files)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.history[-1].items() if k.startswith(("train/", "val/", "test/")))
        log.info("epoch %d/%d: %s", epoch + 1, self.trainer.epochs, shown)

    def _train(self, epoch: int) -> dict[str, Any]:
        """One pass over the training batches, from a mid-epoch checkpoint's position when there is one.

        Returns the epoch's position at its end: ``batch`` (batches done),
        ``loss_sum`` and ``samples`` (for the sample-weighted mean loss),
        ``train_s`` (training time, earlier sessions included), ``earlier_s``
        (the epoch's time in earlier sessions) and ``task`` (its carried state).
        """
        self.forward.train()
        self.task.start_epoch(self.forward, training=True)
        total = self.data.num_train_batches()
        if self.trainer.limit_train_batches is not None:
            total = min(total, self.trainer.limit_train_batches)
        batches = islice(self.data.train_batches(epoch, self.seed), total)
        start = self.position if self.position is not None and self.position["epoch"] == epoch else None
        self.position = None
        position = {"epoch": epoch, "batch": 0, "loss_sum": 0.0, "samples": 0, "train_s": 0.0, "earlier_s": 0.0}
        if start is not None:
            deque(islice(batches, start["batch"]), maxlen=0)  # drawn as before (same order and augmentation), not trained
            position |= {k: start[k] for k in ("batch", "loss_sum", "samples", "train_s")}
            position["earlier_s"] = start["train_s"]
            if start.get("task") is not None:
                self.task.load_state_dict(to_device(start["task"], self.device))
            if start["batch"] < total:
                log.info("resuming epoch %d at batch %d of %d", epoch + 1, start["batch"] + 1, total)
            else:  # stopped while evaluating: every batch has trained
                log.info("resuming epoch %d with its %d training batches done: its evaluation is next", epoch + 1, total)
        started, earlier = time.perf_counter(), position["train_s"]
        every = self.trainer.checkpoint_every_n_steps

        def now() -> dict[str, Any]:
            carried = self.task.state_dict() if hasattr(self.task, "state_dict") else None
            return position | {"train_s": earlier + time.perf_counter() - started, "task": carried}

        description = f"epoch {epoch + 1}/{self.trainer.epochs}"
        running = RunningLoss(position["loss_sum"], position["samples"], self.step)
        with self._progress(description, total, position["batch"], position["samples"]) as progress:
            if (signal := self.world.stop_signal(self.stop.requested)) is not None:  # before the epoch's first step
                self.save(self._wall(), position=now())
                raise self.stop.interrupted(f"before batch {position['batch'] + 1} of epoch {epoch + 1}", signal)
            for batch in batches:
                step = self.train_step(to_device(batch, self.device, self.channels_last))
                running.add(step)
                position["batch"] += 1
                checkpoint_due = every is not None and self.step % every == 0 and position["batch"] < total
                read_due = self.step % self.trainer.log_every_n_steps == 0 or checkpoint_due
                signal = step.signal(wait=read_due)
                if read_due or signal is not None:  # a checkpoint never holds a loss that was not checked
                    self._read(running, position, epoch, progress)
                progress.advance()
                if signal is not None:
                    self.save(self._wall(), position=now())
                    where = f"after batch {position['batch']} of {total} in epoch {epoch + 1}"
                    raise self.stop.interrupted(where, signal)
                if checkpoint_due:
                    self.save(self._wall(), position=now())
            if running.unread:
                self._read(running, position, epoch, progress)
        return now()

    def _read(self, running: RunningLoss, position: dict[str, Any], epoch: int, progress: _Bar) -> None:
        """Read the running loss (one wait for the device): fail on a non-finite one, else log it and show it."""
        reading = running.read()
        if not math.isfinite(reading.loss_sum):
            steps = f"step {reading.last_step}" if reading.first_step == reading.last_step else \
                f"steps {reading.first_step}-{reading.last_step}"
            raise TrainingFailed(f"{DIVERGED} ({reading.loss_sum / reading.samples}) at {steps} (epoch "
                                 f"{epoch + 1}; the loss is read every trainer.log_every_n_steps="
                                 f"{self.trainer.log_every_n_steps} steps)")  # fmt: skip
        position["loss_sum"], position["samples"] = reading.loss_sum, reading.samples
        if reading.last_step % self.trainer.log_every_n_steps == 0:
            self.logger.log_step(reading.last_step, {"train/loss": reading.window_loss})
        progress.show(reading.window_loss, reading.samples)

    def train_step(self, batch: Any) -> Step:
        """One optimizer step on ``batch`` (already on the device): the gradient at θ̂, the update of θ.

        Reads no value off the device, so on a GPU the host queues the next
        step while this one computes. Returns the step over every rank: its
        loss and samples, to be added up (:class:`xgrad.running_loss.RunningLoss`),
        and the stop signal the ranks agree on. The entry point's loop, the
        overhead and the throughput benchmarks all step through here.
        """
        predicted = self.predictor.predicted() if self.predictor is not None else contextlib.nullcontext()
        with predicted:
            with self._autocast():
                loss, n = self.task.train_loss(self.forward, batch)
            loss, step = self.world.weigh(loss, n, self.stop)
            self.scaler.scale(loss).backward()
        self.step += 1
        if self.trainer.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.trainer.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return step

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}.get(self.trainer.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def _evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """The task's metrics over (at most ``limit_val_batches`` of) ``batches``, in eval mode.

        A stop signal ends the pass at the next batch (:class:`_EvaluationStopped`).
        """
        self.evaluate_with.eval()
        self.task.start_epoch(self.evaluate_with, training=False)
        limit = self.trainer.limit_val_batches
        on_device = (to_device(b, self.device, self.channels_last) for b in self._stoppable(islice(batches, limit)))
        with torch.no_grad(), self._autocast():
            metrics = self.task.evaluate(self.evaluate_with, on_device)
        if self.task.metric not in metrics:
            raise KeyError(f"{type(self.task).__name__}.evaluate returned {sorted(metrics)}, no '{self.task.metric}'")
        return metrics

    def _stoppable(self, batches: Iterable[Any]) -> Iterator[Any]:
        for batch in batches:
            if (signal := self.world.stop_signal(self.stop.requested)) is not None:
                raise _EvaluationStopped(signal)
            yield batch

    @contextlib.contextmanager
    def _progress(self, description: str, total: int, completed: int, samples: int) -> Iterator[_Bar]:
        """A rich progress bar for one epoch: advanced every batch, its loss and rate shown at each read."""
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:,.0f} samples/s"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, disable=not self.trainer.progress) as progress:
            bar = progress.add_task(description, total=total, completed=completed, loss=float("nan"), rate=0.0)
            yield _Bar(progress, bar, samples)


class _Bar:
    """One epoch's progress bar: ``advance()`` per batch (host only), ``show(loss, samples)`` at each read."""

    def __init__(self, progress: Progress, bar: Any, samples: int):
        self._progress, self._bar = progress, bar
        self._started, self._samples = time.perf_counter(), samples

    def advance(self) -> None:
        self._progress.update(self._bar, advance=1)

    def show(self, loss: float, samples: int) -> None:
        """The mean loss since the last read; the epoch's samples per second in this session."""
        rate = (samples - self._samples) / max(time.perf_counter() - self._started, 1e-9)
        self._progress.update(self._bar, loss=loss, rate=rate)

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
to the real ones (PAPER.md, Algorithm 1). The scaler is only enabled for
``precision=16``; otherwise its calls pass straight through.

At each epoch end the engine evaluates the validation and the test split,
steps the scheduler, and writes
``checkpoints/last.pt`` with everything the next epoch depends on (weights,
optimizer/predictor/scheduler/scaler states, every RNG, the metrics so far),
so a run restarted from it, even after being killed mid-epoch, repeats the
interrupted epoch exactly and ends with the same metrics. The test split is
evaluated every epoch so that the summary can report it at the epoch the
validation split selects (never the other way round) without keeping a
second copy of the weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from xgrad import checkpoint
from xgrad.loggers import RunLogger

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """The run cannot go on (a non-finite loss); the message says at which step and why."""


@dataclass(frozen=True)
class Settings:
    """How to train (the ``trainer`` config minus what the entry point handles when building)."""

    epochs: int
    precision: str = "32"  # "32" | "bf16" | "16"
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    grad_clip: float | None = None
    channels_last: bool = False
    log_every_n_steps: int = 10
    progress: bool = True


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


class Engine:
    """Trains ``model`` on ``data`` for ``task`` into ``run_dir``; see the module docstring.

    ``forward`` is what runs the batches: the model itself, or its
    ``torch.compile`` wrapper (``model`` is kept for plain state dicts).
    ``checkpoint_extra`` is stored in every checkpoint as is (the entry point
    keeps the config and the W&B id there).
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
        settings: Settings,
        seed: int,
        run_dir: Path,
        logger: RunLogger,
        checkpoint_extra: dict[str, Any],
    ):
        self.model, self.forward, self.task, self.data = model, forward, task, data
        self.optimizer, self.predictor, self.scheduler = optimizer, predictor, scheduler
        self.device, self.settings, self.seed = device, settings, seed
        self.run_dir, self.logger, self.checkpoint_extra = run_dir, logger, checkpoint_extra
        self.checkpoint_path = run_dir / "checkpoints" / "last.pt"
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "16")
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.elapsed_s = 0.0  # wall time of earlier sessions of this run (resume)

    # ------------------------------------------------------------------ state

    def load(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`save`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.predictor is not None:
            self.predictor.load_state_dict(state["predictor"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.history, self.elapsed_s = state["step"], state["history"], state["elapsed_s"]
        checkpoint.set_rng_state(state["rng"])

    def save(self, elapsed_s: float) -> None:
        checkpoint.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "predictor": self.predictor.state_dict() if self.predictor is not None else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(),
                "rng": checkpoint.rng_state(),
                "epoch": len(self.history),
                "step": self.step,
                "history": self.history,
                "elapsed_s": elapsed_s,
                **self.checkpoint_extra,
            },
            self.checkpoint_path,
        )

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs and return the summary.

        Any exception leaves ``summary.json`` with ``status: failed`` and the
        reason, and is re-raised.
        """
        started = time.perf_counter()

        def wall() -> float:
            return self.elapsed_s + time.perf_counter() - started

        self.logger.start(self.history)
        try:
            for epoch in range(len(self.history), self.settings.epochs):
                self._epoch(epoch)
                self.save(wall())
                reason = f"stopped after epoch {epoch + 1} of {self.settings.epochs}"
                self.logger.write_summary(self.history, status="running", wall_time_s=wall(), reason=reason)
        except BaseException as error:
            reason = str(error) if isinstance(error, TrainingFailed) else f"{type(error).__name__}: {error}"
            self.logger.write_summary(self.history, status="failed", wall_time_s=wall(), reason=reason)
            raise
        return self.logger.write_summary(self.history, status="completed", wall_time_s=wall())

    def _epoch(self, epoch: int) -> None:
        """One epoch of training, then validation, test and the scheduler step; appends to ``history``."""
        started = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch's updates use
        train_loss, samples = self._train(epoch)
        train_s = time.perf_counter() - started
        metrics = self._evaluate(self.data.val_batches())
        test = self._evaluate(self.data.test_batches())
        files = {}
        if hasattr(self.task, "on_evaluated"):
            with torch.no_grad():
                files = self.task.on_evaluated(self.model, str(self.run_dir), epoch + 1) or {}
        if self.scheduler is not None:
            self.scheduler.step()
        self.history.append(
            {
                "epoch": epoch + 1,
                "step": self.step,
                "lr": lr,
                "train/loss": train_loss,
                **{f"val/{k}": v for k, v in metrics.items()},
                **{f"test/{k}": v for k, v in test.items()},
                "time/epoch_s": time.perf_counter() - started,
                "time/samples_per_s": samples / train_s,
            }
        )
        self.logger.log_epoch(self.history, files)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.history[-1].items() if k.startswith(("train/", "val/", "test/")))
        log.info("epoch %d/%d: %s", epoch + 1, self.settings.epochs, shown)

    def _train(self, epoch: int) -> tuple[float, int]:
        """One pass over the training batches; the sample-weighted mean loss and the sample count."""
        self.forward.train()
        self.task.start_epoch(self.forward, training=True)
        total = self.data.num_train_batches()
        if self.settings.limit_train_batches is not None:
            total = min(total, self.settings.limit_train_batches)
        batches = islice(self.data.train_batches(epoch, self.seed), total)
        loss_sum, samples = 0.0, 0
        with self._progress(f"epoch {epoch + 1}/{self.settings.epochs}", total) as advance:
            for batch in batches:
                loss, n = self._step(to_device(batch, self.device, self.settings.channels_last), epoch)
                loss_sum, samples = loss_sum + loss * n, samples + n
                advance(loss, n)
        return loss_sum / max(samples, 1), samples

    def _step(self, batch: Any, epoch: int) -> tuple[float, int]:
        """One optimizer step with the gradient taken at the predicted weights; returns (loss, samples)."""
        predicted = self.predictor.predicted() if self.predictor is not None else contextlib.nullcontext()
        with predicted:
            with self._autocast():
                loss, n = self.task.train_loss(self.forward, batch)
            self.scaler.scale(loss).backward()
        value = loss.item()
        self.step += 1
        if not math.isfinite(value):
            raise TrainingFailed(f"non-finite training loss ({value}) at step {self.step} (epoch {epoch + 1})")
        if self.settings.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.step % self.settings.log_every_n_steps == 0:
            self.logger.log_step(self.step, {"train/loss": value})
        return value, n

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(self.settings.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def _evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """The task's metrics over (at most ``limit_val_batches`` of) ``batches``, in eval mode."""
        self.forward.eval()
        self.task.start_epoch(self.forward, training=False)
        limit = self.settings.limit_val_batches
        on_device = (to_device(b, self.device, self.settings.channels_last) for b in islice(batches, limit))
        with torch.no_grad(), self._autocast():
            metrics = self.task.evaluate(self.forward, on_device)
        if self.task.metric not in metrics:
            raise KeyError(f"{type(self.task).__name__}.evaluate returned {sorted(metrics)}, no '{self.task.metric}'")
        return metrics

    @contextlib.contextmanager
    def _progress(self, description: str, total: int) -> Iterator:
        """A rich progress bar for one epoch; yields ``advance(loss, samples)``."""
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:,.0f} samples/s"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, disable=not self.settings.progress) as progress:
            bar = progress.add_task(description, total=total, loss=float("nan"), rate=0.0)
            started, seen = time.perf_counter(), 0

            def advance(loss: float, samples: int) -> None:
                nonlocal seen
                seen += samples
                progress.update(bar, advance=1, loss=loss, rate=seen / (time.perf_counter() - started))

            yield advance

"""An epoch's training loss, summed on the device step by step and read only every few steps.

Reading a value off a GPU (``loss.item()``) makes the host wait until every
kernel launched so far has run, so a loop that reads its loss after each step
can never queue the next step while the current one computes: for a small
model the GPU idles for most of each step. The engine therefore adds each
step's ``loss · samples`` (and its samples) into running sums that stay where
the loss is, and reads them every ``trainer.log_every_n_steps`` steps and at
the epoch's end: one wait per read instead of one per step.

The sums are float64 and added in step order, exactly as the host-side float
sums of earlier versions were, so on the CPU an epoch's ``train/loss`` is the
same number bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xgrad.distributed import Step


@dataclass(frozen=True)
class Reading:
    """What one read found: the epoch's sums so far, and the steps added since the previous read."""

    loss_sum: float  # Σ mean loss · samples over the epoch's steps so far (every rank's)
    samples: int  # samples of the epoch's steps so far
    window_loss: float  # the mean loss over the steps since the previous read
    first_step: int  # the first and last optimizer step since the previous read
    last_step: int


class RunningLoss:
    """``add`` each step (no read), ``read`` the sums when the engine needs them (one wait for the device).

    ``loss_sum`` and ``samples`` start the sums: 0 at an epoch's start, or what
    a mid-epoch checkpoint recorded; ``step`` is the last optimizer step taken.
    """

    def __init__(self, loss_sum: float, samples: int, step: int):
        self._loss_sum: float | torch.Tensor = loss_sum
        self._samples: int | torch.Tensor = samples
        self._read = Reading(loss_sum, samples, float("nan"), step + 1, step)
        self._step = step

    @property
    def unread(self) -> bool:
        """Whether steps were added since the last read."""
        return self._step > self._read.last_step

    def add(self, step: Step) -> None:
        """Add one step's totals where they are (host numbers stay on the host, device tensors on the device)."""
        self._loss_sum = self._loss_sum + step.loss_sum
        self._samples = self._samples + step.samples
        self._step += 1

    def read(self) -> Reading:
        """The sums so far and the window since the previous read; waits for the device once, at most."""
        loss_sum, samples = self._loss_sum, self._samples
        if isinstance(samples, torch.Tensor):
            loss_sum = torch.as_tensor(loss_sum, dtype=torch.float64, device=samples.device)
            loss_sum, samples = torch.stack([loss_sum, samples.double()]).tolist()
        elif isinstance(loss_sum, torch.Tensor):
            loss_sum = loss_sum.item()
        loss_sum, samples = float(loss_sum), round(samples)
        previous = self._read
        window = (loss_sum - previous.loss_sum) / max(samples - previous.samples, 1)
        self._read = Reading(loss_sum, samples, window, previous.last_step + 1, self._step)
        return self._read

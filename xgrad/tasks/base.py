"""The contract between the engine and a task.

The engine knows nothing of models or data: it asks a task for the loss of one
training batch and for the metrics of one evaluation pass. A task knows what a
batch means (images and labels, a BPTT window, a sentence pair) and which
metric decides which run is better.

A task is built from the model config's ``task`` node with the run's data
module as its one positional argument (a translation task needs the data's
tokenizer to detokenise; most tasks ignore it)::

    task = hydra.utils.instantiate(cfg.model.task, data)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn


class Task(Protocol):
    #: primary validation metric, logged as ``val/<metric>`` (e.g. "acc", "ppl", "bleu", "loss")
    metric: str
    #: "max" or "min": which direction of ``metric`` is better
    mode: str

    def start_epoch(self, model: nn.Module, training: bool) -> None:
        """Reset per-pass state (a language model's carried hidden state)."""

    def train_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int | torch.Tensor]:
        """The scalar loss to back-propagate and the number of samples it covers.

        The number is an int when the batch's shape says it (images, tokens of
        a window), or a 0-dim integer tensor on the batch's device when it
        must be counted there (the target tokens of padded sentences): the
        engine reads neither after each step, so no step waits for the device.
        """

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """Metrics over a whole pass, keys without the ``val/`` prefix.

        Must contain ``self.metric``, and ``size``: how many of the data's units
        (``sizes()["unit"]``: images, tokens, sentence pairs) the pass covered,
        which the reports show as the evaluation size actually used. The model is already in eval mode under
        ``torch.no_grad()`` and the batches are already on the model's device.
        """

    def on_evaluated(self, model: nn.Module, run_dir: str, epoch: int) -> dict[str, str]:
        """Optional artefacts after evaluation (a VAE's sample grid): name → file path."""

    def state_dict(self) -> dict[str, Any]:
        """Optional, for a task that carries state from one training batch to the next (a language
        model's hidden state): tensors and plain containers, kept in mid-epoch checkpoints."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Optional: put back what :meth:`state_dict` returned (tensors already on the model's device)."""

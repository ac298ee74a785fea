"""Word-level language modelling with truncated back-propagation through time.

A batch is one BPTT window ``(inputs [T, B], targets [T, B])`` of a token
stream cut into B parallel columns (xgrad/data/ptb.py). Window k+1 continues
window k in every column, so the LSTM's final state after window k is the
right initial state for window k+1: the task carries it across training
batches and detaches it in between, which lets information flow forward
through the whole epoch while gradients stop at the window's start (truncated
BPTT). The state is reset to zeros at each epoch's start.

Loss: cross entropy per token. Metric: perplexity, ``exp`` of the mean token
loss over the whole split (lower is better).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def detach(state: Any) -> Any:
    """The same nested tuples/lists of tensors, cut from the graph (AWD-LSTM's ``repackage_hidden``)."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    return type(state)(detach(s) for s in state)


class LanguageModelTask:
    """Next-token cross entropy for a model ``(tokens [T, B], state) -> (logits [T, B, V], state)``."""

    metric = "ppl"
    mode = "min"

    def __init__(self, data: Any = None):
        # the data module is part of the task contract; a language model needs nothing from it
        self._state = None

    def start_epoch(self, model: nn.Module, training: bool) -> None:
        """Forget the carried state: an epoch (and every evaluation) starts from zeros."""
        self._state = None

    def state_dict(self) -> dict[str, Any]:
        """The state carried into the next training window: a mid-epoch checkpoint keeps it."""
        return {"state": self._state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = state["state"]

    def train_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        inputs, targets = batch
        logits, state = model(inputs, self._state)
        self._state = detach(state)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return loss, targets.numel()

    def evaluate(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Perplexity over a whole split, the state carried across its windows from zeros."""
        state, total, tokens = None, 0.0, 0
        for inputs, targets in batches:
            logits, state = model(inputs, state)
            total = total + F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
            tokens += targets.numel()
        loss = float(total) / tokens
        return {"ppl": math.exp(loss), "loss": loss, "size": tokens}

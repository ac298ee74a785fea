"""The suite's own training loop, written out by hand from docs/design.md: what each framework callback must reproduce.

For every optimizer step over a window of k micro-batches::

    with predictor.predicted():                 # θ_t → θ̂, once, at the start of the window
        for x, y in window:
            scaler.scale(loss(x, y) / k).backward()    # under autocast for bf16/16-mixed; scaled for 16-mixed
    scaler.unscale_(optimizer); clip_grad_norm_      # the real weights are back: only the gradients change
    scaler.step(optimizer); scaler.update()
    optimizer.zero_grad(set_to_none=True); scheduler.step()

The tests' model, data, optimizer and schedule live here too, so that a
framework run and this loop start from the same weights and see the same
batches. The schedule gives every step a new learning rate, so a prediction
taken before the scheduler steps (or one left over from the last step) shows.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from xgrad import WeightPredictor

INPUTS, HIDDEN, CLASSES, MICRO_BATCH = 6, 16, 3, 8
LR = 0.05
AUTOCAST_DTYPE = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def make_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(MICRO_BATCH, INPUTS, generator=generator),
         torch.randint(CLASSES, (MICRO_BATCH,), generator=generator))
        for _ in range(count)
    ]


OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=LR),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=LR / 10),  # rule='auto': the last-update record
}


def make_optimizer(params, name: str = "adam") -> torch.optim.Optimizer:
    return OPTIMIZERS[name](params)


def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + step))


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def autocast(precision: str) -> contextlib.AbstractContextManager:
    dtype = AUTOCAST_DTYPE.get(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


def train_suite_loop(
    batches: list, *, steps: int, accumulate: int = 1, clip: float | None = None, precision: str = "32",
    rule: str = "auto", optimizer_name: str = "adam",
) -> nn.Module:
    """``make_net()`` trained on ``batches`` (``len(batches) / accumulate`` optimizer steps) by the suite's loop."""
    net = make_net()
    optimizer = make_optimizer(net.parameters(), optimizer_name)
    scheduler = make_scheduler(optimizer)
    predictor = WeightPredictor(optimizer, steps=steps, rule=rule)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "16-mixed")
    for start in range(0, len(batches), accumulate):
        with predictor.predicted():
            for x, y in batches[start : start + accumulate]:
                with autocast(precision):
                    loss = loss_fn(net(x), y)
                scaler.scale(loss / accumulate).backward()
        scaler.unscale_(optimizer)
        if clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return net


def relative_difference(trained: nn.Module, reference: nn.Module) -> float:
    """The largest ‖θ − θ_ref‖ / ‖θ_ref‖ over the parameter tensors."""
    return max(
        ((p - q).norm() / q.norm()).item()
        for p, q in zip(trained.parameters(), reference.parameters(), strict=True)
    )

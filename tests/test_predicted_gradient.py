"""The training engine hands the optimizer the gradient taken at the predicted weights θ̂ (docs/method.md).

A real run (the composed config: LeNet-5 on Fashion-MNIST, ``xgrad=on``)
records every batch and, at every ``optimizer.step()``, the gradient the
optimizer receives. A hand-written loop then starts from the same initial
weights and, for each batch, writes θ̂ = θ − s·γ·Δ̂ with docs/method.md's formula
computed here from its own optimizer's state (WeightPredictor is not used),
takes the gradient there and compares. It also takes the gradient at θ itself,
which the received one must differ from — so a predictor that does nothing,
or moves the wrong way, fails. The loop steps its optimizer with the received
gradients, so both runs stay in lockstep and each batch is checked on its own.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from xgrad.tasks.classification import Classification

STEPS = 2  # s: the prediction horizon the run is asked for
BATCHES = 4
TRAIN_LOSS = Classification.train_loss  # the task's loss, unrecorded (the test records the engine's calls)


def momentum_delta(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    return opt.state[p]["momentum_buffer"].double()


def adam_delta(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    state, group = opt.state[p], opt.param_groups[0]
    t = float(state["step"])
    beta1, beta2 = group["betas"]
    m_hat = state["exp_avg"].double() / (1 - beta1**t)
    v_hat = state["exp_avg_sq"].double() / (1 - beta2**t)
    return m_hat / (v_hat.sqrt() + group["eps"])


def gradient(task, model, batch) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss, _ = TRAIN_LOSS(task, model, batch)
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    difference = torch.cat([(x - y).reshape(-1) for x, y in zip(a, b, strict=True)]).norm()
    return (difference / torch.cat([y.reshape(-1) for y in b]).norm()).item()


@pytest.mark.parametrize("optimizer, delta", [("sgdm", momentum_delta), ("adam", adam_delta)])
def test_the_optimizer_receives_the_gradient_at_the_predicted_weights(train_run, monkeypatch, optimizer, delta):
    batches, initial, received, optimizers = [], [], [], []

    def recording_train_loss(self, model, batch):
        if not initial:
            initial.append((self, copy.deepcopy(model)))  # θ_0: the first step has no state to predict from
        batches.append([t.clone() for t in batch])
        return TRAIN_LOSS(self, model, batch)

    def record_received(opt, args, kwargs):
        optimizers.append(opt)
        received.append([p.grad.detach().clone() for group in opt.param_groups for p in group["params"]])

    monkeypatch.setattr(Classification, "train_loss", recording_train_loss)
    hook = register_optimizer_step_pre_hook(record_received)
    try:
        train_run(
            f"optimizer={optimizer}",
            "xgrad=on",
            f"xgrad.steps={STEPS}",
            f"trainer.limit_train_batches={BATCHES}",
            "data.batch_size=32",
            "data.eval_batch_size=100",
        )
    finally:
        hook.remove()
    assert len(batches) == len(received) == BATCHES and len(set(map(id, optimizers))) == 1

    task, model = initial[0]
    params = list(model.parameters())
    opt = type(optimizers[0])(params, **optimizers[0].defaults)  # the same optimizer, fresh, on θ_0
    lr = opt.param_groups[0]["lr"]
    for index, (batch, gradient_received) in enumerate(zip(batches, received, strict=True)):
        theta = [p.detach().clone() for p in params]
        if opt.state:  # θ̂ = θ − s·γ·Δ̂, from docs/method.md's rule
            with torch.no_grad():
                for p in params:
                    p.copy_(p.double() - STEPS * lr * delta(opt, p))
        at_prediction = gradient(task, model, batch)
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)
        at_theta = gradient(task, model, batch)
        off_prediction = relative_difference(gradient_received, at_prediction)
        assert off_prediction < 1e-5, f"batch {index}: received vs at θ̂"
        if opt.state:
            off_theta = relative_difference(gradient_received, at_theta)
            assert off_theta > 1e-2, f"batch {index}: received vs at θ (the test needs θ̂ ≠ θ to mean anything)"
        for p, g in zip(params, gradient_received):
            p.grad = g
        opt.step()

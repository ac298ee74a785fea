"""What AdaBelief and AdaM3 share: everything but their moment update.

Both keep a first moment ``exp_avg`` and one second-moment buffer, both take
the same hyper-parameters, decay weights the same two ways, count steps and
bias-correct the same way, and both offer a per-tensor path and a multi-tensor
(``torch._foreach_*``) path. This base class owns all of that, so a subclass
states only its update rule, once per path, and the two paths cannot drift
apart in anything else.

State layout (a contract: ``xgrad.WeightPredictor`` reads it), per parameter:
``step`` (a float32 scalar tensor on the CPU counting the updates applied, as
``torch.optim.Adam`` keeps it), ``exp_avg`` (m) and the subclass's
``second_moment`` buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _default_to_fused_or_foreach


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """Refuse out-of-range values with torch's own wording, before any state exists."""
    lr, betas, eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2:
        raise ValueError(f"Invalid betas, expected a pair (beta1, beta2): {betas}")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class AdamStyleOptimizer(Optimizer):
    """An Adam-like optimizer with a first moment and one second-moment buffer.

    Subclasses set ``second_moment`` (the state key of their second-moment
    buffer) and implement ``_update`` and ``_update_foreach``. Both receive
    gradients with coupled weight decay already added, parameters with
    decoupled weight decay already applied, and the bias corrections as
    ``step_size = lr / (1 − β1^t)`` and ``bias_correction2_sqrt = √(1 − β2^t)``,
    computed in double precision the way the reference implementations do.
    """

    second_moment: str

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Check every group's hyper-parameters (its own overrides included) before adding it."""
        _check_hyperparameters({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _init_group(self, group: dict[str, Any]) -> list[list[Tensor]]:
        """Parameters with a gradient, with their gradients and state, lazily creating the state."""
        params, grads, exp_avgs, second_moments, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError(
                    f"{type(self).__name__} does not support complex parameters "
                    f"(got one of shape {tuple(p.shape)})"
                )
            state = self.state[p]
            if not state:
                # On the CPU like torch.optim.Adam's: reading it never waits on the accelerator.
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[self.second_moment] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            second_moments.append(state[self.second_moment])
            steps.append(state["step"])
        return [params, grads, exp_avgs, second_moments, steps]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one update of every parameter that has a gradient.

        ``foreach=None`` follows torch: the multi-tensor path when every
        parameter sits on an accelerator with foreach kernels, else per tensor.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            tensors = self._init_group(group)
            if not tensors[0]:
                continue
            foreach = group["foreach"]
            if foreach is None:
                _, foreach = _default_to_fused_or_foreach(tensors[0], differentiable=False)
            if foreach:
                grouped = self._group_tensors_by_device_and_dtype(tensors)
                for same_device_and_dtype, _ in grouped.values():
                    self._step_foreach(group, *same_device_and_dtype)
            else:
                for param, grad, exp_avg, second_moment, step in zip(*tensors):
                    self._step_single(group, param, grad, exp_avg, second_moment, step)
        return loss

    def _step_single(
        self,
        group: dict[str, Any],
        param: Tensor,
        grad: Tensor,
        exp_avg: Tensor,
        second_moment: Tensor,
        step: Tensor,
    ) -> None:
        lr, weight_decay = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        step += 1
        if weight_decay != 0:
            if group["decoupled_weight_decay"]:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)  # never alters param.grad
        t = step.item()
        self._update(
            param,
            grad,
            exp_avg,
            second_moment,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            step_size=lr / (1 - beta1**t),
            bias_correction2_sqrt=math.sqrt(1 - beta2**t),
        )

    def _step_foreach(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        second_moments: list[Tensor],
        steps: list[Tensor],
    ) -> None:
        lr, weight_decay = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1.0)
        if weight_decay != 0:
            if group["decoupled_weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * weight_decay)
            else:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)
        ts = [step.item() for step in steps]
        self._update_foreach(
            params,
            grads,
            exp_avgs,
            second_moments,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            step_sizes=[lr / (1 - beta1**t) for t in ts],
            bias_correction2_sqrts=[math.sqrt(1 - beta2**t) for t in ts],
        )

    @staticmethod
    def _update(
        param: Tensor,
        grad: Tensor,
        exp_avg: Tensor,
        second_moment: Tensor,
        *,
        beta1: float,
        beta2: float,
        eps: float,
        step_size: float,
        bias_correction2_sqrt: float,
    ) -> None:
        """Update the moments and the parameter in place, one tensor."""
        raise NotImplementedError

    @staticmethod
    def _update_foreach(
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        second_moments: list[Tensor],
        *,
        beta1: float,
        beta2: float,
        eps: float,
        step_sizes: list[float],
        bias_correction2_sqrts: list[float],
    ) -> None:
        """The same update for tensors that share one device and dtype, with foreach kernels."""
        raise NotImplementedError

"""AdaBelief: Adam whose second moment tracks the gradient's deviation from its momentum.

Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
Observed Gradients" (NeurIPS 2020). The step is large where the gradient
agrees with its running mean (high "belief") and small where it does not.

This follows the authors' ``adabelief-pytorch`` 0.2.1 with
``rectify=False, amsgrad=False`` operation by operation, so both give the same
float32 results: ε is added to ``s`` in place every step (it accumulates in
the state) and again outside the root. Unlike that package it never alters
``param.grad`` when adding coupled weight decay.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xgrad.optim.base import AdamStyleOptimizer


class AdaBelief(AdamStyleOptimizer):
    r"""AdaBelief, without rectification or AMSGrad.

    Per parameter, with gradient ``g`` (plus ``λθ`` when the decay is coupled)::

        m ← β1·m + (1 − β1)·g
        s ← β2·s + (1 − β2)·(g − m)² + ε
        θ ← θ − lr/(1 − β1^t) · m / (√s / √(1 − β2^t) + ε)

    With ``decoupled_weight_decay=True`` the decay is ``θ ← θ(1 − lr·λ)``
    before the update (AdamW's form, the authors' ``weight_decouple=True``).
    State: ``step``, ``exp_avg`` (m), ``exp_avg_var`` (s).
    """

    second_moment = "exp_avg_var"

    @staticmethod
    def _update(param, grad, exp_avg, exp_avg_var, *, beta1, beta2, eps, step_size, bias_correction2_sqrt):
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        residual = grad - exp_avg
        exp_avg_var.mul_(beta2).addcmul_(residual, residual, value=1 - beta2).add_(eps)
        denom = (exp_avg_var.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)

    @staticmethod
    def _update_foreach(
        params, grads, exp_avgs, exp_avg_vars, *, beta1, beta2, eps, step_sizes, bias_correction2_sqrts
    ):
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        residuals: list[Tensor] = torch._foreach_sub(grads, exp_avgs)
        torch._foreach_mul_(exp_avg_vars, beta2)
        torch._foreach_addcmul_(exp_avg_vars, residuals, residuals, value=1 - beta2)
        del residuals  # freed before the denominators are allocated: one temporary at a time
        torch._foreach_add_(exp_avg_vars, eps)
        denoms = torch._foreach_sqrt(exp_avg_vars)
        torch._foreach_div_(denoms, bias_correction2_sqrts)
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-size for size in step_sizes])

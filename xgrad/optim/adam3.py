"""AdaM3: Adam whose second moment is built from the momentum, not the gradient.

Wang et al., "Momentum is All You Need for Data-Driven Adaptive Optimization"
(ICDM 2023; arXiv 2106.11514 "AdaM3: Momentum centering and asynchronous
update"). Squaring the freshly updated momentum instead of the raw gradient
gives a smoother denominator.

This follows the authors' code (github.com/wyzjack/AdaM3) with rectification
and AMSGrad off, operation by operation: ε is added to ``v`` in place every
step and, unlike AdaBelief, nowhere else. The authors call the buffer
``exp_avg_var``; here it is ``exp_avg_sq``, the name the weight predictor
reads. Unlike that code it never alters ``param.grad`` when adding coupled
weight decay.
"""

from __future__ import annotations

import torch

from xgrad.optim.base import AdamStyleOptimizer


class AdaM3(AdamStyleOptimizer):
    r"""AdaM3, without rectification or AMSGrad.

    Per parameter, with gradient ``g`` (plus ``λθ`` when the decay is coupled)::

        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·m² + ε          (the new m)
        θ ← θ − lr/(1 − β1^t) · m / (√v / √(1 − β2^t))

    With ``decoupled_weight_decay=True`` the decay is ``θ ← θ(1 − lr·λ)``
    before the update (AdamW's form). State: ``step``, ``exp_avg`` (m),
    ``exp_avg_sq`` (v).
    """

    second_moment = "exp_avg_sq"

    @staticmethod
    def _update(param, grad, exp_avg, exp_avg_sq, *, beta1, beta2, eps, step_size, bias_correction2_sqrt):
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(exp_avg, exp_avg, value=1 - beta2).add_(eps)
        denom = exp_avg_sq.sqrt() / bias_correction2_sqrt
        param.addcdiv_(exp_avg, denom, value=-step_size)

    @staticmethod
    def _update_foreach(
        params, grads, exp_avgs, exp_avg_sqs, *, beta1, beta2, eps, step_sizes, bias_correction2_sqrts
    ):
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, exp_avgs, exp_avgs, value=1 - beta2)
        torch._foreach_add_(exp_avg_sqs, eps)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, bias_correction2_sqrts)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-size for size in step_sizes])

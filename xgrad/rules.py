"""Prediction rules: how the next update Δ̂ is read off an optimizer's state, and which optimizer gets which.

XGrad writes θ̂_{t+s} = θ_t − s·γ·Δ̂, where Δ̂ is the update the optimizer
would apply next, per unit of learning rate (PAPER.md, "Prediction rules").
A rule says where in the optimizer's state Δ̂ is found:

- :class:`Momentum` — Δ̂ is a stored buffer (SGD and RMSprop with momentum,
  timm's SGDW, and timm's Adopt, whose step is its first moment);
- :class:`Adaptive` — Δ̂ = m̂ / (√v̂ + ε) with the bias corrections of the
  step count (Adam, AdamW, AdaBelief, AdaM3, timm's AdamWLegacy and AdaBelief);
- :data:`LAST_UPDATE` — Δ̂ is the last applied update, recorded by the
  predictor's step hooks (RMSprop without momentum; ``rule="last_update"``
  for any optimizer).

``rule="auto"`` looks the optimizer up in a registry. :func:`register_rule`
maps an optimizer class — or its qualified name, so that registering a
library's optimizer does not import the library — to a rule, or to a function
of the param group that returns one and raises ``ValueError`` naming the flag
it does not model. The lookup walks the class's MRO, so a subclass inherits its
base's rule until it registers its own. The built-in entries at the end of
this module are ordinary registrations; each was checked against the
optimizer's own ``step`` (tests/test_rules.py runs every one against it).

Decisions (notes for PAPER.md):

- ``maximize=True`` needs no sign of its own. Every optimizer here negates the
  gradient *before* it enters the state, so momentum buffers and first moments
  already point the way the optimizer moves and θ − γ·Δ̂ is its next step for
  either sign (flipping Δ̂ predicted the mirror image: cosine −1).
- ``nesterov=True`` (SGD, timm's SGDW) is predicted from the momentum buffer
  b_t, like plain momentum. The next update is g + μ(μ·b_t + g) =
  μ²·b_t + (1 + μ)·g. Taking the next gradient to be the mean the buffer
  already tracks, E[g] = (1 − μ)·b_t (torch allows Nesterov only with
  dampening 0), gives μ²·b_t + (1 − μ²)·b_t = b_t: exact in expectation, under
  the same assumption that makes b_t the plain-momentum update
  (μ·b_t + (1 − τ)·E[g] with E[g] = (1 − μ)·b_t/(1 − τ)). Under a constant
  gradient it points exactly along the real step. Refusing it would deny a
  common configuration a rule exactly as good as the paper's for plain momentum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from xgrad.optim import AdaBelief, AdaM3


@dataclass(frozen=True)
class Momentum:
    """Δ̂ = ``state[buffer]``: the optimizer steps θ ← θ − γ·buffer after updating the buffer.

    ``decoupled_decay``: the optimizer also shrinks θ ← θ(1 − γλ) each step,
    λ = the group's ``weight_decay`` (``WeightPredictor(decoupled_decay=True)``
    then predicts that term too).
    """

    buffer: str = "momentum_buffer"
    decoupled_decay: bool = False

    def state_tensors(self, state: dict) -> tuple[Tensor, ...] | None:
        buffer = state.get(self.buffer)
        return None if buffer is None else (buffer,)


@dataclass(frozen=True)
class Adaptive:
    """Δ̂ = (m/bc1) / (√(v/bc2) + ε), bc_i = 1 − β_i^t, t = ``state["step"]``, from the group's betas and eps.

    ``eps_outside_root=False`` for optimizers that keep ε inside v only (AdaM3).
    ``exp_avg_sq`` names the buffer under the root (the running maximum with amsgrad).
    """

    exp_avg: str = "exp_avg"
    exp_avg_sq: str = "exp_avg_sq"
    eps_outside_root: bool = True
    decoupled_decay: bool = False

    def state_tensors(self, state: dict) -> tuple[Tensor, ...]:
        if self.exp_avg_sq not in state:
            raise RuntimeError(
                f"WeightPredictor: optimizer state has no '{self.exp_avg_sq}' "
                f"(state keys: {sorted(state)}); was the optimizer's amsgrad flag changed?"
            )
        return state[self.exp_avg], state[self.exp_avg_sq]

    def step_sizes(self, group: dict, steps: list, coeff: float | Tensor) -> tuple[list, list]:
        """Per parameter (alpha, eps') with θ̂ = θ + alpha·m / (√v + eps'), where ``coeff`` = s·γ.

        (m/bc1) / (√v/√bc2 + ε) = (√bc2/bc1) · m / (√v + ε·√bc2) saves a pass over v.
        Step counts held on the host (torch's default) give float bias
        corrections. Step counts on the device (fused or capturable optimizers)
        stay there: the step sizes of all the group's parameters are computed
        there in a few kernels, as 0-dim tensors, so nothing waits on the device.
        """
        beta1, beta2 = (scalar(beta) for beta in group["betas"])
        eps = scalar(group["eps"]) if self.eps_outside_root else 0.0
        steps = [scalar(t) for t in steps]
        negative_coeff = -coeff
        on_device = [x for x in (*steps, beta1, beta2, eps) if isinstance(x, Tensor)]
        if not on_device:
            alphas, epsilons = [], []
            for t in steps:
                root_bias_correction2 = math.sqrt(1.0 - beta2**t)
                # a 0-dim tensor only where the lr itself lives on the device
                alphas.append(negative_coeff * (root_bias_correction2 / (1.0 - beta1**t)))
                epsilons.append(eps * root_bias_correction2)
            return alphas, epsilons
        device = on_device[0].device
        t = torch.stack([torch.as_tensor(step, device=device) for step in steps])
        root_bias_correction2 = (1.0 - beta2**t).sqrt()
        alphas = (negative_coeff * root_bias_correction2 / (1.0 - beta1**t)).unbind()
        epsilons = (eps * root_bias_correction2).unbind()
        return list(alphas), list(epsilons)


@dataclass(frozen=True)
class LastUpdate:
    """Δ̂ = (θ_before − θ_after)/γ of the last step, recorded by the predictor's step hooks (any optimizer)."""

    decoupled_decay: bool = False  # any weight decay is already inside the recorded update


LAST_UPDATE = LastUpdate()

Rule = Momentum | Adaptive | LastUpdate
#: a rule for every param group, or a function of the group returning one (ValueError: a flag not modelled)
RuleEntry = Rule | Callable[[dict], Rule]

_REGISTRY: dict[type | str, RuleEntry] = {}


def register_rule(optimizer: type | str, rule: RuleEntry) -> None:
    """Let ``rule="auto"`` predict ``optimizer`` (and its subclasses) with ``rule``.

    ``optimizer`` is a class or its name as ``f"{cls.__module__}.{cls.__qualname__}"``
    (the module that defines it, e.g. ``"timm.optim.adabelief.AdaBelief"``).
    ``rule`` is a :class:`Momentum`, :class:`Adaptive` or :data:`LAST_UPDATE`,
    or a function ``group -> rule`` for optimizers whose flags change the rule;
    it raises ``ValueError`` with one line naming a flag it cannot model.
    Registering a class again replaces its rule.
    """
    if not isinstance(optimizer, type | str):
        raise TypeError(f"register_rule: expected an optimizer class or its qualified name, got {optimizer!r}")
    if not isinstance(rule, Momentum | Adaptive | LastUpdate) and not callable(rule):
        raise TypeError(f"register_rule: expected a rule or a function of the param group, got {rule!r}")
    _REGISTRY[optimizer] = rule


def rule_for(optimizer: torch.optim.Optimizer, group: dict) -> Rule:
    """The registered rule for one param group of ``optimizer``, or a ValueError saying what is not modelled."""
    kind = type(optimizer)
    if group.get("differentiable", False):
        raise ValueError(
            f"WeightPredictor: {kind.__name__}(differentiable=True) is not modelled: "
            "the predicted weights are written outside autograd, so no gradient would flow through them"
        )
    for cls in kind.__mro__:
        entry = _REGISTRY.get(cls, _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}"))
        if entry is None:
            continue
        if isinstance(entry, Momentum | Adaptive | LastUpdate):
            return entry
        try:
            return entry(group)
        except ValueError as error:
            raise ValueError(f"WeightPredictor: {error}") from None
    raise ValueError(
        f"WeightPredictor: no rule registered for {kind.__module__}.{kind.__qualname__}; "
        "use rule='last_update' (any optimizer) or xgrad.register_rule(...) (see README)"
    )


def scalar(value: float | Tensor) -> float | Tensor:
    """``value`` as a float when that reads no accelerator memory, else the tensor itself (kept on its device)."""
    if isinstance(value, Tensor) and not _on_host(value):
        return value
    return float(value)


def _on_host(tensor: Tensor) -> bool:
    return tensor.device.type == "cpu"


def _refuse(name: str, flag: str, value: object, why: str) -> ValueError:
    return ValueError(f"{name}({flag}={value!r}) is not modelled by rule='auto' ({why}); use rule='last_update'")


# -- built-in entries -------------------------------------------------------------------------


def _sgd(group: dict, name: str = "SGD", decoupled: bool = False) -> Rule:
    if group["momentum"] == 0:
        raise _refuse(name, "momentum", group["momentum"], "it keeps no state to predict from")
    return Momentum("momentum_buffer", decoupled_decay=decoupled)


def _rmsprop(group: dict) -> Rule:
    # with momentum the buffer is the step; without, v has lost the gradient's sign: record the step
    return Momentum("momentum_buffer") if group["momentum"] > 0 else LAST_UPDATE


def _adam(group: dict, decoupled: bool = False) -> Rule:
    second = "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"
    return Adaptive("exp_avg", second, decoupled_decay=decoupled or bool(group.get("decoupled_weight_decay", False)))


def _adabelief(group: dict) -> Rule:
    return Adaptive("exp_avg", "exp_avg_var", decoupled_decay=group["decoupled_weight_decay"])


def _adam3(group: dict) -> Rule:
    return Adaptive("exp_avg", "exp_avg_sq", eps_outside_root=False, decoupled_decay=group["decoupled_weight_decay"])


register_rule(torch.optim.SGD, _sgd)
register_rule(torch.optim.RMSprop, _rmsprop)
register_rule(torch.optim.Adam, _adam)
register_rule(torch.optim.AdamW, lambda group: _adam(group, decoupled=True))  # also where AdamW does not subclass Adam
register_rule(AdaBelief, _adabelief)
register_rule(AdaM3, _adam3)


# timm, by qualified name (registering imports nothing). Each `step` was read in timm 1.0.31 and is
# run against its rule in tests/test_rules.py; flags that take the step beyond the rule are refused.
# Not registered, because none of the three rules is their step: RAdamLegacy and
# AdaBelief(rectify=True) (rectified steps), NAdamLegacy and NAdamW (Nesterov-style: the step mixes
# in the next gradient), AdamP and SGDP (projections), Lamb and Lars (trust ratios), LaProp (lr
# inside the moment and an lr-weighted bias correction), Lion (the sign of a mix with the next
# gradient), Adan and Mars (gradient differences), RMSpropTF (lr inside the momentum buffer), and
# the factored or preconditioned MADGRAD, Adafactor, AdafactorBigVision, Adahessian, Kron, Muon and
# NvNovoGrad. rule='last_update' serves all of them.


def _timm_refusals(name: str, group: dict) -> None:
    if group.get("caution", False):
        raise _refuse(name, "caution", True, "the cautious mask depends on the next gradient")
    if group.get("corrected_weight_decay", False):
        raise _refuse(name, "corrected_weight_decay", True, "the decay is scaled by γ²/γ_max")


def _timm_adabelief(group: dict) -> Rule:
    if group["rectify"]:
        raise _refuse("AdaBelief", "rectify", True, "the rectified step is RAdam's; rectify=False is Adam's")
    if group["decoupled_decay"] and group["fixed_decay"]:
        raise _refuse("AdaBelief", "fixed_decay", True, "the decay does not scale with γ")
    second = "max_exp_avg_var" if group["amsgrad"] else "exp_avg_var"
    return Adaptive("exp_avg", second, decoupled_decay=group["decoupled_decay"])


def _timm_adamw(group: dict) -> Rule:
    _timm_refusals("AdamWLegacy", group)
    if group.get("clipping_threshold") is not None:
        clip = group["clipping_threshold"]
        raise _refuse("AdamWLegacy", "clipping_threshold", clip, "the clip depends on the next gradient")
    return _adam(group, decoupled=True)


def _timm_adopt(group: dict) -> Rule:
    # θ ← θ − γ·m right after m ← β1·m + (1 − β1)·clip(g/√v): its first moment is its step
    _timm_refusals("Adopt", group)
    return Momentum("exp_avg", decoupled_decay=group["decoupled"])


def _timm_sgdw(group: dict) -> Rule:
    _timm_refusals("SGDW", group)
    return _sgd(group, name="SGDW", decoupled=True)


register_rule("timm.optim.adabelief.AdaBelief", _timm_adabelief)
register_rule("timm.optim.adamw.AdamWLegacy", _timm_adamw)
register_rule("timm.optim.adopt.Adopt", _timm_adopt)
register_rule("timm.optim.sgdw.SGDW", _timm_sgdw)

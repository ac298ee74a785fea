"""Prediction rules: the update Δ̂ an optimizer would apply next, read off its state, and which optimizer gets which.

XGrad writes θ̂_{t+s} = θ_t·(1 − s·γ·λ) − s·γ·Δ̂, where Δ̂ is the update the
optimizer would apply next per unit of learning rate and λ its decoupled
weight decay, if any (docs/method.md). A rule computes Δ̂ for one param group
from the state the optimizer stored after its ``t``-th update, with the
coefficients of update ``t + 1``:

- :class:`Momentum` — Δ̂ is a stored buffer (SGD and RMSprop with momentum,
  timm's SGDW, and timm's Adopt, whose step is its first moment);
- :class:`Sign` — Δ̂ = sign(buffer) (Lion);
- :class:`Adaptive` — Δ̂ = a·m/(√v + e) + b·m, with the scalars (a, e, b) of
  :meth:`Adaptive.coefficients` from the group and per-parameter scalars of
  the state (Adam, AdamW, NAdam, RAdam in both its phases, Adamax,
  AdaBelief, AdaM3, and timm's AdamWLegacy, NAdamW and the legacy ones);
- :class:`Direction` — Δ̂ = any function of one parameter's state and its
  group (timm's AdaBelief, whose next second moment depends on its next first moment);
- :data:`LAST_UPDATE` — Δ̂ is the last applied update, recorded by the
  predictor's step hooks in the optimizer's own state (RMSprop without
  momentum; ``rule="last_update"`` for any optimizer).

Where the next update depends on the next gradient g (Nesterov-style steps,
rectification, Lion's sign), g is taken to be the bias-corrected first moment
m̂_t = m_t/(1 − β1^t) and g² the bias-corrected second moment: under a gradient
that stays constant those estimates are exact, so every :class:`Adaptive`,
:class:`Sign` and :class:`Direction` rule here equals the optimizer's real next
step then (tests/test_rules.py checks each to 1e-6 against the optimizer).
Momentum buffers and RMSprop's record are the paper's rules.

``rule="auto"`` looks the optimizer up in a registry. :func:`register_rule`
maps an optimizer class — or its qualified name, so that registering a
library's optimizer does not import the library — to a rule, or to a function
of the param group that returns one and raises ``ValueError`` naming the flag
it does not model. The lookup walks the class's MRO, so a subclass inherits its
base's rule until it registers its own. The built-in entries at the end of
this module are ordinary registrations.

``maximize=True`` needs no sign: every optimizer here negates the gradient
*before* it enters the state, so the state already points the way the
optimizer moves. ``nesterov=True`` SGD is predicted from its buffer b_t, exact
in expectation with E[g] = (1 − μ)·b_t (docs/method.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from xgrad.optim import AdaBelief, AdaM3

#: the optimizer-state key under which the predictor's step hooks keep the last applied update
RECORD = "xgrad_last_update"

#: a float, or a tensor (0-dim, or 1-dim with one entry per parameter) where the value lives on an accelerator
Number = float | Tensor


@dataclass(frozen=True)
class Rule:
    """What every rule says: the state tensors it reads, and whether the optimizer decays θ ← θ(1 − γλ) itself.

    ``decoupled_decay``: the optimizer shrinks θ by (1 − γλ) each step, λ = the
    group's ``weight_decay`` (the predictor then adds that term unless asked for
    the paper's form, ``WeightPredictor(decoupled_decay=False)``).
    """

    decoupled_decay: bool = field(default=False, kw_only=True)

    #: the state keys whose tensors the rule reads (the predictor keeps them in its plan)
    keys: tuple[str, ...] = field(default=(), init=False)

    def state_tensors(self, state: dict) -> tuple[Tensor, ...] | None:
        """The tensors of ``keys`` in ``state``, or None while the optimizer has not created them (θ̂ = θ)."""
        if any(key not in state for key in self.keys):
            return None
        return tuple(state[key] for key in self.keys)


@dataclass(frozen=True)
class Momentum(Rule):
    """Δ̂ = ``state[buffer]``: the optimizer steps θ ← θ − γ·buffer after updating the buffer."""

    buffer: str = "momentum_buffer"

    def __post_init__(self):
        object.__setattr__(self, "keys", (self.buffer,))


@dataclass(frozen=True)
class Sign(Momentum):
    """Δ̂ = sign(``state[buffer]``): a sign step (Lion: sign(β1·m + (1 − β1)·g) = sign(m) when g ∝ m̂)."""

    buffer: str = "exp_avg"


class Coefficients(NamedTuple):
    """Δ̂ = adaptive·m/(√v + eps) + plain·m for one parameter (or for each, as 1-dim tensors)."""

    adaptive: Number
    eps: Number
    plain: Number = 0.0


@dataclass(frozen=True)
class Adaptive(Rule):
    """Δ̂ = a·m/(√v + e) + b·m, m = ``state[exp_avg]``, v = ``state[exp_avg_sq]``, (a, e, b) = ``coefficients``.

    The default coefficients are Adam's, a = √(1 − β2^t)/(1 − β1^t) and
    e = ε·√(1 − β2^t), i.e. Δ̂ = m̂/(√v̂ + ε). A subclass overrides
    :meth:`coefficients` for its own step (RAdam's rectification, NAdam's
    momentum schedule); ``scalars`` names the per-parameter state entries it
    takes, in order. ``root=False`` divides by v itself (Adamax's ∞-norm).
    ``exp_avg_sq`` names the buffer in the denominator (the running maximum
    with amsgrad); ``eps_outside_root=False`` for optimizers whose ε is
    inside v already (AdaM3).
    """

    exp_avg: str = "exp_avg"
    exp_avg_sq: str = "exp_avg_sq"
    eps_outside_root: bool = True
    root: bool = True
    scalars: tuple[str, ...] = ("step",)

    def __post_init__(self):
        object.__setattr__(self, "keys", (self.exp_avg, self.exp_avg_sq))

    def state_tensors(self, state: dict) -> tuple[Tensor, ...] | None:
        if self.exp_avg in state and self.exp_avg_sq not in state:
            raise RuntimeError(
                f"WeightPredictor: optimizer state has no '{self.exp_avg_sq}' "
                f"(state keys: {sorted(state)}); was the optimizer's amsgrad flag changed?"
            )
        return super().state_tensors(state)

    def coefficients(self, group: dict, step: Number) -> Coefficients:
        """(a, e, b) after ``step`` updates, in arithmetic that works on floats and on tensors alike.

        Written with ``**``, ``*``, ``/`` and :func:`where` only, one function
        serves step counts held on the host (floats) and on an accelerator
        (tensors with one entry per parameter), so nothing is read back.
        """
        beta1, beta2 = group["betas"]
        root_bias_correction2 = (1 - beta2**step) ** 0.5
        eps = group["eps"] * root_bias_correction2 if self.eps_outside_root else 0.0
        return Coefficients(root_bias_correction2 / (1 - beta1**step), eps)


@dataclass(frozen=True)
class Direction(Rule):
    """Δ̂ = ``function(state, group)`` for one parameter: any update that is a function of the state.

    The function returns a tensor shaped like the parameter (Δ̂ per unit of
    learning rate, without the decoupled decay, which ``decoupled_decay`` adds),
    or None for θ̂ = θ. Open to any optimizer at the cost of a temporary per
    parameter; the other rules run as multi-tensor kernels.
    """

    function: Callable[[dict, dict], Tensor | None] | None = None

    def direction(self, state: dict, group: dict) -> Tensor | None:
        return self.function(state, group)


@dataclass(frozen=True)
class LastUpdate(Momentum):
    """Δ̂ = (θ_before − θ_after)/γ of the last step, recorded by the predictor's step hooks (any optimizer).

    The record lives in the optimizer's state under :data:`RECORD`, so it
    travels with ``optimizer.state_dict()`` into every checkpoint and back.
    Any weight decay is already inside the recorded update.
    """

    buffer: str = RECORD


LAST_UPDATE = LastUpdate()

#: a rule for every param group, or a function of the group returning one (ValueError: a flag not modelled)
RuleEntry = Rule | Callable[[dict], Rule]

_REGISTRY: dict[type | str, RuleEntry] = {}


def register_rule(optimizer: type | str, rule: RuleEntry) -> None:
    """Let ``rule="auto"`` predict ``optimizer`` (and its subclasses) with ``rule``.

    ``optimizer`` is a class or its name as ``f"{cls.__module__}.{cls.__qualname__}"``
    (the module that defines it, e.g. ``"timm.optim.adabelief.AdaBelief"``).
    ``rule`` is a :class:`Rule` (:class:`Momentum`, :class:`Sign`,
    :class:`Adaptive`, :class:`Direction`, :data:`LAST_UPDATE`), or a function
    ``group -> rule`` for optimizers whose flags change the rule; it raises
    ``ValueError`` with one line naming a flag it cannot model. Registering a
    class again replaces its rule.
    """
    if not isinstance(optimizer, type | str):
        raise TypeError(f"register_rule: expected an optimizer class or its qualified name, got {optimizer!r}")
    if not isinstance(rule, Rule) and not callable(rule):
        raise TypeError(f"register_rule: expected a rule or a function of the param group, got {rule!r}")
    if isinstance(rule, Direction) and not callable(rule.function):
        raise TypeError(f"register_rule: Direction needs a function (state, group) -> Δ̂, got {rule.function!r}")
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
        if isinstance(entry, Rule):
            return entry
        try:
            return entry(group)
        except ValueError as error:
            raise ValueError(f"WeightPredictor: {error}") from None
    raise ValueError(
        f"WeightPredictor: no rule registered for {kind.__module__}.{kind.__qualname__}; register one with "
        "xgrad.register_rule (README, 'Your own optimizer') or use rule='last_update', which extrapolates "
        "the last applied update of any optimizer"
    )


def scalar(value: float | Tensor) -> float | Tensor:
    """``value`` as a float when that reads no accelerator memory, else the tensor itself (kept on its device)."""
    if isinstance(value, Tensor) and not _on_host(value):
        return value
    return float(value)


def where(condition: bool | Tensor, if_true: Number, if_false: Number) -> Number:
    """``if_true if condition else if_false`` for floats, ``torch.where`` for tensors: a phase switch of a rule."""
    if isinstance(condition, Tensor):
        return torch.where(condition, if_true, if_false)
    return if_true if condition else if_false


def _on_host(tensor: Tensor) -> bool:
    return tensor.device.type == "cpu"


def _refuse(name: str, flag: str, value: object, why: str, instead: str = "rule='last_update'") -> ValueError:
    advice = f"; use {instead}" if instead else ""
    return ValueError(f"{name}({flag}={value!r}) is not modelled by rule='auto' ({why}){advice}")


# -- rules of the Adam family's next step -------------------------------------------------------


@dataclass(frozen=True)
class Rectified(Adaptive):
    """RAdam's next step: the rectified Adam step once ρ_{t+1} passes 5, else m̂ (its SGD phase).

    With m̂ and v̂ unchanged by the next step, a = r_{t+1}·√(1 − β2^t)/(1 − β1^t)
    and e = ε·√((1 − β2^t)/(1 − β2^{t+1})) (RAdam adds ε to √v, not to √v̂);
    in the SGD phase a = 0 and b = 1/(1 − β1^t). ``inclusive``: the rectified
    phase starts at ρ ≥ 5 (timm's legacy RAdam), not ρ > 5 (torch's).
    """

    inclusive: bool = False

    def coefficients(self, group: dict, step: Number) -> Coefficients:
        beta1, beta2 = group["betas"]
        rho, rectification = _rectification(beta2, step + 1)
        rectified = rho >= 5 if self.inclusive else rho > 5
        bias_correction1 = 1 - beta1**step
        bias_correction2, bias_correction2_next = 1 - beta2**step, 1 - beta2 ** (step + 1)
        adaptive = rectification * bias_correction2**0.5 / bias_correction1
        eps = group["eps"] * (bias_correction2 / bias_correction2_next) ** 0.5
        return Coefficients(where(rectified, adaptive, 0.0), eps, where(rectified, 0.0, 1 / bias_correction1))


def _rectification(beta2: Number, step: Number) -> tuple[Number, Number]:
    """RAdam's ρ_step and rectification term r_step (r is set to 0 below ρ = 4, where it is never used)."""
    rho_inf = 2 / (1 - beta2) - 1
    beta2_step = beta2**step
    rho = rho_inf - 2 * step * beta2_step / (1 - beta2_step)
    ratio = (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)
    if isinstance(ratio, Tensor):
        return rho, ratio.clamp(min=0) ** 0.5
    return rho, max(ratio, 0.0) ** 0.5


@dataclass(frozen=True)
class NesterovAdam(Adaptive):
    """NAdam's next step (Dozat's momentum schedule μ_t = β1·(1 − ½·0.96^{tψ}), torch's NAdam and timm's legacy one).

    Update t+1 = T adds γ(1 − μ_T)/(1 − Π_T)·ĝ/d + γμ_{T+1}/(1 − Π_{T+1})·m_T/d, with
    Π the product of the μ (``state[product]``), ĝ = m̂_t, m_T = β1·m_t + (1 − β1)·ĝ
    and d = √v̂_t + ε: a multiple of m_t/(√v_t + ε·√(1 − β2^t)).
    """

    scalars: tuple[str, ...] = ("step", "mu_product")
    schedule: str = "momentum_decay"

    def coefficients(self, group: dict, step: Number, product: Number) -> Coefficients:
        beta1, beta2 = group["betas"]
        decay = group[self.schedule]
        mu = beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * decay))
        mu_next = beta1 * (1 - 0.5 * 0.96 ** ((step + 2) * decay))
        product, product_next = product * mu, product * mu * mu_next
        bias_correction1 = 1 - beta1**step
        first = beta1 + (1 - beta1) / bias_correction1  # m_T / m_t
        scale = (1 - mu) / (1 - product) / bias_correction1 + mu_next / (1 - product_next) * first
        root_bias_correction2 = (1 - beta2**step) ** 0.5
        return Coefficients(scale * root_bias_correction2, group["eps"] * root_bias_correction2)


@dataclass(frozen=True)
class NesterovAdamW(Adaptive):
    """timm's NAdamW: Adam's step on β1·m_T + (1 − β1)·g, which is m_t·(β1² + (1 − β1²)/(1 − β1^t)) when g = m̂_t."""

    def coefficients(self, group: dict, step: Number) -> Coefficients:
        beta1, beta2 = group["betas"]
        bias_correction1 = 1 - beta1**step
        lookahead = beta1**2 + (1 - beta1**2) / bias_correction1
        root_bias_correction2 = (1 - beta2**step) ** 0.5
        adaptive = lookahead / (1 - beta1 ** (step + 1)) * root_bias_correction2
        return Coefficients(adaptive, group["eps"] * root_bias_correction2)


@dataclass(frozen=True)
class InfinityNorm(Adaptive):
    """Adamax: Δ̂ = m̂_t / u_t, u the ∞-norm (ε inside it); u_{t+1} = u_t while |g| stays below u."""

    exp_avg_sq: str = "exp_inf"
    root: bool = False

    def coefficients(self, group: dict, step: Number) -> Coefficients:
        beta1 = group["betas"][0]
        return Coefficients(1 / (1 - beta1**step), 0.0)


def _timm_adabelief_direction(group: dict, amsgrad: bool) -> Callable[[dict, dict], Tensor | None]:
    """timm's AdaBelief (rectified or not): its next step with g = m̂_t, s updated from the residual g − m_{t+1}."""

    def direction(state: dict, group: dict) -> Tensor | None:
        if "exp_avg" not in state:
            return None
        beta1, beta2 = group["betas"]
        eps, step = group["eps"], float(state["step"])
        m = state["exp_avg"]
        bias_correction1 = 1 - beta1**step
        m_next = m * (beta1 + (1 - beta1) / bias_correction1)
        residual = m * (1 / bias_correction1) - m_next
        s_next = state["exp_avg_var"] * beta2 + (1 - beta2) * residual.square() + eps
        bias_correction1_next, bias_correction2_next = 1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1)
        if not group["rectify"]:
            second = torch.maximum(state["max_exp_avg_var"], s_next) if amsgrad else s_next
            return m_next / bias_correction1_next / (second.sqrt() / bias_correction2_next**0.5 + eps)
        rho, rectification = _rectification(beta2, step + 1)
        if rho >= 5:
            size = rectification * bias_correction2_next**0.5 / bias_correction1_next
            return m_next * size / (s_next.sqrt() + eps)
        if group["degenerated_to_sgd"]:
            return m_next / bias_correction1_next
        return torch.zeros_like(m)

    return direction


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


def _radam(group: dict) -> Rule:
    return Rectified(decoupled_decay=group["decoupled_weight_decay"])


def _nadam(group: dict) -> Rule:
    return NesterovAdam(decoupled_decay=group["decoupled_weight_decay"])


def _no_rule(name: str, why: str, instead: str | None) -> Callable[[dict], Rule]:
    def refuse(group: dict) -> Rule:
        advice = f"; use {instead}" if instead else ""
        raise ValueError(f"{name} is not modelled by rule='auto': {why}{advice}")

    return refuse


_LAST = "rule='last_update'"

register_rule(torch.optim.SGD, _sgd)
register_rule(torch.optim.RMSprop, _rmsprop)
register_rule(torch.optim.Adam, _adam)
register_rule(torch.optim.AdamW, lambda group: _adam(group, decoupled=True))  # also where AdamW does not subclass Adam
register_rule(torch.optim.RAdam, _radam)
register_rule(torch.optim.NAdam, _nadam)
register_rule(torch.optim.Adamax, InfinityNorm())
register_rule(AdaBelief, _adabelief)
register_rule(AdaM3, _adam3)
# what is not a function of the state: refused, with the alternative only where it is a good one
_NOT_A_FUNCTION_OF_THE_STATE = {
    torch.optim.LBFGS: ("its step evaluates the closure at weights of its own line search", None),
    torch.optim.Rprop: ("its step sizes grow or shrink with the sign of the next gradient", _LAST),
    torch.optim.Adagrad: ("its state has lost the gradient's sign, as RMSprop's has", _LAST),
    torch.optim.Adadelta: ("its state has lost the gradient's sign, as RMSprop's has", _LAST),
    torch.optim.SparseAdam: ("its sparse step touches only the rows of the next gradient", None),
}
for _cls, (_why, _instead) in _NOT_A_FUNCTION_OF_THE_STATE.items():
    register_rule(_cls, _no_rule(_cls.__name__, _why, _instead))


# timm, by qualified name (registering imports nothing). Each `step` was read in timm 1.0.31 and is
# run against its rule in tests/test_rules.py; flags that take the step beyond the rule are refused.
# Not registered: AdamP and SGDP (projections that depend on the next gradient), Lamb and Lars
# (trust ratios of the next update), LaProp (lr inside the moment), Adan and Mars (gradient
# differences), RMSpropTF (lr inside the momentum buffer), and the factored or preconditioned
# MADGRAD, Adafactor, AdafactorBigVision, Adahessian, Kron, Muon and NvNovoGrad.
# rule='last_update' serves all of them.


def _timm_refusals(name: str, group: dict) -> None:
    if group.get("caution", False):
        raise _refuse(name, "caution", True, "the cautious mask depends on the next gradient")
    if group.get("corrected_weight_decay", False):
        raise _refuse(name, "corrected_weight_decay", True, "the decay is scaled by γ²/γ_max")
    if group.get("clipping_threshold") is not None:
        clip = group["clipping_threshold"]
        raise _refuse(name, "clipping_threshold", clip, "the clip depends on the next gradient")


def _timm_adabelief(group: dict) -> Rule:
    if group["decoupled_decay"] and group["fixed_decay"]:
        raise _refuse("AdaBelief", "fixed_decay", True, "the decay does not scale with γ")
    direction = _timm_adabelief_direction(group, amsgrad=group["amsgrad"])
    return Direction(function=direction, decoupled_decay=group["decoupled_decay"])


def _timm_adamw(group: dict) -> Rule:
    _timm_refusals("AdamWLegacy", group)
    return _adam(group, decoupled=True)


def _timm_adopt(group: dict) -> Rule:
    # θ ← θ − γ·m right after m ← β1·m + (1 − β1)·clip(g/√v): its first moment is its step
    _timm_refusals("Adopt", group)
    return Momentum("exp_avg", decoupled_decay=group["decoupled"])


def _timm_sgdw(group: dict) -> Rule:
    _timm_refusals("SGDW", group)
    return _sgd(group, name="SGDW", decoupled=True)


def _timm_nadamw(group: dict) -> Rule:
    _timm_refusals("NAdamW", group)
    return NesterovAdamW(decoupled_decay=True)


def _timm_lion(group: dict) -> Rule:
    _timm_refusals("Lion", group)
    return Sign("exp_avg", decoupled_decay=True)


register_rule("timm.optim.adabelief.AdaBelief", _timm_adabelief)
register_rule("timm.optim.adamw.AdamWLegacy", _timm_adamw)
register_rule("timm.optim.adopt.Adopt", _timm_adopt)
register_rule("timm.optim.sgdw.SGDW", _timm_sgdw)
register_rule("timm.optim.nadamw.NAdamW", _timm_nadamw)
register_rule("timm.optim.lion.Lion", _timm_lion)
register_rule("timm.optim.radam.RAdamLegacy", Rectified(inclusive=True, decoupled_decay=True))
register_rule("timm.optim.nadam.NAdamLegacy", NesterovAdam(scalars=("step", "m_schedule"), schedule="schedule_decay"))

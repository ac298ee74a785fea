"""Every registered rule against the optimizer itself: θ̂ − θ must point where the next step really goes.

The gradient is held constant (a fixed random tensor per parameter) for a few
steps; then the predicted displacement θ̂ − θ_t is compared with s times the
real next displacement θ_{t+1} − θ_t that ``opt.step()`` makes with the same
gradient. The cosine must exceed 0.99 — a no-op predictor (no displacement) or
a wrong sign (cosine −1) fails.

Where the next step is a function of the state it is asserted exact, to 1e-6
(float64): every Adam-family rule, Lion and timm's AdaBelief predict the next
step with the next gradient taken to be the bias-corrected first moment, which a
constant gradient makes exact — so RAdam's rectification, NAdam's momentum
schedule and NAdamW's look-ahead must all come out right, in both of RAdam's
phases. Decoupled decay is exact with the library's default (it predicts the
λθ term); the paper's form (``decoupled_decay=False``) and coupled decay (the
gradient g + λθ drifts) are checked for direction only, as are momentum
buffers, RMSprop and this project's AdaBelief (the paper's rules, whose state
is still moving by transient factors 1 − μ^t, 1 − α^t, ...).

The same cases also run forward and backward inside ``optimizer.step(closure)``
(Lightning's path), which must train exactly as the plain loop.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import xgrad
import xgrad.rules
from xgrad import WeightPredictor
from xgrad.optim import AdaBelief, AdaM3

try:
    import timm.optim as timm_optim
except ImportError:  # the library does not need timm; its entries are tested where it is installed
    timm_optim = None

needs_timm = pytest.mark.skipif(timm_optim is None, reason="timm is not installed")

SHAPES = [(7, 5), (5,), (3, 4, 2)]


def make_params(dtype=torch.float64, seed: int = 0, scale: float = 1.0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((scale * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype)) for s in SHAPES]


def constant_gradients(params, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


def step_with(opt, params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()


def flat(params) -> torch.Tensor:
    """All parameters as one float64 vector (complex ones as their real and imaginary parts)."""
    real = [torch.view_as_real(p.detach()) if p.is_complex() else p.detach() for p in params]
    return torch.cat([r.reshape(-1) for r in real]).double()


def predicted_and_real(opt, params, grads, *, steps: int, warmup: int = 5, decoupled_decay=None, rule="auto"):
    """(θ̂ − θ_t, s·(θ_{t+1} − θ_t)) after ``warmup`` steps with the constant ``grads``."""
    predictor = WeightPredictor(opt, steps=steps, decoupled_decay=decoupled_decay, rule=rule)  # first: records
    for _ in range(warmup):
        step_with(opt, params, grads)
    theta = flat(params)
    with predictor.predicted():
        predicted = flat(params) - theta
    assert torch.equal(flat(params), theta), "restore must be bit-exact"
    step_with(opt, params, grads)
    return predicted, steps * (flat(params) - theta)


def assert_points_along(predicted: torch.Tensor, real: torch.Tensor, exact: bool, tolerance: float = 1e-6) -> None:
    assert real.norm() > 0, "the optimizer did not move: nothing to compare with"
    assert predicted.norm() > 0, "the predictor did not move the weights"
    cosine = torch.nn.functional.cosine_similarity(predicted, real, dim=0).item()
    assert cosine > 0.99, f"cosine {cosine:.6f} with the real next step"
    if exact:
        error = ((predicted - real).norm() / real.norm()).item()
        assert error < tolerance, f"relative error {error:.3g} where the next step is determined by the state"


@dataclass(frozen=True)
class Case:
    factory: Callable
    exact: bool = False
    decoupled_decay: bool | None = None  # the predictor's option (None: the library's default)
    marks: tuple = ()
    tolerance: float = 1e-6  # relative error where exact (float32 arithmetic inside the optimizer: more)


IMPLEMENTATIONS = {"foreach": {"foreach": True}, "for_loop": {"foreach": False}}


def _kwargs_id(kwargs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


def _with_options(cases: dict, name: str, factory, decoupled: bool, wd: float, marks=(), paper=False, **kw) -> None:
    """The default (decay predicted: exact) and, for AdamW (``paper``), the paper's form too (direction only)."""
    for option in (None, False) if paper and decoupled and wd else (None,):
        case = Case(factory, exact=option is None, decoupled_decay=option, marks=marks, **kw)
        cases[f"{name}-decoupled_decay={option}"] = case


def torch_cases() -> dict[str, Case]:
    """torch's optimizers under every combination of the flags that change their step (capturable needs a GPU)."""
    cases = {}
    impls = {**IMPLEMENTATIONS, "fused": {"fused": True}}
    for cls, maximize, amsgrad, wd, impl in itertools.product(
        (torch.optim.Adam, torch.optim.AdamW), (False, True), (False, True), (0.0, 0.01), impls
    ):
        if cls is torch.optim.AdamW:
            variants = [{}]  # always decoupled
        else:
            variants = [{"decoupled_weight_decay": d} for d in ((False, True) if wd else (False,))]
        for variant in variants:
            kwargs = dict(lr=1e-2, weight_decay=wd, amsgrad=amsgrad, maximize=maximize, **variant, **impls[impl])
            factory = lambda ps, cls=cls, kwargs=kwargs: cls(ps, **kwargs)  # noqa: E731
            decoupled = cls is torch.optim.AdamW or variant.get("decoupled_weight_decay", False)
            if wd and not decoupled:
                cases[f"{cls.__name__}({_kwargs_id(kwargs)})"] = Case(factory)  # coupled: the gradient drifts
            else:
                _with_options(cases, f"{cls.__name__}({_kwargs_id(kwargs)})", factory, decoupled, wd, paper=True)
    for cls, maximize, wd, impl in itertools.product(
        (torch.optim.RAdam, torch.optim.NAdam), (False, True), (0.0, 0.01), IMPLEMENTATIONS
    ):
        for decoupled in (False, True) if wd else (False,):
            kwargs = dict(lr=1e-2, weight_decay=wd, decoupled_weight_decay=decoupled, maximize=maximize)
            kwargs.update(IMPLEMENTATIONS[impl])
            factory = lambda ps, cls=cls, kwargs=kwargs: cls(ps, **kwargs)  # noqa: E731
            if wd and not decoupled:
                cases[f"{cls.__name__}({_kwargs_id(kwargs)})"] = Case(factory)
            else:
                _with_options(cases, f"{cls.__name__}({_kwargs_id(kwargs)})", factory, decoupled, wd)
    for maximize, wd, impl in itertools.product((False, True), (0.0, 0.01), IMPLEMENTATIONS):
        kwargs = dict(lr=1e-2, weight_decay=wd, maximize=maximize, **IMPLEMENTATIONS[impl])
        cases[f"Adamax({_kwargs_id(kwargs)})"] = Case(lambda ps, kwargs=kwargs: torch.optim.Adamax(ps, **kwargs), exact=wd == 0)
    for maximize, (nesterov, dampening), wd, impl in itertools.product(
        (False, True), ((False, 0.0), (False, 0.3), (True, 0.0)), (0.0, 0.01), impls
    ):
        kwargs = dict(lr=0.05, momentum=0.9, dampening=dampening, nesterov=nesterov, weight_decay=wd, maximize=maximize)
        kwargs.update(impls[impl])
        cases[f"SGD({_kwargs_id(kwargs)})"] = Case(lambda ps, kwargs=kwargs: torch.optim.SGD(ps, **kwargs))
    for maximize, centered, momentum, wd, impl in itertools.product(
        (False, True), (False, True), (0.0, 0.9), (0.0, 0.01), IMPLEMENTATIONS
    ):
        kwargs = dict(lr=1e-2, centered=centered, momentum=momentum, weight_decay=wd, maximize=maximize)
        kwargs.update(IMPLEMENTATIONS[impl])
        cases[f"RMSprop({_kwargs_id(kwargs)})"] = Case(lambda ps, kwargs=kwargs: torch.optim.RMSprop(ps, **kwargs))
    for cls, wd, decoupled, impl in itertools.product((AdaBelief, AdaM3), (0.0, 0.01), (False, True), IMPLEMENTATIONS):
        kwargs = dict(lr=1e-2, weight_decay=wd, decoupled_weight_decay=decoupled, **IMPLEMENTATIONS[impl])
        factory = lambda ps, cls=cls, kwargs=kwargs: cls(ps, **kwargs)  # noqa: E731
        cases[f"{cls.__name__}({_kwargs_id(kwargs)})"] = Case(factory)
    return cases


def timm_cases() -> dict[str, Case]:
    cases = {}
    mark = (needs_timm,)
    for rectify, amsgrad, decoupled, wd, impl in itertools.product(
        (False, True), (False, True), (False, True), (0.0, 0.01), IMPLEMENTATIONS
    ):
        kwargs = dict(lr=1e-2, amsgrad=amsgrad, decoupled_decay=decoupled, weight_decay=wd, rectify=rectify)
        kwargs.update(IMPLEMENTATIONS[impl])
        factory = lambda ps, kwargs=kwargs: timm_optim.AdaBelief(ps, **kwargs)  # noqa: E731
        cases[f"timm.AdaBelief({_kwargs_id(kwargs)})"] = Case(factory, exact=wd == 0 or decoupled, marks=mark)
    for maximize, amsgrad, wd, impl in itertools.product((False, True), (False, True), (0.0, 0.01), IMPLEMENTATIONS):
        kwargs = dict(lr=1e-2, amsgrad=amsgrad, weight_decay=wd, maximize=maximize, **IMPLEMENTATIONS[impl])
        factory = lambda ps, kwargs=kwargs: timm_optim.AdamWLegacy(ps, **kwargs)  # noqa: E731
        _with_options(cases, f"timm.AdamWLegacy({_kwargs_id(kwargs)})", factory, True, wd, marks=mark, paper=True)
    for maximize, decoupled, wd, impl in itertools.product((False, True), (False, True), (0.0, 0.01), IMPLEMENTATIONS):
        kwargs = dict(lr=1e-2, decoupled=decoupled, weight_decay=wd, maximize=maximize, **IMPLEMENTATIONS[impl])
        factory = lambda ps, kwargs=kwargs: timm_optim.Adopt(ps, **kwargs)  # noqa: E731
        cases[f"timm.Adopt({_kwargs_id(kwargs)})"] = Case(factory, marks=mark)
    for maximize, (nesterov, dampening), wd, impl in itertools.product(
        (False, True), ((False, 0.0), (False, 0.3), (True, 0.0)), (0.0, 0.01), IMPLEMENTATIONS
    ):
        kwargs = dict(lr=0.05, momentum=0.9, dampening=dampening, nesterov=nesterov, weight_decay=wd, maximize=maximize)
        kwargs.update(IMPLEMENTATIONS[impl])
        factory = lambda ps, kwargs=kwargs: timm_optim.SGDW(ps, **kwargs)  # noqa: E731
        cases[f"timm.SGDW({_kwargs_id(kwargs)})"] = Case(factory, marks=mark)
    for cls_name, maximize, wd, impl in itertools.product(("NAdamW", "Lion"), (False, True), (0.0, 0.01), IMPLEMENTATIONS):
        kwargs = dict(lr=1e-2 if cls_name == "NAdamW" else 1e-3, weight_decay=wd, maximize=maximize)
        kwargs.update(IMPLEMENTATIONS[impl])
        factory = lambda ps, cls_name=cls_name, kwargs=kwargs: getattr(timm_optim, cls_name)(ps, **kwargs)  # noqa: E731
        _with_options(cases, f"timm.{cls_name}({_kwargs_id(kwargs)})", factory, True, wd, marks=mark)
    for wd in (0.0, 0.01):
        factory = lambda ps, wd=wd: timm_optim.RAdamLegacy(ps, lr=1e-2, weight_decay=wd)  # noqa: E731
        # it steps in float32 whatever the parameters' dtype: exact to float32's resolution of θ
        _with_options(cases, f"timm.RAdamLegacy(weight_decay={wd})", factory, True, wd, marks=mark, tolerance=2e-4)
        factory = lambda ps, wd=wd: timm_optim.NAdamLegacy(ps, lr=1e-2, weight_decay=wd)  # noqa: E731
        cases[f"timm.NAdamLegacy(weight_decay={wd})"] = Case(factory, exact=wd == 0, marks=mark)
    return cases


CASES = {**torch_cases(), **timm_cases()}


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", [pytest.param(name, marks=case.marks, id=name) for name, case in CASES.items()])
def test_prediction_points_where_the_optimizer_goes(name, steps):
    case = CASES[name]
    params = make_params()
    opt = case.factory(params)
    predicted, real = predicted_and_real(
        opt, params, constant_gradients(params), steps=steps, decoupled_decay=case.decoupled_decay
    )
    assert_points_along(predicted, real, exact=case.exact, tolerance=case.tolerance)


def _first_rectified_step(beta2: float = 0.999) -> int:
    """The first update at which RAdam's ρ exceeds 5, computed here from its definition."""
    rho_inf = 2 / (1 - beta2) - 1
    return next(t for t in range(1, 100) if rho_inf - 2 * t * beta2**t / (1 - beta2**t) > 5)


RECTIFIED = {
    "torch.RAdam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
    "torch.RAdam(decoupled)": lambda ps: torch.optim.RAdam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "torch.RAdam(foreach)": lambda ps: torch.optim.RAdam(ps, lr=1e-2, foreach=True),
    "timm.RAdamLegacy": lambda ps: timm_optim.RAdamLegacy(ps, lr=1e-2, weight_decay=0.1),
    "timm.AdaBelief(rectify)": lambda ps: timm_optim.AdaBelief(ps, lr=1e-2),
    "timm.AdaBelief(rectify,foreach=False)": lambda ps: timm_optim.AdaBelief(ps, lr=1e-2, foreach=False),
    "timm.AdaBelief(rectify,degenerated_to_sgd=False)": lambda ps: timm_optim.AdaBelief(
        ps, lr=1e-2, degenerated_to_sgd=False, weight_decay=0.1
    ),
}


@pytest.mark.parametrize("offset", [-4, -2, -1, 0, 5])
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=(needs_timm,) if n.startswith("timm") else (), id=n) for n in RECTIFIED]
)
def test_rectified_steps_exact_on_both_sides_of_the_threshold(name, offset):
    """The predicted update is the first rectified one at offset −1 (the state's own step was not)."""
    params = make_params()
    warmup = _first_rectified_step() - 1 + offset
    predicted, real = predicted_and_real(RECTIFIED[name](params), params, constant_gradients(params), steps=1, warmup=warmup)
    if real.norm() == 0:  # AdaBelief without its SGD phase takes no step before the threshold
        assert predicted.norm() == 0
        return
    assert_points_along(predicted, real, exact=True, tolerance=2e-4 if "Legacy" in name else 1e-6)


def _loss(params, k: int) -> torch.Tensor:
    """A smooth loss whose gradient changes with the weights and with the batch k."""
    total = 0
    for i, p in enumerate(params):
        real = torch.view_as_real(p) if p.is_complex() else p
        total = total + ((real - 0.1 * (k % 3) - 0.05 * i) ** 2).sum() + 0.05 * (real**4).sum()
    return total


def _train_plain(opt, params, predictor, iterations: int) -> None:
    for k in range(iterations):
        with predictor.predicted():
            _loss(params, k).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _train_in_closure(opt, params, predictor, iterations: int, zero_grad_first: bool) -> None:
    for k in range(iterations):
        if zero_grad_first:
            opt.zero_grad(set_to_none=True)

        def closure(k=k):
            with predictor.predicted():
                opt.zero_grad(set_to_none=True)
                loss = _loss(params, k)
                loss.backward()
            return loss

        opt.step(closure)
        if not zero_grad_first:
            opt.zero_grad(set_to_none=True)


CLOSURE_CASES = {
    **CASES,
    "SGD(momentum=0)-last_update": Case(lambda ps: torch.optim.SGD(ps, lr=0.05)),
    "Adam-last_update": Case(lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    "Adagrad-last_update": Case(lambda ps: torch.optim.Adagrad(ps, lr=0.05)),
}


@pytest.mark.parametrize("zero_grad_first", [True, False])
@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=case.marks, id=name) for name, case in CLOSURE_CASES.items()]
)
def test_forward_and_backward_inside_step_closure_train_as_the_plain_loop(name, zero_grad_first):
    """``optimizer.step(closure)`` with the prediction in the closure: the same training, to 1e-12 in float64."""
    case = CLOSURE_CASES[name]
    rule = "last_update" if name.endswith("last_update") else "auto"
    ends = []
    for closure in (False, True):
        params = make_params()
        opt = case.factory(params)
        predictor = WeightPredictor(opt, steps=2, rule=rule, decoupled_decay=case.decoupled_decay)
        if closure:
            _train_in_closure(opt, params, predictor, 8, zero_grad_first)
        else:
            _train_plain(opt, params, predictor, 8)
        ends.append(flat(params))
    assert not torch.equal(ends[0], flat(make_params())), "training moved nothing"
    error = ((ends[0] - ends[1]).norm() / ends[0].norm()).item()
    assert error < 1e-12, f"the closure path ends {error:.3g} away from the plain loop"


def test_the_prediction_matters_on_the_closure_path():
    """The comparison above can fail: a loop without prediction ends elsewhere."""
    ends = []
    for steps in (0, 2):
        params = make_params()
        opt = torch.optim.RMSprop(params, lr=1e-2)
        _train_in_closure(opt, params, WeightPredictor(opt, steps=steps), 8, zero_grad_first=True)
        ends.append(flat(params))
    assert ((ends[0] - ends[1]).norm() / ends[0].norm()).item() > 1e-4


# -- the cases the matrix does not reach -------------------------------------------------------


def test_param_groups_each_use_their_own_lr_decay_and_betas():
    params = make_params()
    extra = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = torch.optim.AdamW(
        [
            {"params": [params[0]], "lr": 1e-2, "weight_decay": 0.0},
            {"params": [params[1]], "lr": 3e-3, "weight_decay": 0.05, "betas": (0.8, 0.99)},
            {"params": [params[2], extra], "lr": 2e-2, "weight_decay": 0.01, "betas": (0.95, 0.9), "eps": 1e-3},
        ]
    )
    everything = [*params, extra]
    grads = constant_gradients(everything)
    predictor = WeightPredictor(opt, steps=2, decoupled_decay=True)
    for _ in range(4):
        step_with(opt, everything, grads)
    before = [p.detach().clone() for p in everything]
    with predictor.predicted():
        predicted = [p.detach() - b for p, b in zip(everything, before)]
    step_with(opt, everything, grads)
    for p, b, guess in zip(everything, before, predicted):
        assert_points_along(guess.reshape(-1), 2 * (p.detach() - b).reshape(-1), exact=True)


def test_frozen_parameters_and_parameters_without_state_stay_put():
    params = make_params()
    opt = torch.optim.Adam(params, lr=1e-2)
    grads = constant_gradients(params)
    for _ in range(4):
        step_with(opt, params, [grads[0], grads[1], None])  # params[2] never gets a gradient: no state
    params[1].requires_grad_(False)  # frozen after training: state, but no longer trained
    assert params[1] in opt.state and params[2] not in opt.state
    theta = [p.detach().clone() for p in params]
    with WeightPredictor(opt).predicted():
        assert torch.equal(params[1], theta[1]) and torch.equal(params[2], theta[2])
        predicted = params[0].detach() - theta[0]
    step_with(opt, params, [grads[0], None, None])
    assert_points_along(predicted.reshape(-1), (params[0].detach() - theta[0]).reshape(-1), exact=True)


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(lambda ps: torch.optim.Adam(ps, lr=1e-2), id="Adam"),
        pytest.param(lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True), id="SGD-nesterov"),
        pytest.param(lambda ps: torch.optim.RMSprop(ps, lr=1e-3), id="RMSprop-last-update"),
        pytest.param(lambda ps: AdaBelief(ps, lr=1e-2, eps=1e-8), id="AdaBelief"),
        pytest.param(
            lambda ps: timm_optim.AdaBelief(ps, lr=1e-2, rectify=False), id="timm.AdaBelief-fp32", marks=needs_timm
        ),
    ],
)
def test_bfloat16_parameters(factory):
    params = make_params(dtype=torch.bfloat16, scale=0.05)  # small weights, so that bf16 resolves a 1e-2 step
    predicted, real = predicted_and_real(factory(params), params, constant_gradients(params), steps=1)
    assert_points_along(predicted, real, exact=False)  # both displacements are rounded to bf16


@pytest.mark.parametrize("chunk", [1 << 20, 8])
@pytest.mark.parametrize("foreach", [True, False])
def test_channels_last_parameters_keep_their_layout(chunk, foreach, monkeypatch):
    monkeypatch.setitem(xgrad.predict.CHUNK_NUMEL, "cpu", chunk)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64)
    conv = torch.nn.Parameter(weight.to(memory_format=torch.channels_last))
    params = [conv, *make_params()]
    opt = torch.optim.Adam(params, lr=1e-2)
    grads = constant_gradients(params)
    predictor = WeightPredictor(opt, steps=1, foreach=foreach)
    for _ in range(4):
        step_with(opt, params, grads)
    theta, pointer, strides = flat(params), conv.data_ptr(), conv.stride()
    with predictor.predicted():
        predicted = flat(params) - theta
        assert conv.is_contiguous(memory_format=torch.channels_last) and conv.data_ptr() == pointer
    assert conv.stride() == strides and conv.data_ptr() == pointer and torch.equal(flat(params), theta)
    step_with(opt, params, grads)
    assert_points_along(predicted, flat(params) - theta, exact=True)


def test_complex_parameters():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 2, generator=g, dtype=torch.complex128)), *make_params()]
    opt = torch.optim.Adam(params, lr=1e-2)
    predicted, real = predicted_and_real(opt, params, constant_gradients(params), steps=1)
    assert_points_along(predicted, real, exact=True)


# -- refusals: one line naming the flag ---------------------------------------------------------

REFUSED = {  # name: (factory, what the line names, whether it offers rule='last_update' instead)
    "SGD(momentum=0)": (lambda ps: torch.optim.SGD(ps, lr=0.1), "momentum=0", True),
    "Adam(differentiable=True)": (lambda ps: torch.optim.Adam(ps, differentiable=True), "differentiable=True", False),
    "LBFGS": (lambda ps: torch.optim.LBFGS(ps), "LBFGS", False),
    "Rprop": (lambda ps: torch.optim.Rprop(ps), "Rprop", True),
    "Adagrad": (lambda ps: torch.optim.Adagrad(ps), "Adagrad", True),
    "Adadelta": (lambda ps: torch.optim.Adadelta(ps), "Adadelta", True),
    "SparseAdam": (lambda ps: torch.optim.SparseAdam(ps), "SparseAdam", False),
    "an unregistered optimizer": (lambda ps: PlainAdam(ps), "no rule registered", True),
    "timm.AdaBelief(fixed_decay=True)": (
        lambda ps: timm_optim.AdaBelief(ps, rectify=False, fixed_decay=True),
        "fixed_decay=True",
        True,
    ),
    "timm.AdamWLegacy(caution=True)": (lambda ps: timm_optim.AdamWLegacy(ps, caution=True), "caution=True", True),
    "timm.AdamWLegacy(clipping_threshold=1.0)": (
        lambda ps: timm_optim.AdamWLegacy(ps, clipping_threshold=1.0),
        "clipping_threshold=1.0",
        True,
    ),
    "timm.Adopt(corrected_weight_decay=True)": (
        lambda ps: timm_optim.Adopt(ps, corrected_weight_decay=True),
        "corrected_weight_decay=True",
        True,
    ),
    "timm.SGDW(momentum=0)": (lambda ps: timm_optim.SGDW(ps), "momentum=0", True),
    "timm.NAdamW(caution=True)": (lambda ps: timm_optim.NAdamW(ps, caution=True), "caution=True", True),
    "timm.Lion(corrected_weight_decay=True)": (
        lambda ps: timm_optim.Lion(ps, corrected_weight_decay=True),
        "corrected_weight_decay=True",
        True,
    ),
    "timm.Lamb": (lambda ps: timm_optim.Lamb(ps), "no rule registered", True),
}


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=(needs_timm,) if name.startswith("timm") else (), id=name) for name in REFUSED]
)
def test_what_auto_cannot_predict_is_refused_in_one_line_naming_it(name):
    factory, named, offers_last_update = REFUSED[name]
    with pytest.raises(ValueError) as refusal:
        WeightPredictor(factory(make_params()))
    message = str(refusal.value)
    assert named in message and "\n" not in message
    assert ("rule='last_update'" in message) == offers_last_update


# -- the registry ---------------------------------------------------------------------------------


class PlainAdam(torch.optim.Optimizer):
    """A user's own Adam (not a torch subclass), with Adam's state layout."""

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                v_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
                p.sub_(group["lr"] * self.numerator(state, p.grad, beta1) / (v_hat.sqrt() + group["eps"]))

    def numerator(self, state, grad, beta1):
        return state["exp_avg"] / (1 - beta1 ** state["step"])


class LookaheadAdam(PlainAdam):
    """A user's own step that mixes in the next gradient (NAdamW-like, not bias-corrected): no built-in rule fits it."""

    def numerator(self, state, grad, beta1):
        return beta1 * state["exp_avg"] + (1 - beta1) * grad


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored after the test."""
    monkeypatch.setattr(xgrad.rules, "_REGISTRY", dict(xgrad.rules._REGISTRY))
    return xgrad.rules._REGISTRY


@pytest.mark.parametrize("key", [PlainAdam, f"{__name__}.PlainAdam"], ids=["class", "qualified-name"])
def test_a_registered_optimizer_is_predicted_where_it_goes(registry, key):
    with pytest.raises(ValueError, match="register_rule"):
        WeightPredictor(PlainAdam(make_params()))
    xgrad.register_rule(key, xgrad.rules.Adaptive(exp_avg="exp_avg", exp_avg_sq="exp_avg_sq"))
    params = make_params()
    predicted, real = predicted_and_real(PlainAdam(params), params, constant_gradients(params), steps=2)
    assert_points_along(predicted, real, exact=True)


def lookahead_direction(state, group):
    """The README's few lines: its next step with the next gradient taken to be m̂ (and g² to be v̂)."""
    beta1, beta2 = group["betas"]
    t = state["step"]
    m_hat = state["exp_avg"] / (1 - beta1**t)
    m_next = beta1 * state["exp_avg"] + (1 - beta1) * m_hat
    v_hat = state["exp_avg_sq"] / (1 - beta2**t)
    return (beta1 * m_next + (1 - beta1) * m_hat) / (v_hat.sqrt() + group["eps"])


class LookaheadRule(xgrad.rules.Adaptive):
    """The same step as multi-tensor kernels: Δ̂ = a·m/(√v + e), a and e from the next step's coefficients."""

    def coefficients(self, group, step):
        beta1, beta2 = group["betas"]
        first = 1 / (1 - beta1**step)
        mix = beta1 * (beta1 + (1 - beta1) * first) + (1 - beta1) * first
        root = (1 - beta2**step) ** 0.5
        return xgrad.rules.Coefficients(mix * root, group["eps"] * root)


@pytest.mark.parametrize(
    "rule",
    [xgrad.rules.Direction(function=lookahead_direction), LookaheadRule()],
    ids=["Direction", "Adaptive-subclass"],
)
def test_a_users_own_step_registered_in_a_few_lines_is_exact(registry, rule):
    with pytest.raises(ValueError, match="register_rule"):
        WeightPredictor(LookaheadAdam(make_params()))
    xgrad.register_rule(LookaheadAdam, rule)
    params = make_params()
    predicted, real = predicted_and_real(LookaheadAdam(params), params, constant_gradients(params), steps=2)
    assert_points_along(predicted, real, exact=True)


def test_the_closed_rules_alone_would_miss_it(registry):
    """Adam's rule on the look-ahead step is off: the exactness above is the rule's doing."""
    xgrad.register_rule(LookaheadAdam, xgrad.rules.Adaptive())
    params = make_params()
    predicted, real = predicted_and_real(LookaheadAdam(params), params, constant_gradients(params), steps=2)
    assert ((predicted - real).norm() / real.norm()).item() > 1e-3


def test_subclasses_inherit_their_base_rule_until_they_register_their_own(registry):
    class MyAdam(torch.optim.Adam):
        pass

    params = make_params()
    predicted, real = predicted_and_real(MyAdam(params, lr=1e-2), params, constant_gradients(params), steps=1)
    assert_points_along(predicted, real, exact=True)

    def refuse(group):
        raise ValueError(f"MyAdam(lr={group['lr']}) is not modelled")

    xgrad.register_rule(MyAdam, refuse)
    with pytest.raises(ValueError, match=r"^WeightPredictor: MyAdam\(lr=0.01\) is not modelled$"):
        WeightPredictor(MyAdam(make_params(), lr=1e-2))
    WeightPredictor(torch.optim.Adam(make_params()))  # the base keeps its own


def test_a_rule_function_sees_each_param_group(registry):
    seen = []

    def rule(group):
        seen.append(group["lr"])
        return xgrad.rules.Adaptive()

    xgrad.register_rule(PlainAdam, rule)
    a, b = make_params()[:2]
    WeightPredictor(PlainAdam([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}]))
    assert seen == [0.1, 0.2]


@pytest.mark.parametrize("key, rule", [(object(), xgrad.rules.Adaptive()), (PlainAdam, "adam")])
def test_register_rule_refuses_what_is_not_a_class_or_a_rule(registry, key, rule):
    with pytest.raises(TypeError, match="register_rule"):
        xgrad.register_rule(key, rule)


def test_import_xgrad_loads_no_suite_dependency():
    code = "import sys, xgrad; print(sorted(m for m in ('timm', 'hydra', 'omegaconf', 'wandb') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

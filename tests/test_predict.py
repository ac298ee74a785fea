"""WeightPredictor against independent float64 computations of docs/method.md's rules, and its mechanics.

Whether each rule points where its optimizer really goes is tested against the
optimizers themselves in tests/test_rules.py; here the arithmetic, the
stash/restore cycle, the paths (foreach, per tensor, chunked, on-device
scalars), checkpoints and the absence of host synchronisation.
"""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import xgrad.predict
import xgrad.rules
from xgrad import WeightPredictor
from xgrad.optim import AdaBelief, AdaM3


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _train(opt: torch.optim.Optimizer, params, steps: int, seed: int = 1) -> None:
    """A few updates with random gradients (a fixed generator, so runs are repeatable)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


# Each case: (name, factory, expected Δ̂ per parameter from the state in float64).
def _adam_delta(opt, p, group, second="exp_avg_sq", eps_out=True):
    st = opt.state[p]
    t = float(st["step"])
    b1, b2 = group["betas"]
    m_hat = st["exp_avg"].double() / (1 - b1**t)
    v_hat = st[second].double() / (1 - b2**t)
    return m_hat / (v_hat.sqrt() + (group["eps"] if eps_out else 0.0))


def _buffer_delta(opt, p, group):
    return opt.state[p]["momentum_buffer"].double()


def _adamw_delta(opt, p, group):
    """AdamW's next step per unit lr: the Adam direction plus its decoupled decay λθ (the library's default)."""
    return _adam_delta(opt, p, group) + group["weight_decay"] * p.detach().double()


def _next_moments(opt, p, group, second="exp_avg_sq"):
    """(t, m_{t+1}, v_{t+1}) of the next step with the next g taken to be m̂_t and g² to be v̂_t."""
    st = opt.state[p]
    t = float(st["step"])
    b1, b2 = group["betas"]
    m, v = st["exp_avg"].double(), st[second].double()
    return t, b1 * m + (1 - b1) * m / (1 - b1**t), b2 * v + (1 - b2) * v / (1 - b2**t)


def _radam_delta(opt, p, group):
    """torch's RAdam step t+1, written out from its source with those moments."""
    t, m, v = _next_moments(opt, p, group)
    b1, b2 = group["betas"]
    T = t + 1
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * T * b2**T / (1 - b2**T)
    if rho <= 5:
        return m / (1 - b1**T) + _decay(group, p)
    rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    return m / (1 - b1**T) * rect * math.sqrt(1 - b2**T) / (v.sqrt() + group["eps"]) + _decay(group, p)


def _nadam_delta(opt, p, group):
    """torch's NAdam step t+1 (momentum schedule μ, product Π in the state), written out the same way."""
    t, m, v = _next_moments(opt, p, group)
    b1, b2 = group["betas"]
    T, psi = t + 1, group["momentum_decay"]
    mu, mu_next = b1 * (1 - 0.5 * 0.96 ** (T * psi)), b1 * (1 - 0.5 * 0.96 ** ((T + 1) * psi))
    product = float(opt.state[p]["mu_product"]) * mu
    g = opt.state[p]["exp_avg"].double() / (1 - b1**t)
    denom = (v / (1 - b2**T)).sqrt() + group["eps"]
    return (1 - mu) / (1 - product) * g / denom + mu_next / (1 - product * mu_next) * m / denom + _decay(group, p)


def _adamax_delta(opt, p, group):
    """Adamax: m̂_{t+1}/u_t (the ∞-norm u keeps its value while |g| stays below it)."""
    st = opt.state[p]
    t = float(st["step"])
    b1 = group["betas"][0]
    m_next = b1 * st["exp_avg"].double() + (1 - b1) * st["exp_avg"].double() / (1 - b1**t)
    return m_next / (1 - b1 ** (t + 1)) / st["exp_inf"].double()


def _decay(group, p):
    """λθ where the optimizer decays θ itself (its decoupled flag), else 0."""
    if group.get("decoupled_weight_decay", False):
        return group["weight_decay"] * p.detach().double()
    return 0.0


CASES = {
    "sgdm": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), _buffer_delta),
    "sgdm_wd_damp_nesterov": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, weight_decay=1e-2, nesterov=True),
        _buffer_delta,
    ),
    "sgdm_dampening": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3), _buffer_delta),
    "rmsprop_momentum": (lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9), _buffer_delta),
    "rmsprop_centered_momentum": (
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True, weight_decay=1e-3),
        _buffer_delta,
    ),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-3), _adam_delta),
    "adam_l2_betas": (lambda ps: torch.optim.Adam(ps, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=5e-4), _adam_delta),
    "adam_large_eps": (lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=0.1), _adam_delta),
    "adam_amsgrad": (
        lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
        lambda o, p, g: _adam_delta(o, p, g, second="max_exp_avg_sq"),
    ),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2), _adamw_delta),
    "adabelief": (
        lambda ps: AdaBelief(ps, lr=1e-3, eps=1e-16),
        lambda o, p, g: _adam_delta(o, p, g, second="exp_avg_var"),
    ),
    "adabelief_l2_eps": (
        lambda ps: AdaBelief(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=5e-4),
        lambda o, p, g: _adam_delta(o, p, g, second="exp_avg_var"),
    ),
    "adabelief_large_eps": (
        lambda ps: AdaBelief(ps, lr=1e-2, eps=1e-2),
        lambda o, p, g: _adam_delta(o, p, g, second="exp_avg_var"),
    ),
    "adam3": (
        lambda ps: AdaM3(ps, lr=1e-3),
        lambda o, p, g: _adam_delta(o, p, g, eps_out=False),
    ),
    "radam": (lambda ps: torch.optim.RAdam(ps, lr=1e-2), _radam_delta),
    "radam_decoupled": (
        lambda ps: torch.optim.RAdam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
        _radam_delta,
    ),
    "nadam": (lambda ps: torch.optim.NAdam(ps, lr=1e-2, betas=(0.8, 0.99)), _nadam_delta),
    "nadam_decoupled": (
        lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
        _nadam_delta,
    ),
    "adamax": (lambda ps: torch.optim.Adamax(ps, lr=1e-2, weight_decay=1e-3), _adamax_delta),
    "adam3_l2": (
        lambda ps: AdaM3(ps, lr=5e-3, betas=(0.85, 0.995), eps=1e-8, weight_decay=1e-3),
        lambda o, p, g: _adam_delta(o, p, g, eps_out=False),
    ),
}


def _check_prediction(opt, params, steps, delta_fn, lr_override=None, predictor=None):
    before = [p.detach().clone() for p in params]
    predictor = predictor or WeightPredictor(opt, steps=steps)
    group = opt.param_groups[0]
    lr = group["lr"] if lr_override is None else lr_override
    expected = [b.double() - steps * lr * delta_fn(opt, p, group) for b, p in zip(before, params)]
    with predictor.predicted():
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach().double(), e, rtol=2e-6, atol=1e-6)
    for p, b in zip(params, before):
        assert torch.equal(p, b), "restore must be bit-exact"


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_matches_independent_computation(case, steps):
    factory, delta_fn = CASES[case]
    params = _params()
    opt = factory(params)
    _train(opt, params, steps=4)
    _check_prediction(opt, params, steps, delta_fn)


@pytest.mark.parametrize("case", ["sgdm", "adam", "adabelief", "adam3"])
def test_uses_the_lr_set_after_the_step(case):
    factory, delta_fn = CASES[case]
    params = _params()
    opt = factory(params)
    _train(opt, params, steps=3)
    opt.param_groups[0]["lr"] *= 0.1  # a scheduler step between update and prediction
    _check_prediction(opt, params, 2, delta_fn)


@pytest.mark.parametrize(
    "factory, delta_fn",
    [
        (lambda ps: torch.optim.Adam(ps, lr=1e-2, maximize=True), _adam_delta),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, maximize=True), _buffer_delta),
    ],
    ids=["adam", "sgdm"],
)
def test_maximize_needs_no_sign_of_its_own(factory, delta_fn):
    """The optimizer negates the gradient before it enters the state: Δ̂ is read as for minimising."""
    params = _params()
    opt = factory(params)
    _train(opt, params, steps=3)
    _check_prediction(opt, params, 1, delta_fn)


@pytest.mark.parametrize("option", [None, True, False])
def test_adamw_decay_by_default_and_the_papers_form_one_argument_away(option):
    """None (default) and True predict AdamW's decoupled decay λθ; False is the paper's Δ̂ alone."""
    params = _params()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    _train(opt, params, steps=3)
    before = [p.detach().clone() for p in params]
    predictor = WeightPredictor(opt, steps=2, decoupled_decay=option)
    decay = 0.0 if option is False else 0.1
    with predictor.predicted():
        for p, b in zip(params, before):
            delta = _adam_delta(opt, p, opt.param_groups[0]) + decay * b.double()
            torch.testing.assert_close(p.detach().double(), b.double() - 2 * 1e-2 * delta, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(
    "factory", [lambda ps: torch.optim.Adam(ps), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)]
)
def test_decoupled_decay_refused_where_decay_is_coupled(factory):
    with pytest.raises(ValueError, match="decoupled_decay"):
        WeightPredictor(factory(_params()), decoupled_decay=True)


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_without_momentum_extrapolates_the_last_update(centered):
    params = _params()
    opt = torch.optim.RMSprop(params, lr=0.01, alpha=0.9, weight_decay=1e-3, centered=centered)
    predictor = WeightPredictor(opt, steps=2)
    _train(opt, params, steps=3)
    previous = [p.detach().clone() for p in params]
    _train(opt, params, steps=1, seed=7)
    opt.param_groups[0]["lr"] = 0.02
    now = [p.detach().clone() for p in params]
    with predictor.predicted():
        for p, a, b in zip(params, previous, now):
            direction = (a.double() - b.double()) / 0.01
            torch.testing.assert_close(p.detach().double(), b.double() - 2 * 0.02 * direction, rtol=1e-5, atol=1e-6)


def test_last_update_rule_works_with_any_optimizer():
    params = _params()
    opt = torch.optim.Adagrad(params, lr=0.1)
    with pytest.raises(ValueError, match="rule='last_update'"):
        WeightPredictor(opt)
    predictor = WeightPredictor(opt, steps=3, rule="last_update")
    with predictor.predicted():  # nothing recorded yet: identity
        pass
    _train(opt, params, steps=2)
    previous = [p.detach().clone() for p in params]
    _train(opt, params, steps=1, seed=5)
    now = [p.detach().clone() for p in params]
    with predictor.predicted():
        for p, a, b in zip(params, previous, now):
            torch.testing.assert_close(p.detach().double(), b.double() - 3 * (a.double() - b.double()), rtol=1e-5, atol=1e-6)
    for p, b in zip(params, now):
        assert torch.equal(p, b)


def test_sgd_without_momentum_is_refused_by_auto():
    with pytest.raises(ValueError, match="momentum=0"):
        WeightPredictor(torch.optim.SGD(_params(), lr=0.1))


def test_identity_before_the_first_update_and_with_zero_steps():
    params = _params()
    opt = torch.optim.Adam(params)
    before = [p.detach().clone() for p in params]
    with WeightPredictor(opt).predicted():
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    _train(opt, params, steps=2)
    now = [p.detach().clone() for p in params]
    with WeightPredictor(opt, steps=0).predicted():
        assert all(torch.equal(p, b) for p, b in zip(params, now))


def test_steps_zero_is_exactly_the_base_optimizer():
    def run(with_predictor: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        predictor = WeightPredictor(opt, steps=0)
        g = torch.Generator().manual_seed(3)
        for _ in range(10):
            x = torch.randn(16, 4, generator=g)
            if with_predictor:
                with predictor.predicted():
                    model(x).pow(2).mean().backward()
            else:
                model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))


def test_prediction_reads_state_not_grad():
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-2)
    _train(opt, params, steps=2)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)
    _check_prediction(opt, params, 1, _adam_delta)


def test_restore_is_bit_exact_after_an_exception_and_keeps_storage():
    params = _params()
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    _train(opt, params, steps=2)
    before = [p.detach().clone() for p in params]
    pointers = [p.data_ptr() for p in params]
    predictor = WeightPredictor(opt, steps=3)
    with pytest.raises(KeyError):
        with predictor.predicted():
            assert not all(torch.equal(p, b) for p, b in zip(params, before))
            raise KeyError("boom")
    assert not predictor.is_predicted
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert [p.data_ptr() for p in params] == pointers


def test_frozen_parameters_are_left_alone():
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-2)
    _train(opt, params, steps=2)
    params[0].requires_grad_(False)
    frozen, trained = params[0].detach().clone(), params[1].detach().clone()
    with WeightPredictor(opt).predicted():
        assert torch.equal(params[0], frozen)
        assert not torch.equal(params[1], trained)


@pytest.mark.parametrize("steps", [-1, 1.5, True, "2", None])
def test_bad_steps_refused(steps):
    with pytest.raises(ValueError, match="steps"):
        WeightPredictor(torch.optim.Adam(_params()), steps=steps)


def test_misuse_is_refused():
    params = _params()
    opt = torch.optim.Adam(params)
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        WeightPredictor(opt, rule="nope")
    with pytest.raises(TypeError):
        WeightPredictor(object())
    predictor = WeightPredictor(opt)
    with pytest.raises(RuntimeError, match="nothing stashed"):
        predictor.restore()
    predictor.predict()
    with pytest.raises(RuntimeError, match="twice"):
        predictor.predict()
    for p in params:
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="restore"):
        opt.step()
    predictor.restore()
    opt.step()


def test_load_state_dict_that_does_not_fit_is_refused():
    params = _params()
    opt = torch.optim.Adagrad(params)
    predictor = WeightPredictor(opt, steps=2, rule="last_update")
    _train(opt, params, steps=1)
    state = predictor.state_dict()
    assert state == {"steps": 2, "rule": "last_update", "decoupled_decay": None}
    with pytest.raises(ValueError, match="steps=2"):
        WeightPredictor(opt, steps=1, rule="last_update").load_state_dict(state)
    legacy = state | {"last_update": {0: torch.zeros(7, 5), 1: torch.zeros(3)}}  # records by index, another shape
    other = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(7, 5)), torch.nn.Parameter(torch.zeros(5))])
    with pytest.raises(ValueError, match="does not fit"):
        WeightPredictor(other, steps=2, rule="last_update").load_state_dict(legacy)
    with pytest.raises(ValueError, match="expected keys"):
        predictor.load_state_dict({"steps": 2})


def test_the_last_update_record_travels_in_the_optimizers_own_state_dict():
    """No file of the predictor's own: a resume that loads the optimizer's state_dict resumes the record."""
    params = _params()
    opt = torch.optim.RMSprop(params, lr=1e-2)
    predictor = WeightPredictor(opt, steps=1)
    _train(opt, params, steps=2)
    saved = copy.deepcopy(opt.state_dict())
    assert all(xgrad.rules.RECORD in entry for entry in saved["state"].values())
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_b = torch.optim.RMSprop(params_b, lr=1e-2)
    opt_b.load_state_dict(saved)
    with predictor.predicted():
        by_a = [p.detach().clone() for p in params]
    with WeightPredictor(opt_b, steps=1).predicted():
        by_b = [p.detach().clone() for p in params_b]
    assert all(torch.equal(a, b) for a, b in zip(by_a, by_b)) and not torch.equal(by_a[0], params[0])


@pytest.mark.parametrize("rule_case", ["adam", "rmsprop", "adagrad_last_update"])
def test_state_dict_round_trip_in_lockstep(rule_case):
    def build(model):
        if rule_case == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            return opt, WeightPredictor(opt, steps=2)
        if rule_case == "rmsprop":
            opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
            return opt, WeightPredictor(opt, steps=2)
        opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
        return opt, WeightPredictor(opt, steps=2, rule="last_update")

    def step(model, opt, predictor, x):
        with predictor.predicted():
            model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt_a, pred_a = build(model_a)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 3, generator=g) for _ in range(10)]
    for x in data[:5]:
        step(model_a, opt_a, pred_a, x)
    model_b = copy.deepcopy(model_a)
    opt_b, pred_b = build(model_b)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    pred_b.load_state_dict(copy.deepcopy(pred_a.state_dict()))
    for x in data[5:]:
        theta = [p.detach().clone() for p in model_b.parameters()]
        with pred_a.predicted(), pred_b.predicted():  # the loaded predictor predicts the same θ̂, and θ̂ ≠ θ
            for a, b, before in zip(model_a.parameters(), model_b.parameters(), theta, strict=True):
                assert torch.equal(a, b) and not torch.equal(b, before)
        step(model_a, opt_a, pred_a, x)
        step(model_b, opt_b, pred_b, x)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chunk", [1 << 20, 8])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_foreach_chunked_and_per_tensor_paths_each_compute_the_rule(case, foreach, chunk, monkeypatch):
    monkeypatch.setitem(xgrad.predict.CHUNK_NUMEL, "cpu", chunk)
    factory, delta_fn = CASES[case]
    params = _params()
    opt = factory(params)
    _train(opt, params, steps=3)
    _check_prediction(opt, params, 2, delta_fn, predictor=WeightPredictor(opt, steps=2, foreach=foreach))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_kept_predictor_predicts_as_a_fresh_one(case, foreach, monkeypatch):
    """Buffers kept between calls (the stash, the CPU's √v scratch) carry nothing from one call to the next."""
    monkeypatch.setitem(xgrad.predict.CHUNK_NUMEL, "cpu", 8)  # many chunks of different make-up
    factory, delta_fn = CASES[case]
    params = _params()
    opt = factory(params)
    kept = WeightPredictor(opt, steps=2, foreach=foreach)
    for _ in range(3):
        _train(opt, params, steps=1)
        with kept.predicted():
            by_kept = [p.detach().clone() for p in params]
        with WeightPredictor(opt, steps=2, foreach=foreach).predicted():
            by_fresh = [p.detach().clone() for p in params]
        for a, b in zip(by_kept, by_fresh, strict=True):
            assert torch.equal(a, b)
        _check_prediction(opt, params, 2, delta_fn, predictor=kept)  # and both are the rule's θ̂


def _rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    return (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2


ROSENBROCK = {
    "sgdm": (lambda ps: torch.optim.SGD(ps, lr=2e-4, momentum=0.9), 3000),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9), 3000),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=2e-2), 3000),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=2e-2, weight_decay=0.0), 3000),
    "adabelief": (lambda ps: AdaBelief(ps, lr=2e-2), 3000),
    "adam3": (lambda ps: AdaM3(ps, lr=3e-3), 3000),
}


@pytest.mark.parametrize("xgrad_on", [False, True])
@pytest.mark.parametrize("name", sorted(ROSENBROCK))
def test_each_optimizer_minimises_rosenbrock(name, xgrad_on):
    factory, iterations = ROSENBROCK[name]
    xy = torch.nn.Parameter(torch.tensor([-1.5, 2.0]))
    opt = factory([xy])
    predictor = WeightPredictor(opt, steps=1 if xgrad_on else 0)
    start = _rosenbrock(xy).item()
    for _ in range(iterations):
        with predictor.predicted():
            _rosenbrock(xy).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert math.isfinite(_rosenbrock(xy).item())
    assert _rosenbrock(xy).item() < 1e-2 * start
    assert torch.dist(xy.detach(), torch.tensor([1.0, 1.0])) < 0.25


def test_small_mlp_trains_with_the_predicted_loop():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    predictor = WeightPredictor(opt, steps=1)
    loss_fn = torch.nn.CrossEntropyLoss()
    first = loss_fn(model(x), y).item()
    for epoch in range(15):
        for i in range(0, 512, 64):
            with predictor.predicted():
                loss_fn(model(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
        assert loss_fn(model(x), y).item() < 0.3 * first
    assert accuracy > 0.95


# -- no host synchronisation: scalars that live on an accelerator are never read -----------------


def _on_meta() -> torch.Tensor:
    return torch.empty((), device="meta")


ON_META = {  # the optimizer, its state keys, step counts on the device?, the predictor's decoupled_decay
    "adam-capturable": (lambda ps: torch.optim.Adam(ps, capturable=True), ("exp_avg", "exp_avg_sq"), True, False),
    "adam-fused-amsgrad": (
        lambda ps: torch.optim.Adam(ps, fused=True, amsgrad=True),
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        True,
        False,
    ),
    "adamw-capturable-decoupled": (
        lambda ps: torch.optim.AdamW(ps, capturable=True, weight_decay=0.1),
        ("exp_avg", "exp_avg_sq"),
        True,
        True,
    ),
    "adam-steps-on-host": (lambda ps: torch.optim.Adam(ps, foreach=False), ("exp_avg", "exp_avg_sq"), False, False),
    "adam3": (lambda ps: AdaM3(ps), ("exp_avg", "exp_avg_sq"), True, False),
    "sgd-momentum": (lambda ps: torch.optim.SGD(ps, momentum=0.9), ("momentum_buffer",), False, False),
    "radam-capturable": (lambda ps: torch.optim.RAdam(ps, capturable=True), ("exp_avg", "exp_avg_sq"), True, None),
    "nadam-capturable-decoupled": (
        lambda ps: torch.optim.NAdam(ps, capturable=True, weight_decay=0.1, decoupled_weight_decay=True),
        ("exp_avg", "exp_avg_sq", "mu_product"),
        True,
        None,
    ),
    "adamax-capturable": (lambda ps: torch.optim.Adamax(ps, capturable=True), ("exp_avg", "exp_inf"), True, None),
    "rmsprop-momentum-capturable": (
        lambda ps: torch.optim.RMSprop(ps, momentum=0.9, capturable=True),
        ("momentum_buffer", "square_avg"),
        True,
        False,
    ),
}


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("case", sorted(ON_META))
def test_predict_and_restore_read_no_value_off_the_device(case, foreach):
    """On ``meta`` every read of a value (``.item()``, ``float()``, ``bool()``, ``if t == 0``) raises.

    That is how a host synchronisation would show on a GPU. Here the lr lives
    on the device, and so do the step counts and betas where fused/capturable
    optimizers keep them there.
    """
    factory, keys, steps_on_device, decoupled_decay = ON_META[case]
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in [(7, 5), (5,), (3, 4, 2)]]
    opt = factory(params)  # built with floats: the constructors check their values
    for group in opt.param_groups:
        group["lr"] = _on_meta()
        if "betas" in group and steps_on_device:
            group["betas"] = (_on_meta(), _on_meta())
        for p in group["params"]:
            opt.state[p] = {key: torch.empty_like(p) for key in keys}
            opt.state[p]["step"] = _on_meta() if steps_on_device else torch.tensor(3.0)
            if "mu_product" in keys:
                opt.state[p]["mu_product"] = _on_meta()
    predictor = WeightPredictor(opt, steps=2, decoupled_decay=decoupled_decay, foreach=foreach)
    predictor.predict()
    assert predictor.is_predicted
    predictor.restore()


@pytest.mark.parametrize("off_host", ["lr-and-steps", "lr"])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_scalars_kept_on_the_device_give_the_same_prediction(case, foreach, off_host, monkeypatch):
    """The on-device arithmetic (0-dim tensor scalars), run on the CPU by treating tensors as off-host."""
    factory, delta_fn = CASES[case]
    params = _params()
    opt = factory(params)
    _train(opt, params, steps=3)
    lr = opt.param_groups[0]["lr"] = torch.tensor(opt.param_groups[0]["lr"])  # a tensor lr, as fused/capturable allow
    monkeypatch.setattr(xgrad.rules, "_on_host", lambda tensor: off_host == "lr" and tensor is not lr)
    _check_prediction(opt, params, 2, delta_fn, predictor=WeightPredictor(opt, steps=2, foreach=foreach))


@pytest.mark.parametrize("lr", [0.01, 0.0])
def test_last_update_with_a_tensor_lr_kept_on_the_device(lr, monkeypatch):
    monkeypatch.setattr(xgrad.rules, "_on_host", lambda tensor: False)
    params = _params()
    opt = torch.optim.RMSprop(params, lr=torch.tensor(lr), foreach=False)
    predictor = WeightPredictor(opt, steps=2)
    _train(opt, params, steps=2)
    previous = [p.detach().clone() for p in params]
    _train(opt, params, steps=1, seed=7)
    now = [p.detach().clone() for p in params]
    with predictor.predicted():
        for p, a, b in zip(params, previous, now):
            direction = (a.double() - b.double()) / lr if lr else torch.zeros_like(b, dtype=torch.float64)
            torch.testing.assert_close(p.detach().double(), b.double() - 2 * lr * direction, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "factory",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
        lambda ps: torch.optim.Adam(ps, lr=torch.tensor(1e-3, device="cuda"), capturable=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    ],
    ids=["adam-fused", "adam-capturable-tensor-lr", "adamw-foreach", "sgd-nesterov"],
)
def test_no_host_synchronisation_on_a_gpu(factory):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(64, 32), (32,), (8, 4, 3, 3)]]
    opt = factory(params)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    predictor = WeightPredictor(opt, steps=1)
    before = [p.detach().clone() for p in params]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        predictor.predict()
        predictor.restore()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("off_host", [False, True])
@pytest.mark.parametrize("trained", [4, 5, 6, 12])
def test_radam_in_both_phases_on_the_host_and_on_the_device(trained, off_host, monkeypatch):
    """Trained 4 or 5 steps the next is in RAdam's SGD phase; 6 and 12, rectified: both arithmetic paths agree."""
    if off_host:
        monkeypatch.setattr(xgrad.rules, "_on_host", lambda tensor: False)
    params = _params()
    opt = torch.optim.RAdam(params, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
    _train(opt, params, steps=trained)
    _check_prediction(opt, params, 2, _radam_delta)


# -- life cycle: exceptions, several predictors, detaching ---------------------------------------


def test_a_failure_half_way_through_predict_leaves_the_real_weights(monkeypatch):
    """Out of memory in a later chunk (simulated): what was written is restored, then the error propagates."""
    monkeypatch.setitem(xgrad.predict.CHUNK_NUMEL, "cpu", 8)
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-2)
    _train(opt, params, steps=2)
    predictor = WeightPredictor(opt, steps=2)
    before = [p.detach().clone() for p in params]
    real_kernel, calls = torch._foreach_addcdiv_, []

    def fails_on_the_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_addcdiv_", fails_on_the_third_chunk)
    with pytest.raises(torch.OutOfMemoryError):
        predictor.predict()
    assert len(calls) == 3, "two chunks were written before the failure"
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not predictor.is_predicted
    monkeypatch.setattr(torch, "_foreach_addcdiv_", real_kernel)
    _check_prediction(opt, params, 2, _adam_delta, predictor=predictor)  # and it works again


def test_two_predictors_cannot_both_hold_predicted_weights_of_one_optimizer():
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-2)
    _train(opt, params, steps=2)
    first, second = WeightPredictor(opt, steps=1), WeightPredictor(opt, steps=2)
    before = [p.detach().clone() for p in params]
    with first.predicted():
        with pytest.raises(RuntimeError, match="another WeightPredictor"):
            second.predict()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with second.predicted():  # one after the other is fine
        pass


def _hook_count(opt) -> int:
    return len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


def test_a_discarded_predictor_is_freed_with_its_hooks_and_stash():
    params = _params()
    opt = torch.optim.RMSprop(params, lr=1e-2)
    baseline = _hook_count(opt)
    predictor = WeightPredictor(opt, steps=1)
    _train(opt, params, steps=2)
    with predictor.predicted():
        pass
    alive = weakref.ref(predictor)
    stash = weakref.ref(next(iter(predictor._stash.values())))
    assert _hook_count(opt) == baseline + 2
    del predictor
    gc.collect()
    assert alive() is None and stash() is None
    assert _hook_count(opt) == baseline
    _train(opt, params, steps=1)  # and the optimizer steps on without it


def test_detach_removes_the_hooks_restores_and_keeps_the_records():
    params = _params()
    opt = torch.optim.RMSprop(params, lr=1e-2)
    before_hooks = _hook_count(opt)
    predictor = WeightPredictor(opt, steps=1)
    _train(opt, params, steps=2)
    before = [p.detach().clone() for p in params]
    predictor.predict()
    predictor.detach()  # while predicted: the real weights come back first
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert _hook_count(opt) == before_hooks and not predictor._stash
    with pytest.raises(RuntimeError, match="detached"):
        predictor.predict()
    records = [opt.state[p][xgrad.rules.RECORD].clone() for p in params]
    _train(opt, params, steps=1)  # no hook: the records are those of the last step it saw
    assert all(torch.equal(opt.state[p][xgrad.rules.RECORD], r) for p, r in zip(params, records))
    predictor.detach()  # twice is harmless


def test_repeated_predictors_on_one_optimizer_leave_at_most_one_set_of_hooks():
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-2)
    baseline = _hook_count(opt)
    for _ in range(3):  # three fit() calls, each building and detaching its predictor
        predictor = WeightPredictor(opt, steps=1)
        _train(opt, params, steps=1)
        predictor.detach()
    assert _hook_count(opt) == baseline


class _Wrapper(torch.optim.Optimizer):
    """A trainer's wrapper (accelerate's AcceleratedOptimizer shape): steps the optimizer inside it."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_a_wrapped_optimizer_is_unwrapped():
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-2)
    predictor = WeightPredictor(_Wrapper(opt), steps=2)
    assert predictor.optimizer is opt
    _train(_Wrapper(opt), params, steps=2)
    _check_prediction(opt, params, 2, _adam_delta, predictor=predictor)


# -- the last-update record: kernels per device and dtype, skipped steps ---------------------------


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n_params", [3, 30])
def test_the_record_hooks_launch_a_few_kernels_whatever_the_number_of_parameters(n_params):
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(n_params)]
    opt = torch.optim.RMSprop(params, lr=1e-2)
    predictor = WeightPredictor(opt, steps=1)
    _train(opt, params, steps=2)
    with _CountOps() as counted:
        predictor._before_step(opt, (), {})
        predictor._after_step(opt, (), {})
    assert len(counted.ops) <= 4, counted.ops  # copy; sub, div, copy: one multi-tensor kernel each


def test_a_skipped_fused_step_leaves_the_record_untouched():
    """A gradient scaler's fused step with found_inf = 1 changes nothing, and the record stays."""
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-2, fused=True)
    predictor = WeightPredictor(opt, steps=1, rule="last_update")
    _train(opt, params, steps=2)
    records = [opt.state[p][xgrad.rules.RECORD].clone() for p in params]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)  # as GradScaler.step sets them
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "the fused step was skipped"
    assert all(torch.equal(opt.state[p][xgrad.rules.RECORD], r) for p, r in zip(params, records))
    opt.found_inf = torch.tensor(0.0)
    opt.step()  # taken: recorded
    with predictor.predicted():
        pass
    assert not all(torch.equal(opt.state[p][xgrad.rules.RECORD], r) for p, r in zip(params, records))


def test_a_step_the_scaler_skips_leaves_the_record_untouched():
    params = _params()
    opt = torch.optim.RMSprop(params, lr=1e-2)
    predictor = WeightPredictor(opt, steps=1)
    _train(opt, params, steps=2)
    records = [opt.state[p][xgrad.rules.RECORD].clone() for p in params]
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # the scale exists from the first scaled loss on
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(opt.state[p][xgrad.rules.RECORD], r) for p, r in zip(params, records))
    del predictor

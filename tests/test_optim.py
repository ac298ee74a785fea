"""AdaBelief and AdaM3 against independent computations and the authors' code.

The update rules are checked element by element against plain-Python float64
arithmetic written here, AdaBelief also against the authors' package
``adabelief-pytorch``; the foreach and per-tensor paths against each other;
and the state layout the weight predictor reads, the state_dict round trip,
the refusals and convergence on the Rosenbrock function on their own.
"""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
from adabelief_pytorch import AdaBelief as ReferenceAdaBelief

from xgrad.optim import AdaBelief, AdaM3

OPTIMIZERS = [AdaBelief, AdaM3]
SECOND_MOMENT = {AdaBelief: "exp_avg_var", AdaM3: "exp_avg_sq"}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _same(device: str) -> dict[str, float]:
    """Tolerance for two computations that run the same operations in the same order.

    On the CPU the foreach kernels fall back to the per-tensor ones, so results
    are bit-identical; CUDA's fused foreach kernels may round differently.
    """
    return dict(rtol=0.0, atol=0.0) if device == "cpu" else dict(rtol=1e-6, atol=1e-9)


# -- the update rules, element by element in float64 --------------------------------------


def reference_trajectory(cls, theta0, grads, *, lr, betas, eps, weight_decay, decoupled_weight_decay):
    """θ, m, the second moment and the step count after ``grads``, one element at a time in float64.

    ``grads`` holds one flat list per step, or None for a step the parameter
    has no gradient (it is skipped and its step count does not advance).
    """
    beta1, beta2 = betas
    theta = [float(x) for x in theta0]
    m = [0.0] * len(theta)
    second = [0.0] * len(theta)
    t = 0
    for grad in grads:
        if grad is None:
            continue
        t += 1
        for i, g in enumerate(grad):
            if weight_decay and decoupled_weight_decay:
                theta[i] *= 1 - lr * weight_decay
            elif weight_decay:
                g += weight_decay * theta[i]
            m[i] = beta1 * m[i] + (1 - beta1) * g
            if cls is AdaBelief:
                second[i] = beta2 * second[i] + (1 - beta2) * (g - m[i]) ** 2 + eps
                denom = math.sqrt(second[i] / (1 - beta2**t)) + eps
            else:
                second[i] = beta2 * second[i] + (1 - beta2) * m[i] ** 2 + eps
                denom = math.sqrt(second[i] / (1 - beta2**t))
            theta[i] -= lr * (m[i] / (1 - beta1**t)) / denom
    return theta, m, second, t


SETTINGS = {
    "defaults": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, decoupled_weight_decay=False),
    "coupled-decay": dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1, decoupled_weight_decay=False),
    "decoupled-decay": dict(lr=3e-2, betas=(0.5, 0.9), eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True),
    "beta1-zero-big-eps": dict(lr=1e-2, betas=(0.0, 0.5), eps=1e-2, weight_decay=0.0, decoupled_weight_decay=False),
}


def _assert_close_float64(tensor, values, *, atol):
    expected = torch.tensor(values, dtype=torch.float64)
    torch.testing.assert_close(tensor.detach().flatten().double(), expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_update_rule_matches_float64_per_element(cls, setting, foreach):
    generator = torch.Generator().manual_seed(1)
    params = [
        torch.randn(3, 2, generator=generator).requires_grad_(),
        torch.randn(4, generator=generator).requires_grad_(),
    ]
    initial = [p.detach().flatten().tolist() for p in params]
    steps = 6
    grads = [[torch.randn(p.shape, generator=generator) for _ in range(steps)] for p in params]
    grads[1][2] = None  # no gradient at step 3: the second parameter's own step count must lag
    opt = cls(params, **setting, foreach=foreach)
    for step in range(steps):
        for p, grad in zip(params, grads):
            p.grad = None if grad[step] is None else grad[step].clone()
        opt.step()

    for p, theta0, grad in zip(params, initial, grads):
        flat_grads = [None if g is None else g.flatten().double().tolist() for g in grad]
        theta, m, second, t = reference_trajectory(cls, theta0, flat_grads, **setting)
        state = opt.state[p]
        assert state["step"].item() == t
        _assert_close_float64(p, theta, atol=1e-6)
        _assert_close_float64(state["exp_avg"], m, atol=1e-7)
        _assert_close_float64(state[SECOND_MOMENT[cls]], second, atol=1e-12)


# -- AdaBelief against the authors' package ----------------------------------------------


def _small_regression(device: str):
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    x = torch.randn(32, 5, generator=generator)
    y = torch.randn(32, 1, generator=generator)
    return model.to(device), x.to(device), y.to(device)


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
@pytest.mark.parametrize(
    "weight_decay, decoupled", [(0.0, False), (1e-2, False), (1e-2, True)], ids=["no-decay", "coupled", "decoupled"]
)
def test_adabelief_matches_authors_package_over_100_steps(weight_decay, decoupled, foreach, device):
    ours, x, y = _small_regression(device)
    theirs = copy.deepcopy(ours)
    opt = AdaBelief(
        ours.parameters(), lr=1e-2, weight_decay=weight_decay, decoupled_weight_decay=decoupled, foreach=foreach
    )
    reference = ReferenceAdaBelief(
        theirs.parameters(),
        lr=1e-2,
        weight_decay=weight_decay,
        weight_decouple=decoupled,
        fixed_decay=False,
        rectify=False,
        amsgrad=False,
        print_change_log=False,
    )
    initial = [p.detach().clone() for p in ours.parameters()]
    _train(ours, opt, x, y, 100)
    _train(theirs, reference, x, y, 100)

    for p, q, p0 in zip(ours.parameters(), theirs.parameters(), initial):
        assert (p - p0).abs().max() > 1e-2  # it did train: agreement is not trivial
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg"], reference.state[q]["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(
            opt.state[p]["exp_avg_var"], reference.state[q]["exp_avg_var"], rtol=1e-6, atol=1e-12
        )
        assert opt.state[p]["step"].item() == reference.state[q]["step"] == 100


# -- the two paths -----------------------------------------------------------------------


def _mixed_params(device: str) -> list[torch.Tensor]:
    """Two dtypes (two foreach groups), several shapes, and one parameter that never gets a gradient."""
    generator = torch.Generator().manual_seed(2)
    shapes_and_dtypes = [((4, 3), torch.float32), ((5,), torch.float64), ((2, 2, 2), torch.float32), ((3,), torch.float32)]
    return [
        torch.randn(shape, generator=generator, dtype=dtype).to(device).requires_grad_()
        for shape, dtype in shapes_and_dtypes
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_foreach_and_per_tensor_paths_agree(cls, decoupled, device):
    runs = {}
    for foreach in (False, True):
        params = _mixed_params(device)
        opt = cls(params, lr=1e-2, eps=1e-8, weight_decay=0.05, decoupled_weight_decay=decoupled, foreach=foreach)
        generator = torch.Generator().manual_seed(3)
        for _ in range(5):
            for p in params[:-1]:
                p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(device)
            opt.step()
        runs[foreach] = (params, opt)

    (single, single_opt), (multi, multi_opt) = runs[False], runs[True]
    assert not multi_opt.state[multi[-1]]  # no gradient, no state
    for p, q in zip(single, multi):
        torch.testing.assert_close(p, q, **_same(device))
    for p, q in zip(single[:-1], multi[:-1]):
        for key in ("step", "exp_avg", SECOND_MOMENT[cls]):
            torch.testing.assert_close(single_opt.state[p][key], multi_opt.state[q][key], **_same(device))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_foreach_default_follows_torch(cls, monkeypatch):
    """foreach=None: per tensor when a parameter is on the CPU, foreach when all are on CUDA."""
    paths = []
    monkeypatch.setattr(cls, "_update", staticmethod(lambda *a, **k: paths.append("per-tensor")))
    monkeypatch.setattr(cls, "_update_foreach", staticmethod(lambda *a, **k: paths.append("foreach")))
    for device, expected in [("cpu", "per-tensor")] + [("cuda", "foreach")] * ("cuda" in DEVICES):
        paths.clear()
        p = torch.zeros(3, device=device, requires_grad=True)
        p.grad = torch.ones(3, device=device)
        cls([p]).step()
        assert paths == [expected]


# -- the state the weight predictor reads ------------------------------------------------


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_state_layout_and_step_count(cls, decoupled):
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    opt = cls([a, b], lr=0.1, weight_decay=0.5, decoupled_weight_decay=decoupled)
    group_keys = {"params", "lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "foreach"}
    assert set(opt.param_groups[0]) == group_keys
    for step in range(3):
        a.grad = torch.full((3,), 0.25)
        b.grad = torch.full((2,), 0.25) if step != 1 else None
        b_before = b.detach().clone()
        opt.step()
        assert torch.equal(a.grad, torch.full((3,), 0.25))  # coupled decay never alters .grad
        if step == 1:
            assert torch.equal(b, b_before)  # no gradient: untouched, even by decoupled decay
    for p, updates in [(a, 3), (b, 2)]:
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg", SECOND_MOMENT[cls]}
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
        assert state["step"].item() == updates


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_state_dict_round_trip_in_lockstep(cls):
    model, x, y = _small_regression("cpu")
    opt = cls(model.parameters(), lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True)
    _train(model, opt, x, y, 5)

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin = copy.deepcopy(model)
    twin_opt = cls(twin.parameters())  # other hyper-parameters: the loaded groups must replace them
    buffer.seek(0)
    twin_opt.load_state_dict(torch.load(buffer))
    assert twin_opt.param_groups[0]["decoupled_weight_decay"] is True
    assert twin_opt.param_groups[0]["lr"] == 1e-2

    _train(model, opt, x, y, 5)
    _train(twin, twin_opt, x, y, 5)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", SECOND_MOMENT[cls]):
            assert torch.equal(opt.state[p][key], twin_opt.state[q][key])
        assert twin_opt.state[q]["step"].dtype == torch.float32
        assert twin_opt.state[q]["step"].item() == 10


# -- refusals ----------------------------------------------------------------------------

BAD_HYPERPARAMETERS = [
    (dict(lr=-1e-3), "Invalid learning rate: -0.001"),
    (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(-0.1, 0.999)), "Invalid beta parameter at index 0: -0.1"),
    (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    (dict(betas=(0.9,)), "expected a pair (beta1, beta2): (0.9,)"),
    (dict(weight_decay=-0.5), "Invalid weight_decay value: -0.5"),
]


@pytest.mark.parametrize("kwargs, message", BAD_HYPERPARAMETERS, ids=[m for _, m in BAD_HYPERPARAMETERS])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_bad_hyperparameter_raises_naming_it(cls, kwargs, message):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=re.escape(message)):
        cls([p], **kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):  # a param group's own override too
        cls([{"params": [p], **kwargs}])


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_sparse_gradient_refused(cls):
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        cls([p]).step()


# -- convergence -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_minimises_rosenbrock(cls):
    xy = torch.tensor([-1.5, 2.0], requires_grad=True)
    opt = cls([xy], lr=3e-2)
    for _ in range(2000):
        opt.zero_grad()
        x, y = xy
        ((1 - x) ** 2 + 100 * (y - x**2) ** 2).backward()
        opt.step()
    assert torch.dist(xy.detach(), torch.ones(2)) < 1e-2

"""Weight prediction (XGrad): run forward and backward at the weights a few steps ahead.

``WeightPredictor`` wraps an optimizer. ``predict()`` stashes the current
weights θ_t and writes θ̂_{t+s} = θ_t − s·γ·Δ̂ into the parameters, where Δ̂ is
the update the optimizer would apply next, computed from its *current state*
(never from ``.grad``, which may already be cleared). ``restore()`` copies θ_t
back bit for bit, in place, so storage identity survives (DDP buckets, CUDA
graphs and compiled models keep pointing at the same memory).

Each optimizer family has one closed-form rule (PAPER.md, "Prediction rules"):

- momentum:  Δ̂ = the stored momentum buffer (SGD with momentum, RMSprop with momentum);
- adaptive:  Δ̂ = (m/bc1) / (√(v/bc2) + ε_out) (Adam, AdamW, AdaBelief, AdaM3);
- last update: Δ̂ = (θ_before − θ_after)/γ_used, recorded by step hooks
  (RMSprop without momentum, and ``rule="last_update"`` for any optimizer).

The work is cut into chunks of at most ``CHUNK_NUMEL`` elements (flat views of
contiguous tensors), so the temporaries stay small (the extra memory is the
stash plus one chunk) and, on the CPU, each chunk's stash copy, denominator and
update run while the chunk is still in cache.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from xgrad.optim import AdaBelief, AdaM3

#: elements per chunk: a few MB that stay in the CPU caches between the passes (measured by
#: scripts/bench_predict.py), and few kernel launches per model on a GPU
CHUNK_NUMEL = {"cpu": 1 << 20, "cuda": 1 << 24}
_DEFAULT_CHUNK_NUMEL = 1 << 22

RULES = ("auto", "last_update")


@dataclass(frozen=True)
class _Momentum:
    """Δ̂ is a stored buffer: SGD's (or RMSprop's) momentum, or the recorded last update."""

    buffer: str


@dataclass(frozen=True)
class _Adaptive:
    """Δ̂ = (m/bc1) / (√(v/bc2) + ε_out), ε_out = ε or 0 (AdaM3 keeps ε inside the root)."""

    exp_avg: str
    exp_avg_sq: str
    eps_outside_root: bool


_LAST_UPDATE = _Momentum(buffer="xgrad_last_update")


def _auto_family(optimizer: torch.optim.Optimizer, group: dict) -> _Momentum | _Adaptive:
    """The closed-form rule for one param group, or a ValueError naming what is not modelled."""
    kind = type(optimizer)
    name = kind.__name__
    if group.get("differentiable", False):
        raise ValueError(f"WeightPredictor: {name}(differentiable=True) is not modelled")
    if kind is torch.optim.SGD:
        if group["momentum"] == 0:
            raise ValueError(
                "WeightPredictor: SGD with momentum=0 keeps no state to predict from; "
                "use momentum > 0 or rule='last_update'"
            )
        return _Momentum(buffer="momentum_buffer")
    if kind is torch.optim.RMSprop:
        if group["momentum"] > 0:
            return _Momentum(buffer="momentum_buffer")
        return _LAST_UPDATE
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        second = "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"
        return _Adaptive("exp_avg", second, eps_outside_root=True)
    if kind is AdaBelief:
        return _Adaptive("exp_avg", "exp_avg_var", eps_outside_root=True)
    if kind is AdaM3:
        return _Adaptive("exp_avg", "exp_avg_sq", eps_outside_root=False)
    raise ValueError(
        f"WeightPredictor: no closed-form rule for {kind.__module__}.{name} "
        "(rule='auto' knows SGD, RMSprop, Adam, AdamW, AdaBelief, AdaM3); "
        "use rule='last_update' for any other optimizer"
    )


def _has_decoupled_decay(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


@dataclass
class _Chunk:
    """Aligned flat pieces of parameters, their stash and their state, plus per-piece scalars."""

    params: list[torch.Tensor] = field(default_factory=list)
    stash: list[torch.Tensor] = field(default_factory=list)
    direction: list[torch.Tensor] = field(default_factory=list)  # Δ̂ buffer or m
    second: list[torch.Tensor] = field(default_factory=list)  # v (adaptive only)
    scale: list[float] = field(default_factory=list)  # θ̂ = decay·θ − scale·direction[/denom]
    decay: float = 1.0  # 1 − s·γ·λ (the decoupled decay term), one value per param group
    eps: list[float] = field(default_factory=list)  # added to √v (adaptive only)
    numel: int = 0


class WeightPredictor:
    """Predict the weights ``steps`` updates ahead of ``optimizer`` and restore them exactly.

    Typical use (see README)::

        xg = WeightPredictor(opt, steps=1)
        with xg.predicted():          # θ_t → θ̂_{t+s}; restores θ_t on exit, exceptions too
            loss_fn(model(x), y).backward()
        opt.step()

    ``rule="auto"`` refuses, at construction, any optimizer or flag it has no
    exact rule for; ``rule="last_update"`` works with any optimizer at the cost
    of one extra buffer per parameter. ``decoupled_decay=True`` adds the
    decoupled weight-decay term λθ to Δ̂ (AdamW-style optimizers only).
    ``foreach`` picks multi-tensor kernels (default) or the per-tensor path.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps: int = 1,
        rule: str = "auto",
        decoupled_decay: bool = False,
        *,
        foreach: bool = True,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"WeightPredictor needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ValueError(f"WeightPredictor: steps must be a non-negative integer, got {steps!r}")
        if steps < 0:
            raise ValueError(f"WeightPredictor: steps must be a non-negative integer, got {steps}")
        if rule not in RULES:
            raise ValueError(f"WeightPredictor: unknown rule {rule!r}; choose one of {RULES}")
        self.optimizer = optimizer
        self.steps = steps
        self.rule = rule
        self.decoupled_decay = bool(decoupled_decay)
        self.foreach = bool(foreach)
        self._families = [self._family(group) for group in optimizer.param_groups]
        self._stash: dict[torch.Tensor, torch.Tensor] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}  # one chunk's √v on the CPU, per (device, dtype)
        self._changed: list[torch.Tensor] | None = None  # parameters overwritten by predict()
        self._last_update: dict[torch.Tensor, torch.Tensor] = {}
        self._lr_used: list[float] = []
        self._hooks = [optimizer.register_step_pre_hook(self._before_step)]
        if _LAST_UPDATE in self._families:
            self._hooks.append(optimizer.register_step_post_hook(self._after_step))

    def _family(self, group: dict) -> _Momentum | _Adaptive:
        if self.rule == "last_update":
            if self.decoupled_decay:
                raise ValueError(
                    "WeightPredictor: decoupled_decay=True does not apply to rule='last_update' "
                    "(the recorded update already contains any weight decay)"
                )
            return _LAST_UPDATE
        family = _auto_family(self.optimizer, group)
        if self.decoupled_decay and not _has_decoupled_decay(self.optimizer, group):
            raise ValueError(
                f"WeightPredictor: decoupled_decay=True but {type(self.optimizer).__name__} applies "
                "its weight decay through the gradient (it is already inside the moments)"
            )
        return family

    # -- the public cycle -------------------------------------------------------------

    @property
    def is_predicted(self) -> bool:
        """True between ``predict()`` and ``restore()``."""
        return self._changed is not None

    @torch.no_grad()
    def predict(self) -> None:
        """Stash θ_t and write θ̂_{t+s} into every parameter that has optimizer state."""
        if self.is_predicted:
            raise RuntimeError(
                "WeightPredictor.predict() called twice without restore(): the stash of the real weights would be lost"
            )
        if len(self._families) != len(self.optimizer.param_groups):
            raise RuntimeError(
                "WeightPredictor: the optimizer gained param groups after the predictor was built; build a new one"
            )
        changed: list[torch.Tensor] = []
        if self.steps > 0:
            for chunk in self._chunks(changed):
                if self.foreach:
                    torch._foreach_copy_(chunk.stash, chunk.params)
                else:
                    for stash, p in zip(chunk.stash, chunk.params):
                        stash.copy_(p)
                if chunk.second:
                    self._apply_adaptive(chunk)
                else:
                    self._apply_momentum(chunk)
        self._changed = changed

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the stashed θ_t back into the parameters, bit for bit, in place."""
        if self._changed is None:
            raise RuntimeError("WeightPredictor.restore() called with nothing stashed: call predict() first")
        if self._changed:
            stash = [self._stash[p] for p in self._changed]
            if self.foreach:
                for device_params, device_stash in _by_device_and_dtype(self._changed, stash):
                    torch._foreach_copy_(device_params, device_stash)
            else:
                for p, s in zip(self._changed, stash):
                    p.copy_(s)
        self._changed = None

    @contextlib.contextmanager
    def predicted(self) -> Iterator[WeightPredictor]:
        """``predict()`` on entry, ``restore()`` on exit — also when the block raises."""
        self.predict()
        try:
            yield self
        finally:
            self.restore()

    # -- the plan: which tensors, cut into chunks ----------------------------------------

    def _chunks(self, changed: list[torch.Tensor]) -> Iterator[_Chunk]:
        """Yield chunks per (param group, device, dtype), appending every parameter touched to ``changed``."""
        open_chunks: dict[tuple, _Chunk] = {}
        for index, (group, family) in enumerate(zip(self.optimizer.param_groups, self._families)):
            lr = float(group["lr"])
            coeff = self.steps * lr * (-1.0 if group.get("maximize", False) else 1.0)
            decay = 1.0 - self.steps * lr * group["weight_decay"] if self.decoupled_decay else 1.0
            for p in group["params"]:
                tensors = self._prediction_tensors(p, family)
                if tensors is None:
                    continue
                scale, eps, direction, second = self._scalars(p, family, group, coeff, tensors)
                changed.append(p)
                stash = self._stash_for(p)
                key = (index, p.device, p.dtype)
                limit = CHUNK_NUMEL.get(p.device.type, _DEFAULT_CHUNK_NUMEL)
                pieces = _pieces(limit, p, stash, direction, *([second] if second is not None else []))
                for piece in pieces:
                    chunk = open_chunks.setdefault(key, _Chunk(decay=decay))
                    chunk.params.append(piece[0])
                    chunk.stash.append(piece[1])
                    chunk.direction.append(piece[2])
                    if second is not None:
                        chunk.second.append(piece[3])
                    chunk.scale.append(scale)
                    chunk.eps.append(eps)
                    chunk.numel += piece[0].numel()
                    if chunk.numel >= limit:
                        yield open_chunks.pop(key)
        yield from open_chunks.values()

    def _prediction_tensors(self, p: torch.Tensor, family) -> tuple[torch.Tensor, ...] | None:
        """The state tensors Δ̂ is computed from, or None when θ̂ = θ (frozen, or no update yet)."""
        if not p.requires_grad:
            return None
        if family is _LAST_UPDATE:
            buffer = self._last_update.get(p)
            return None if buffer is None else (buffer,)
        state = self.optimizer.state.get(p)
        if not state:
            return None
        if isinstance(family, _Momentum):
            buffer = state.get(family.buffer)
            return None if buffer is None else (buffer,)
        if family.exp_avg_sq not in state:
            raise RuntimeError(
                f"WeightPredictor: optimizer state has no '{family.exp_avg_sq}' "
                f"(state keys: {sorted(state)}); was the optimizer's amsgrad flag changed?"
            )
        return state[family.exp_avg], state[family.exp_avg_sq]

    def _scalars(self, p, family, group, coeff, tensors):
        """(scale, eps, direction, second) for one parameter; bias corrections use its step count t."""
        if isinstance(family, _Momentum):
            return coeff, 0.0, tensors[0], None
        beta1, beta2 = (float(b) for b in group["betas"])
        t = float(self.optimizer.state[p]["step"])
        bias_correction1 = 1.0 - beta1**t
        root_bias_correction2 = math.sqrt(1.0 - beta2**t)
        # (m/bc1) / (√v/√bc2 + ε) = (√bc2/bc1) · m / (√v + ε·√bc2): one pass fewer over v
        eps = float(group["eps"]) * root_bias_correction2 if family.eps_outside_root else 0.0
        return coeff * root_bias_correction2 / bias_correction1, eps, tensors[0], tensors[1]

    def _stash_for(self, p: torch.Tensor) -> torch.Tensor:
        stash = self._stash.get(p)
        if stash is None:
            stash = self._stash[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return stash

    # -- the rules ------------------------------------------------------------------------

    def _apply_momentum(self, chunk: _Chunk) -> None:
        """θ̂ = decay·θ − scale·buffer (one scale per param group)."""
        scale = chunk.scale[0]
        if self.foreach:
            if self.decoupled_decay:
                torch._foreach_mul_(chunk.params, chunk.decay)
            torch._foreach_add_(chunk.params, chunk.direction, alpha=-scale)
            return
        for p, d in zip(chunk.params, chunk.direction):
            if self.decoupled_decay:
                p.mul_(chunk.decay)
            p.add_(d, alpha=-scale)

    def _apply_adaptive(self, chunk: _Chunk) -> None:
        """θ̂ = decay·θ − scale·m / (√v + eps)."""
        negative_scale = [-s for s in chunk.scale]
        denom = self._square_roots(chunk)
        add_eps = any(chunk.eps)  # AdaM3 keeps ε inside the root: nothing to add
        if self.foreach:
            if add_eps:
                torch._foreach_add_(denom, chunk.eps)
            if self.decoupled_decay:
                torch._foreach_mul_(chunk.params, chunk.decay)
            torch._foreach_addcdiv_(chunk.params, chunk.direction, denom, negative_scale)
            return
        for p, m, d, scale, eps in zip(chunk.params, chunk.direction, denom, negative_scale, chunk.eps):
            if add_eps:
                d.add_(eps)
            if self.decoupled_decay:
                p.mul_(chunk.decay)
            p.addcdiv_(m, d, value=scale)

    def _square_roots(self, chunk: _Chunk) -> list[torch.Tensor]:
        """√v for every piece of ``chunk``, in temporaries the rule may overwrite.

        On the CPU they are views of one buffer kept between calls: a fresh
        chunk-sized tensor per chunk costs page faults whenever the allocator
        has handed memory back to the OS (as it does after large frees, such as
        a training step's). With fresh tensors scripts/bench_predict.py measured
        the adaptive rows at 4.2–6.5× the copy floor from run to run; with the
        kept buffer, 3.8–4.4×. On a GPU the caching allocator makes a temporary
        free, and one multi-tensor kernel beats a launch per piece.
        """
        second = chunk.second
        if self.foreach and second[0].device.type != "cpu":
            return torch._foreach_sqrt(second)
        key = (second[0].device, second[0].dtype)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < chunk.numel:
            buffer = self._scratch[key] = torch.empty(chunk.numel, device=second[0].device, dtype=second[0].dtype)
        roots, offset = [], 0
        for v in second:
            roots.append(torch.sqrt(v, out=buffer[offset : offset + v.numel()].view(v.shape)))
            offset += v.numel()
        return roots

    # -- step hooks: misuse guard and the last-update record ----------------------------------

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self.is_predicted:
            raise RuntimeError(
                "optimizer.step() called while the predicted weights are in place: "
                "call WeightPredictor.restore() (or leave predicted()) before stepping"
            )
        if _LAST_UPDATE not in self._families:
            return
        self._lr_used = [float(group["lr"]) for group in optimizer.param_groups]
        with torch.no_grad():
            for group, family in zip(optimizer.param_groups, self._families):
                if family is not _LAST_UPDATE:
                    continue
                for p in group["params"]:
                    if p.requires_grad and p.grad is not None:
                        buffer = self._last_update.get(p)
                        if buffer is None:
                            buffer = self._last_update[p] = torch.empty_like(p, memory_format=torch.preserve_format)
                        buffer.copy_(p)  # θ_before, turned into the direction after the step

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        for group, family, lr in zip(optimizer.param_groups, self._families, self._lr_used):
            if family is not _LAST_UPDATE:
                continue
            for p in group["params"]:
                buffer = self._last_update.get(p)
                if buffer is None or not p.requires_grad or p.grad is None:
                    continue
                if lr == 0.0:
                    buffer.zero_()  # no step taken: no direction to extrapolate
                else:
                    buffer.sub_(p).div_(lr)  # (θ_before − θ_after) / γ_used

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Settings and, for the last-update rule, the recorded directions (by parameter index)."""
        if self.is_predicted:
            raise RuntimeError("WeightPredictor.state_dict() called while predicted: restore() first")
        index = {p: i for i, p in enumerate(self._all_params())}
        return {
            "steps": self.steps,
            "rule": self.rule,
            "decoupled_decay": self.decoupled_decay,
            "last_update": {index[p]: buffer.clone() for p, buffer in self._last_update.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict()``; refuses one from a predictor configured differently."""
        expected = {"steps", "rule", "decoupled_decay", "last_update"}
        if not isinstance(state, dict) or set(state) != expected:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"WeightPredictor.load_state_dict: expected keys {sorted(expected)}, got {keys}")
        for key in ("steps", "rule", "decoupled_decay"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"WeightPredictor.load_state_dict: {key}={state[key]!r} in the state, "
                    f"but this predictor has {key}={getattr(self, key)!r}"
                )
        params = self._all_params()
        restored = {}
        for i, buffer in state["last_update"].items():
            if not 0 <= int(i) < len(params) or buffer.shape != params[int(i)].shape:
                raise ValueError(
                    f"WeightPredictor.load_state_dict: recorded update #{i} of shape {tuple(buffer.shape)} "
                    "does not fit this optimizer's parameters"
                )
            p = params[int(i)]
            restored[p] = buffer.to(device=p.device, dtype=p.dtype).clone(memory_format=torch.preserve_format)
        self._last_update = restored

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def __repr__(self) -> str:
        return (
            f"WeightPredictor({type(self.optimizer).__name__}, steps={self.steps}, rule={self.rule!r}, "
            f"decoupled_decay={self.decoupled_decay})"
        )


def _pieces(limit: int, *tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Split aligned same-shape tensors into flat pieces of at most ``limit`` elements.

    Tensors that are not all plainly contiguous (channels_last, strided views)
    stay whole: elementwise kernels need only that they share one layout.
    """
    first = tensors[0]
    if first.numel() <= limit or not all(t.is_contiguous() for t in tensors):
        return [tensors]
    flat = [t.view(-1) for t in tensors]
    return [tuple(f[start : start + limit] for f in flat) for start in range(0, first.numel(), limit)]


def _by_device_and_dtype(
    params: list[torch.Tensor], stash: list[torch.Tensor]
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    groups: dict[tuple, tuple[list, list]] = {}
    for p, s in zip(params, stash):
        group = groups.setdefault((p.device, p.dtype), ([], []))
        group[0].append(p)
        group[1].append(s)
    yield from groups.values()

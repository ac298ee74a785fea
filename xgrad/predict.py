"""Weight prediction (XGrad): run forward and backward at the weights a few steps ahead.

``WeightPredictor`` wraps an optimizer. ``predict()`` stashes the current
weights θ_t and writes θ̂_{t+s} = θ_t − s·γ·Δ̂ into the parameters, where Δ̂ is
the update the optimizer would apply next, computed from its *current state*
(never from ``.grad``, which may already be cleared). ``restore()`` copies θ_t
back bit for bit, in place, so storage identity survives (DDP buckets, CUDA
graphs and compiled models keep pointing at the same memory).

Where Δ̂ is found in the state is a rule of ``xgrad.rules`` (a momentum
buffer, Adam's bias-corrected moments, or the last update recorded by step
hooks), looked up per param group by the optimizer's class; that module also
records why ``maximize`` needs no sign and why Nesterov momentum uses the buffer.

The work is cut into chunks of at most ``CHUNK_NUMEL`` elements (flat views of
contiguous tensors), so the temporaries stay small (the extra memory is the
stash plus one chunk) and, on the CPU, each chunk's stash copy, denominator and
update run while the chunk is still in cache.

No host synchronisation: predict() and restore() never read the value of a
tensor that lives on an accelerator. Learning rates and step counts held on the
host (the default: torch keeps Adam's ``step`` on the CPU) become Python
floats; those on the device (``fused=True``, ``capturable=True``, a tensor lr)
stay there, and the step sizes are computed from them with tensor kernels, for
a whole param group at once. This is checked by tests/test_predict.py on the
``meta`` device, where reading any value raises, and with
``torch.cuda.set_sync_debug_mode("error")`` where a GPU is present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from xgrad import rules
from xgrad.rules import LAST_UPDATE, Adaptive, LastUpdate, Rule

#: elements per chunk: a few MB that stay in the CPU caches between the passes (measured by
#: scripts/bench_predict.py), and few kernel launches per model on a GPU
CHUNK_NUMEL = {"cpu": 1 << 20, "cuda": 1 << 24}
_DEFAULT_CHUNK_NUMEL = 1 << 22

RULES = ("auto", "last_update")


@dataclass
class _Chunk:
    """Aligned flat pieces of parameters, their stash and their state, plus per-piece scalars.

    θ̂ = decay·θ + alpha·direction, or decay·θ + alpha·direction / (√second + eps) for an
    adaptive rule. The scalars are floats, or 0-dim tensors on the parameters' device.
    """

    params: list[Tensor] = field(default_factory=list)
    stash: list[Tensor] = field(default_factory=list)
    direction: list[Tensor] = field(default_factory=list)  # Δ̂ buffer or m
    second: list[Tensor] = field(default_factory=list)  # v (adaptive only)
    alpha: list[float | Tensor] = field(default_factory=list)  # −s·γ (times √bc2/bc1 for adaptive)
    eps: list[float | Tensor] = field(default_factory=list)  # added to √v (adaptive only)
    add_eps: bool = False  # AdaM3 keeps ε inside the root: nothing to add
    decay: float | Tensor = 1.0  # 1 − s·γ·λ (the decoupled decay term), one value per param group
    numel: int = 0

    @property
    def on_device(self) -> bool:
        """True when the scalars are tensors (kept on the accelerator) rather than floats."""
        return isinstance(self.alpha[0], Tensor)


class WeightPredictor:
    """Predict the weights ``steps`` updates ahead of ``optimizer`` and restore them exactly.

    Typical use (see README)::

        xg = WeightPredictor(opt, steps=1)
        with xg.predicted():          # θ_t → θ̂_{t+s}; restores θ_t on exit, exceptions too
            loss_fn(model(x), y).backward()
        opt.step()

    ``rule="auto"`` takes the optimizer's rule from ``xgrad.rules`` (its class,
    or the nearest registered base class) and refuses, at construction, any
    optimizer or flag it has no rule for; ``rule="last_update"`` works with any
    optimizer at the cost of one extra buffer per parameter. ``decoupled_decay=True`` adds the
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
        self._rules = [self._rule(group) for group in optimizer.param_groups]
        self._stash: dict[Tensor, Tensor] = {}
        self._scratch: dict[tuple, Tensor] = {}  # one chunk's √v on the CPU, per (device, dtype)
        self._changed: list[Tensor] | None = None  # parameters overwritten by predict()
        self._last_update: dict[Tensor, Tensor] = {}
        self._lr_used: list[float | Tensor] = []  # per group, for the last-update record
        self._hooks = [optimizer.register_step_pre_hook(self._before_step)]
        if self._records_updates:
            self._hooks.append(optimizer.register_step_post_hook(self._after_step))

    def _rule(self, group: dict) -> Rule:
        if self.rule == "last_update":
            if self.decoupled_decay:
                raise ValueError(
                    "WeightPredictor: decoupled_decay=True does not apply to rule='last_update' "
                    "(the recorded update already contains any weight decay)"
                )
            return LAST_UPDATE
        rule = rules.rule_for(self.optimizer, group)
        if self.decoupled_decay and not rule.decoupled_decay:
            raise ValueError(
                f"WeightPredictor: decoupled_decay=True but {type(self.optimizer).__name__} applies "
                "its weight decay through the gradient (it is already inside the state)"
            )
        return rule

    @property
    def _records_updates(self) -> bool:
        return any(isinstance(rule, LastUpdate) for rule in self._rules)

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
        if len(self._rules) != len(self.optimizer.param_groups):
            raise RuntimeError(
                "WeightPredictor: the optimizer gained param groups after the predictor was built; build a new one"
            )
        changed: list[Tensor] = []
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

    def _chunks(self, changed: list[Tensor]) -> Iterator[_Chunk]:
        """Yield chunks per (param group, device, dtype), appending every parameter touched to ``changed``."""
        open_chunks: dict[tuple, _Chunk] = {}
        for index, (group, rule) in enumerate(zip(self.optimizer.param_groups, self._rules)):
            members = [(p, tensors) for p in group["params"] if (tensors := self._prediction_tensors(p, rule))]
            if not members:
                continue
            coeff = self.steps * rules.scalar(group["lr"])
            decay = 1.0 - coeff * rules.scalar(group["weight_decay"]) if self.decoupled_decay else 1.0
            if isinstance(rule, Adaptive):
                steps = [self.optimizer.state[p]["step"] for p, _ in members]
                alphas, epsilons = rule.step_sizes(group, steps, coeff)
            else:
                alphas, epsilons = [-coeff] * len(members), [0.0] * len(members)
            add_eps = isinstance(rule, Adaptive) and rule.eps_outside_root
            for (p, tensors), alpha, eps in zip(members, alphas, epsilons, strict=True):
                changed.append(p)
                key = (index, p.device, p.dtype)
                limit = CHUNK_NUMEL.get(p.device.type, _DEFAULT_CHUNK_NUMEL)
                for piece in _pieces(limit, *_real_views(p, self._stash_for(p), *tensors)):
                    chunk = open_chunks.setdefault(key, _Chunk(decay=decay, add_eps=add_eps))
                    chunk.params.append(piece[0])
                    chunk.stash.append(piece[1])
                    chunk.direction.append(piece[2])
                    if len(piece) > 3:
                        chunk.second.append(piece[3])
                    chunk.alpha.append(alpha)
                    chunk.eps.append(eps)
                    chunk.numel += piece[0].numel()
                    if chunk.numel >= limit:
                        yield open_chunks.pop(key)
        yield from open_chunks.values()

    def _prediction_tensors(self, p: Tensor, rule: Rule) -> tuple[Tensor, ...] | None:
        """The state tensors Δ̂ is computed from, or None when θ̂ = θ (frozen, or no update yet)."""
        if not p.requires_grad:
            return None
        if isinstance(rule, LastUpdate):
            buffer = self._last_update.get(p)
            return None if buffer is None else (buffer,)
        state = self.optimizer.state.get(p)
        return rule.state_tensors(state) if state else None

    def _stash_for(self, p: Tensor) -> Tensor:
        stash = self._stash.get(p)
        if stash is None:
            stash = self._stash[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return stash

    # -- the rules ------------------------------------------------------------------------

    def _apply_momentum(self, chunk: _Chunk) -> None:
        """θ̂ = decay·θ + alpha·buffer (one alpha per param group)."""
        if self.foreach:
            if self.decoupled_decay:
                torch._foreach_mul_(chunk.params, chunk.decay)
            if chunk.on_device:
                torch._foreach_addcmul_(chunk.params, chunk.direction, chunk.alpha)  # 0-dim alphas broadcast
            else:
                torch._foreach_add_(chunk.params, chunk.direction, alpha=chunk.alpha[0])
            return
        for p, d, alpha in zip(chunk.params, chunk.direction, chunk.alpha):
            if self.decoupled_decay:
                p.mul_(chunk.decay)
            if chunk.on_device:
                p.addcmul_(d, alpha)
            else:
                p.add_(d, alpha=alpha)

    def _apply_adaptive(self, chunk: _Chunk) -> None:
        """θ̂ = decay·θ + alpha·m / (√v + eps).

        With tensor scalars the denominator is divided by alpha first, as torch's
        capturable Adam does, since addcdiv takes only a float as its factor.
        """
        denom = self._square_roots(chunk)
        if self.foreach:
            if chunk.add_eps:
                torch._foreach_add_(denom, chunk.eps)
            if self.decoupled_decay:
                torch._foreach_mul_(chunk.params, chunk.decay)
            if chunk.on_device:
                torch._foreach_div_(denom, chunk.alpha)
                torch._foreach_addcdiv_(chunk.params, chunk.direction, denom)
            else:
                torch._foreach_addcdiv_(chunk.params, chunk.direction, denom, chunk.alpha)
            return
        for p, m, d, alpha, eps in zip(chunk.params, chunk.direction, denom, chunk.alpha, chunk.eps):
            if chunk.add_eps:
                d.add_(eps)
            if self.decoupled_decay:
                p.mul_(chunk.decay)
            if chunk.on_device:
                p.addcdiv_(m, d.div_(alpha))
            else:
                p.addcdiv_(m, d, value=alpha)

    def _square_roots(self, chunk: _Chunk) -> list[Tensor]:
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
        if not self._records_updates:
            return
        self._lr_used = [rules.scalar(group["lr"]) for group in optimizer.param_groups]
        with torch.no_grad():
            for group, rule in zip(optimizer.param_groups, self._rules):
                if not isinstance(rule, LastUpdate):
                    continue
                for p in group["params"]:
                    if p.requires_grad and p.grad is not None:
                        buffer = self._last_update.get(p)
                        if buffer is None:
                            buffer = self._last_update[p] = torch.empty_like(p, memory_format=torch.preserve_format)
                        buffer.copy_(p)  # θ_before, turned into the direction after the step

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        for group, rule, lr in zip(optimizer.param_groups, self._rules, self._lr_used):
            if not isinstance(rule, LastUpdate):
                continue
            if isinstance(lr, Tensor):  # on the device: 1/γ, or 0 where no step was taken, without reading γ
                inverse_lr = torch.where(lr == 0, 0.0, lr.reciprocal())
            for p in group["params"]:
                buffer = self._last_update.get(p)
                if buffer is None or not p.requires_grad or p.grad is None:
                    continue
                if isinstance(lr, Tensor):
                    buffer.sub_(p).mul_(inverse_lr)
                elif lr == 0.0:
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

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def __repr__(self) -> str:
        return (
            f"WeightPredictor({type(self.optimizer).__name__}, steps={self.steps}, rule={self.rule!r}, "
            f"decoupled_decay={self.decoupled_decay})"
        )


def _pieces(limit: int, *tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """Split aligned same-shape tensors into flat pieces of at most ``limit`` elements.

    Tensors that are not all plainly contiguous (channels_last, strided views)
    stay whole: elementwise kernels need only that they share one layout.
    """
    first = tensors[0]
    if first.numel() <= limit or not all(t.is_contiguous() for t in tensors):
        return [tensors]
    flat = [t.view(-1) for t in tensors]
    return [tuple(f[start : start + limit] for f in flat) for start in range(0, first.numel(), limit)]


def _real_views(*tensors: Tensor) -> list[Tensor]:
    """Complex tensors as real ones with a trailing (re, im) axis, as torch's optimizers update them."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _by_device_and_dtype(
    params: list[Tensor], stash: list[Tensor]
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    groups: dict[tuple, tuple[list, list]] = {}
    for p, s in zip(params, stash):
        group = groups.setdefault((p.device, p.dtype), ([], []))
        group[0].append(p)
        group[1].append(s)
    yield from groups.values()

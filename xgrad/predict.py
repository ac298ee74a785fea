"""Weight prediction (XGrad): run forward and backward at the weights a few steps ahead.

``WeightPredictor`` wraps an optimizer. ``predict()`` stashes the current
weights θ_t and writes θ̂_{t+s} = θ_t·(1 − s·γ·λ) − s·γ·Δ̂ into the parameters,
where Δ̂ is the update the optimizer would apply next, computed from its
*current state* by a rule of ``xgrad.rules`` (never from ``.grad``, which may
already be cleared). ``restore()`` copies θ_t back bit for bit, in place, so
storage identity survives (DDP buckets, CUDA graphs and compiled models keep
pointing at the same memory). If ``predict()`` fails half-way, what it wrote is
restored before the error propagates.

The plan — which tensors, cut into chunks of at most ``CHUNK_NUMEL`` elements
(flat views of contiguous tensors), grouped by param group, device and dtype —
is built once and reused; it is rebuilt when the param groups, the trainable
parameters or the optimizer's state tensors change (``optimizer.load_state_dict``,
a parameter's first step). Each call then computes a few scalars per param
group and runs a handful of multi-tensor kernels, which keeps the cost small
for small models (scripts/bench_predict.py, the LeNet-5 row). The temporaries
stay small: the stash plus one chunk.

No host synchronisation: predict() and restore() never read the value of a
tensor that lives on an accelerator. Learning rates and step counts held on the
host (torch's default) become Python floats; those on the device
(``fused=True``, ``capturable=True``, a tensor lr) stay there, and the
coefficients are computed from them with tensor kernels, for a whole param group
at once. tests/test_predict.py checks this on the ``meta`` device, where reading
any value raises, and with ``torch.cuda.set_sync_debug_mode("error")`` where a GPU
is present.

Step hooks: a pre-hook refuses ``optimizer.step()`` while θ̂ is in place, and
for the last-update rule the hooks record the update the step applied (θ before
the step is stashed by the pre-hook and compared after it, so forward and
backward may run before ``step()`` or inside ``step(closure)``). The hooks hold
the predictor weakly: a discarded predictor is freed and its hooks removed;
``detach()`` does so at once.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from xgrad import rules
from xgrad.rules import RECORD, Adaptive, Direction, LastUpdate, Rule, Sign

#: elements per chunk: a few MB that stay in the CPU caches between the passes (measured by
#: scripts/bench_predict.py), and few kernel launches per model on a GPU
CHUNK_NUMEL = {"cpu": 1 << 20, "cuda": 1 << 24}
_DEFAULT_CHUNK_NUMEL = 1 << 22

RULES = ("auto", "last_update")

#: optimizer → a one-entry list: a weak reference to the predictor whose θ̂ is in its parameters now, or None
_HOLDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_arguments(steps: object, rule: object, decoupled_decay: object) -> None:
    """Refuse bad ``WeightPredictor`` arguments in one line (the callbacks call this at construction too)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"WeightPredictor: steps must be a non-negative integer, got {steps!r}")
    if rule not in RULES:
        raise ValueError(f"WeightPredictor: unknown rule {rule!r}; choose one of {RULES}")
    if decoupled_decay is not None and not isinstance(decoupled_decay, bool):
        raise ValueError(f"WeightPredictor: decoupled_decay must be None, True or False, got {decoupled_decay!r}")
    if rule == "last_update" and decoupled_decay:
        raise ValueError(
            "WeightPredictor: decoupled_decay=True does not apply to rule='last_update' "
            "(the recorded update already contains any weight decay)"
        )


def unwrap(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer inside a trainer's wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``).

    The wrapper steps the optimizer inside it, so the hooks on that one fire.
    """
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"WeightPredictor needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


@dataclass
class _Chunk:
    """Aligned flat pieces of one param group's parameters on one device and dtype, with their stash and state."""

    params: list[Tensor] = field(default_factory=list)
    stash: list[Tensor] = field(default_factory=list)
    direction: list[Tensor] = field(default_factory=list)  # Δ̂'s buffer, or m
    second: list[Tensor] = field(default_factory=list)  # v (adaptive only)
    roots: list[Tensor] = field(default_factory=list)  # views of a kept buffer for √v (adaptive, on the CPU)
    flat_roots: Tensor | None = None  # the same buffer as one flat tensor: ε added in one kernel
    owners: list[int] = field(default_factory=list)  # the member of the group each piece belongs to
    numel: int = 0


@dataclass
class _GroupPlan:
    """What predict() touches in one param group, and what must stay the same for the plan to hold."""

    group: dict
    rule: Rule
    params: list[Tensor]  # the group's own list (its identity and length are checked)
    count: int
    members: list[Tensor]  # trainable parameters with the state the rule reads
    pointers: list[int]  # where each member's data lives (a parameter given new data, e.g. by .to(): a new plan)
    states: list[dict]
    tensors: list[tuple[Tensor, ...]]
    waiting: list[Tensor]  # the group's other parameters: a plan change when one gains state or is unfrozen
    chunks: list[_Chunk]
    host_scalars: bool = True  # every per-parameter scalar the rule reads is held on the host


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
    optimizer at the cost of one extra buffer per parameter in its state.
    ``decoupled_decay``: None (default) predicts the decoupled weight decay
    θ(1 − s·γ·λ) wherever the optimizer applies one, as its next step does;
    False is the paper's form (Δ̂ alone); True insists on the decay term and
    refuses optimizers without one. ``foreach`` picks multi-tensor kernels
    (default) or the per-tensor path.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps: int = 1,
        rule: str = "auto",
        decoupled_decay: bool | None = None,
        *,
        foreach: bool = True,
    ):
        optimizer = unwrap(optimizer)
        check_arguments(steps, rule, decoupled_decay)
        self.optimizer = optimizer
        self.steps = steps
        self.rule = rule
        self.decoupled_decay = decoupled_decay
        self.foreach = bool(foreach)
        self._plans: list[_GroupPlan] | None = None
        self._whole: list[tuple[list[Tensor], list[Tensor]]] = []  # every member and its stash, per (device, dtype)
        self._rules = [self._rule(group) for group in optimizer.param_groups]  # refusals here, at construction
        self._stash: dict[Tensor, Tensor] = {}
        self._scratch: dict[tuple, Tensor] = {}  # √v of the largest chunk on the CPU, per (device, dtype)
        self._restore_lists: list[tuple[list[Tensor], list[Tensor]]] | None = None  # set between predict and restore
        self._lr_used: list[float | Tensor] = []  # per group, for the last-update record
        self._detached = False
        self._holder = _HOLDERS.setdefault(optimizer, [None])
        self._myself = weakref.ref(self)
        handles = [
            optimizer.register_step_pre_hook(_weakly(self._before_step)),
            optimizer.register_step_post_hook(_weakly(self._after_step)),
        ]
        self._release = weakref.finalize(self, _remove_hooks, handles)

    def _rule(self, group: dict) -> Rule:
        if self.rule == "last_update":
            return rules.LAST_UPDATE
        rule = rules.rule_for(self.optimizer, group)
        if self.decoupled_decay is True and not rule.decoupled_decay:
            raise ValueError(
                f"WeightPredictor: decoupled_decay=True but {type(self.optimizer).__name__} applies "
                "its weight decay through the gradient (it is already inside the state)"
            )
        return rule

    def _decays(self, rule: Rule) -> bool:
        """Whether θ̂ includes the decoupled decay: where the optimizer applies one, unless the paper's form is asked for."""
        return rule.decoupled_decay and self.decoupled_decay is not False

    # -- the public cycle -------------------------------------------------------------

    @property
    def is_predicted(self) -> bool:
        """True between ``predict()`` and ``restore()``."""
        return self._restore_lists is not None

    def predict(self) -> None:
        """Stash θ_t and write θ̂_{t+s} into every parameter that has optimizer state; all or nothing."""
        if self._detached:
            raise RuntimeError("WeightPredictor.predict(): this predictor was detached from its optimizer")
        if self.is_predicted:
            raise RuntimeError(
                "WeightPredictor.predict() called twice without restore(): the stash of the real weights would be lost"
            )
        other = self._holder[0]() if self._holder[0] is not None else None
        if other is not None and other is not self and other.is_predicted:
            raise RuntimeError(
                "WeightPredictor.predict(): another WeightPredictor holds predicted weights of this optimizer; "
                "restore() it first"
            )
        plans = self._current_plans()
        written: list[tuple[list[Tensor], list[Tensor]]] = []
        try:
            if self.steps > 0:
                for plan in plans:
                    self._predict_group(plan, written)
        except BaseException:
            self._copy_back(written)  # the real weights, whatever failed half-way
            raise
        self._restore_lists = self._whole if self.steps > 0 else []
        self._holder[0] = self._myself

    def restore(self) -> None:
        """Copy the stashed θ_t back into the parameters, bit for bit, in place."""
        if self._restore_lists is None:
            raise RuntimeError("WeightPredictor.restore() called with nothing stashed: call predict() first")
        self._copy_back(self._restore_lists)
        self._restore_lists = None
        if self._holder[0] is self._myself:
            self._holder[0] = None

    @contextlib.contextmanager
    def predicted(self) -> Iterator[WeightPredictor]:
        """``predict()`` on entry, ``restore()`` on exit — also when the block raises."""
        self.predict()
        try:
            yield self
        finally:
            self.restore()

    def detach(self) -> None:
        """Remove the step hooks and free the stash (restoring θ_t first if it is predicted).

        The last-update records stay in the optimizer's state, like its own
        buffers: a new predictor on the same optimizer continues from them.
        """
        if self.is_predicted:
            self.restore()
        self._release()
        self._detached = True
        self._plans = None
        self._stash.clear()
        self._scratch.clear()

    # -- the plan ------------------------------------------------------------------------

    def _current_plans(self) -> list[_GroupPlan]:
        if self._plans is None or not self._plans_hold(self._plans):
            self._plans = self._build_plans()
            members = [p for plan in self._plans for p in plan.members]
            self._whole = list(_by_device_and_dtype([p.detach() for p in members], [self._stash[p] for p in members]))
        return self._plans

    def _plans_hold(self, plans: list[_GroupPlan]) -> bool:
        """Are the param groups, their trainable parameters and the state tensors those the plan was built on?"""
        groups, state = self.optimizer.param_groups, self.optimizer.state
        if len(groups) != len(plans):
            return False
        for group, plan in zip(groups, plans):
            if group is not plan.group or group["params"] is not plan.params or len(plan.params) != plan.count:
                return False
            keys = plan.rule.keys
            for p, pointer, st, tensors in zip(plan.members, plan.pointers, plan.states, plan.tensors):
                if state.get(p) is not st or not p.requires_grad or p.data_ptr() != pointer:
                    return False
                for key, tensor in zip(keys, tensors):
                    if st.get(key) is not tensor:
                        return False
            for p in plan.waiting:
                if p.requires_grad and state.get(p) and plan.rule.state_tensors(state[p]) is not None:
                    return False
        return True

    def _build_plans(self) -> list[_GroupPlan]:
        state = self.optimizer.state
        self._rules = [self._rule(group) for group in self.optimizer.param_groups]
        plans = []
        for group, rule in zip(self.optimizer.param_groups, self._rules):
            members, states, tensors, waiting = [], [], [], []
            for p in group["params"]:
                st = state.get(p)
                found = rule.state_tensors(st) if st and p.requires_grad else None
                if found is None:
                    waiting.append(p)
                    continue
                members.append(p)
                states.append(st)
                tensors.append(found)
            if isinstance(rule, Direction):  # no chunks: one parameter at a time, each with its stash
                for p in members:
                    self._stash_for(p)
                chunks = []
            else:
                chunks = self._chunks(members, tensors, isinstance(rule, Adaptive))
            names = rule.scalars if isinstance(rule, Adaptive) else ()
            host = all(not isinstance(st[name], Tensor) or rules._on_host(st[name]) for st in states for name in names)
            pointers = [p.data_ptr() for p in members]
            plans.append(
                _GroupPlan(
                    group, rule, group["params"], len(group["params"]), members, pointers, states, tensors, waiting,
                    chunks, host,
                )
            )
        return plans

    def _chunks(self, members: list[Tensor], tensors: list[tuple[Tensor, ...]], adaptive: bool) -> list[_Chunk]:
        """The members cut into chunks per (device, dtype) of at most CHUNK_NUMEL elements each."""
        done: list[_Chunk] = []
        open_chunks: dict[tuple, _Chunk] = {}
        for index, (p, state_tensors) in enumerate(zip(members, tensors)):
            key = (p.device, p.dtype)
            limit = CHUNK_NUMEL.get(p.device.type, _DEFAULT_CHUNK_NUMEL)
            # a detached view: predict and restore write the weights outside autograd without a no_grad context
            for piece in _pieces(limit, *_real_views(p.detach(), self._stash_for(p), *state_tensors)):
                chunk = open_chunks.setdefault(key, _Chunk())
                chunk.params.append(piece[0])
                chunk.stash.append(piece[1])
                chunk.direction.append(piece[2])
                if len(piece) > 3:
                    chunk.second.append(piece[3])
                chunk.owners.append(index)
                chunk.numel += piece[0].numel()
                if chunk.numel >= limit:
                    done.append(open_chunks.pop(key))
        done.extend(open_chunks.values())
        if adaptive:
            self._root_views(done)
        return done

    def _root_views(self, chunks: list[_Chunk]) -> None:
        """Views of one kept buffer per (device, dtype) where √v is written on the CPU (a GPU takes a fresh foreach sqrt).

        A fresh chunk-sized tensor per call costs page faults whenever the
        allocator has handed memory back to the OS (as it does after a training
        step's large frees); the kept buffer is written in cache instead. It is
        sized once for the largest chunk, so the extra memory is one chunk.
        """
        on_cpu = [chunk for chunk in chunks if not (self.foreach and chunk.second[0].device.type != "cpu")]
        largest: dict[tuple, int] = {}
        for chunk in on_cpu:
            key = (chunk.second[0].device, chunk.second[0].dtype)
            largest[key] = max(largest.get(key, 0), chunk.numel)
        for key, numel in largest.items():
            if key not in self._scratch or self._scratch[key].numel() < numel:
                self._scratch[key] = torch.empty(numel, device=key[0], dtype=key[1])
        for chunk in on_cpu:
            buffer = self._scratch[(chunk.second[0].device, chunk.second[0].dtype)]
            offset = 0
            for v in chunk.second:
                chunk.roots.append(buffer[offset : offset + v.numel()].view(v.shape))
                offset += v.numel()
            chunk.flat_roots = buffer[:offset]

    def _stash_for(self, p: Tensor) -> Tensor:
        stash = self._stash.get(p)
        if stash is None or stash.shape != p.shape or stash.dtype != p.dtype or stash.device != p.device:
            stash = self._stash[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return stash

    # -- the arithmetic ---------------------------------------------------------------------

    def _predict_group(self, plan: _GroupPlan, written: list) -> None:
        if not plan.members:
            return
        group, rule = plan.group, plan.rule
        coeff = -self.steps * rules.scalar(group["lr"])
        decay = None
        if self._decays(rule) and not _is_zero(group["weight_decay"]):
            decay = 1.0 + coeff * rules.scalar(group["weight_decay"])  # 1 − s·γ·λ
        if isinstance(rule, Direction):
            self._predict_directions(plan, coeff, decay, written)
            return
        if isinstance(rule, Adaptive):
            alphas, epsilons, plains = self._adaptive_scalars(plan, coeff)
        for chunk in plan.chunks:
            if self.foreach:
                torch._foreach_copy_(chunk.stash, chunk.params)
            else:
                for stash, p in zip(chunk.stash, chunk.params):
                    stash.copy_(p)
            written.append((chunk.params, chunk.stash))
            if decay is not None:
                _scale(chunk.params, decay, self.foreach)
            if isinstance(rule, Adaptive):
                pieces = len(chunk.owners)
                if len(alphas) == 1:  # one value for the whole group
                    per_piece = [alphas * pieces, epsilons * pieces, plains * pieces]
                else:
                    per_piece = [[values[i] for i in chunk.owners] for values in (alphas, epsilons, plains)]
                self._apply_adaptive(chunk, rule, *per_piece)
            else:
                direction = chunk.direction
                if isinstance(rule, Sign):
                    direction = torch._foreach_sign(direction) if self.foreach else [d.sign() for d in direction]
                _add_scaled(chunk.params, direction, [coeff] * len(chunk.params), self.foreach)

    def _adaptive_scalars(self, plan: _GroupPlan, coeff: float | Tensor) -> tuple[list, list, list]:
        """Per member: alpha = −s·γ·a, eps = e and plain = −s·γ·b of the rule's coefficients.

        Scalars held on the host are floats, and the coefficients are computed
        once per distinct value (all members share one step count as a rule);
        where any lives on an accelerator they are stacked there and the
        coefficients computed for the whole group in a few kernels.
        """
        rule = plan.rule
        if plan.host_scalars:  # the common case, read fast: floats, ints and tensors on the CPU
            if len(rule.scalars) == 1:
                name = rule.scalars[0]
                values = [(float(st[name]),) for st in plan.states]
            else:
                values = [tuple(float(st[name]) for name in rule.scalars) for st in plan.states]
            on_device = []
        else:
            values = [tuple(rules.scalar(st[name]) for name in rule.scalars) for st in plan.states]
            on_device = [v for row in values for v in row if isinstance(v, Tensor)]
        if on_device:  # in float64 where the device has it: RAdam's ρ is a small difference of large numbers
            device = on_device[0].device
            dtype = torch.float32 if device.type == "mps" else torch.float64
            columns = [
                torch.stack([v if isinstance(v, Tensor) else torch.full((), v, device=device) for v in column]).to(dtype)
                for column in zip(*values)
            ]
            a, e, b = rule.coefficients(plan.group, *columns)
            n = len(values)
            return _per_member(coeff * a, n), _per_member(e, n), _per_member(_times(coeff, b), n)
        if values.count(values[0]) == len(values):  # one step count for the whole group: one value each
            a, e, b = rule.coefficients(plan.group, *values[0])
            return [coeff * a], [e], [_times(coeff, b)]
        cache: dict[tuple, tuple] = {}
        alphas, epsilons, plains = [], [], []
        for row in values:
            found = cache.get(row)
            if found is None:
                a, e, b = rule.coefficients(plan.group, *row)
                found = cache[row] = (coeff * a, e, _times(coeff, b))
            alphas.append(found[0])
            epsilons.append(found[1])
            plains.append(found[2])
        return alphas, epsilons, plains

    def _apply_adaptive(self, chunk: _Chunk, rule: Adaptive, alphas: list, epsilons: list, plains: list) -> None:
        """θ̂ += alpha·m/(√v + eps) + plain·m, piece by piece (0-dim tensor scalars: divide the denominator first)."""
        params, m = chunk.params, chunk.direction
        denominators, temporary = self._denominators(chunk, rule, epsilons)
        on_device = isinstance(alphas[0], Tensor)
        if on_device:
            if not temporary:
                denominators = torch._foreach_div(denominators, alphas) if self.foreach else [
                    d / a for d, a in zip(denominators, alphas)
                ]
            elif self.foreach:
                torch._foreach_div_(denominators, alphas)
            else:
                for d, a in zip(denominators, alphas):
                    d.div_(a)
            if self.foreach:
                torch._foreach_addcdiv_(params, m, denominators)
            else:
                for p, mi, d in zip(params, m, denominators):
                    p.addcdiv_(mi, d)
        else:
            active = [i for i, a in enumerate(alphas) if a != 0]
            if len(active) == len(alphas) and self.foreach:
                torch._foreach_addcdiv_(params, m, denominators, alphas)
            elif active and self.foreach:
                pieces = [params[i] for i in active], [m[i] for i in active], [denominators[i] for i in active]
                torch._foreach_addcdiv_(*pieces, [alphas[i] for i in active])
            else:
                for i in active:
                    params[i].addcdiv_(m[i], denominators[i], value=alphas[i])
        if isinstance(plains[0], Tensor) or any(b != 0 for b in plains):
            _add_scaled(params, m, plains, self.foreach)

    def _denominators(self, chunk: _Chunk, rule: Adaptive, epsilons: list) -> tuple[list[Tensor], bool]:
        """√v + eps (v + eps without the root) per piece, and whether they are temporaries the caller may change."""
        second = chunk.second
        uniform = not isinstance(epsilons[0], Tensor) and epsilons.count(epsilons[0]) == len(epsilons)
        if not rule.root:
            if uniform and epsilons[0] == 0:
                return second, False  # the state itself: Adamax's u holds its ε
            if self.foreach:
                return torch._foreach_add(second, epsilons), True
            return [v + e for v, e in zip(second, epsilons)], True
        if chunk.roots:  # the CPU: into the kept buffer, piece by piece, then ε over the whole buffer at once
            for v, root in zip(second, chunk.roots):
                torch.sqrt(v, out=root)
            roots = chunk.roots
            if uniform:
                if epsilons[0] != 0:
                    chunk.flat_roots.add_(epsilons[0])
                return roots, True
        else:
            roots = torch._foreach_sqrt(second)
        if self.foreach:
            torch._foreach_add_(roots, epsilons)
        else:
            for r, e in zip(roots, epsilons):
                r.add_(e)
        return roots, True

    @torch.no_grad()
    def _predict_directions(self, plan: _GroupPlan, coeff: float | Tensor, decay, written: list) -> None:
        """A :class:`Direction` rule: Δ̂ from the rule's function, one parameter at a time."""
        for p, st in zip(plan.members, plan.states):
            stash, weights = self._stash[p], p.detach()
            stash.copy_(weights)
            written.append(([weights], [stash]))
            direction = plan.rule.direction(st, plan.group)
            if direction is None:
                continue
            if decay is not None:
                p.mul_(decay)
            _add_scaled([p], [direction], [coeff], foreach=False)

    def _copy_back(self, lists: list[tuple[list[Tensor], list[Tensor]]]) -> None:
        for params, stash in lists:
            if self.foreach:
                torch._foreach_copy_(params, stash)
            else:
                for p, s in zip(params, stash):
                    p.copy_(s)

    # -- step hooks: misuse guard and the last-update record ----------------------------------

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self.is_predicted:
            raise RuntimeError(
                "optimizer.step() called while the predicted weights are in place: "
                "call WeightPredictor.restore() (or leave predicted()) before stepping"
            )
        if len(self._rules) != len(optimizer.param_groups):  # groups added since: their rules
            self._rules = [self._rule(group) for group in optimizer.param_groups]
        self._lr_used = [rules.scalar(group["lr"]) for group in optimizer.param_groups]
        trainable = [
            p
            for group, rule in zip(optimizer.param_groups, self._rules)
            if isinstance(rule, LastUpdate)
            for p in group["params"]
            if p.requires_grad
        ]
        with torch.no_grad():
            for params, stash in _by_device_and_dtype(trainable, [self._stash_for(p) for p in trainable]):
                torch._foreach_copy_(stash, params)  # θ before the step (or before the closure's forward)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        found_inf = getattr(optimizer, "found_inf", None)  # set by a gradient scaler for a fused step: 1 if skipped
        for group, rule, lr in zip(optimizer.param_groups, self._rules, self._lr_used):
            if not isinstance(rule, LastUpdate):
                continue
            updated = [p for p in group["params"] if p.requires_grad and p.grad is not None and p in self._stash]
            records = [self._record_for(p) for p in updated]
            for params, difference, record in _by_device_and_dtype(updated, [self._stash[p] for p in updated], records):
                torch._foreach_sub_(difference, params)  # θ_before − θ_after
                if isinstance(lr, Tensor):  # on the device: 1/γ, or 0 where no step was taken, without reading γ
                    torch._foreach_mul_(difference, torch.where(lr == 0, 0.0, lr.reciprocal()))
                elif lr == 0.0:
                    torch._foreach_zero_(difference)  # no step taken: no direction to extrapolate
                else:
                    torch._foreach_div_(difference, lr)
                if found_inf is None:
                    torch._foreach_copy_(record, difference)
                else:  # keep the record where the scaler skipped the step
                    torch._foreach_mul_(record, found_inf)
                    torch._foreach_mul_(difference, 1 - found_inf)
                    torch._foreach_add_(record, difference)

    def _record_for(self, p: Tensor) -> Tensor:
        state = self.optimizer.state[p]
        record = state.get(RECORD)
        if record is None:
            record = state[RECORD] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return record

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The predictor's settings; the last-update records travel in the optimizer's own ``state_dict()``."""
        if self.is_predicted:
            raise RuntimeError("WeightPredictor.state_dict() called while predicted: restore() first")
        return {"steps": self.steps, "rule": self.rule, "decoupled_decay": self.decoupled_decay}

    def load_state_dict(self, state: dict) -> None:
        """Check a ``state_dict()`` against this predictor's settings; refuses one configured differently.

        A state with a ``last_update`` entry (records by parameter index, as
        checkpoints of earlier versions hold them) moves the records into the
        optimizer's state.
        """
        expected = {"steps", "rule", "decoupled_decay"}
        if not isinstance(state, dict) or not expected <= set(state) <= expected | {"last_update"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"WeightPredictor.load_state_dict: expected keys {sorted(expected)}, got {keys}")
        for key in ("steps", "rule", "decoupled_decay"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"WeightPredictor.load_state_dict: {key}={state[key]!r} in the state, "
                    f"but this predictor has {key}={getattr(self, key)!r}"
                )
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        records = state.get("last_update") or {}
        for i, buffer in records.items():
            if not 0 <= int(i) < len(params) or buffer.shape != params[int(i)].shape:
                raise ValueError(
                    f"WeightPredictor.load_state_dict: recorded update #{i} of shape {tuple(buffer.shape)} "
                    "does not fit this optimizer's parameters"
                )
        for i, buffer in records.items():
            p = params[int(i)]
            if self.optimizer.state.get(p):  # never the first entry of a state the optimizer has yet to create
                self._record_for(p).copy_(buffer)

    def __repr__(self) -> str:
        return (
            f"WeightPredictor({type(self.optimizer).__name__}, steps={self.steps}, rule={self.rule!r}, "
            f"decoupled_decay={self.decoupled_decay})"
        )


def _weakly(method):
    """A hook that calls ``method`` while its object lives, without keeping the object alive."""
    reference = weakref.WeakMethod(method)

    def hook(*args):
        bound = reference()
        if bound is not None:
            return bound(*args)
        return None

    return hook


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


def _times(coeff: float | Tensor, value: float | Tensor) -> float | Tensor:
    """coeff·value, but a float 0 stays a float 0 (no kernel for a term that is absent)."""
    if not isinstance(value, Tensor) and value == 0:
        return 0.0
    return coeff * value


def _is_zero(value: float | Tensor) -> bool:
    """True for a host value of 0 (a tensor on an accelerator is never read: taken as non-zero)."""
    value = rules.scalar(value)
    return not isinstance(value, Tensor) and value == 0


def _per_member(value: float | Tensor, n: int) -> list:
    """Coefficients for n members from a float or a tensor with one entry per member (or one for all)."""
    if isinstance(value, Tensor) and value.dim() == 1:
        return list(value.unbind())
    return [value] * n


def _scale(params: list[Tensor], factor: float | Tensor, foreach: bool) -> None:
    if foreach:
        torch._foreach_mul_(params, factor)
    else:
        for p in params:
            p.mul_(factor)


def _add_scaled(params: list[Tensor], tensors: list[Tensor], scalars: list, foreach: bool) -> None:
    """params[i] += scalars[i]·tensors[i]; floats grouped by value, 0-dim tensors broadcast (never read)."""
    if isinstance(scalars[0], Tensor):
        if foreach:
            torch._foreach_addcmul_(params, tensors, scalars)
        else:
            for p, t, s in zip(params, tensors, scalars):
                p.addcmul_(t, s)
        return
    if not foreach:
        for p, t, s in zip(params, tensors, scalars):
            if s != 0:
                p.add_(t, alpha=s)
        return
    by_value: dict[float, tuple[list, list]] = {}
    for p, t, s in zip(params, tensors, scalars):
        if s != 0:
            entry = by_value.setdefault(s, ([], []))
            entry[0].append(p)
            entry[1].append(t)
    for s, (ps, ts) in by_value.items():
        torch._foreach_add_(ps, ts, alpha=s)


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


def _by_device_and_dtype(params: list[Tensor], *others: list[Tensor]) -> Iterator[tuple[list[Tensor], ...]]:
    """``params`` and the aligned lists in ``others`` split per (device, dtype) of the parameter, for foreach kernels."""
    groups: dict[tuple, tuple[list, ...]] = {}
    for row in zip(params, *others):
        lists = groups.setdefault((row[0].device, row[0].dtype), tuple([] for _ in row))
        for target, value in zip(lists, row):
            target.append(value)
    yield from groups.values()

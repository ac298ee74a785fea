"""Cost of weight prediction: predict()+restore() against the floor of one parameter copy.

For each of the six optimizers, on ResNet-34-sized parameters (torchvision's
ResNet-34 with 10 classes, 21.3M floats) with a populated optimizer state:

- time: ``predict()+restore()`` and a naive per-parameter Python loop (the way
  the authors' code works: clone, out-of-place temporaries, copy back), each
  against ``torch._foreach_copy_`` of the same parameters, measured in
  alternation in one process; the figure is the median of the paired ratios;
- memory: the peak of bytes allocated during the first ``predict()+restore()``
  (stash included) against the parameter bytes, counted exactly by a
  dispatch mode on the CPU and by ``torch.cuda.max_memory_allocated`` on a GPU.

Usage: ``python scripts/bench_predict.py [--device cpu|cuda] [--repeats 15] [--out results/bench_predict.md]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import weakref
from pathlib import Path

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from xgrad import WeightPredictor, hardware
from xgrad.optim import AdaBelief, AdaM3

OPTIMIZERS = {
    "SGDM": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, weight_decay=5e-4),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=5e-4),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2),
    "AdaBelief": lambda ps: AdaBelief(ps, lr=1e-3, weight_decay=5e-4),
    "AdaM3": lambda ps: AdaM3(ps, lr=1e-3, weight_decay=5e-4),
}


class AllocationPeak(TorchDispatchMode):
    """Peak bytes of tensors created (and still alive) while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in inputs or ptr in self.live:
                continue
            self.live[ptr] = t.untyped_storage().nbytes()
            self.current += self.live[ptr]
            self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._free, ptr)
        return out

    def _free(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)


class NaiveLoopPredictor:
    """Per-parameter prediction in a Python loop, a fresh clone per call (the authors' shape)."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int = 1, last_update: dict | None = None):
        self.optimizer, self.steps = optimizer, steps
        self.last_update = last_update or {}  # RMSprop: the directions recorded by the real predictor
        self.backup: dict = {}

    @torch.no_grad()
    def predict(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state[p]
                self.backup[p] = p.data.clone()
                buffer = state.get("momentum_buffer", self.last_update.get(p))
                if buffer is not None:
                    p.data.add_(buffer, alpha=-self.steps * group["lr"])
                    continue
                if "exp_avg" not in state:
                    continue
                t = float(state["step"])
                beta1, beta2 = group["betas"]
                second = state["exp_avg_sq"] if "exp_avg_sq" in state else state["exp_avg_var"]
                denom = (second.sqrt() / math.sqrt(1 - beta2**t)).add(group["eps"])
                step_size = group["lr"] / (1 - beta1**t)
                p.data.addcdiv_(state["exp_avg"], denom, value=-self.steps * step_size)

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in self.backup.items():
            p.data.copy_(saved)
        self.backup.clear()


def resnet34_params(device: torch.device) -> list[torch.nn.Parameter]:
    model = torchvision.models.resnet34(num_classes=10).to(device)
    return list(model.parameters())


def populate_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    g = torch.Generator(device=params[0].device).manual_seed(0)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, device=p.device) * 1e-2
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_extra_bytes(predictor, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        predictor.predict()
        predictor.restore()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with AllocationPeak() as tracker:
        predictor.predict()
        predictor.restore()
    return tracker.peak


def bench_one(name: str, device: torch.device, repeats: int) -> dict:
    params = resnet34_params(device)
    optimizer = OPTIMIZERS[name](params)
    # built before the steps, so that a last-update rule records them; one predictor is
    # timed, a fresh one (its stash not yet allocated) is measured for memory afterwards
    ours, ours_fresh = WeightPredictor(optimizer, steps=1), WeightPredictor(optimizer, steps=1)
    populate_state(optimizer, params)
    naive = NaiveLoopPredictor(optimizer, steps=1, last_update=ours._last_update)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    floor_buffers = [torch.empty_like(p) for p in params]

    def floor():
        torch._foreach_copy_(floor_buffers, params)

    def cycle(predictor):
        return lambda: (predictor.predict(), predictor.restore())

    for _ in range(3):  # warm-up: allocator, caches, clock
        for fn in (floor, cycle(ours), cycle(naive)):
            timed(fn, device)
    ratios = {"ours": [], "naive": []}
    floor_times = []
    for _ in range(repeats):
        for which, predictor in (("ours", ours), ("naive", naive)):  # each against its own adjacent floor
            t_floor = timed(floor, device)
            floor_times.append(t_floor)
            ratios[which].append(timed(cycle(predictor), device) / t_floor)
    memory = {"ours": peak_extra_bytes(ours_fresh, device), "naive": peak_extra_bytes(naive, device)}
    return {
        "optimizer": name,
        "numel": sum(p.numel() for p in params),
        "floor_ms": 1e3 * statistics.median(floor_times),
        "time_ours": statistics.median(ratios["ours"]),
        "time_naive": statistics.median(ratios["naive"]),
        "mem_ours": memory["ours"] / param_bytes,
        "mem_naive": memory["naive"] / param_bytes,
    }


def render(rows: list[dict], device: torch.device, repeats: int) -> str:
    numel = rows[0]["numel"]
    lines = [
        "# Cost of weight prediction: predict()+restore()",
        "",
        f"Hardware: {hardware.describe(device)}; torch {torch.__version__}. "
        f"Scale: ResNet-34-sized parameters ({numel / 1e6:.2f}M float32, torchvision resnet34, 10 classes), "
        f"optimizer state populated by two steps; {repeats} paired repetitions.",
        "",
        "Time is the median of paired ratios against one `torch._foreach_copy_` of the same parameters "
        "(the floor: predict+restore must at least copy the weights out and back). Memory is the peak of "
        "bytes allocated during the first predict+restore (the stash included), over the parameter bytes. "
        "'Naive loop' is a per-parameter Python loop with a fresh clone per call, the shape of the authors' code.",
        "",
        "| optimizer | one copy (ms) | predict+restore / copy | naive loop / copy | peak extra memory / params | naive loop memory / params |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['floor_ms']:.1f} | {r['time_ours']:.2f}x | {r['time_naive']:.2f}x "
            f"| {r['mem_ours']:.3f}x | {r['mem_naive']:.3f}x |"
        )
    lines += ["", "Generated by `python scripts/bench_predict.py`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("results/bench_predict.md"))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    rows = []
    for name in args.optimizers:
        rows.append(bench_one(name, device, args.repeats))
        r = rows[-1]
        print(f"{name:10s} time {r['time_ours']:.2f}x (naive {r['time_naive']:.2f}x)  "
              f"memory {r['mem_ours']:.3f}x (naive {r['mem_naive']:.3f}x)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(render(rows, device, args.repeats))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()

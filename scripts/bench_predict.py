"""Cost of weight prediction: predict()+restore() against the floor of one parameter copy, and against a training step.

For each of the six optimizers, on ResNet-34-sized parameters (torchvision's
ResNet-34 with 10 classes, 21.3M floats) with a populated optimizer state:

- time: ``predict()+restore()`` and a naive per-parameter Python loop (the way
  the authors' code works: clone, out-of-place temporaries, copy back), each
  against ``torch._foreach_copy_`` of the same parameters, measured in
  alternation in one process; the figure is the median of the paired ratios;
- memory: the peak of bytes allocated during the first ``predict()+restore()``
  (stash included) against the parameter bytes, counted exactly by a
  dispatch mode on the CPU and by ``torch.cuda.max_memory_allocated`` on a GPU.

For a small model, where Python and kernel launches rather than memory traffic
set the cost: LeNet-5 (44k parameters in 10 tensors) on 28×28 images, Adam,
batch 32, one thread: ``predict()+restore()`` against the training step itself
(zero_grad, forward, loss, backward, step), blocks of each in alternation; the
figure is the median of the per-round ratios.

Each row is measured in ``--processes`` fresh processes (default 3) and the
median reported with the range.

Usage: ``python scripts/bench_predict.py [--device cpu|cuda] [--repeats 15] [--processes 3] [--out results/bench_predict.md]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from xgrad import WeightPredictor, atomic, hardware
from xgrad.models.lenet import LeNet5
from xgrad.optim import AdaBelief, AdaM3
from xgrad.rules import RECORD

SMALL = "lenet5"  # the small-model row's worker name

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
                if group.get("decoupled_weight_decay", False):  # AdamW: θ(1 − s·γ·λ), as the predictor does
                    p.data.mul_(1 - self.steps * group["lr"] * group["weight_decay"])
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


def timed(fn, device: torch.device, n: int | None = None) -> float:
    """Seconds per call of ``fn``, over ``n`` calls in a row (default: 20 on CUDA, 1 on the CPU).

    On CUDA the loop is timed with CUDA events, on the device: one call of
    predict+restore is ~0.1 ms of GPU work, which a host clock around a single
    call would drown in launch and synchronisation overhead.
    """
    n = n if n is not None else (20 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


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
    ours = WeightPredictor(optimizer, steps=1)
    populate_state(optimizer, params)
    ours_fresh = WeightPredictor(optimizer, steps=1)
    records = {p: optimizer.state[p][RECORD] for p in params if RECORD in optimizer.state[p]}
    naive = NaiveLoopPredictor(optimizer, steps=1, last_update=records)
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


def bench_small_model(device: torch.device, repeats: int) -> dict:
    """LeNet-5 / Adam / batch 32 / one thread: predict+restore over a training step, blocks in alternation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = LeNet5(in_channels=1, num_classes=10, image_size=28).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(32, 1, 28, 28, device=device)
        y = torch.randint(0, 10, (32,), device=device)

        def training_step():
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        predictor = WeightPredictor(optimizer, steps=1)

        def cycle():
            predictor.predict()
            predictor.restore()

        def block(fn, n: int) -> float:
            return timed(fn, device, n)

        for _ in range(20):  # warm-up: the state exists, the plan is built, the allocator has settled
            training_step()
            cycle()
        steps, cycles = [], []
        for _ in range(repeats):
            steps.append(block(training_step, 20))
            cycles.append(block(cycle, 100))
        return {
            "numel": sum(p.numel() for p in model.parameters()),
            "tensors": len(list(model.parameters())),
            "step_us": 1e6 * statistics.median(steps),
            "cycle_us": 1e6 * statistics.median(cycles),
            "ratio": statistics.median(c / s for c, s in zip(cycles, steps)),
        }
    finally:
        torch.set_num_threads(threads)


def render(rows: list[dict], small: dict, device: torch.device, args: argparse.Namespace) -> str:
    numel = rows[0]["numel"]
    lines = [
        "# Cost of weight prediction: predict()+restore()",
        "",
        f"Hardware: {hardware.describe(device)}; torch {torch.__version__}. "
        f"Scale: ResNet-34-sized parameters ({numel / 1e6:.2f}M float32, torchvision resnet34, 10 classes), "
        f"optimizer state populated by two steps; {args.repeats} paired repetitions in each of {args.processes} "
        "fresh processes per row.",
        "",
        "Time is the median of paired ratios against one `torch._foreach_copy_` of the same parameters "
        "(the floor: predict+restore must at least copy the weights out and back), per process; the table gives "
        "the median over the processes and their range (a process's memory layout moves all its ratios together). "
        "Memory is the peak of bytes allocated during the first predict+restore (the stash included), over the "
        "parameter bytes. 'Naive loop' is a per-parameter Python loop with a fresh clone per call, the shape of the "
        "authors' code (AdamW's decay term included, as the predictor's default predicts it).",
        "",
        "| optimizer | one copy (ms) | predict+restore / copy | range over processes | naive loop / copy "
        "| peak extra memory / params | naive loop memory / params |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['floor_ms']:.1f} | {r['time_ours']:.2f}x | {r['range'][0]:.2f}-{r['range'][1]:.2f}x "
            f"| {r['time_naive']:.2f}x | {r['mem_ours']:.3f}x | {r['mem_naive']:.3f}x |"
        )
    lines += [
        "",
        "## A small model: predict+restore against the training step",
        "",
        f"LeNet-5 ({small['numel']:,} parameters in {small['tensors']} tensors, 28×28 inputs), Adam, batch 32, "
        f"one thread, on the same {device.type}; blocks of 20 training steps and of 100 predict+restore cycles in "
        f"alternation, {args.repeats} rounds, median of the per-round ratios, median over {args.processes} "
        "processes. Here the cost is Python and kernel launches, not memory traffic.",
        "",
        "| model | training step (µs) | predict+restore (µs) | predict+restore / step | range over processes |",
        "|---|---:|---:|---:|---:|",
        f"| LeNet-5 / Adam | {small['step_us']:.0f} | {small['cycle_us']:.0f} | {100 * small['ratio']:.1f}% "
        f"| {100 * small['range'][0]:.1f}-{100 * small['range'][1]:.1f}% |",
        "",
        "Generated by `python scripts/bench_predict.py` (`make bench`).",
    ]
    return "\n".join(lines) + "\n"


def measure_in_processes(what: str, args: argparse.Namespace) -> dict:
    """Run one row in ``args.processes`` fresh processes; the median of their figures, with their range.

    A process's memory layout (where the large tensors land, whether the OS
    backs them with huge pages) moves every ratio of that process together:
    measured on the 2-core CPU, whole processes read 3.5x or 6x for the same
    row. Fresh processes sample that layout; the median is the figure.
    """
    runs = []
    for _ in range(args.processes):
        command = [sys.executable, __file__, "--worker", what, "--device", args.device, "--repeats", str(args.repeats)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    row = {
        key: statistics.median(run[key] for run in runs) if isinstance(value, float) else value
        for key, value in runs[0].items()
    }
    key = "ratio" if what == SMALL else "time_ours"
    row["range"] = (min(run[key] for run in runs), max(run[key] for run in runs))
    return row


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per row (their median is reported)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_predict.md"))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--worker", choices=[*OPTIMIZERS, SMALL], help=argparse.SUPPRESS)  # one row, JSON to stdout
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    if args.worker is not None:
        row = bench_small_model(device, args.repeats) if args.worker == SMALL else bench_one(args.worker, device, args.repeats)
        print(json.dumps(row))
        return args.out
    small = measure_in_processes(SMALL, args)
    print(f"LeNet-5    predict+restore {small['cycle_us']:.0f} us = {100 * small['ratio']:.1f}% of a training step",
          flush=True)
    rows = []
    for name in args.optimizers:
        rows.append(measure_in_processes(name, args))
        r = rows[-1]
        print(f"{name:10s} time {r['time_ours']:.2f}x (processes {r['range'][0]:.2f}-{r['range'][1]:.2f}; "
              f"naive {r['time_naive']:.2f}x)  memory {r['mem_ours']:.3f}x (naive {r['mem_naive']:.3f}x)", flush=True)
    atomic.write_text(args.out, render(rows, small, device, args))
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()

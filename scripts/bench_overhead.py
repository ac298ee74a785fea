"""Time per training iteration and peak memory, baseline versus XGrad, per model (the overhead table).

    python scripts/bench_overhead.py                # experiments/overhead.yaml, paper scale (a GPU, the paper's data)
    python scripts/bench_overhead.py scale=quick    # the paper's models on the offline data, batch 8, on a CPU
    python scripts/bench_overhead.py scale=quick overhead.optimizers=[adam] overhead.quick.rounds=5

Arguments are Hydra overrides of ``conf/config.yaml`` with ``experiment=overhead``.
For each cell and optimizer both arms, the baseline and XGrad (s = 1), are built
in this process from the same config and seed by the entry point's own
:func:`xgrad.builder.build_run`, and one iteration is the engine's own
optimizer step (:meth:`xgrad.engine.Engine.train_step`: predict, forward and
backward, restore, clip, step) on a batch already on the device:

- time: after ``warmup`` steps each, the arms run ``rounds`` blocks of
  ``iterations`` steps in alternation (so drifts of clock speed or load hit both
  alike); an arm's time is the median over its blocks of the mean step time;
- memory (CUDA only): the peak of ``torch.cuda.max_memory_allocated`` during an
  arm's warm-up, minus what was allocated before the arm was built: its
  parameters, optimizer state, XGrad's stash and the step's activations.

A cell whose data is missing is listed as not measured. The table is written to
``overhead.out`` (``results/<scale>/overhead.md``), labelled with the hardware,
the scale and the settings, through the suite's one table renderer
(:func:`xgrad.report.tables.benchmark_page`).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from xgrad import atomic, hardware, performance
from xgrad.builder import benchmark_arm, build_data
from xgrad.data.base import DatasetMissingError
from xgrad.engine import Engine, to_device
from xgrad.report.tables import benchmark_page, spread
from xgrad.train import CONF_DIR, resolve_device


def main(argv: list[str] | None = None) -> Path:
    """Measure every cell × optimizer of the composed overhead experiment; write and return the table."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        base = compose("config", overrides=["experiment=overhead", *overrides])
        plan = base.overhead[base.scale]
        rows, skipped = [], []
        for cell in plan.cells:
            for optimizer in base.overhead.optimizers:
                cfg = compose(
                    "config",
                    overrides=["experiment=overhead", *cell.split(), f"optimizer={optimizer}", "xgrad=on",
                               "logger=none", "trainer.progress=false", *_batch_override(plan), *overrides],
                )  # fmt: skip
                try:
                    rows.append(measure(cfg, plan))
                except DatasetMissingError as error:
                    skipped.append(f"`{cell}`: {error}")
                    break  # the other optimizers need the same data
                print(" | ".join(_cells(rows[-1])), flush=True)
    device = resolve_device(base.trainer.device)
    out = Path(base.overhead.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, render(rows, skipped, base.scale, hardware.describe(device), plan))
    print(out)
    return out


def _batch_override(plan: DictConfig) -> list[str]:
    return [] if plan.batch_size is None else [f"data.batch_size={plan.batch_size}"]


def measure(cfg: DictConfig, plan: DictConfig) -> dict:
    """One cell and optimizer: both arms' time per step (ms) and, on CUDA, peak memory (MB)."""
    device = resolve_device(cfg.trainer.device)
    data = build_data(cfg, device)
    stream = cycle(data.train_batches(0, cfg.seed))  # repeats the batches if the split has too few
    channels_last = performance.channels_last(cfg.trainer.channels_last, cfg.model.channels_last, device)
    batches = [to_device(b, device, channels_last) for b in islice(stream, plan.warmup + plan.iterations)]
    warmup, timed = batches[: plan.warmup], batches[plan.warmup :]
    with tempfile.TemporaryDirectory() as scratch:
        arms, memory = {}, {}
        for name in ("baseline", "XGrad"):
            run_dir = Path(scratch) / name
            arms[name], memory[name] = _build_and_warm_up(cfg, data, device, run_dir, name == "XGrad", warmup)
        times: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(plan.rounds):
            for name, engine in arms.items():
                times[name].append(_timed_block(engine, timed, device))
    params = sum(p.numel() for p in arms["baseline"].model.parameters())
    return {
        "data": cfg.data.name, "model": cfg.model.name, "optimizer": cfg.optimizer.name,
        "parameters": params, "batch": cfg.data.batch_size,
        "baseline_ms": 1e3 * statistics.median(times["baseline"]), "xgrad_ms": 1e3 * statistics.median(times["XGrad"]),
        "baseline_mb": memory["baseline"], "xgrad_mb": memory["XGrad"],
        "spread": max(spread(blocks) for blocks in times.values()),
    }  # fmt: skip


def _build_and_warm_up(cfg, data, device, run_dir: Path, xgrad: bool, warmup: list) -> tuple[Engine, float | None]:
    """One arm (fresh model from the run's seed) after its warm-up steps, and the CUDA memory it added (MB)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    engine = benchmark_arm(cfg, data, device, run_dir, xgrad)
    for batch in warmup:
        engine.train_step(batch)
    if not cuda:
        return engine, None
    torch.cuda.synchronize(device)
    return engine, (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _timed_block(engine: Engine, batches: list, device: torch.device) -> float:
    """Mean seconds per optimizer step over ``batches``."""
    hardware.synchronize(device)
    started = time.perf_counter()
    for batch in batches:
        engine.train_step(batch)
    hardware.synchronize(device)
    return (time.perf_counter() - started) / len(batches)


COLUMNS = [
    "data", "model", "optimizer", "parameters (M)", "batch", "baseline ms/iter", "XGrad ms/iter",
    "time overhead", "noise (block spread)", "baseline peak MB", "XGrad peak MB", "memory overhead",
]  # fmt: skip


def _cells(row: dict) -> list[str]:
    """One measurement as the table's cells, in the order of :data:`COLUMNS`."""

    def ratio(xgrad, baseline):
        return "n/a" if xgrad is None else f"{100 * (xgrad / baseline - 1):+.1f}%"

    def mb(value):
        return "n/a (CPU)" if value is None else f"{value:.1f}"

    cells = [
        row["data"], row["model"], row["optimizer"], f"{row['parameters'] / 1e6:.2f}", str(row["batch"]),
        f"{row['baseline_ms']:.2f}", f"{row['xgrad_ms']:.2f}", ratio(row["xgrad_ms"], row["baseline_ms"]),
        f"±{row['spread']:.1f}%", mb(row["baseline_mb"]), mb(row["xgrad_mb"]), ratio(row["xgrad_mb"], row["baseline_mb"]),
    ]  # fmt: skip
    return cells


def render(rows: list[dict], skipped: list[str], scale: str, device: str, plan: DictConfig) -> str:
    method = [
        f"Hardware: {device} · torch {torch.__version__} · {os.cpu_count()} CPU cores visible.",
        f"Per arm: {plan.warmup} warm-up steps, then {plan.rounds} timed blocks of {plan.iterations} steps, "
        "baseline and XGrad (s = 1) alternating in one process.",
        "Time: median over the blocks of the mean step time (predict → forward/backward → restore → step). "
        "Memory: the peak CUDA memory an arm adds (parameters, optimizer state, XGrad's stash, activations); "
        "not measured on the CPU.",
        "Noise: the larger of the two arms' block spreads, (slowest − fastest block) / median; "
        "a time overhead smaller than it is not distinguishable from zero at these settings.",
    ]
    table = pd.DataFrame([_cells(row) for row in rows], columns=COLUMNS)
    return benchmark_page(f"XGrad overhead per training iteration ({scale} scale)", method, table, skipped)


if __name__ == "__main__":
    main()

"""Training samples per second of the paper's models, baseline versus XGrad (s = 1), side by side in one process.

    python scripts/bench_throughput.py                          # a GPU: every paper model at its paper batch
    python scripts/bench_throughput.py                          # a CPU: the small models at batch 32
    python scripts/bench_throughput.py --models lenet resnet34 trainer.compile=true   # some models; overrides last
    python scripts/bench_throughput.py data.root=device-data --out $OUT/throughput.md

Each model is trained as a run trains it: built by the entry point's own
:func:`xgrad.builder.build_run` (with the hardware settings of
xgrad/performance.py: data on the device, TF32 and channels-last on CUDA),
its batches drawn from the data module and stepped by
:meth:`xgrad.engine.Engine.train_step`, with ``trainer.precision`` = bf16 on
CUDA and 32 on the CPU unless an override says otherwise. Both arms, the
baseline and XGrad, are built from the same config and seed and draw the same
batches; after ``--warmup`` steps each, they train ``--rounds`` blocks of about
``--block-seconds`` in alternation (so drifts of clock speed or load hit both
alike), and an arm's throughput is the median over its blocks of samples per
second (images; tokens for the language models and translation). The last
column is the cost of an XGrad iteration relative to a baseline one: the
ratio of the two throughputs.

The paper's image models are measured on Fashion-MNIST (28×28 grey; the data
that is on every machine of this project), the others on their own data;
a model whose data is missing is listed as not measured. The table goes to
``results/<hardware>/throughput.md`` (``--out``), labelled with the hardware
and the settings, through the suite's one table renderer.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from xgrad import atomic, hardware
from xgrad.builder import benchmark_arm, build_data
from xgrad.data.base import DatasetMissingError
from xgrad.engine import Engine, to_device
from xgrad.report.tables import benchmark_page, spread
from xgrad.running_loss import RunningLoss
from xgrad.train import CONF_DIR, resolve_device

#: model → the overrides that compose it at the paper's protocol (its batch size), on data present offline
CELLS = {
    "lenet": "+protocol=paper/cifar10_lenet data=fashion_mnist",
    "resnet34": "+protocol=paper/cifar10_resnet34 data=fashion_mnist",
    "densenet121": "+protocol=paper/cifar10_densenet121 data=fashion_mnist",
    "inception_v3": "+protocol=paper/cifar10_inception_v3 data=fashion_mnist",
    "vit": "+protocol=paper/cifar10_vit data=fashion_mnist",
    "lstm1": "+protocol=paper/ptb_lstm1",
    "lstm2": "+protocol=paper/ptb_lstm2",
    "lstm3": "+protocol=paper/ptb_lstm3",
    "gnmt8": "+protocol=paper/wmt16_gnmt8",
    "vae": "model=vae",  # MNIST's protocol (batch 128) on Fashion-MNIST: the same 28×28 grey images
}
#: what a CPU measures by default: the small models, at a reduced batch, in a few minutes
CPU_MODELS, CPU_BATCH = ("lenet", "vae", "lstm1"), 32
QUIET = ("logger=none", "trainer.progress=false", "optimizer=adam", "xgrad=on")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml, applied to every model")
    parser.add_argument("--models", nargs="+", choices=list(CELLS), default=None,
                        help=f"models to measure (default: all on a GPU, {' '.join(CPU_MODELS)} on a CPU)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"training batch size (default: each model's paper batch on a GPU, {CPU_BATCH} on a CPU)")
    parser.add_argument("--warmup", type=int, default=10, help="steps per arm before timing")
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks per arm, the arms alternating")
    parser.add_argument("--block-seconds", type=float, default=1.0, help="about how long one timed block lasts")
    parser.add_argument("--note", default="", help="a line for the table's header (e.g. what else ran)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/<hardware>/throughput.md")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("warmup", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        device = resolve_device(compose("config", overrides=list(args.overrides)).trainer.device)
        cuda = device.type == "cuda"
        models = args.models or (list(CELLS) if cuda else list(CPU_MODELS))
        batch = args.batch if args.batch is not None or cuda else CPU_BATCH
        precision = ["trainer.precision=bf16" if cuda else "trainer.precision=32"]
        rows, skipped = [], []
        for model in models:
            overrides = [*CELLS[model].split(), *QUIET, *precision, *([f"data.batch_size={batch}"] if batch else []),
                         *args.overrides]  # fmt: skip
            try:
                rows.append(measure(compose("config", overrides=overrides), device, args))
            except DatasetMissingError as error:
                skipped.append(f"`{model}`: {error}")
                print(f"{model}: not measured ({error})", flush=True)
                continue
            row = rows[-1]
            print(f"{model}: baseline {row['baseline']:,.0f} {row['unit']}/s, XGrad {row['xgrad']:,.0f} "
                  f"({row['baseline'] / row['xgrad']:.3f}x per iteration)", flush=True)  # fmt: skip
    out = args.out or hardware.results_dir(device) / "throughput.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, render(rows, skipped, hardware.describe(device), args))
    print(out)
    return out


def measure(cfg: DictConfig, device: torch.device, args: argparse.Namespace) -> dict:
    """Both arms' median samples per second over their blocks, and the largest spread of an arm's blocks."""
    data = build_data(cfg, device)
    with tempfile.TemporaryDirectory() as scratch:
        arms = {name: _Arm(cfg, data, device, Path(scratch) / name, xgrad=name == "xgrad") for name in ("baseline", "xgrad")}
        for arm in arms.values():
            arm.warm_up(args.warmup)
        rates: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(args.rounds):
            for name, arm in arms.items():
                rates[name].append(arm.block(args.block_seconds))
    engine = arms["baseline"].engine
    return {
        "data": cfg.data.name, "model": cfg.model.name, "batch": cfg.data.batch_size, "unit": data.sizes()["unit"],
        "parameters": sum(p.numel() for p in engine.model.parameters()), "precision": str(engine.trainer.precision),
        "channels_last": engine.channels_last, "compile": bool(cfg.trainer.compile),
        "baseline": statistics.median(rates["baseline"]), "xgrad": statistics.median(rates["xgrad"]),
        "spread": max(spread(blocks) for blocks in rates.values()),
    }  # fmt: skip


class _Arm:
    """One arm of a comparison: its engine and its endless stream of the run's batches."""

    def __init__(self, cfg: DictConfig, data, device: torch.device, run_dir: Path, xgrad: bool):
        self.engine: Engine = benchmark_arm(cfg, data, device, run_dir, xgrad)
        epochs = (data.train_batches(epoch, cfg.seed) for epoch in itertools.count())
        self._batches: Iterator = itertools.chain.from_iterable(epochs)

    def _steps(self, count: int) -> tuple[int, float]:
        """Train ``count`` steps as the engine's loop does; the samples they took and the seconds, device included."""
        engine = self.engine
        running = RunningLoss(0.0, 0, engine.step)
        hardware.synchronize(engine.device)
        started = time.perf_counter()
        for batch in itertools.islice(self._batches, count):
            running.add(engine.train_step(to_device(batch, engine.device, engine.channels_last)))
        samples = running.read().samples  # waits for the device
        return samples, time.perf_counter() - started

    def warm_up(self, steps: int) -> None:
        """Steps that are not timed (allocations, cuDNN's choice of kernels, a compilation), then the block size."""
        self._steps(steps)
        _, seconds = self._steps(steps)
        self._seconds_per_step = seconds / steps

    def block(self, seconds: float) -> float:
        """Samples per second over about ``seconds`` of training."""
        samples, elapsed = self._steps(max(1, round(seconds / self._seconds_per_step)))
        return samples / elapsed


COLUMNS = ["data", "model", "parameters (M)", "batch", "precision", "channels-last", "compiled", "baseline samples/s",
           "XGrad samples/s", "XGrad iteration cost", "noise (block spread)"]  # fmt: skip


def render(rows: list[dict], skipped: list[str], device: str, args: argparse.Namespace) -> str:
    table = pd.DataFrame(
        [
            [row["data"], row["model"], f"{row['parameters'] / 1e6:.2f}", str(row["batch"]), row["precision"],
             "yes" if row["channels_last"] else "no", "yes" if row["compile"] else "no",
             f"{row['baseline']:,.0f} {row['unit']}", f"{row['xgrad']:,.0f} {row['unit']}",
             f"{row['baseline'] / row['xgrad']:.3f}×", f"±{row['spread']:.1f}%"]
            for row in rows
        ],
        columns=COLUMNS,
    )  # fmt: skip
    method = [
        f"Hardware: {device} · torch {torch.__version__} · {os.cpu_count()} CPU cores visible.",
        "Each model built by the entry point's `build_run` (data on the device, TF32 and channels-last on CUDA), its "
        "batches drawn from the data module and stepped by `Engine.train_step`, Adam; image models on Fashion-MNIST.",
        f"Per arm: {args.warmup} + {args.warmup} warm-up steps, then {args.rounds} blocks of about "
        f"{args.block_seconds:g} s, baseline and XGrad alternating; the median of the blocks' samples/s. "
        "XGrad iteration cost: baseline samples/s ÷ XGrad samples/s. Noise: the larger of the two arms' block "
        "spreads, (fastest − slowest) / median.",
        f"Overrides: {' '.join(args.overrides) or 'none'}. Measured {datetime.date.today().isoformat()}."
        + (f" {args.note}" if args.note else ""),
    ]
    return benchmark_page("Training throughput, baseline versus XGrad (s = 1)", method, table, skipped)


if __name__ == "__main__":
    main()

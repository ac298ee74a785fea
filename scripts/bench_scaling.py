"""Training throughput of one run on 1, 2, ... processes of this machine (DDP through torchrun): the scaling table.

    python scripts/bench_scaling.py                                  # LeNet, Fashion-MNIST; every GPU count 1, 2, 4, ... here, else 1 and 2 CPU processes
    python scripts/bench_scaling.py model=resnet34 data=cifar10 xgrad=on --processes 1 2 4 8   # overrides first
    python scripts/bench_scaling.py --note "measured while other jobs ran"

Arguments other than the options are Hydra overrides of ``conf/config.yaml``.
Each measurement is the documented command, ``torchrun --standalone
--nproc_per_node=N -m xgrad.train ...``, for two epochs of ``--batches``
batches; the engine's ``time/samples_per_s`` of the second epoch (the first
warms up: allocations, cuDNN's search, a compilation) is the throughput of
training only, every process included: global samples over the time rank 0
spent in the epoch's steps, collectives and waits included, evaluation
excluded. ``data.batch_size`` is the global batch (strong scaling: each of N
processes trains on batch_size / N samples per step). The process counts
alternate within each of ``--rounds`` rounds, so drifts of clock or load hit
them alike; a count's throughput is the median over the rounds.

On a CPU each process gets ``--threads`` threads (default 1), so N processes
use N cores. The table goes to ``results/<hardware>/scaling.md`` (``--out``),
labelled with the hardware, the settings and ``--note``, through the suite's
one table renderer (:func:`xgrad.report.tables.benchmark_page`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from xgrad import atomic, hardware
from xgrad.report.tables import benchmark_page, spread

QUIET = ("logger=none", "trainer.progress=false", "trainer.limit_val_batches=1")


def default_processes() -> list[int]:
    """1, 2, 4, ... up to the GPUs here (and all of them), or 1 and 2 processes on a CPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        return [1, 2]
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= gpus]
    return counts if counts[-1] == gpus else [*counts, gpus]


def measure(processes: int, overrides: list[str], batches: int, threads: int, run_dir: Path) -> float:
    """Samples per second of one run on ``processes`` processes into ``run_dir``: its second epoch's training throughput."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "xgrad.train", *QUIET, "trainer.epochs=2", f"trainer.limit_train_batches={batches}",
               *([f"trainer.num_threads={threads}"] if not torch.cuda.is_available() else []),
               *overrides, f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
    done = subprocess.run(command, cwd=run_dir.parent, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{processes} processes failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return last["time/samples_per_s"]


def render(rows: list[dict], args: argparse.Namespace, device: str, batch_size: int) -> str:
    base = rows[0]["samples_per_s"] if rows[0]["processes"] == 1 else None
    table = pd.DataFrame(
        [
            {
                "processes": str(row["processes"]),
                "per-process batch": str(batch_size // row["processes"]),
                "samples/s": f"{row['samples_per_s']:,.0f}",
                "speed-up": "n/a" if base is None else f"{row['samples_per_s'] / base:.2f}×",
                "efficiency": "n/a" if base is None else f"{100 * row['samples_per_s'] / base / row['processes']:.0f}%",
                "spread": f"±{row['spread']:.0f}%",
            }
            for row in rows
        ]
    )
    settings = " ".join(args.overrides) or "the defaults (LeNet-5, Fashion-MNIST, Adam, no XGrad)"
    method = [
        f"Hardware: {device} · torch {torch.__version__} · {os.cpu_count()} CPU cores visible"
        + ("" if torch.cuda.is_available() else f" · {args.threads} thread(s) per process") + ".",
        f"Run: {settings}; global batch {batch_size}.",
        f"Each count: `torchrun --standalone --nproc_per_node=N -m xgrad.train`, 2 epochs of {args.batches} batches; "
        f"the second epoch's training samples/s (evaluation excluded), median of {args.rounds} rounds, the counts "
        "alternating within each round. Spread: (fastest − slowest round) / median.",
        f"Measured {datetime.date.today().isoformat()}." + (f" {args.note}" if args.note else ""),
    ]
    return benchmark_page("Training throughput on several processes (DDP, torchrun)", method, table, [])


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml")
    parser.add_argument("--processes", type=int, nargs="+", default=None, help="process counts (default: see above)")
    parser.add_argument("--batches", type=int, default=200, help="training batches per epoch")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the process counts")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (CPU runs)")
    parser.add_argument("--note", default="", help="a line for the table's header (e.g. what else ran)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/<hardware>/scaling.md")
    args = parser.parse_args(argv)
    counts = args.processes or default_processes()
    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = hardware.describe(where).split(",")[0]
    batch_size = _batch_size(args.overrides)
    samples: dict[int, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for n in counts:
                run_dir = Path(scratch) / f"round{round_ + 1}-{n}"
                samples[n].append(measure(n, args.overrides, args.batches, args.threads, run_dir))
                print(f"round {round_ + 1}: {n} processes: {samples[n][-1]:,.0f} samples/s", flush=True)
    rows = [{"processes": n, "samples_per_s": statistics.median(values), "spread": spread(values)}
            for n, values in samples.items()]  # fmt: skip
    out = args.out or hardware.results_dir(where) / "scaling.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, render(rows, args, device, batch_size))
    print(out)
    return out


def _batch_size(overrides: list[str]) -> int:
    """``data.batch_size`` as the run composes it (the default of the chosen data config, or the override)."""
    from hydra import compose, initialize_config_dir

    from xgrad.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return int(compose("config", overrides=overrides).data.batch_size)


if __name__ == "__main__":
    main()

"""Shared test fixtures: an offline environment and in-process training runs.

Every test composes ``conf/config.yaml`` through Hydra's compose API and trains
in this process, so torch is imported once for the whole suite instead of once
per ``python -m xgrad.train``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

# Tests never touch the network: W&B writes offline runs, Hugging Face reads its cache only.
os.environ["WANDB_MODE"] = "offline"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The tests' models are tiny: one thread is faster than several, and immune to the
# slowdown of several threads competing for shared cores (set before torch loads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from xgrad.trained_config import register_resolver  # noqa: E402

register_resolver()  # what `python -m xgrad.train` registers before Hydra composes (conf/sweep/figure.yaml uses it)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

#: What every test run starts from: the CPU, no W&B, no progress bar, one epoch
#: of two training batches, and two batches of each evaluation split.
TEST_OVERRIDES = (
    "trainer.device=cpu",
    "logger=none",
    "trainer.progress=false",
    "trainer.epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
)


@pytest.fixture(autouse=True)
def xgrad_log_level_kept():
    """A test that starts a rank other than 0 in this process quiets the ``xgrad`` logger: later tests get it back."""
    level = logging.getLogger("xgrad").level
    yield
    logging.getLogger("xgrad").setLevel(level)


def compose_config(*overrides: str, return_hydra_config: bool = False) -> DictConfig:
    """``conf/config.yaml`` with the test defaults, then ``overrides`` (later ones win)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "config",
            overrides=[*TEST_OVERRIDES, *overrides],
            return_hydra_config=return_hydra_config,
        )


@pytest.fixture(name="compose_config")
def compose_config_fixture():
    """``compose_config(*overrides) -> DictConfig``: the composed test config, not run."""
    return compose_config


@pytest.fixture
def train_run(tmp_path):
    """``train_run(*overrides) -> Path``: train in-process and return the run directory.

    Each call gets a fresh directory under ``tmp_path`` unless the overrides pass
    ``hydra.run.dir=...`` (as on the command line; the same directory twice
    resumes the run). The directory holds ``.hydra/config.yaml`` (which the run
    writes itself once its start is accepted: ``hydra.output_subdir`` is null),
    ``run.json``, ``metrics.jsonl``, ``summary.json`` and ``checkpoints/last.pt``.
    """
    from xgrad.train import run

    counter = itertools.count()

    def train(*overrides: str) -> Path:
        default_dir = tmp_path / f"run{next(counter)}"
        cfg = compose_config(f"hydra.run.dir={default_dir}", *overrides, return_hydra_config=True)
        run_dir = Path(cfg.hydra.run.dir)
        # What `python -m xgrad.train` provides: Hydra's runtime config (group
        # choices such as the experiment's name, the output directory).
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        try:
            run(cfg, run_dir=run_dir)
        finally:
            HydraConfig.instance().cfg = None
        return run_dir

    return train


def main_with(monkeypatch, *argv: str) -> int:
    """``python -m xgrad.train [-m] <test overrides> argv...`` in this process; its exit status (0: it returned)."""
    from xgrad.train import main

    flags = [a for a in argv if a == "-m"]
    monkeypatch.setattr(sys, "argv", ["xgrad.train", *flags, *TEST_OVERRIDES, *[a for a in argv if a != "-m"]])
    try:
        main()
        return 0
    except SystemExit as exit_info:
        return exit_info.code
    finally:
        GlobalHydra.instance().clear()


def start_into_epoch_two(*args: str, run_dir: Path, cwd: Path) -> subprocess.Popen:
    """``python -m xgrad.train <test overrides> args`` in a subprocess, returned once epoch 1's checkpoint is on disk.

    It inherits this process's offline environment (set above). Its stderr is a
    pipe (read it after the process ends); stdout is discarded.
    """
    command = [sys.executable, "-m", "xgrad.train", *TEST_OVERRIDES, *args, f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_epoch_one(process, run_dir)
    return process


def wait_for_epoch_one(process: subprocess.Popen, run_dir: Path, timeout: float = 120) -> None:
    """Return once ``run_dir/summary.json`` exists (written right after epoch 1's checkpoint).

    If ``process`` ends first, or ``timeout`` seconds pass, it is killed and the
    test fails with its stderr (a pipe).
    """
    deadline = time.monotonic() + timeout
    while not (run_dir / "summary.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            code = process.poll()
            process.kill()
            raise AssertionError(f"epoch 1 did not end within {timeout:g} s (exit status {code}): "
                                 f"{process.communicate()[1]}")  # fmt: skip
        time.sleep(0.02)


# ---------------------------------------------------------------- reading a run directory


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def untimed(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing fields, which are the only ones allowed to differ."""
    return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in metrics(run_dir)]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- patching the training step


class SimulatedCrash(Exception):
    """Stands for the process dying (or being stopped) in the middle of a run."""


def at_step(monkeypatch, step: int, action, task=None) -> list[int]:
    """Call ``action()`` inside training step ``step`` (counted from now), before its loss is computed.

    ``task`` is the task class whose ``train_loss`` is patched (Classification
    when None). Returns the list of steps taken from now on (one item per step).
    """
    if task is None:
        from xgrad.tasks.classification import Classification as task
    steps, original = [], task.train_loss

    def train_loss(self, model, batch):
        steps.append(1)
        if len(steps) == step:
            action()
        return original(self, model, batch)

    monkeypatch.setattr(task, "train_loss", train_loss)
    return steps


def count_steps(monkeypatch, task=None) -> list[int]:
    """Count the training steps from now on (one list item per step)."""
    return at_step(monkeypatch, 0, lambda: None, task)


def fail_at_step(monkeypatch, step: int, error: Exception | None = None) -> None:
    """Make the ``step``-th training loss (counted from now) raise ``error``, or come out NaN when ``error`` is None."""
    from xgrad.tasks.classification import Classification

    calls = itertools.count(1)
    original = Classification.train_loss

    def train_loss(self, model, batch):
        loss, n = original(self, model, batch)
        if next(calls) == step:
            if error is not None:
                raise error
            loss = loss * float("nan")
        return loss, n

    monkeypatch.setattr(Classification, "train_loss", train_loss)


def write_cifar(root: Path, variant: str, per_file: int, seed: int = 0, row_length: int = 3072) -> dict:
    """A CIFAR folder in the real format (pickled dicts, protocol 2, byte keys) with random images.

    Returns {file name: (images uint8 [N, 3, 32, 32], labels)} as written.
    """
    from xgrad.data import cifar

    spec = cifar.VARIANTS[variant]
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in spec.train_files + spec.test_files:
        data = rng.integers(0, 256, size=(per_file, row_length), dtype=np.uint8)
        labels = rng.integers(0, spec.num_classes, size=per_file).tolist()
        batch = {b"batch_label": name.encode(), spec.label_key: labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_file)]}
        if variant == "cifar100":
            batch[b"coarse_labels"] = [label // 5 for label in labels]
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (data.reshape(-1, 3, 32, 32) if row_length == 3072 else data, np.array(labels))
    return written

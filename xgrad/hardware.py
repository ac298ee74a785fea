"""The hardware a number was measured on: one line naming it (results must say it) and its results folder.

:func:`synchronize` waits for a GPU's queued work, so that a benchmark's timer reads what the device did.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

#: the repository's results folder (results/<hardware>/ holds what was measured on that hardware)
RESULTS = Path(__file__).resolve().parent.parent / "results"


def describe(device: torch.device) -> str:
    """``NVIDIA H200`` or ``AMD EPYC, 2 threads``: the accelerator, else the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {torch.get_num_threads()} threads"


def results_dir(device: torch.device) -> Path:
    """``results/nvidia-h200``: the folder of the benchmarks measured on ``device``'s hardware, named after it."""
    name = describe(device).split(",")[0]
    return RESULTS / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; the CPU has no queue) before a timer is read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"

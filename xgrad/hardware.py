"""One line naming the hardware a number was measured on (results must say it)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def describe(device: torch.device) -> str:
    """``NVIDIA H200`` or ``AMD EPYC, 2 threads``: the accelerator, else the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"

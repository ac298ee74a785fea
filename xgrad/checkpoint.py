"""Checkpoint files: written atomically, read back safely, with every RNG the run draws from.

A run directory holds one ``checkpoints/last.pt``, rewritten at the end of each
epoch. It is written to a temporary file in the same folder and renamed over
the old one (``os.replace`` is atomic on POSIX), so a process killed at any
moment leaves either the previous complete checkpoint or the new one, never
half a file. Contents are plain containers and tensors, so loading uses
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def save(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes private files; a checkpoint is as shareable as the results
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """The state of every random generator a run uses: Python, NumPy, torch CPU and CUDA."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),  # plain lists load with weights_only
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` captured (CUDA generators only where there are as many devices)."""
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """``random.setstate`` needs tuples where a round trip through a file may give lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value

"""Checkpoint files: written atomically, read back safely, with every RNG the run draws from.

A run directory holds one ``checkpoints/last.pt``, rewritten at the end of each
epoch and, mid-epoch, when the run is stopped by a signal or every
``trainer.checkpoint_every_n_steps`` steps. It is replaced in one rename
(:mod:`xgrad.atomic`), so a process killed at any moment leaves either the
previous complete checkpoint or the new one, never half a file; a write that
fails (a full disk, no permission) is one line naming the path, and the previous
checkpoint stays as it was. Contents are plain containers and tensors, so
loading uses ``torch.load(weights_only=True)``; a file that does not load that
way, or lacks what a checkpoint holds, is refused in one line naming it.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xgrad import atomic
from xgrad.records import Checkpoint, RecordError


class UnreadableCheckpoint(Exception):
    """A checkpoint file that cannot be resumed from; the message names it and what to do, in one line."""

    def __init__(self, path: Path, why: str):
        super().__init__(
            f"{path} cannot be resumed from ({why}); move it away (mv {path} {path}.bad) to train this run "
            "from its start, or pass a new hydra.run.dir"
        )
        self.path = path


def save(state: Checkpoint, path: Path) -> None:
    """Write ``state`` to ``path`` atomically; :class:`xgrad.atomic.WriteFailed` when it cannot be written."""
    atomic.replace(path, lambda f: torch.save(state.as_dict(), f))


def load(path: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save` onto the CPU, or refuse it (:class:`UnreadableCheckpoint`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise UnreadableCheckpoint(path, error.strerror or str(error)) from None
    except Exception as error:  # noqa: BLE001 -- whatever torch says about a damaged file, it is one refusal
        raise UnreadableCheckpoint(path, _why(error)) from None
    if not isinstance(state, dict):
        raise UnreadableCheckpoint(path, f"it holds a {type(state).__name__}, not a checkpoint's dict")
    try:
        return Checkpoint.from_dict(state, "it")
    except RecordError as error:
        raise UnreadableCheckpoint(path, str(error)) from None


def check_fits(path: Path, state: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse (:class:`UnreadableCheckpoint`) a checkpoint whose weights or optimizer state do not fit these.

    Before anything is loaded or written: ``load_state_dict`` would say so in a
    many-line error, or (an optimizer state of other shapes) not at all until
    the first step.
    """
    own = model.state_dict()
    weights = state.model
    if not isinstance(weights, dict):
        raise UnreadableCheckpoint(path, "its model entry is not a state dict")
    if missing := sorted(own.keys() - weights.keys()):
        raise UnreadableCheckpoint(path, f"it holds no {_some(missing)}: the weights of another model")
    if unexpected := sorted(weights.keys() - own.keys()):
        raise UnreadableCheckpoint(path, f"it holds {_some(unexpected)}, which this model has not: another model")
    for name, tensor in own.items():
        theirs = weights[name]
        if not isinstance(theirs, torch.Tensor) or theirs.shape != tensor.shape:
            shape = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            raise UnreadableCheckpoint(path, f"{name} is {shape} there, {tuple(tensor.shape)} in this model")
    groups, saved_groups = optimizer.param_groups, state.optimizer.get("param_groups", [])
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in saved_groups]:
        raise UnreadableCheckpoint(path, "its optimizer state has other parameter groups than this optimizer")
    params = [p for group in groups for p in group["params"]]
    ids = [i for group in saved_groups for i in group["params"]]
    for param, index in zip(params, ids):
        for key, value in state.optimizer.get("state", {}).get(index, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise UnreadableCheckpoint(
                    path, f"its optimizer's {key} is {tuple(value.shape)} for a parameter of {tuple(param.shape)}"
                )


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _why(error: Exception) -> str:
    """One line for a failed ``torch.load``. torch's own messages run to many lines and, for a file that
    names arbitrary objects, advise loading it with ``weights_only=False``, which would run its code."""
    text = str(error)
    if isinstance(error, EOFError) or "Ran out of input" in text:
        return "the file is empty or cut short"
    if "PytorchStreamReader failed" in text:
        return "the file is damaged or cut short: not a complete zip archive"
    if "Weights only load failed" in text:
        named = re.search(r"unsupported GLOBAL (\S+)", text)
        if named:
            return f"it names {named.group(1)}, which a checkpoint never holds; not loaded, as loading it runs code"
        return "the file is damaged: not tensors and plain containers"
    first = re.split(r"(?<=\.)\s", text.strip(), maxsplit=1)[0] if text.strip() else ""
    return f"not a checkpoint file ({type(error).__name__}{': ' + first if first else ''})"


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

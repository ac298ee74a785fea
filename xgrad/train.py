"""The Hydra entry point: ``python -m xgrad.train [group=option ...] [key=value ...]``.

Reads ``conf/config.yaml`` (next to the package), checks the config, builds
data, model, task, optimizer, predictor and scheduler from it, and hands them
to :class:`xgrad.engine.Engine`, through :func:`xgrad.builder.build_run` (which the
benchmarks use too). Everything is checked before training starts:
the schema (xgrad/schema.py: types, ranges, unknown keys), what no single key
says (the model consumes the data's modality, the device exists), the run
directory (xgrad/run_dir.py: nobody else trains in it, it holds no run of
another config, its checkpoint loads), and whatever the constructors refuse.
A refusal is one line naming the key and the value, and exit status 2; a run
that fails while training (a non-finite loss, a file that cannot be written)
exits 1; a run stopped by a signal writes a checkpoint and exits 128 + the
signal's number, or lets submitit requeue it (xgrad/preemption.py). Under
``-m`` a refused or failed job leaves a ``failed`` summary.json with that line,
Hydra prints the line, and the other jobs run.

Started by ``torchrun`` (or as several SLURM tasks of one job), the same
command trains one run on all the processes (xgrad/distributed.py): each
rank checks the config (a batch size the ranks cannot share is refused), rank
0 decides the run directory (Hydra's ``${now:...}`` may differ between
processes by a second) and alone locks and writes it, and a start refused on
any rank stops them all.

Running the same command again with the same ``hydra.run.dir`` resumes from
``checkpoints/last.pt``, mid-epoch included. The run must be the same: the
config it was started with is recorded in the run directory and compared,
ignoring only the keys that do not change what is trained
(:data:`xgrad.trained_config.RESUME_IGNORES`; a larger ``trainer.epochs`` trains on,
unless the schedule depends on it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from xgrad import checkpoint, distributed, hardware, performance, preemption, schema
from xgrad.atomic import WriteFailed
from xgrad.builder import RunParts, build_run
from xgrad.checkpoint import UnreadableCheckpoint
from xgrad.data.base import DatasetMissingError
from xgrad.distributed import Launch, LaunchRefused, RankFailed, World
from xgrad.engine import TrainingFailed
from xgrad.loggers import RunLogger, TensorBoardRun, WandbRun, check_wandb_environment
from xgrad.preemption import Interrupted, StopSignals
from xgrad.run_dir import RunDirectory, RunDirRefused, fingerprint, record_refusal
from xgrad.records import Checkpoint, Identity, Summary
from xgrad.schema import ConfigError
from xgrad.trained_config import cell, register_resolver

log = logging.getLogger(__name__)
register_resolver()  # before Hydra composes anything: conf/sweep/figure.yaml names its run directories with it

#: conf/ at the repository root, next to the package (an absolute path, so Hydra finds it
#: whether this module runs as ``python -m xgrad.train`` or is imported and called)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

#: what refuses a start before training (exit status 2) ...
REFUSALS = (ConfigError, RunDirRefused, UnreadableCheckpoint, DatasetMissingError, RankFailed, LaunchRefused)
#: ... and what ends a run that was training (exit status 1)
FAILURES = (TrainingFailed, WriteFailed)


class JobFailed(CompactHydraException):
    """A sweep job that was refused or failed: Hydra prints this one line (no traceback) and runs the others."""


# ---------------------------------------------------------------------- checks


def validate(cfg: DictConfig, where: Launch = Launch()) -> schema.Config:
    """The config as its typed object (xgrad/schema.py); refuses a config that cannot run, before anything is built.

    A model that does not consume the data's modality first (its interpolations
    of the data's keys could not resolve), then the schema, then the device,
    then what the ranks of a run on several processes (``where``) cannot share.
    Every rank refuses alike, before any of them waits for the others.
    """
    model_input, modality = OmegaConf.select(cfg, "model.input"), OmegaConf.select(cfg, "data.modality")
    if model_input != modality:
        raise ConfigError(
            f"model={OmegaConf.select(cfg, 'model.name')} takes model.input={model_input} but "
            f"data={OmegaConf.select(cfg, 'data.name')} is data.modality={modality}"
        )
    job = schema.check(cfg)
    check_environment(cfg)
    device = resolve_device(job.trainer.device, where)
    ranks = where.world_size
    if ranks > 1 and job.data.batch_size % ranks:
        raise ConfigError(
            f"data.batch_size={job.data.batch_size}: not divisible by the {ranks} processes of this run (the batch "
            f"size is global, each process trains on an equal share of every batch); use a multiple of {ranks}"
        )
    if ranks > 1 and job.trainer.sync_batchnorm and device.type != "cuda":
        raise ConfigError(
            f"trainer.sync_batchnorm=true: synchronised batch norm needs CUDA devices (nccl); on the {device.type} "
            "each process normalises over its own share of the batch"
        )
    return job


def check_environment(cfg: DictConfig) -> None:
    """Refuse environment variables the run would trip over later: a preemption signal no handler can catch,
    a W&B mode W&B does not know, TensorBoard chosen but not installed (the launcher's variables are checked by
    :func:`xgrad.distributed.launch`)."""
    try:
        preemption.preempt_signal()
        if cfg.logger.get("wandb") is not None:
            check_wandb_environment()
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.logger.get("tensorboard") is not None and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logger=tensorboard: the tensorboard package is not installed (pip install tensorboard, or "
                          "the suite's extra: pip install -e '.[suite]')")  # fmt: skip


def resolve_device(name: str, where: Launch = Launch()) -> torch.device:
    """``auto`` → cuda when available, else cpu; a CUDA device that is not there is refused.

    With several processes on a node, each takes the GPU of its local rank
    (``cuda:<LOCAL_RANK>``) among the node's GPUs it sees, or the one GPU it
    sees when the launcher gives each process its own (SLURM's
    ``--gpus-per-task``); naming one GPU for all of them is refused.
    """
    if name == "auto":  # then as if named: several processes need the index of their own GPU
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"trainer.device={name!r}: must be auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.device={name!r}: must be auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r}: no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"trainer.device={name!r}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "cuda" and where.world_size > 1:
        if device.index is not None:
            raise ConfigError(f"trainer.device={name!r}: each of the {where.world_size} processes trains on the GPU "
                              "of its local rank; use trainer.device=cuda or auto")  # fmt: skip
        visible = torch.cuda.device_count()
        if visible == 1:
            return torch.device("cuda", 0)
        if where.local_rank >= visible:
            raise ConfigError(f"trainer.device={name!r}: local rank {where.local_rank} has no GPU of its own "
                              f"({visible} are visible); start at most that many processes per node")  # fmt: skip
        return torch.device("cuda", where.local_rank)
    return device


# ---------------------------------------------------------------------- the run


def experiment_name() -> str | None:
    """The ``experiment=<name>`` choice when Hydra runs us (None for a plain run)."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("experiment")


def requested(cfg: DictConfig) -> Identity:
    """What the config asks to train: the identity a refused job's summary.json carries.

    Read defensively: a refused job's summary is written from this too, and
    there the config may be the bad part (a value that cannot resolve is None).
    """

    def get(key: str) -> Any:
        try:
            return OmegaConf.select(cfg, key, default=None)
        except Exception:  # noqa: BLE001 -- an interpolation that cannot resolve is simply unknown
            return None

    enabled, steps = bool(get("xgrad.enabled")), get("xgrad.steps")
    return Identity(
        model=get("model.name"),
        data=get("data.name"),
        optimizer=get("optimizer.name"),
        scheduler=get("scheduler.name"),
        xgrad=enabled,
        steps=steps if enabled and isinstance(steps, int) else 0,
        seed=get("seed"),
        experiment=experiment_name(),
        scale=get("scale"),
        paper_epochs=get("paper_epochs"),
    )


def describe(cfg: DictConfig, task: Any, data: Any, device: torch.device, world: World,
             model: torch.nn.Module | None = None) -> Identity:  # fmt: skip
    """What summary.json says the run is (the outcome is added by the logger).

    ``hardware`` is one process's device; ``world_size`` says how many
    processes trained together, over ``backend`` (None for one process);
    ``precision`` what ``trainer.precision`` ran as for ``model``.
    """
    return dataclasses.replace(
        requested(cfg),
        task=type(task).__name__,
        data_variant=data.variant,
        data_sizes=data.sizes(),
        hardware=hardware.describe(device),
        precision=performance.precision_label(model, cfg.trainer.precision) if model is not None else None,
        world_size=world.size,
        backend=world.backend,
        metric=task.metric,
        mode=task.mode,
    )


def start_wandb(cfg: DictConfig, run_dir: Path, identity: Identity, run_id: str | None) -> WandbRun | None:
    """The W&B run of this training run: paired by group (one seed's pair), told apart by job_type and the ``s``
    tag; its config's ``cell`` and ``arm`` group a comparison's runs over seeds ("group by cell, then arm")."""
    steps, settings = identity.steps, cfg.logger.wandb
    group = f"{cfg.data.name}-{cfg.model.name}-{cfg.optimizer.name}-seed{cfg.seed}"
    return WandbRun.start(
        run_dir,
        project=settings.project,
        entity=settings.entity,
        mode=settings.mode,
        init_timeout=settings.init_timeout,
        group=group,
        job_type=identity.arm,
        name=f"{group}-{identity.arm}" + (f"-s{steps}" if steps > 0 else ""),
        tags=[tag for tag in (identity.experiment, f"s={steps}") if tag],
        config={**OmegaConf.to_container(cfg, resolve=True), "cell": identity.cell, "arm": identity.arm,
                "world_size": identity.world_size, "backend": identity.backend},  # fmt: skip
        run_id=run_id,
    )


def start_tensorboard(cfg: DictConfig, run_dir: Path, identity: Identity, resume_step: int) -> TensorBoardRun:
    """The TensorBoard event files of this training run, in ``<run_dir>/<logger.tensorboard.subdir>``."""
    hparams = {"cell": identity.cell, "arm": identity.arm, "seed": identity.seed, "s": identity.steps,
               "data": identity.data, "model": identity.model, "optimizer": identity.optimizer,
               "lr": OmegaConf.select(cfg, "optimizer.lr"), "experiment": identity.experiment or "",
               "scale": identity.scale or ""}  # fmt: skip
    return TensorBoardRun(run_dir / cfg.logger.tensorboard.subdir, hparams, resume_step)


@dataclasses.dataclass
class Start:
    """What a start of a run found in its directory, decided by rank 0 under the directory's lock."""

    fingerprint: dict[str, Any]  # what the config trains (xgrad/run_dir.py), computed once per start
    checkpoint: Checkpoint | None = None  # this rank's checkpoint to resume from (None: from the start)
    completed: Summary | None = None  # the summary of a run with nothing left to train


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> Summary:
    """Train one composed config into ``run_dir`` (default: Hydra's output dir); return the summary.

    The steps, in this order: check the config, open (and lock) the run
    directory, plan the resume against what it holds, build the parts, record
    the accepted start, fit. Nothing is written before the start is accepted
    (but the lock file), so a refused start leaves the directory as it was;
    the lock is held until the run ends. With several ranks
    (xgrad/distributed.py), rank 0 decides the directory, locks, checks and
    writes it; a rank that refuses or fails to start stops every rank.
    """
    where = distributed.launch()
    job = validate(cfg, where)
    device = resolve_device(job.trainer.device, where)
    world = distributed.start(where, device)
    directory = open_run_dir(run_dir, world)
    with contextlib.ExitStack() as held:
        world.from_rank_zero(lambda: lock(directory, held))
        start = plan_resume(directory, cfg, world)
        if start.completed is not None:
            log.info("%s has completed its %s epochs: nothing to train", directory.path, start.completed.epochs)
            return start.completed
        parts = build_run(cfg, device, world, job=job)
        if start.checkpoint is not None:
            checkpoint.check_fits(directory.checkpoint_file, start.checkpoint, parts.model, parts.optimizer)
        parts.trainer = dataclasses.replace(parts.trainer, progress=job.trainer.progress and world.main)
        world.from_rank_zero(lambda: directory.accept(cfg, start.fingerprint))
        summary = fit(cfg, parts, directory, start)
    log.info("%s: best val/%s %s (epoch %s), final %s", summary.status, parts.task.metric, summary.best,
             summary.best_epoch, summary.final)  # fmt: skip
    return summary


def lock(directory: RunDirectory, held: contextlib.ExitStack) -> None:
    """Take the run directory's lock until ``held`` closes (the run's end); rank 0 alone locks."""
    held.enter_context(directory)


def open_run_dir(run_dir: str | Path | None, world: World) -> RunDirectory:
    """The run directory: ``run_dir``, else Hydra's output dir as rank 0 names it (``${now:...}`` may differ by a
    second between ranks)."""
    here = Path(run_dir if run_dir is not None else HydraConfig.get().runtime.output_dir)
    return RunDirectory(world.from_rank_zero(lambda: here))


def plan_resume(directory: RunDirectory, cfg: DictConfig, world: World) -> Start:
    """Rank 0 reads the checkpoint and checks it and the directory's record against the config
    (:meth:`xgrad.run_dir.RunDirectory.check`); the other ranks then read the file it accepted."""
    start = Start(fingerprint(cfg))

    def examine() -> tuple[bool, Summary | None]:
        start.checkpoint = directory.load_checkpoint()
        return start.checkpoint is not None, directory.check(cfg, start.checkpoint, world.size, start.fingerprint)

    resumes, start.completed = world.from_rank_zero(examine)  # only whether there is one: not the file itself
    if start.completed is None:
        start.checkpoint = world.on_every_rank(
            lambda: start.checkpoint if world.main else directory.load_checkpoint() if resumes else None
        )
    return start


def fit(cfg: DictConfig, parts: RunParts, directory: RunDirectory, start: Start) -> Summary:
    """Train the parts into the directory (from the checkpoint, when there is one); the summary says how it ended.

    A signal leaves an ``interrupted`` summary (every rank leaves once rank 0
    has written it: a launcher stops the others when one exits), any other
    exception a ``failed`` one.
    """
    world = parts.world
    identity = describe(cfg, parts.task, parts.data, parts.device, world, parts.model)
    identity = dataclasses.replace(identity, cell=cell(start.fingerprint))
    saved = start.checkpoint
    wandb_run = tensorboard = None
    if cfg.logger.get("wandb") is not None and world.main:
        wandb_run = start_wandb(cfg, directory.path, identity, saved.wandb_id if saved else None)
    if cfg.logger.get("tensorboard") is not None and world.main:
        tensorboard = start_tensorboard(cfg, directory.path, identity, saved.step if saved else 0)
    logger = RunLogger(directory.path, identity, wandb_run, writes=world.main, tensorboard=tensorboard)
    with StopSignals() as stop:
        try:
            checkpoint_extra = {"config": start.fingerprint, "wandb_id": wandb_run.id if wandb_run else None}
            engine = parts.engine(directory.path, logger, checkpoint_extra, stop)
            if saved is not None:
                engine.load(saved)
                log.info("resuming %s after epoch %d", directory.path, saved.epoch)
            summary = engine.fit()
        except Interrupted:
            try:
                logger.finish("interrupted")
            finally:
                world.barrier()
            raise
        except BaseException:
            logger.finish("failed")
            raise
    logger.finish("completed")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; see the module docstring for what a refusal, a failure and a signal end with.

    ``HYDRA_FULL_ERROR=1`` shows the whole traceback of a refusal or failure
    instead of its line, as Hydra does for its own errors.
    """
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return run(cfg).best
    except Interrupted as stopped:
        print(f"interrupted: {stopped}", file=sys.stderr)
        stopped.hand_over()  # submitit's handler requeues the job and exits; otherwise:
        raise SystemExit(stopped.exit_code) from None
    except REFUSALS + FAILURES as error:
        refused = isinstance(error, REFUSALS)
        if multirun and refused and _rank() == 0:  # a failed run has written its own summary
            record_refusal(Path(HydraConfig.get().runtime.output_dir), requested(cfg), f"refused: {error}")
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if multirun:
            raise JobFailed(str(error)) from None
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2 if refused else 1) from None


def _rank() -> int:
    """This process's rank, 0 where the launcher's variables are what was refused."""
    try:
        return distributed.launch().rank
    except LaunchRefused:
        return 0


if __name__ == "__main__":
    # Run the copy of `main` that lives in the importable module `xgrad.train`, not
    # this `__main__` one: launchers that pickle the task for worker processes
    # (joblib) can then send it by reference instead of trying to pickle its globals.
    from xgrad.train import main as importable_main

    importable_main()

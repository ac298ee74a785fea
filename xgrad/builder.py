"""One run's parts from its config: the one public way to build what the engine trains.

:func:`build_run` takes a composed (and checked) config and a device and
returns :class:`RunParts`: data, model, task, optimizer, predictor, scheduler,
the modules that run training and evaluation batches, and the engine's
typed ``trainer`` config (xgrad/schema.py), with the hardware settings resolved for the device
(xgrad/performance.py). The entry point (xgrad/train.py) trains them; the
benchmarks (scripts/bench_overhead.py, scripts/bench_throughput.py) step them
through :meth:`xgrad.engine.Engine.train_step`, so what they time is what a
run does.

Hydra's ``instantiate`` builds each part from its node; what a constructor
refuses reaches the user as one line (:class:`xgrad.schema.ConfigError`).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from xgrad import distributed, performance, schema
from xgrad.data.base import DatasetMissingError
from xgrad.distributed import World
from xgrad.engine import Engine
from xgrad.loggers import RunLogger
from xgrad.messages import first_line
from xgrad.preemption import StopSignals
from xgrad.records import Identity
from xgrad.schema import ConfigError

log = logging.getLogger(__name__)


@dataclass
class RunParts:
    """Everything one run trains with, built from its config (see :func:`build_run`)."""

    data: Any
    model: nn.Module  # the network itself: its state dict is what checkpoints hold
    forward: nn.Module  # what runs the training batches: the model, compiled and/or wrapped in DDP
    evaluate: nn.Module  # what runs the evaluation batches: the model, compiled or not (never DDP)
    task: Any
    optimizer: torch.optim.Optimizer
    predictor: Any | None
    scheduler: Any | None
    device: torch.device
    trainer: schema.Trainer  # the config's typed trainer group: what the engine reads
    channels_last: bool  # batches and weights channels-last, as resolved for the device
    seed: int
    world: World = field(default_factory=World)

    def engine(self, run_dir: Path, logger: RunLogger, checkpoint_extra: dict[str, Any] | None = None,
               stop: StopSignals | None = None) -> Engine:  # fmt: skip
        """The engine that trains these parts into ``run_dir``."""
        return Engine(
            model=self.model, forward=self.forward, evaluate=self.evaluate, task=self.task, data=self.data,
            optimizer=self.optimizer, predictor=self.predictor, scheduler=self.scheduler, device=self.device,
            trainer=self.trainer, channels_last=self.channels_last, seed=self.seed, run_dir=run_dir, logger=logger,
            checkpoint_extra=checkpoint_extra or {}, stop=stop, world=self.world,
        )  # fmt: skip


def build_run(cfg: DictConfig, device: torch.device, world: World | None = None, data: Any = None,
              job: schema.Config | None = None) -> RunParts:  # fmt: skip
    """The parts of the run ``cfg`` describes, on ``device``, for this rank of ``world`` (default: one process).

    The order is the one every run has always had (it decides the random
    draws): threads and seeds, data, model, task, optimizer, predictor,
    scheduler; then the compiled and distributed wrappers, and the other
    ranks' random streams seeded apart. ``data``: a data module built earlier
    from the same config (:func:`build_data`), which the benchmarks share between
    the runs they compare (building data draws no random numbers). ``job``:
    ``cfg`` as the schema's typed object, when the caller has checked it already.
    """
    world = world if world is not None else World()
    job = job if job is not None else schema.check(cfg)  # what the code below reads (the nodes it builds stay nodes)
    trainer = job.trainer
    launcher = HydraConfig.get().launcher if HydraConfig.initialized() else None
    if (threads := performance.threads_per_job(trainer.num_threads, launcher)) is not None:
        torch.set_num_threads(threads)
    performance.use_tf32(device, trainer.tf32)
    seed_everything(job.seed, trainer.deterministic)
    if data is None:
        data = build_data(cfg, device, world)
    channels_last = performance.channels_last(trainer.channels_last, job.model.channels_last, device)
    model = build(cfg.model.net).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if trainer.sync_batchnorm and world.size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same parameters, in new modules
    task = build(cfg.model.task, data)
    # optimizer and scheduler nodes are partial (`_partial_: true`): called here with what they act on
    optimizer = call(f"optimizer={cfg.optimizer.name}", build(constructor(cfg.optimizer), _convert_="all"),
                     model.parameters())  # fmt: skip
    predictor = build_predictor(cfg, optimizer)
    scheduler = None
    if "_target_" in cfg.scheduler:
        scheduler = call(f"scheduler={cfg.scheduler.name}", build(constructor(cfg.scheduler), _convert_="all"),
                         optimizer)  # fmt: skip
    # one process trains and evaluates through one compiled module; several compile the DDP wrapper for training
    # (the all-reduce then overlaps the backward pass) and evaluate with the model itself, compiled apart
    compile_it = trainer.compile and compiles(job.model)
    evaluate = performance.DynamicBatch(model) if compile_it else model
    forward = evaluate
    if world.size > 1:
        forward = world.wrap(model, device)  # rank 0's weights on every rank
        forward = performance.DynamicBatch(forward) if compile_it else forward
        if not world.main:  # rank 0 draws on as one process would; the others draw apart (dropout masks)
            seed_everything(distributed.rank_seed(job.seed, world.rank), trainer.deterministic)
    return RunParts(
        data=data, model=model, forward=forward, evaluate=evaluate, task=task, optimizer=optimizer,
        predictor=predictor, scheduler=scheduler, device=device, trainer=trainer, channels_last=channels_last,
        seed=job.seed, world=world,
    )  # fmt: skip


def build_data(cfg: DictConfig, device: torch.device, world: World | None = None) -> Any:
    """The run's data module, handing this rank its share of every batch, placed on ``device`` as configured.

    One function for :func:`build_run` and the benchmarks, which build the data
    once and share it between the runs they compare.
    """
    data = build(cfg.data.module)
    share_batches(data, world if world is not None else World())
    place_data(data, cfg, device)
    return data


def benchmark_arm(cfg: DictConfig, data: Any, device: torch.device, run_dir: Path, xgrad: bool) -> Engine:
    """The engine of one arm of a baseline-versus-XGrad benchmark, ready for :meth:`~xgrad.engine.Engine.train_step`.

    Built and put in training mode as a run's epoch starts, so that the
    benchmarks time what a run does. The baseline arm is ``cfg`` with
    ``xgrad.enabled`` false; the XGrad arm is ``cfg`` as it is.
    """
    if xgrad and not cfg.xgrad.enabled:  # the two arms would time the same thing
        raise ValueError("the XGrad arm of a benchmark needs a config with xgrad enabled (xgrad=on)")
    if not xgrad:
        cfg = cfg.copy()
        cfg.xgrad = {"enabled": False}
    parts = build_run(cfg, device, data=data)
    engine = parts.engine(run_dir, RunLogger(run_dir, Identity()))
    parts.forward.train()
    parts.task.start_epoch(parts.forward, training=True)
    return engine


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; with ``deterministic``, also ask for deterministic GPU kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def share_batches(data: Any, world: World) -> None:
    """Make the data module hand this rank only its share of every training batch (xgrad/data/base.py)."""
    if world.size == 1:
        return
    if not hasattr(data, "shard"):
        raise ConfigError(f"data={type(data).__name__}: this data module cannot share its batches between the "
                          f"{world.size} processes of this run (it has no shard method)")  # fmt: skip
    data.shard(world.rank, world.size)


def place_data(data: Any, cfg: DictConfig, device: torch.device) -> None:
    """Move an in-memory dataset to ``device`` when ``data.on_device`` resolves to true (xgrad/performance.py)."""
    setting = OmegaConf.select(cfg, "data.on_device", default=False)
    if not performance.data_on_device(setting, device):
        return
    if hasattr(data, "to"):
        data.to(device)
    elif setting is True:
        raise ConfigError(f"data.on_device=true: data={cfg.data.name} builds its batches on the host (its module has "
                          "no `to` method); use data.on_device=auto or false")  # fmt: skip


def compiles(model: schema.Model) -> bool:
    """Whether ``torch.compile`` captures the model's forward (``model.compiles``); says so in the log when not."""
    if model.compiles:
        return True
    log.warning("trainer.compile=true: model=%s runs eagerly (model.compiles=false: dynamo breaks its graph at every "
                "nn.LSTM, and compiling would only add the time of trying)", model.name)  # fmt: skip
    return False


def build(node: DictConfig, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, with what a constructor refuses turned into one line.

    Hydra wraps whatever a constructor raises in an ``InstantiationException``;
    a missing dataset or a refused config reaches the user as itself, and a
    ``ValueError`` or ``TypeError`` (an argument the class refuses, a key it
    does not take) as a :class:`ConfigError` naming the class.
    """
    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, (DatasetMissingError, ConfigError)):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"{node.get('_target_', 'the config')}: {first_line(cause)}") from cause
        raise


def call(what: str, factory: Callable[..., Any], *args: Any) -> Any:
    """``factory(*args)`` (a partial that ``build`` made), with a refused argument turned into one line."""
    try:
        return factory(*args)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{what}: {first_line(error)}") from error


def constructor(node: DictConfig) -> DictConfig:
    """An optimizer/scheduler node without its ``name`` (a label for tables, not an argument).

    Resolved first, while the node still sits in the whole config: its values may
    interpolate other keys (``T_max: ${trainer.epochs}``, an experiment's per-optimizer lr).
    """
    resolved = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.create({k: v for k, v in resolved.items() if k != "name"})


def build_predictor(cfg: DictConfig, optimizer: torch.optim.Optimizer):
    """The WeightPredictor for ``xgrad=on`` (also with steps=0: exactly the base optimizer), else None."""
    if not cfg.xgrad.enabled:
        return None
    from xgrad import WeightPredictor

    try:
        return WeightPredictor(
            optimizer, steps=cfg.xgrad.steps, rule=cfg.xgrad.rule, decoupled_decay=cfg.xgrad.decoupled_decay
        )
    except (ValueError, TypeError) as error:
        raise ConfigError(f"optimizer={cfg.optimizer.name} xgrad.rule={cfg.xgrad.rule}: {first_line(error)}") from None

"""The Hydra entry point: ``python -m xgrad.train [group=option ...] [key=value ...]``.

Reads ``conf/config.yaml`` (next to the package), checks the config, builds
data, model, task, optimizer, predictor and scheduler from it, and hands them
to :class:`xgrad.engine.Engine`. Everything is checked before training starts;
a bad value stops the run with one line naming the key and the value and a
nonzero exit status.

Running the same command again with the same ``hydra.run.dir`` resumes from
``checkpoints/last.pt``. The run must be the same: the composed config is
stored in the checkpoint and compared, ignoring only the keys that do not
change what is trained (:data:`RESUME_IGNORES`; a larger ``trainer.epochs``
trains on).
"""

from __future__ import annotations

import copy
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from xgrad import checkpoint, hardware
from xgrad.data.base import DatasetMissingError
from xgrad.engine import Engine, Settings, TrainingFailed
from xgrad.loggers import RunLogger, WandbRun, write_refusal

log = logging.getLogger(__name__)

#: conf/ at the repository root, next to the package (an absolute path, so Hydra finds it
#: whether this module runs as ``python -m xgrad.train`` or is imported and called)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

#: Keys that may differ when a run is resumed: where and how it runs, not what it trains.
RESUME_IGNORES = (
    "trainer.epochs",
    "trainer.device",
    "trainer.num_threads",
    "trainer.progress",
    "trainer.log_every_n_steps",
    "logger",
    "data.root",
)
PRECISIONS = ("32", "bf16", "16")


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key and the value."""


# ---------------------------------------------------------------------- checks


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate(cfg: DictConfig) -> None:
    """Refuse a config that cannot run, before anything is built."""
    if cfg.model.input != cfg.data.modality:
        raise ConfigError(
            f"model={cfg.model.name} takes model.input={cfg.model.input} but "
            f"data={cfg.data.name} is data.modality={cfg.data.modality}"
        )
    if cfg.xgrad.enabled:
        steps = cfg.xgrad.steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"xgrad.steps={steps!r}: must be an integer >= 0")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed!r}: must be an integer >= 0")
    trainer = cfg.trainer
    if not _positive_int(trainer.epochs):
        raise ConfigError(f"trainer.epochs={trainer.epochs!r}: must be an integer >= 1")
    for key in ("limit_train_batches", "limit_val_batches"):
        if trainer[key] is not None and not _positive_int(trainer[key]):
            raise ConfigError(f"trainer.{key}={trainer[key]!r}: must be null or an integer >= 1")
    if str(trainer.precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={trainer.precision!r}: must be one of {', '.join(PRECISIONS)}")
    if trainer.grad_clip is not None and not (isinstance(trainer.grad_clip, (int, float)) and trainer.grad_clip > 0):
        raise ConfigError(f"trainer.grad_clip={trainer.grad_clip!r}: must be null or a number > 0")
    if trainer.num_threads is not None and not _positive_int(trainer.num_threads):
        raise ConfigError(f"trainer.num_threads={trainer.num_threads!r}: must be null or an integer >= 1")
    if not _positive_int(trainer.log_every_n_steps):
        raise ConfigError(f"trainer.log_every_n_steps={trainer.log_every_n_steps!r}: must be an integer >= 1")
    resolve_device(trainer.device)


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"trainer.device={name!r}: must be auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.device={name!r}: must be auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r}: no CUDA device is available")
    return device


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus :data:`RESUME_IGNORES`, flattened to dotted keys."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key in RESUME_IGNORES:
            OmegaConf.update(cfg, key, None, force_add=True)  # before resolving: drops interpolated copies too
    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in RESUME_IGNORES)}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def check_resumable(saved: dict[str, Any], cfg: DictConfig, run_dir: Path) -> None:
    """Refuse to resume a checkpoint of another config, or one with more epochs than asked for."""
    now = fingerprint(cfg)
    before = saved["config"]
    changed = [k for k in sorted(now.keys() | before.keys()) if now.get(k, "<absent>") != before.get(k, "<absent>")]
    if changed:
        diffs = "; ".join(f"{k}={before.get(k, '<absent>')!r} there, {now.get(k, '<absent>')!r} now" for k in changed[:5])
        more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
        raise ConfigError(
            f"{run_dir} holds a checkpoint of a different config: {diffs}{more}; "
            "rerun with the same overrides, or pass a new hydra.run.dir"
        )
    if saved["epoch"] > cfg.trainer.epochs:
        raise ConfigError(
            f"trainer.epochs={cfg.trainer.epochs}: the checkpoint in {run_dir} already has {saved['epoch']} epochs"
        )


# ---------------------------------------------------------------------- build


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; with ``deterministic``, also ask for deterministic GPU kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def build(node: DictConfig, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, letting this project's own errors through unwrapped.

    Hydra wraps whatever a constructor raises in an ``InstantiationException``;
    a missing dataset or a refused config should reach the user as itself.
    """
    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, (DatasetMissingError, ConfigError)):
            raise error.__cause__ from None
        raise


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
        raise ConfigError(f"optimizer={cfg.optimizer.name} xgrad.rule={cfg.xgrad.rule}: {error}") from None


def experiment_name() -> str | None:
    """The ``experiment=<name>`` choice when Hydra runs us (None for a plain run)."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("experiment")


def requested(cfg: DictConfig) -> dict[str, Any]:
    """What the config asks to train, as summary.json names it.

    Read defensively: a refused job's summary is written from this too, and
    there the config may be the bad part (a value that cannot resolve is None).
    """

    def get(key: str) -> Any:
        try:
            return OmegaConf.select(cfg, key, default=None)
        except Exception:  # noqa: BLE001 -- an interpolation that cannot resolve is simply unknown
            return None

    enabled, steps = bool(get("xgrad.enabled")), get("xgrad.steps")
    return {
        "model": get("model.name"),
        "data": get("data.name"),
        "optimizer": get("optimizer.name"),
        "scheduler": get("scheduler.name"),
        "xgrad": enabled,
        "steps": steps if enabled and isinstance(steps, int) else 0,
        "seed": get("seed"),
        "experiment": experiment_name(),
        "scale": get("scale"),  # an experiment's size label (e.g. a reduced protocol), if it sets one
        "paper_epochs": get("paper_epochs"),  # the paper schedule's length, where a protocol trains a part of it
    }


def describe(cfg: DictConfig, task: Any, data: Any, device: torch.device) -> dict[str, Any]:
    """What summary.json says the run is (the outcome is added by the logger)."""
    return {
        "task": type(task).__name__,
        **requested(cfg),
        "data_variant": data.variant,
        "data_sizes": data.sizes(),
        "hardware": hardware.describe(device),
        "metric": task.metric,
        "mode": task.mode,
    }


def start_wandb(cfg: DictConfig, run_dir: Path, identity: dict[str, Any], run_id: str | None) -> WandbRun:
    """The W&B run of this training run: paired by group, told apart by job_type and the ``s`` tag."""
    steps = identity["steps"]
    group = f"{cfg.data.name}-{cfg.model.name}-{cfg.optimizer.name}-seed{cfg.seed}"
    job_type = "xgrad" if steps > 0 else "baseline"
    return WandbRun(
        run_dir,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        mode=cfg.logger.mode,
        init_timeout=cfg.logger.init_timeout,
        group=group,
        job_type=job_type,
        name=f"{group}-{job_type}" + (f"-s{steps}" if steps > 0 else ""),
        tags=[tag for tag in (identity["experiment"], f"s={steps}") if tag],
        config=OmegaConf.to_container(cfg, resolve=True),
        run_id=run_id,
    )


def settings(trainer: DictConfig) -> Settings:
    return Settings(
        epochs=trainer.epochs,
        precision=str(trainer.precision),
        limit_train_batches=trainer.limit_train_batches,
        limit_val_batches=trainer.limit_val_batches,
        grad_clip=trainer.grad_clip,
        channels_last=trainer.channels_last,
        log_every_n_steps=trainer.log_every_n_steps,
        progress=trainer.progress,
    )


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train one composed config into ``run_dir`` (default: Hydra's output dir); return the summary.

    Order matters: the config is checked, then a checkpoint in ``run_dir`` is
    checked against it, then the data is loaded; only then does anything get
    written, so a refused run leaves no files behind.
    """
    validate(cfg)
    run_dir = Path(run_dir if run_dir is not None else HydraConfig.get().runtime.output_dir)
    checkpoint_path = run_dir / "checkpoints" / "last.pt"
    saved = checkpoint.load(checkpoint_path) if checkpoint_path.is_file() else None
    if saved is not None:
        check_resumable(saved, cfg, run_dir)

    trainer = cfg.trainer
    device = resolve_device(trainer.device)
    if trainer.num_threads is not None:
        torch.set_num_threads(trainer.num_threads)
    seed_everything(cfg.seed, trainer.deterministic)
    data = build(cfg.data.module)
    model = build(cfg.model.net).to(device)
    if trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    task = build(cfg.model.task, data)
    # optimizer and scheduler nodes are partial (`_partial_: true`): called here with what they act on
    optimizer = build(constructor(cfg.optimizer), _convert_="all")(model.parameters())
    predictor = build_predictor(cfg, optimizer)
    scheduler = build(constructor(cfg.scheduler), _convert_="all")(optimizer) if "_target_" in cfg.scheduler else None

    identity = describe(cfg, task, data, device)
    wandb_run = None
    if cfg.logger.name == "wandb":
        wandb_run = start_wandb(cfg, run_dir, identity, saved["wandb_id"] if saved else None)
    logger = RunLogger(run_dir, identity, wandb_run)
    try:
        engine = Engine(
            model=model,
            forward=torch.compile(model) if trainer.compile else model,
            task=task,
            data=data,
            optimizer=optimizer,
            predictor=predictor,
            scheduler=scheduler,
            device=device,
            settings=settings(trainer),
            seed=cfg.seed,
            run_dir=run_dir,
            logger=logger,
            checkpoint_extra={"config": fingerprint(cfg), "wandb_id": wandb_run.id if wandb_run else None},
        )
        if saved is not None:
            engine.load(saved)
            log.info("resuming %s after epoch %d", run_dir, saved["epoch"])
        summary = engine.fit()
    except BaseException:
        logger.finish(failed=True)
        raise
    logger.finish(failed=False)
    best, final = summary["best"], summary["final"]
    log.info("%s: best val/%s %s (epoch %s), final %s", summary["status"], task.metric, best, summary["best_epoch"], final)
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; a bad config, missing data or a diverged run exits nonzero with one line.

    Under ``-m`` the error is raised instead, so Hydra finishes the other jobs
    of the sweep and then exits nonzero; a refused job first leaves a ``failed``
    summary.json with the reason, for the sweep's table to list.
    """
    try:
        return run(cfg)["best"]
    except (ConfigError, DatasetMissingError, TrainingFailed) as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            if not isinstance(error, TrainingFailed):  # a failed training run has written its own summary
                write_refusal(Path(HydraConfig.get().runtime.output_dir), requested(cfg), f"refused: {error}")
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    # Run the copy of `main` that lives in the importable module `xgrad.train`, not
    # this `__main__` one: launchers that pickle the task for worker processes
    # (joblib) can then send it by reference instead of trying to pickle its globals.
    from xgrad.train import main as importable_main

    importable_main()

"""What a run reports: local files always, Weights & Biases when it is on.

Local files in the run directory (DESIGN.md, "What a run leaves behind"):

- ``metrics.jsonl``: one JSON object per finished epoch (``epoch``, ``step``,
  ``lr``, ``train/loss``, ``val/<metric>`` ..., ``test/<metric>`` ..., and
  timing fields under ``time/``);
- ``summary.json``: what a table needs, rewritten at every epoch end
  (``status: running``) and when the run ends (``completed`` or ``failed`` with
  a ``reason``). Keys: ``task model data data_variant data_sizes optimizer
  scheduler xgrad steps seed experiment scale paper_epochs hardware metric mode
  best best_epoch final test test_best test_final test/<name>... epochs
  wall_time_s status reason`` plus ``wandb_group wandb_job_type wandb_run_id``
  when W&B is on (:meth:`RunLogger.write_summary` says which epoch each is from).

Both are replaced atomically, so a killed process never leaves half a line
that a table would read.

W&B: one run per training run, ``group = <data>-<model>-<optimizer>-seed<seed>``
(the baseline and every ``s`` of one setting side by side), ``job_type =
baseline | xgrad``, offline when no API key is found, resumed under the same
id when the training run resumes.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
import string
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (never a half-written file)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes private files; results are for everyone to read
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _finite(value: Any) -> bool:
    """A real number that is not NaN or infinite (a diverged epoch never becomes "best")."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def _json_value(value: Any) -> Any:
    """JSON has no NaN/inf: a diverged value is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def api_key_available() -> bool:
    """True when W&B can authenticate: ``WANDB_API_KEY`` or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def new_run_id() -> str:
    """A fresh W&B run id from the OS's entropy.

    W&B's own ids come from Python's ``random``, which the run has just seeded:
    every job of a sweep with the same seed would get the same id and, resumed
    by id, land in one W&B run.
    """
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_mode(configured: str | None) -> str:
    """The configured mode, else ``$WANDB_MODE``, else online with an API key and offline without."""
    return configured or os.environ.get("WANDB_MODE") or ("online" if api_key_available() else "offline")


def write_refusal(run_dir: Path, identity: dict[str, Any], reason: str) -> None:
    """A ``failed`` summary.json for a sweep job refused before it started (a bad value, missing data).

    Without it the sweep's table could only say "no summary.json". An existing
    summary (a finished run this job was not allowed to resume) is left alone.
    """
    path = run_dir / "summary.json"
    if path.exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {**identity, "best": None, "final": None, "epochs": 0, "status": "failed", "reason": reason}
    write_atomic(path, json.dumps({k: _json_value(v) for k, v in summary.items()}, indent=2) + "\n")


class WandbRun:
    """One W&B run, started at construction; never blocks a run that cannot reach W&B.

    An online start that fails (no network, a timeout after ``init_timeout``
    seconds) falls back to an offline run, synced later with ``wandb sync``.
    Files go to ``<run_dir>/wandb``.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        project: str,
        entity: str | None,
        mode: str | None,
        init_timeout: float,
        group: str,
        job_type: str,
        name: str,
        tags: list[str],
        config: dict[str, Any],
        run_id: str | None,
    ):
        import wandb

        self._wandb = wandb
        self.group, self.job_type = group, job_type
        mode = wandb_mode(mode)
        init = dict(
            project=project,
            entity=entity,
            group=group,
            job_type=job_type,
            name=name,
            tags=tags,
            config=config,
            id=run_id or new_run_id(),
            resume="allow",  # the same id again (a resumed training run) continues that W&B run
            dir=str(run_dir),
            settings=wandb.Settings(init_timeout=init_timeout, quiet=True),
        )
        try:
            self.run = wandb.init(mode=mode, **init)
        except Exception as error:  # noqa: BLE001 -- any failure to reach W&B
            if mode != "online":
                raise
            log.warning("W&B online start failed (%s); logging offline instead", error)
            self.run = wandb.init(mode="offline", **init)
        self.id = self.run.id
        # validation and test curves against epochs; the training loss against optimizer steps
        self.run.define_metric("epoch")
        self.run.define_metric("val/*", step_metric="epoch")
        self.run.define_metric("test/*", step_metric="epoch")
        self.run.define_metric("lr", step_metric="epoch")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_images(self, files: dict[str, str], step: int) -> None:
        self.run.log({name: self._wandb.Image(path) for name, path in files.items()}, step=step)

    def set_summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class RunLogger:
    """Writes the run directory's files and forwards everything to W&B when there is a run.

    ``identity`` is the summary's description of the run (task, model, data,
    optimizer, xgrad, steps, seed, metric, mode, ...); the outcome keys are
    added by :meth:`write_summary`.
    """

    def __init__(self, run_dir: Path, identity: dict[str, Any], wandb_run: WandbRun | None = None):
        self.run_dir = run_dir
        self.identity = identity
        self.wandb = wandb_run
        self.metrics_file = run_dir / "metrics.jsonl"
        self.summary_file = run_dir / "summary.json"
        run_dir.mkdir(parents=True, exist_ok=True)

    def start(self, history: list[dict[str, Any]]) -> None:
        """Make ``metrics.jsonl`` hold exactly ``history`` (the epochs a resumed checkpoint has)."""
        self._write_metrics(history)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Per-step values (training loss): W&B only; the local file has one line per epoch."""
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_epoch(self, history: list[dict[str, Any]], files: dict[str, str]) -> None:
        """The epoch just finished is ``history[-1]``; ``files`` are a task's artefacts (images)."""
        self._write_metrics(history)
        if self.wandb is not None:
            record = history[-1]
            self.wandb.log(record, step=record["step"])
            if files:
                self.wandb.log_images(files, step=record["step"])

    def _write_metrics(self, history: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps({k: _json_value(v) for k, v in r.items()}) + "\n" for r in history)
        write_atomic(self.metrics_file, lines)

    def write_summary(
        self,
        history: list[dict[str, Any]],
        *,
        status: str,
        wall_time_s: float,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Write ``summary.json`` from the epochs so far and return it.

        The validation split selects the epoch (``best_epoch``, the first with
        the best ``val/<metric>``); ``test`` and every ``test/<name>`` are read
        at that epoch. ``test_best``, the best test value over all epochs, is
        the optimizer papers' habit of reporting: the test set picks the epoch
        there, so it is kept for comparison only.
        """
        metric, mode = self.identity["metric"], self.identity["mode"]
        pick = max if mode == "max" else min
        val_key, test_key = f"val/{metric}", f"test/{metric}"
        scored = [r for r in history if _finite(r.get(val_key))]
        selected = pick(scored, key=lambda r: r[val_key]) if scored else {}
        tests = [r[test_key] for r in history if _finite(r.get(test_key))]
        summary = {
            **self.identity,
            "best": selected.get(val_key),
            "best_epoch": selected.get("epoch"),
            "final": history[-1].get(val_key) if history else None,
            "test": selected.get(test_key),
            "test_best": pick(tests) if tests else None,
            "test_final": history[-1].get(test_key) if history else None,
            **{k: v for k, v in selected.items() if k.startswith("test/")},
            "epochs": len(history),
            "wall_time_s": wall_time_s,
            "status": status,
            "reason": reason,
        }
        if self.wandb is not None:
            summary |= {
                "wandb_group": self.wandb.group,
                "wandb_job_type": self.wandb.job_type,
                "wandb_run_id": self.wandb.id,
            }
            # everything a table needs, so that `make_tables.py --wandb` reads what summary.json holds
            self.wandb.set_summary({k: v for k, v in summary.items() if not k.startswith("wandb_")})
        write_atomic(self.summary_file, json.dumps({k: _json_value(v) for k, v in summary.items()}, indent=2) + "\n")
        return summary

    def finish(self, failed: bool) -> None:
        if self.wandb is not None:
            self.wandb.finish(failed)

"""A run directory belongs to one run: an exclusive lock while it trains, and its own record of its config.

Files (beside the run's results):

- ``run.lock``: locked (``flock``, exclusive) by the process training in the
  directory, for the whole run, and holding that process's PID and host. A
  second run into a locked directory is refused at once, naming them; a lock
  file that nobody holds means nothing (the lock dies with its process, also
  when it is killed).
- ``run.json``: the run's record of what it trains, written when a start is
  accepted: ``config``, the resolved config as dotted keys minus
  :data:`RESUME_IGNORES` (:func:`fingerprint`), and ``epochs``, the
  ``trainer.epochs`` it was last started with.
- ``.hydra/``: ``config.yaml``, ``hydra.yaml`` and ``overrides.yaml``, which
  Hydra would write at every start, before any check. ``conf/config.yaml`` sets
  ``hydra.output_subdir: null``, and :meth:`RunDirectory.accept` writes them
  only once the start is accepted.

A start is checked, holding the lock, against the record (or, for a directory
written before records existed, against the config its checkpoint holds), not
against anything a refused start may have just written. It is refused in one
line (:class:`RunDirRefused`) when the directory holds a run of another config,
whatever files of it remain; when the checkpoint already has more epochs than
asked for; when ``trainer.epochs`` changes for a schedule that depends on it (a
cosine's ``T_max``: the epochs trained so far used a schedule of the old
length, which no run of the new length would have); when a completed run is
to be extended but its checkpoint is gone; and when a directory holds results
but no record of their config. A refused start writes nothing: every file the
directory held is left byte for byte as it was.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from xgrad import atomic, checkpoint
from xgrad.loggers import write_refusal
from xgrad.records import Checkpoint, Identity, NewerFormat, RecordError, RunRecord, Summary
from xgrad.trained_config import RESUME_IGNORES, flatten, recorded, what_it_trains

log = logging.getLogger(__name__)

class RunDirRefused(Exception):
    """This start may not train in this directory; the message says why and what to do, in one line."""


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus :data:`RESUME_IGNORES`, flattened to dotted keys."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key in RESUME_IGNORES:
            OmegaConf.update(cfg, key, None, force_add=True)  # before resolving: drops interpolated copies too
    return what_it_trains(OmegaConf.to_container(cfg, resolve=True))


def follows_epochs(cfg: DictConfig, epochs: int) -> dict[str, tuple[Any, Any]]:
    """Keys whose value follows ``trainer.epochs``: ``{key: (value with epochs, value now)}``.

    A cosine's ``T_max: ${trainer.epochs}`` is one: its schedule depends on
    the run's length, so a run cannot change its length half way.
    """
    other = copy.deepcopy(cfg)
    other.trainer.epochs = epochs
    now, then = flatten(OmegaConf.to_container(cfg, resolve=True)), flatten(OmegaConf.to_container(other, resolve=True))
    return {k: (then.get(k), v) for k, v in now.items() if k != "trainer.epochs" and then.get(k) != v}


class RunDirectory:
    """The run directory at ``path``; ``with RunDirectory(path) as directory:`` holds its lock (see the module)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_file = self.path / "run.lock"
        self.record_file = self.path / "run.json"
        self.checkpoint_file = self.path / "checkpoints" / "last.pt"
        self.summary_file = self.path / "summary.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self._fd: int | None = None

    # ------------------------------------------------------------------ the lock

    def __enter__(self) -> RunDirectory:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    def lock(self) -> None:
        """Take the directory's lock, or refuse naming the process that holds it.

        On a file system without locks (a network file system mounted without
        them) the run goes on unlocked, with a warning: refusing would make the
        directory unusable, not safer. (``filelock`` falls back there to a lock
        file's existence, which a killed run would leave behind: so ``flock`` by
        hand, the holder's PID written into the file it locks.)
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)  # not O_TRUNC: the holder's PID is in it
        except OSError as error:
            raise RunDirRefused(f"cannot use {self.path}: {error.strerror or error} ({self.lock_file})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise RunDirRefused(
                f"{self.path} is in use by another run ({holder}); wait for it to end, or pass another hydra.run.dir"
            ) from None
        except OSError as error:  # ENOLCK, ENOSYS, EOPNOTSUPP: no locks here
            log.warning("%s cannot be locked (%s): a second run into it would not be stopped", self.lock_file,
                        error.strerror or error)  # fmt: skip
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        except OSError as error:  # a full disk: nothing the run could write would fit either
            os.close(fd)
            raise RunDirRefused(f"cannot use {self.path}: {error.strerror or error} ({self.lock_file})") from None
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        """What the holder wrote in the lock file (it writes right after locking: wait a moment for it)."""
        for _ in range(20):
            text = os.pread(fd, 200, 0).decode(errors="replace").strip()
            if text:
                return text
            time.sleep(0.05)
        return "pid unknown"

    def unlock(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # releases the lock
            self._fd = None

    # ------------------------------------------------------------------ what the directory holds

    def holds_run(self) -> bool:
        """Whether a run has trained here (its record, its checkpoint or its metrics); a refusal's summary is none."""
        return self.record_file.is_file() or self.checkpoint_file.is_file() or self.metrics_file.is_file()

    def load_checkpoint(self) -> Checkpoint | None:
        """The checkpoint to resume from (None: there is none); an unreadable one is refused by :mod:`xgrad.checkpoint`.

        Besides the engine's state it must hold what the entry point adds (the
        run's config), which a checkpoint of the benchmarks' engines lacks.
        """
        if not self.checkpoint_file.is_file():
            return None
        saved = checkpoint.load(self.checkpoint_file)
        if saved.config is None:
            raise checkpoint.UnreadableCheckpoint(self.checkpoint_file, "no config in it: not a training run's")
        return saved

    def _record(self) -> RunRecord | None:
        if not self.record_file.is_file():
            return None
        try:
            return RunRecord.read(self.record_file)
        except RecordError as error:
            raise RunDirRefused(f"{error}; it records what {self.path} trains: restore it, or pass a new "
                                "hydra.run.dir") from None  # fmt: skip

    def _summary(self) -> Summary | None:
        """The run's summary; None when it cannot be read (the run rewrites it), refused when a newer xgrad wrote it."""
        try:
            return Summary.read(self.summary_file)
        except NewerFormat as error:
            named = str(error).replace(self.summary_file.name, str(self.summary_file), 1)
            raise RunDirRefused(f"{named}; go on training {self.path} with that version, or pass a new "
                                "hydra.run.dir") from None  # fmt: skip
        except RecordError:
            return None

    # ------------------------------------------------------------------ the check

    def check(self, cfg: DictConfig, saved: Checkpoint | None, world_size: int = 1,
              trains: dict[str, Any] | None = None) -> Summary | None:  # fmt: skip
        """Refuse a start that may not train here (see the module); return the summary when the run is complete.

        ``saved`` is the checkpoint (:meth:`load_checkpoint`). A run that has
        already completed ``trainer.epochs`` epochs of this config is not
        trained again, with or without its checkpoint: its summary is returned.
        ``world_size``: the processes this start trains on (xgrad/distributed.py).
        ``trains``: :func:`fingerprint` of ``cfg``, when the caller has it.
        """
        record = self._record()
        if record is not None:
            before, target = record.config, record.epochs
            if saved is not None:
                self._checkpoint_of_this_run(before, saved.config)
        elif saved is not None:
            before, target = saved.config, None  # written before run.json existed: the length it aimed at is unknown
        elif self.metrics_file.is_file():
            raise RunDirRefused(
                f"{self.path} holds results (metrics.jsonl) but no record of the config that made them (no run.json, "
                "no checkpoint); pass a new hydra.run.dir, or move those files away"
            )
        else:
            return None  # nothing has trained here
        self._same_config(before, trains if trains is not None else fingerprint(cfg))
        self._same_shares(saved, world_size)
        epochs = cfg.trainer.epochs
        if saved is not None and saved.epoch > epochs:
            raise RunDirRefused(
                f"trainer.epochs={epochs}: the checkpoint in {self.path} already has {saved.epoch} epochs"
            )
        if saved is not None and target is not None and target != epochs and (changed := follows_epochs(cfg, target)):
            values = "; ".join(f"{k}={then!r} for {target} epochs, {now!r} for {epochs}" for k, (then, now) in changed.items())
            raise RunDirRefused(
                f"trainer.epochs={epochs}: {self.path} has trained toward trainer.epochs={target} with a schedule that "
                f"depends on it ({values}); the rates it used belong to the {target}-epoch schedule, so it cannot "
                f"become a {epochs}-epoch run: train that in a new hydra.run.dir"
            )
        summary = self._summary() if self.summary_file.is_file() else None
        if summary is None or summary.status != "completed":
            return None
        if summary.epochs == epochs:
            return summary
        if saved is None:
            raise RunDirRefused(
                f"trainer.epochs={epochs}: {self.path} holds a completed {summary.epochs}-epoch run whose "
                "checkpoints/last.pt is gone, so there is nothing to continue from; pass a new hydra.run.dir"
            )
        return None

    def _same_shares(self, saved: Checkpoint | None, world_size: int) -> None:
        """Refuse to continue, on another number of processes, an epoch whose task carries state per rank.

        The data a batch holds is global, so a run may resume on any number of
        processes; but a mid-epoch checkpoint of a language model holds each
        rank's hidden state for its own columns of the token stream, which
        belong to that number of ranks.
        """
        position = saved.position if saved is not None else None
        written_by = saved.world_size if saved is not None else world_size
        if position is not None and position.get("task") is not None and written_by != world_size:
            raise RunDirRefused(
                f"{self.checkpoint_file} was written in the middle of an epoch by {written_by} process(es), with the "
                f"state the task carries from batch to batch split between them; continue it on {written_by} "
                f"process(es) (this start has {world_size}), or move it away to train the run from its start"
            )

    def _checkpoint_of_this_run(self, record: dict[str, Any], written: dict[str, Any]) -> None:
        """Refuse a checkpoint written by a run of another config than run.json records (one copied in, say)."""
        record, written = recorded(record), recorded(written)
        changed = _differences(record, written)
        if changed:
            diffs = "; ".join(f"{k}={written.get(k, '<absent>')!r} there, {record.get(k, '<absent>')!r} in run.json"
                              for k in changed[:5])  # fmt: skip
            more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
            raise RunDirRefused(
                f"{self.checkpoint_file} is not this run's: it was written by a run of another config ({diffs}{more}); "
                f"move it away to train the run {self.record_file} records from its start, or pass a new hydra.run.dir"
            )

    def _same_config(self, before: dict[str, Any], now: dict[str, Any]) -> None:
        before = recorded(before)
        changed = _differences(before, now)
        if changed:
            diffs = "; ".join(f"{k}={before.get(k, '<absent>')!r} there, {now.get(k, '<absent>')!r} now" for k in changed[:5])
            more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
            raise RunDirRefused(
                f"{self.path} holds a run of a different config: {diffs}{more}; "
                "rerun with the same overrides, or pass a new hydra.run.dir"
            )

    # ------------------------------------------------------------------ an accepted start

    def accept(self, cfg: DictConfig, trains: dict[str, Any] | None = None) -> None:
        """Record the accepted start: remove temporary files left by a killed run, write ``run.json`` and ``.hydra/``.

        ``trains``: :func:`fingerprint` of ``cfg``, when the caller has it.
        """
        for folder in (self.path, self.checkpoint_file.parent):
            atomic.remove_temporaries(folder)
        RunRecord(trains if trains is not None else fingerprint(cfg), cfg.trainer.epochs).write(self.record_file)
        hydra = HydraConfig.instance().cfg if HydraConfig.initialized() else None
        subdir = self.path / ".hydra"  # Hydra's own copy is off (conf/config.yaml: hydra.output_subdir null)
        atomic.write_text(subdir / "config.yaml", OmegaConf.to_yaml(cfg))
        if hydra is not None:
            atomic.write_text(subdir / "hydra.yaml", OmegaConf.to_yaml(hydra))
            atomic.write_text(subdir / "overrides.yaml", OmegaConf.to_yaml(hydra.hydra.overrides.task))


def _differences(one: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two configs (a key only one holds included), sorted."""
    return [k for k in sorted(one.keys() | other.keys()) if one.get(k, "<absent>") != other.get(k, "<absent>")]


def record_refusal(path: Path, identity: Identity, reason: str) -> None:
    """A sweep job's refusal as a ``failed`` summary.json in its directory, for the sweep's table.

    Only into a directory that holds no run and that no process is using: the
    files of a run (of another config, or one now training) are left alone.
    """
    directory = RunDirectory(path)
    try:
        directory.lock()
    except RunDirRefused:
        return
    try:
        if not directory.holds_run():
            write_refusal(path, identity, reason)
    finally:
        directory.unlock()

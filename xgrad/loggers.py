"""What a run reports: local files always, Weights & Biases and TensorBoard when they are on.

Local files in the run directory (docs/design.md, "What a run leaves behind"):

- ``metrics.jsonl``: one JSON object per finished epoch (``epoch``, ``step``,
  ``lr``, ``train/loss``, ``val/<metric>`` ..., ``test/<metric>`` ..., and
  timing fields under ``time/``);
- ``summary.json``: what a table needs (:class:`xgrad.records.Summary`, whose
  fields are its keys), rewritten at every epoch end (``status: running``) and
  when the run ends: ``completed``; ``failed`` with a ``reason``;
  ``interrupted`` (stopped by a signal after writing a checkpoint that the same
  command continues from) with a ``reason``.

Both are replaced atomically (:mod:`xgrad.atomic`), so a killed process never
leaves half a line that a table would read.

W&B: one run per training run, ``group = <data>-<model>-<optimizer>-seed<seed>``
(the baseline and every ``s`` of one setting side by side), ``job_type =
baseline | xgrad``, resumed under the same id when the training run resumes.
W&B can never take a training run down (:class:`WandbRun`): it never prompts,
its start and finish together never wait longer than ``logger.wandb.init_timeout``
(nor, at exit, for W&B's own analytics, which are off unless
``WANDB_ERROR_REPORTING`` says otherwise), it falls back to an offline run that
``wandb sync`` uploads later, and a failure after the start is logged once and
ends W&B logging, not training.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
import socket
import string
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from xgrad import atomic
from xgrad.messages import with_type
from xgrad.records import Identity, Summary, json_value

log = logging.getLogger(__name__)

#: the longest wait, in seconds, for a TCP connection to the W&B server before a run goes offline
REACH_TIMEOUT_S = 5.0


def _is_finite(value: Any) -> bool:
    """A real number that is not NaN or infinite (a diverged epoch never becomes "best")."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def wandb_base_url() -> str:
    """The W&B server that ``wandb.init`` talks to (its settings: ``WANDB_BASE_URL``, settings files, default)."""
    import wandb

    return wandb.setup().settings.base_url


def api_key_available(host: str | None = None) -> bool:
    """True when W&B can authenticate without asking: an API key in the environment or W&B's
    settings, an identity token file, or a netrc entry for the W&B host (default: :func:`wandb_base_url`'s)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import wandb

    if wandb.setup().settings.api_key:
        return True
    host = host or urlparse(wandb_base_url()).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def unreachable(url: str, timeout: float) -> str | None:
    """Why ``url``'s server (or its proxy) gives no HTTP answer within ``timeout`` s; None when it answers.

    Any answer counts, an error status included: the server is there. W&B
    retries a server that does not answer until its init timeout runs out,
    and a run that failed to start online is then flushed again when the
    process exits (about 20 s more, measured with a server that accepts
    connections and never answers). On a compute node without network this
    answers in milliseconds (the name does not resolve) instead. The request
    runs in a thread, so that a resolver that hangs cannot hold the run past
    ``timeout`` either.
    """
    parts = urlparse(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[str | None] = []

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:  # an answer, if not a welcome one
            outcome.append(None)
        except urllib.error.URLError as error:
            reason = error.reason
            if isinstance(reason, TimeoutError | socket.timeout):
                outcome.append(f"no answer from {host}:{port} within {timeout:g} s")
            else:
                outcome.append(f"cannot reach {host}:{port} ({getattr(reason, 'strerror', None) or reason})")
        except (OSError, ValueError) as error:  # a timeout while reading the answer, a malformed URL
            if isinstance(error, TimeoutError | socket.timeout):
                outcome.append(f"no answer from {host}:{port} within {timeout:g} s")
            else:
                outcome.append(f"cannot reach {host}:{port} ({getattr(error, 'strerror', None) or error})")

    probe = threading.Thread(target=ask, name="wandb-reachable", daemon=True)
    probe.start()
    probe.join(timeout)
    if not outcome:
        return f"no answer from {host}:{port} within {timeout:g} s"
    return outcome[0]


def new_run_id() -> str:
    """A fresh W&B run id from the OS's entropy.

    W&B's own ids come from Python's ``random``, which the run has just seeded:
    every job of a sweep with the same seed would get the same id and, resumed
    by id, land in one W&B run.
    """
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


#: the values of ``WANDB_MODE`` W&B accepts (wandb 0.2x; an empty one is taken as unset)
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")


def check_wandb_environment() -> None:
    """Refuse a ``WANDB_MODE`` W&B would fail on with a validation traceback; an empty one is removed (unset).

    Raises ValueError, one line.
    """
    if os.environ.get("WANDB_MODE") == "":
        del os.environ["WANDB_MODE"]
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_MODES:
        raise ValueError(f"WANDB_MODE={mode!r}: W&B accepts {', '.join(WANDB_MODES)}; set one of them, or unset it")


def wandb_mode(configured: str | None) -> str:
    """The configured mode, else ``$WANDB_MODE``, else online with an API key and offline without."""
    return configured or os.environ.get("WANDB_MODE") or ("online" if api_key_available() else "offline")


def write_refusal(run_dir: Path, identity: Identity, reason: str) -> None:
    """A ``failed`` summary.json for a sweep job refused before it trained (a bad value, missing data).

    Without it the sweep's table could only say "no summary.json". The caller
    makes sure the directory holds no run of its own (xgrad/run_dir.py).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    Summary(identity, status="failed", reason=reason).write(run_dir / "summary.json")


class WandbRun:
    """One W&B run; nothing it does can stop the training run.

    :meth:`start` never prompts for a key (online without one means offline),
    tries online only when the server answers HTTP (:func:`unreachable`), and
    waits at most ``init_timeout`` seconds in all for that answer, for W&B to
    start and log in and, at the end, to upload (:meth:`finish` gets what the
    start left). An online start that fails falls back to an offline run
    under a fresh id (W&B keeps the failed id in use within the process);
    ``wandb sync <run_dir>/wandb/offline-run-*`` uploads it later. Any W&B call
    that fails afterwards is logged once, and the run trains on without W&B:
    ``metrics.jsonl`` and ``summary.json`` hold everything.
    """

    def __init__(self, run: Any, group: str, job_type: str, deadline: float | None = None):
        self.run, self.group, self.job_type = run, group, job_type
        self.id = run.id
        # what is left of logger.wandb.init_timeout once the start is over: the most the finish may wait
        self.finish_budget_s = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        # validation and test curves against epochs; the training loss against optimizer steps
        self._call("defining its metrics", self._define_metrics)

    @classmethod
    def start(
        cls,
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
    ) -> WandbRun | None:
        """The W&B run of a training run (files in ``<run_dir>/wandb``), or None when W&B cannot start at all."""
        # W&B's own analytics post to the server when the process exits, waiting 10 s per post on one that
        # does not answer (wandb 0.2x, measured: 22 s after a failed online start): off, unless asked for
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        deadline = time.monotonic() + init_timeout  # every wait of W&B's, start and finish together
        mode = wandb_mode(mode)
        if mode == "online":
            url = wandb_base_url()
            offline_because = (
                None if api_key_available(urlparse(url).hostname) else f"no W&B API key for {url}"
            ) or unreachable(url, min(init_timeout, REACH_TIMEOUT_S))
            if offline_because:
                log.warning("W&B: %s; logging offline to %s (upload later with `wandb sync`)", offline_because, run_dir / "wandb")
                mode = "offline"
        left = max(deadline - time.monotonic(), 1.0)
        init = dict(
            project=project,
            entity=entity,
            group=group,
            job_type=job_type,
            name=name,
            tags=tags,
            config=config,
            resume="allow",  # the same id again (a resumed training run) continues that W&B run
            dir=str(run_dir),
            settings=wandb.Settings(init_timeout=left, login_timeout=left, finish_timeout=left, quiet=True),
        )
        try:
            return cls(wandb.init(mode=mode, id=run_id or new_run_id(), **init), group, job_type, deadline)
        except Exception as error:  # noqa: BLE001 -- any failure to start W&B
            if mode != "online":
                log.warning("W&B could not start (%s); training goes on without it", with_type(error))
                return None
            log.warning("W&B online start failed (%s); logging offline under a new run id instead", with_type(error))
        try:
            return cls(wandb.init(mode="offline", id=new_run_id(), **init), group, job_type, deadline)
        except Exception as error:  # noqa: BLE001
            log.warning("W&B could not start offline either (%s); training goes on without it", with_type(error))
            return None

    def _define_metrics(self) -> None:
        self.run.define_metric("epoch")
        self.run.define_metric("val/*", step_metric="epoch")
        self.run.define_metric("test/*", step_metric="epoch")
        self.run.define_metric("lr", step_metric="epoch")

    def _call(self, doing: str, function: Any, *args: Any, **kwargs: Any) -> None:
        """``function(*args, **kwargs)`` unless W&B has failed before; the first failure ends W&B logging."""
        if self.run is None:
            return
        try:
            function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 -- W&B never stops training
            log.warning(
                "W&B failed while %s (%s); training goes on without W&B, the run directory has every result",
                doing,
                with_type(error),
            )
            self.run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._call("logging", lambda: self.run.log(metrics, step=step))

    def log_images(self, files: dict[str, str], step: int) -> None:
        import wandb

        self._call("logging images", lambda: self.run.log({k: wandb.Image(v) for k, v in files.items()}, step=step))

    def set_summary(self, values: dict[str, Any]) -> None:
        self._call("updating the summary", lambda: self.run.summary.update(values))

    def finish(self, status: str) -> None:
        """End the W&B run: ``completed`` exits 0; ``interrupted`` marks it preempted first (it will resume).

        The finish waits at most what the start left of ``logger.wandb.init_timeout``
        (an offline run finishes at once); past that it is left to end in the
        background and the run goes on, saying so.
        """
        if status == "interrupted":
            self._call("marking the run preempted", lambda: self.run.mark_preempting())
        if self.run is None:
            return
        run, exit_code = self.run, 0 if status == "completed" else 1
        ended = threading.Event()

        def finish() -> None:
            self._call("finishing", lambda: run.finish(exit_code=exit_code))
            ended.set()

        if self.finish_budget_s is None:
            finish()
            return
        threading.Thread(target=finish, name="wandb-finish", daemon=True).start()
        if not ended.wait(max(self.finish_budget_s, 0.5)):
            log.warning("W&B did not finish within what logger.wandb.init_timeout left (%.1f s); it goes on in the "
                        "background, the run directory has every result", self.finish_budget_s)  # fmt: skip
            self.run = None


class TensorBoardRun:
    """TensorBoard event files of one run: every value W&B gets, against the optimizer step, and the hparams.

    ``train/loss`` is the loss read every ``log_every_n_steps`` steps; an
    epoch's mean training loss is ``train/epoch_loss``.

    The hparams (``cell``, ``arm``, ``seed``, data, model, optimizer, lr, s,
    experiment, scale) let TensorBoard's HParams view group a figure's runs
    by cell and arm, with the selected validation value and the test value at
    it (``summary/best_val``, ``summary/test``) as their metrics. A resumed run
    appends a new event file and drops the events logged after its
    checkpoint's step (``purge_step``), so no step is shown twice.
    """

    def __init__(self, log_dir: Path, hparams: dict[str, Any], resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # a resumed run keeps what was logged up to its checkpoint's step and drops what came after it
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1 if resume_step else None)
        for event in hparams_summary(hparams, {"summary/best_val": 0.0, "summary/test": 0.0}):
            self.writer.file_writer.add_summary(event)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Every finite number of ``metrics`` at ``step`` (the step itself is the x axis, not a value)."""
        for key, value in metrics.items():
            if key == "step":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def finish(self, summary: Summary, step: int) -> None:
        """The selected values as the hparams' metrics; the files flushed and closed."""
        self.log({"summary/best_val": summary.best, "summary/test": summary.test}, step)
        self.writer.close()


class RunLogger:
    """Writes the run directory's files and forwards everything to W&B and TensorBoard when they are on.

    ``identity`` is the summary's description of the run (task, model, data,
    optimizer, xgrad, steps, seed, metric, mode, ...); the outcome keys are
    added by :meth:`write_summary`. With ``writes=False`` (the ranks of a
    run but rank 0) it touches no file and no W&B run, and only returns the
    summaries it would have written.
    """

    def __init__(self, run_dir: Path, identity: Identity, wandb_run: WandbRun | None = None,
                 writes: bool = True, tensorboard: TensorBoardRun | None = None):  # fmt: skip
        self.run_dir = run_dir
        self.identity = identity
        self.wandb = wandb_run
        self.tensorboard = tensorboard
        self.writes = writes
        self._last_step = 0  # the optimizer step of the last values logged
        self._summary: Summary | None = None  # the last summary written
        self.metrics_file = run_dir / "metrics.jsonl"
        self.summary_file = run_dir / "summary.json"
        if writes:
            run_dir.mkdir(parents=True, exist_ok=True)

    def start(self, history: list[dict[str, Any]]) -> None:
        """Make ``metrics.jsonl`` hold exactly ``history`` (the epochs a resumed checkpoint has)."""
        self._write_metrics(history)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Per-step values (training loss): W&B and TensorBoard; the local file has one line per epoch."""
        self._last_step = step
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tensorboard is not None:
            self.tensorboard.log(metrics, step)

    def log_epoch(self, history: list[dict[str, Any]], files: dict[str, str]) -> None:
        """The epoch just finished is ``history[-1]``; ``files`` are a task's artefacts (images)."""
        self._write_metrics(history)
        record = history[-1]
        self._last_step = record["step"]
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
            if files:
                self.wandb.log_images(files, step=record["step"])
        if self.tensorboard is not None:  # the epoch's mean loss apart from the step reads' train/loss
            self.tensorboard.log({("train/epoch_loss" if k == "train/loss" else k): v for k, v in record.items()},
                                 record["step"])  # fmt: skip

    def _write_metrics(self, history: list[dict[str, Any]]) -> None:
        if not self.writes:
            return
        lines = "".join(json.dumps({k: json_value(v) for k, v in r.items()}) + "\n" for r in history)
        atomic.write_text(self.metrics_file, lines)

    def write_summary(
        self,
        history: list[dict[str, Any]],
        *,
        status: str,
        wall_time_s: float,
        reason: str | None = None,
    ) -> Summary:
        """Write ``summary.json`` from the epochs so far and return it (:class:`xgrad.records.Summary`).

        The validation split selects the epoch (``best_epoch``, the first with
        the best ``val/<metric>``); ``test`` and every ``test/<name>`` are read
        at that epoch. ``test_best``, the best test value over all epochs, is
        the optimizer papers' habit of reporting: the test set picks the epoch
        there, so it is kept for comparison only.
        """
        metric, mode = self.identity.metric, self.identity.mode
        pick = max if mode == "max" else min
        val_key, test_key = f"val/{metric}", f"test/{metric}"
        scored = [r for r in history if _is_finite(r.get(val_key))]
        selected = pick(scored, key=lambda r: r[val_key]) if scored else {}
        tests = [r[test_key] for r in history if _is_finite(r.get(test_key))]
        summary = Summary(
            identity=self.identity,
            best=selected.get(val_key),
            best_epoch=selected.get("epoch"),
            final=history[-1].get(val_key) if history else None,
            test=selected.get(test_key),
            test_best=pick(tests) if tests else None,
            test_final=history[-1].get(test_key) if history else None,
            tests={k: v for k, v in selected.items() if k.startswith("test/")},
            epochs=len(history),
            wall_time_s=wall_time_s,
            status=status,
            reason=reason,
        )
        if self.wandb is not None:
            summary.wandb_group, summary.wandb_job_type, summary.wandb_run_id = (
                self.wandb.group, self.wandb.job_type, self.wandb.id)  # fmt: skip
            # everything a table needs, so that `make_tables.py --wandb` reads what summary.json holds
            self.wandb.set_summary({k: v for k, v in summary.as_json().items() if not k.startswith("wandb_")})
        if self.writes:
            summary.write(self.summary_file)
        self._summary = summary
        return summary

    def finish(self, status: str) -> None:
        """End the W&B run, if any, as the run ended: ``completed``, ``failed`` or ``interrupted``; close
        TensorBoard's files."""
        if self.wandb is not None:
            self.wandb.finish(status)
        if self.tensorboard is not None:
            last = self._summary if self._summary is not None else Summary(self.identity, status)
            self.tensorboard.finish(last, self._last_step)
            self.tensorboard = None

"""W&B can never take a run down (xgrad/loggers.py, WandbRun): no prompt, bounded waits, a working offline fallback.

"No network" is made deterministic: the W&B host is a name under ``.invalid``
(which never resolves, RFC 2606), or a local socket that accepts connections
and never answers (a server that hangs). W&B reads its environment once per
process, so each test starts and ends with ``wandb.teardown()``.
"""

from __future__ import annotations

import logging
import socket
import time

import pytest

from conftest import at_step, summary

SMALL = ("data.batch_size=32", "data.eval_batch_size=100")
BOGUS_KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fresh_wandb(monkeypatch, tmp_path):
    """W&B set up anew from this test's environment; no key or netrc of the machine's."""
    import wandb

    wandb.teardown()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    yield monkeypatch
    wandb.teardown()


def first_step_time(monkeypatch) -> list[float]:
    """The time.monotonic() at which the first training step starts (the list's one item, once it has)."""
    times = []
    at_step(monkeypatch, 1, lambda: times.append(time.monotonic()))
    return times


def test_a_bogus_key_on_a_node_without_network_trains_at_once_offline(fresh_wandb, train_run, caplog):
    fresh_wandb.setenv("WANDB_API_KEY", BOGUS_KEY)
    fresh_wandb.setenv("WANDB_BASE_URL", "https://api.xgrad-test.invalid")
    times = first_step_time(fresh_wandb)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="xgrad.loggers"):
        run_dir = train_run("logger=wandb", *SMALL)
    assert times[0] - started < 30  # the bound: W&B used to wait 60 s here, then crash
    result = summary(run_dir)
    assert result["status"] == "completed" and result["wandb_run_id"]
    assert list((run_dir / "wandb").glob(f"offline-run-*-{result['wandb_run_id']}"))
    assert "cannot reach api.xgrad-test.invalid:443" in caplog.text


def test_a_server_that_never_answers_is_waited_for_init_timeout_then_an_offline_run_starts(fresh_wandb, train_run):
    """The online attempt times out; the offline run gets a fresh id (W&B keeps the first in use)."""
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(8)  # connections are accepted by the kernel, never answered
    fresh_wandb.setenv("WANDB_API_KEY", BOGUS_KEY)
    fresh_wandb.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{hanging.getsockname()[1]}")
    ids = iter(["online01", "offline2"])
    fresh_wandb.setattr("xgrad.loggers.new_run_id", lambda: next(ids))
    times = first_step_time(fresh_wandb)
    started = time.monotonic()
    try:
        run_dir = train_run("logger=wandb", "logger.init_timeout=3", *SMALL)
    finally:
        hanging.close()
    assert times[0] - started < 30
    result = summary(run_dir)
    assert (result["status"], result["wandb_run_id"]) == ("completed", "offline2")
    assert list((run_dir / "wandb").glob("offline-run-*-offline2"))


def test_online_without_a_key_never_prompts(fresh_wandb, train_run):
    import wandb

    fresh_wandb.setenv("WANDB_MODE", "online")
    modes, init = [], wandb.init

    def recording_init(*args, **kwargs):
        modes.append(kwargs.get("mode"))
        return init(*args, **kwargs)

    def no_login(*args, **kwargs):
        raise AssertionError("W&B's login (and its prompt) was reached")

    fresh_wandb.setattr(wandb, "init", recording_init)
    fresh_wandb.setattr("wandb.sdk.wandb_login._login", no_login)
    run_dir = train_run("logger=wandb", *SMALL)
    assert modes == ["offline"] and summary(run_dir)["status"] == "completed"


def test_a_wandb_failure_after_the_start_is_logged_once_and_training_goes_on(fresh_wandb, train_run, caplog):
    from wandb.sdk.wandb_run import Run

    fresh_wandb.setenv("WANDB_MODE", "offline")

    def broken_log(self, *args, **kwargs):
        raise RuntimeError("connection to the W&B service lost")

    fresh_wandb.setattr(Run, "log", broken_log)
    with caplog.at_level(logging.WARNING, logger="xgrad.loggers"):
        run_dir = train_run("logger=wandb", "trainer.epochs=2", "trainer.log_every_n_steps=1", *SMALL)
    assert caplog.text.count("W&B failed while logging (RuntimeError: connection to the W&B service lost)") == 1
    assert summary(run_dir)["status"] == "completed" and summary(run_dir)["epochs"] == 2
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2

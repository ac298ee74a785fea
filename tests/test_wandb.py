"""W&B can never take a run down (xgrad/loggers.py, WandbRun): no prompt, bounded waits, a working offline fallback.

"No network" is made deterministic: the W&B host is a name under ``.invalid``
(which never resolves, RFC 2606), or a local socket that accepts connections
and never answers (a server that hangs). W&B reads its environment once per
process, so each test starts and ends with ``wandb.teardown()``.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import subprocess
import sys
import threading
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


def test_a_server_that_accepts_and_never_answers_means_offline_at_once(fresh_wandb, train_run, caplog):
    """No HTTP answer within init_timeout (at most 5 s): no online attempt, which would hang at exit too."""
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(8)  # connections are accepted by the kernel, never answered
    port = hanging.getsockname()[1]
    fresh_wandb.setenv("WANDB_API_KEY", BOGUS_KEY)
    fresh_wandb.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    times = first_step_time(fresh_wandb)
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="xgrad.loggers"):
            run_dir = train_run("logger=wandb", "logger.wandb.init_timeout=2", *SMALL)
    finally:
        hanging.close()
    assert times[0] - started < 30
    assert f"no answer from 127.0.0.1:{port} within 2 s" in caplog.text
    result = summary(run_dir)
    assert result["status"] == "completed"
    assert list((run_dir / "wandb").glob(f"offline-run-*-{result['wandb_run_id']}"))


class _AnswersButHangsItsApi(http.server.BaseHTTPRequestHandler):
    """A W&B server that answers a plain request and never its API (GraphQL is a POST)."""

    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def do_POST(self):
        time.sleep(60)

    def log_message(self, *args):
        pass


@pytest.fixture
def half_answering_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnswersButHangsItsApi)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_api_that_never_answers_is_waited_for_init_timeout_then_an_offline_run_starts(
    fresh_wandb, train_run, half_answering_server
):
    """The online attempt times out; the offline run gets a fresh id (W&B keeps the first in use)."""
    fresh_wandb.setenv("WANDB_API_KEY", BOGUS_KEY)
    fresh_wandb.setenv("WANDB_BASE_URL", half_answering_server)
    ids = iter(["online01", "offline2"])
    fresh_wandb.setattr("xgrad.loggers.new_run_id", lambda: next(ids))
    times = first_step_time(fresh_wandb)
    started = time.monotonic()
    run_dir = train_run("logger=wandb", "logger.wandb.init_timeout=3", *SMALL)
    assert times[0] - started < 30
    result = summary(run_dir)
    assert (result["status"], result["wandb_run_id"]) == ("completed", "offline2")
    assert list((run_dir / "wandb").glob("offline-run-*-offline2"))


def test_the_process_does_not_wait_for_wandb_at_exit(half_answering_server, tmp_path):
    """Start (online fails), finish, exit: within init_timeout and the imports, not 12-22 s more for W&B's analytics."""
    code = (
        "import sys, time; from pathlib import Path; from xgrad.loggers import WandbRun; "
        "run = WandbRun.start(Path(sys.argv[1]), project='p', entity=None, mode='online', init_timeout=2.0, "
        "group='g', job_type='baseline', name='n', tags=[], config={}, run_id=None); "
        "run.finish('completed')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"WANDB_API_KEY": BOGUS_KEY, "WANDB_BASE_URL": half_answering_server, "HOME": str(tmp_path)}
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env=env, check=True, capture_output=True,
                   timeout=120)  # fmt: skip
    took = time.monotonic() - started
    assert took < 11, f"{took:.1f} s; measured: 4-5 s, and 16-18 s while W&B's analytics waited at exit"


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


def test_the_runs_of_one_comparison_share_a_cell_and_say_their_arm(fresh_wandb, train_run, monkeypatch):
    """W&B's "group by cell, then arm" gives baseline vs XGrad over seeds: the cell is shared by every seed and both
    arms, and by nothing that trains differently; summary.json carries the same cell."""
    import wandb

    configs = []
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda *a, **kw: configs.append(kw["config"]) or real_init(*a, **kw))
    fresh_wandb.setenv("WANDB_MODE", "offline")
    runs = [("xgrad=off", "seed=0"), ("xgrad=on", "seed=0"), ("xgrad=off", "seed=1"), ("xgrad=on", "seed=1"),
            ("xgrad=on", "xgrad.steps=2", "seed=1"), ("xgrad=off", "seed=0", "optimizer.lr=0.01"),
            ("xgrad=off", "seed=0", "trainer.grad_clip=1.0")]  # fmt: skip
    dirs = [train_run("logger=wandb", *overrides, *SMALL) for overrides in runs]
    cells, arms = [c["cell"] for c in configs], [c["arm"] for c in configs]
    assert arms == ["baseline", "xgrad", "baseline", "xgrad", "xgrad", "baseline", "baseline"]
    assert len(set(cells[:5])) == 1 and len(set(cells)) == 3  # another lr, clipping: other cells
    assert cells[0].startswith("fashion_mnist/lenet/adam/")
    assert [summary(d)["cell"] for d in dirs] == cells and [summary(d)["arm"] for d in dirs] == arms
    assert [c["seed"] for c in configs][:4] == [0, 0, 1, 1]  # the per-seed pairing is kept beside it

"""Stopped by a signal, a run checkpoints mid-epoch and its rerun continues the epoch exactly (xgrad/preemption.py).

Signals are sent to this process from inside a training step (os.kill to
itself), which reaches the handlers as SLURM's would; one test runs the real
entry point in a subprocess and stops it with SIGTERM. "Identical" means
metrics.jsonl without its timing fields, as for the resume tests of
test_engine.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from hydra.core.global_hydra import GlobalHydra

from conftest import (TEST_OVERRIDES, SimulatedCrash, at_step, count_steps, fail_at_step, start_into_epoch_two,
                      summary, untimed, wait_for_epoch_one)
from xgrad import checkpoint
from xgrad.preemption import PREEMPT_SIGNAL, Interrupted, StopSignals
from xgrad.tasks.classification import Classification
from xgrad.tasks.language_model import LanguageModelTask

SMALL = ("data.batch_size=32", "data.eval_batch_size=100")
#: three epochs of five batches, with everything a resume has to restore: momentum and prediction state,
#: a schedule that has stepped, augmentation drawn per batch
ARGS = ("optimizer=sgdm", "xgrad=on", "scheduler=multistep", "scheduler.milestones=[1]", "trainer.epochs=3",
        "trainer.limit_train_batches=5", "data.module.augment=true", *SMALL)  # fmt: skip


def send(signum: int):
    return lambda: os.kill(os.getpid(), signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_checkpoints_and_the_rerun_continues_that_epoch(train_run, monkeypatch, tmp_path, signum):
    whole = train_run(*ARGS)
    run_dir, handlers = tmp_path / "stopped", signal.getsignal(signum)
    with monkeypatch.context() as patch:
        at_step(patch, 7, send(signum))  # epoch 2, its second batch
        with pytest.raises(Interrupted, match=rf"^stopped by {signum.name} after batch 2 of 5 in epoch 2; the same"):
            train_run(*ARGS, f"hydra.run.dir={run_dir}")
    assert signal.getsignal(signum) == handlers  # put back when the run ended
    assert summary(run_dir)["status"] == "interrupted" and "after batch 2 of 5 in epoch 2" in summary(run_dir)["reason"]
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert (saved.epoch, saved.step, saved.position["batch"]) == (1, 7, 2)
    assert len(untimed(run_dir)) == 1

    steps = count_steps(monkeypatch)
    train_run(*ARGS, f"hydra.run.dir={run_dir}")
    assert untimed(run_dir) == untimed(whole)
    assert len(steps) == 15 - 7  # no batch trained twice
    assert summary(run_dir)["status"] == "completed" and summary(run_dir)["best"] == summary(whole)["best"]


def test_a_language_model_continues_mid_epoch_with_its_carried_state(train_run, monkeypatch, tmp_path):
    """The LSTM's hidden state flows from window to window: a mid-epoch checkpoint keeps it."""
    args = ("model=lstm1", "data=ptb", "model.net.emb_size=16", "model.net.hidden_size=16", "data.batch_size=4",
            "data.eval_batch_size=4", "data.bptt=8", "trainer.limit_train_batches=6", "trainer.epochs=2")  # fmt: skip
    whole = train_run(*args)
    run_dir = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        at_step(patch, 3, send(signal.SIGTERM), LanguageModelTask)
        with pytest.raises(Interrupted, match="after batch 3 of 6 in epoch 1"):
            train_run(*args, f"hydra.run.dir={run_dir}")
    train_run(*args, f"hydra.run.dir={run_dir}")
    assert untimed(run_dir) == untimed(whole)


def test_periodic_checkpoints_bound_what_a_crash_loses(train_run, monkeypatch, tmp_path):
    """With checkpoint_every_n_steps=2, a crash at step 8 loses one step (7), not the epoch."""
    args = (*ARGS, "trainer.checkpoint_every_n_steps=2")
    whole = train_run(*args)
    run_dir = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        fail_at_step(patch, 8, SimulatedCrash("step 8"))
        with pytest.raises(SimulatedCrash):
            train_run(*args, f"hydra.run.dir={run_dir}")
    assert summary(run_dir)["status"] == "failed"
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert (saved.step, saved.position["batch"]) == (6, 1)
    steps = count_steps(monkeypatch)
    train_run(*args, f"hydra.run.dir={run_dir}")
    assert untimed(run_dir) == untimed(whole) and len(steps) == 15 - 6


def test_a_signal_during_evaluation_keeps_the_epoch_trained(train_run, monkeypatch, tmp_path, caplog):
    whole = train_run(*ARGS)
    run_dir, evaluations, original = tmp_path / "stopped", [], Classification.evaluate

    def evaluate(self, model, batches):
        evaluations.append(1)
        if len(evaluations) == 3:  # epoch 2's validation
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, model, batches)

    with monkeypatch.context() as patch:
        patch.setattr(Classification, "evaluate", evaluate)
        with pytest.raises(Interrupted, match="while evaluating epoch 2"):
            train_run(*ARGS, f"hydra.run.dir={run_dir}")
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt").position["batch"] == 5
    steps = count_steps(monkeypatch)
    with caplog.at_level(logging.INFO, logger="xgrad.engine"):
        train_run(*ARGS, f"hydra.run.dir={run_dir}")
    assert untimed(run_dir) == untimed(whole) and len(steps) == 5  # only epoch 3 trains
    assert "resuming epoch 2 with its 5 training batches done: its evaluation is next" in caplog.text
    assert "batch 6 of 5" not in caplog.text


def test_submitits_preemption_handler_requeues_after_the_checkpoint(monkeypatch, tmp_path):
    """Under submitit, SIGUSR2's handler (installed before the job) requeues the job: it runs once the run is saved."""
    from xgrad.train import main

    run_dir, seen = tmp_path / "run", []

    def submitit_handler(signum, frame):  # what submitit's checkpoint_and_try_requeue leaves behind: an exit
        saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")
        seen.append((signum, summary(run_dir)["status"], saved.position["batch"]))
        sys.exit(-1)

    previous = signal.signal(PREEMPT_SIGNAL, submitit_handler)
    monkeypatch.setattr(sys, "argv", ["xgrad.train", *TEST_OVERRIDES, *ARGS, f"hydra.run.dir={run_dir}"])
    try:
        at_step(monkeypatch, 3, send(PREEMPT_SIGNAL))
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert signal.getsignal(PREEMPT_SIGNAL) is submitit_handler
    finally:
        signal.signal(PREEMPT_SIGNAL, previous)
        GlobalHydra.instance().clear()
    assert exit_info.value.code == -1 and seen == [(PREEMPT_SIGNAL, "interrupted", 3)]


def test_a_second_sigint_stops_at_once_a_second_sigterm_does_not():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs in the main thread at the next bytecode


def test_sigterm_to_the_command_line_run_exits_143_and_the_rerun_ends_identical(train_run, monkeypatch, tmp_path):
    """The real entry point stopped by SIGTERM in epoch 2: exit status 143, one line, then the same end as without."""
    args = ("optimizer=adam", "xgrad=on", "trainer.epochs=2", "trainer.limit_train_batches=400", *SMALL)
    run_dir = tmp_path / "stopped"
    process = start_into_epoch_two(*args, run_dir=run_dir, cwd=tmp_path)
    try:
        time.sleep(0.3)  # into epoch 2
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        process.kill()
    line = process.stderr.read().strip().splitlines()[-1]
    assert code == 143, line
    assert line.startswith("interrupted: stopped by SIGTERM after batch ") and line.endswith(
        " of 400 in epoch 2; the same command continues it")
    assert summary(run_dir)["status"] == "interrupted"
    done = checkpoint.load(run_dir / "checkpoints" / "last.pt").position["batch"]
    assert 0 < done < 400

    steps = count_steps(monkeypatch)
    train_run(*args, f"hydra.run.dir={run_dir}")
    assert len(steps) == 400 - done  # fewer batches than the epoch: none trained twice
    monkeypatch.undo()
    assert untimed(run_dir) == untimed(train_run(*args))
    assert summary(run_dir)["status"] == "completed"


def test_under_submitit_the_preemption_signal_requeues_the_job_and_it_resumes_mid_epoch(train_run, tmp_path):
    """The real chain, with submitit's local executor standing in for SLURM: SIGUSR2 to the job, submitit's
    handler requeues it (locally: exit code 144, and its controller starts the job again), the job resumes."""
    args = ("xgrad=on", "trainer.epochs=2", "trainer.limit_train_batches=600", *SMALL)
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "xgrad.train", "-m", "hydra/launcher=submitit_local", *TEST_OVERRIDES, *args,
               f"hydra.sweep.dir={sweep}"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = sweep / "0"
    try:
        wait_for_epoch_one(process, run_dir, timeout=180)
        time.sleep(0.3)
        job = int((run_dir / "run.lock").read_text().split()[1])  # "pid <pid> on <host> since ..."
        os.kill(job, PREEMPT_SIGNAL)
        assert process.wait(timeout=240) == 0, process.stderr.read()
    finally:
        process.kill()
    logs = "".join(path.read_text() for path in (sweep / ".submitit").glob("*/*_0_log.*"))
    assert "Requeued job" in logs and "resuming epoch 2 at batch " in (run_dir / "train.log").read_text()
    assert summary(run_dir)["status"] == "completed"
    assert untimed(run_dir) == untimed(train_run(*args))


def test_sigterm_to_a_parallel_sweep_stops_its_workers_each_checkpointing_and_the_rerun_resumes(tmp_path):
    """joblib's workers are the sweep's children: SIGTERM to the sweep reaches them (xgrad/launch_guards.py)."""
    import psutil

    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "xgrad.train", "-m", *TEST_OVERRIDES, "hydra/launcher=joblib",
               "hydra.launcher.n_jobs=2", "seed=0,1", "trainer.epochs=500", *SMALL, f"hydra.sweep.dir={sweep}"]  # fmt: skip
    for start in ("first", "rerun"):
        logs = {job: (sweep / str(job) / "train.log").read_text() if start == "rerun" else "" for job in (0, 1)}
        process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        workers = []
        try:
            deadline = time.monotonic() + 120
            while not all((sweep / str(job) / "train.log").is_file()
                          and (sweep / str(job) / "train.log").read_text() != logs[job]
                          and (sweep / str(job) / "summary.json").is_file()  # logged before its summary is written
                          and summary(sweep / str(job))["status"] == "running" for job in (0, 1)):  # fmt: skip
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
                time.sleep(0.05)
            workers = [child for child in psutil.Process(process.pid).children()
                       if "loky" in " ".join(child.cmdline()) and "resource_tracker" not in " ".join(child.cmdline())]
            assert len(workers) == 2
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 128 + signal.SIGTERM
            assert not [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        finally:  # a failed test leaves no worker training on
            with contextlib.suppress(psutil.NoSuchProcess):
                workers += psutil.Process(process.pid).children(recursive=True)
            process.kill()
            for worker in workers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.kill()
        for job in (0, 1):
            assert summary(sweep / str(job))["status"] == "interrupted"
            assert (sweep / str(job) / "checkpoints" / "last.pt").is_file()
    for job in (0, 1):  # the rerun was not refused "in use": it continued each job where the first start stopped
        assert "resuming epoch" in (sweep / str(job) / "train.log").read_text()

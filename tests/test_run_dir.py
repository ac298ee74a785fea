"""One run per directory (xgrad/run_dir.py): the lock, the run's record of its config, refusals that touch nothing.

Also the schedules a longer run may extend (none, multistep) and the ones it may
not (cosine, whose T_max follows trainer.epochs). The race of two processes
into one directory is the one test here that starts processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from conftest import TEST_OVERRIDES, SimulatedCrash, count_steps, fail_at_step, main_with, snapshot, summary, untimed
from xgrad.records import Identity
from xgrad.run_dir import RunDirectory, RunDirRefused, record_refusal

SMALL = ("data.batch_size=32", "data.eval_batch_size=100")


# ---------------------------------------------------------------- the lock


def test_a_run_into_a_locked_directory_is_refused_at_once_naming_the_holder(train_run, tmp_path):
    run_dir = tmp_path / "run"
    train_run(f"hydra.run.dir={run_dir}", *SMALL)
    before = snapshot(run_dir)
    with RunDirectory(run_dir):  # another run holds it (flock: a second open of the file conflicts, in-process too)
        with pytest.raises(RunDirRefused, match=rf"^{run_dir} is in use by another run \(pid {os.getpid()} on "):
            train_run(f"hydra.run.dir={run_dir}", *SMALL)
        assert {k: v for k, v in snapshot(run_dir).items() if k != "run.lock"} == {
            k: v for k, v in before.items() if k != "run.lock"
        }
    train_run(f"hydra.run.dir={run_dir}", *SMALL)  # released: the same command finds its run complete


def test_a_file_system_without_locks_warns_and_one_that_refuses_files_is_one_line(train_run, monkeypatch, tmp_path,
                                                                                     caplog):  # fmt: skip
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="xgrad.run_dir"):
        patch.setattr(fcntl, "flock", no_locks)
        run_dir = train_run(*SMALL)
    assert summary(run_dir)["status"] == "completed"
    assert "run.lock cannot be locked (No locks available): a second run into it would not be stopped" in caplog.text

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", refused)
    with pytest.raises(RunDirRefused, match=rf"^cannot use {tmp_path / 'ro'}: Permission denied \("):
        train_run(f"hydra.run.dir={tmp_path / 'ro'}", *SMALL)


def test_a_disk_too_full_for_the_lock_file_is_one_line_before_anything_is_written(train_run, monkeypatch, tmp_path):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    run_dir = tmp_path / "run"
    with pytest.raises(RunDirRefused, match=rf"^cannot use {run_dir}: No space left on device \({run_dir / 'run.lock'}\)$"):
        train_run(f"hydra.run.dir={run_dir}", *SMALL)
    assert [p.name for p in run_dir.iterdir()] == ["run.lock"]


def test_two_runs_started_together_into_one_directory_leave_one_run(tmp_path):
    """The issue's race: lr 0.001 and 0.01 into one hydra.run.dir, started together; one trains, one is refused."""
    run_dir = tmp_path / "shared"
    args = [*TEST_OVERRIDES, "trainer.limit_train_batches=300", *SMALL, f"hydra.run.dir={run_dir}"]
    processes = {
        lr: subprocess.Popen([sys.executable, "-m", "xgrad.train", *args, f"optimizer.lr={lr}"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for lr in (0.001, 0.01)
    }  # fmt: skip
    outcomes = {lr: (p.wait(timeout=300), p.stderr.read(), p.pid) for lr, p in processes.items()}
    assert sorted(code for code, _, _ in outcomes.values()) == [0, 2], outcomes
    [winner] = [lr for lr, (code, _, _) in outcomes.items() if code == 0]
    [(_, refusal, _)] = [o for lr, o in outcomes.items() if lr != winner]
    [line] = refusal.strip().splitlines()
    in_use = f"error: {run_dir} is in use by another run (pid {outcomes[winner][2]} on "
    assert line.startswith(in_use) or line.startswith(f"error: {run_dir} holds a run of a different config: "), line
    assert json.loads((run_dir / "run.json").read_text())["config"]["optimizer.lr"] == winner
    assert summary(run_dir)["status"] == "completed"
    log = (run_dir / "train.log").read_text()
    assert log.count("epoch 1/1:") == 1 and "resuming" not in log  # only the winner wrote to it


# ---------------------------------------------------------------- the record


def test_a_refused_start_leaves_every_file_byte_identical_whatever_files_remain(monkeypatch, tmp_path):
    """Through Hydra (which used to rewrite .hydra/ before any check): a different config never touches the run."""
    run_dir = tmp_path / "run"
    assert main_with(monkeypatch, f"hydra.run.dir={run_dir}", *SMALL) == 0
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "run.json", "train.log",
            "checkpoints/last.pt", "summary.json", "metrics.jsonl"} <= snapshot(run_dir).keys()  # fmt: skip
    before = snapshot(run_dir)
    assert main_with(monkeypatch, f"hydra.run.dir={run_dir}", "optimizer.lr=0.01", *SMALL) == 2
    assert snapshot(run_dir) == before
    (run_dir / "checkpoints" / "last.pt").unlink()  # a completed run whose checkpoints were cleaned up
    (run_dir / "checkpoints").rmdir()
    before = snapshot(run_dir)
    assert main_with(monkeypatch, f"hydra.run.dir={run_dir}", "optimizer.lr=0.01", *SMALL) == 2
    assert snapshot(run_dir) == before
    (run_dir / "run.json").unlink()  # not even its record: results of an unknown config
    before = snapshot(run_dir)
    assert main_with(monkeypatch, f"hydra.run.dir={run_dir}", *SMALL) == 2
    assert snapshot(run_dir) == before


def test_a_checkpoint_of_another_run_copied_in_is_refused_in_one_line_and_nothing_changes(monkeypatch, capsys,
                                                                                            tmp_path):
    """The issue's case: last.pt of a run at lr 0.01 copied into a run at the default lr (its run.json says 0.001)."""
    other, run_dir = tmp_path / "other", tmp_path / "run"
    longer = ("trainer.epochs=2", *SMALL)
    assert main_with(monkeypatch, f"hydra.run.dir={other}", "optimizer.lr=0.01", *SMALL) == 0
    assert main_with(monkeypatch, f"hydra.run.dir={run_dir}", *SMALL) == 0
    (run_dir / "checkpoints" / "last.pt").write_bytes((other / "checkpoints" / "last.pt").read_bytes())
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main_with(monkeypatch, f"hydra.run.dir={run_dir}", *longer) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {run_dir / 'checkpoints' / 'last.pt'} is not this run's: it was written by a run "
                           "of another config (optimizer.lr=0.01 there, 0.001 in run.json)"), line  # fmt: skip
    assert snapshot(run_dir) == before


def test_a_checkpoint_whose_weights_do_not_fit_the_model_is_one_line_and_nothing_changes(monkeypatch, capsys,
                                                                                         tmp_path):
    import torch

    run_dir = tmp_path / "run"
    assert main_with(monkeypatch, f"hydra.run.dir={run_dir}", *SMALL) == 0
    path = run_dir / "checkpoints" / "last.pt"
    good = torch.load(path, weights_only=True)
    cases = {
        "weights of another shape": ({"classifier.4.weight": torch.zeros(3, 84)},
                                     r"classifier\.4\.weight is \(3, 84\) there, \(10, 84\)"),
        "another model's weights": ({"encoder.weight": torch.zeros(1)}, r"it holds encoder\.weight, which this model"),
    }
    for change, pattern in cases.values():
        state = {**good, "model": {**good["model"], **change}}
        torch.save(state, path)
        before = snapshot(run_dir)
        capsys.readouterr()
        assert main_with(monkeypatch, f"hydra.run.dir={run_dir}", "trainer.epochs=2", *SMALL) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert re.search(pattern, line) and "cannot be resumed from" in line, line
        assert snapshot(run_dir) == before
    param = next(iter(good["optimizer"]["state"]))
    state = {**good, "optimizer": {**good["optimizer"], "state": {**good["optimizer"]["state"],
                                                                   param: {"exp_avg": torch.zeros(2, 2)}}}}  # fmt: skip
    torch.save(state, path)
    capsys.readouterr()
    assert main_with(monkeypatch, f"hydra.run.dir={run_dir}", "trainer.epochs=2", *SMALL) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "its optimizer's exp_avg is (2, 2) for a parameter of" in line, line


def test_a_completed_run_is_not_trained_again_with_or_without_its_checkpoint(train_run, monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    train_run(f"hydra.run.dir={run_dir}", *SMALL)
    (run_dir / "checkpoints" / "last.pt").unlink()
    before, steps = snapshot(run_dir), count_steps(monkeypatch)
    train_run(f"hydra.run.dir={run_dir}", *SMALL)
    assert steps == [] and snapshot(run_dir) == before
    with pytest.raises(RunDirRefused, match="holds a completed 1-epoch run whose checkpoints/last.pt is gone"):
        train_run(f"hydra.run.dir={run_dir}", "trainer.epochs=2", *SMALL)


def test_a_run_from_before_records_is_checked_against_its_checkpoint(train_run, tmp_path):
    run_dir = tmp_path / "run"
    train_run(f"hydra.run.dir={run_dir}", "trainer.limit_train_batches=3", *SMALL)
    (run_dir / "run.json").unlink()
    with pytest.raises(RunDirRefused, match=r"optimizer\.lr=0\.001 there, 0\.02 now"):
        train_run(f"hydra.run.dir={run_dir}", "trainer.limit_train_batches=3", "optimizer.lr=0.02", *SMALL)
    train_run(f"hydra.run.dir={run_dir}", "trainer.limit_train_batches=3", "trainer.epochs=2", *SMALL)
    assert summary(run_dir)["epochs"] == 2 and (run_dir / "run.json").is_file()


def test_a_sweep_refusal_is_recorded_only_where_no_run_lives(train_run, tmp_path):
    trained = train_run(f"hydra.run.dir={tmp_path / 'trained'}", *SMALL)
    before = snapshot(trained)
    record_refusal(trained, Identity(model="lenet"), "refused: something")
    assert snapshot(trained) == before  # another config's run: left alone
    busy = tmp_path / "busy"
    with RunDirectory(busy):
        record_refusal(busy, Identity(model="lenet"), "refused: something")
    assert not (busy / "summary.json").exists()  # a directory in use: left alone
    record_refusal(tmp_path / "fresh", Identity(model="lenet"), "refused: something")
    written = summary(tmp_path / "fresh")
    expected = {"model": "lenet", "best": None, "final": None, "epochs": 0, "status": "failed",
                "reason": "refused: something", "format": 1, "arm": "baseline"}  # fmt: skip
    assert {k: written[k] for k in expected} == expected
    assert all(v in (None, False, 0) for k, v in written.items() if k not in expected)  # nothing else is known
    train_run(f"hydra.run.dir={tmp_path / 'fresh'}", *SMALL)  # a refusal's summary is no run: the fixed job trains
    assert summary(tmp_path / "fresh")["status"] == "completed"


# ---------------------------------------------------------------- longer runs


@pytest.mark.parametrize("schedule", [(), ("scheduler=multistep", "scheduler.milestones=[2]")])
def test_raising_epochs_continues_a_schedule_that_does_not_depend_on_them(train_run, tmp_path, schedule):
    args = ("optimizer=sgdm", "trainer.limit_train_batches=3", *schedule, *SMALL)
    run_dir = tmp_path / "run"
    train_run(f"hydra.run.dir={run_dir}", "trainer.epochs=2", *args)
    assert summary(run_dir)["status"] == "completed"
    train_run(f"hydra.run.dir={run_dir}", "trainer.epochs=4", *args)
    assert untimed(run_dir) == untimed(train_run("trainer.epochs=4", *args))  # as if it had been a 4-epoch run
    assert summary(run_dir)["status"] == "completed" and summary(run_dir)["epochs"] == 4


@pytest.mark.parametrize(("epochs", "stop_at_step", "new_epochs"), [(2, None, 4), (4, 4, 3)])
def test_changing_epochs_of_a_cosine_run_is_refused_saying_why(train_run, monkeypatch, tmp_path, epochs, stop_at_step,
                                                                new_epochs):  # fmt: skip
    """Extended (2 → 4 after completing) or shortened (4 → 3 after one epoch): the rates so far were another schedule's."""
    args = ("optimizer=sgdm", "scheduler=cosine", "trainer.limit_train_batches=3", *SMALL)
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        if stop_at_step is not None:
            fail_at_step(patch, stop_at_step, SimulatedCrash(f"step {stop_at_step}"))
        with pytest.raises(SimulatedCrash) if stop_at_step is not None else contextlib.nullcontext():
            train_run(f"hydra.run.dir={run_dir}", f"trainer.epochs={epochs}", *args)
    before = snapshot(run_dir)
    with pytest.raises(RunDirRefused, match=rf"^trainer.epochs={new_epochs}: .* toward trainer.epochs={epochs} with a "
                       rf"schedule that depends on it \(scheduler.T_max={epochs} for {epochs} epochs, {new_epochs} for "
                       rf"{new_epochs}\)"):  # fmt: skip
        train_run(f"hydra.run.dir={run_dir}", f"trainer.epochs={new_epochs}", *args)
    assert snapshot(run_dir) == before
    train_run(f"hydra.run.dir={run_dir}", f"trainer.epochs={epochs}", *args)  # its own length: trains on, or is done
    assert summary(run_dir)["status"] == "completed"

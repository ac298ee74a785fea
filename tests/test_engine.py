"""The training engine end to end on Fashion-MNIST and LeNet, in this process.

Each run is one or a few epochs of two or three small batches (see
``conftest.TEST_OVERRIDES``): enough to take real optimizer steps with and
without prediction, checkpoint, resume and evaluate, in about a second.
"""

from __future__ import annotations

import json
import math
import signal
import struct
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from conftest import (CONF_DIR, TEST_OVERRIDES, SimulatedCrash, fail_at_step, main_with, metrics,
                      start_into_epoch_two, summary, untimed)
from xgrad import checkpoint
from xgrad.data.base import DatasetMissingError
from xgrad.engine import TrainingFailed
from xgrad.run_dir import RunDirRefused
from xgrad.train import ConfigError

#: small batches keep every run here around a second
SMALL = ("data.batch_size=32", "data.eval_batch_size=100")
OPTIMIZERS = sorted(p.stem for p in (CONF_DIR / "optimizer").glob("*.yaml"))


# ---------------------------------------------------------------- optimizers


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_two_steps_with_and_without_prediction(train_run, optimizer):
    base = train_run(f"optimizer={optimizer}", *SMALL)
    predicted = train_run(f"optimizer={optimizer}", "xgrad=on", *SMALL)
    for run_dir in (base, predicted):
        (line,) = metrics(run_dir)
        assert line["epoch"] == 1 and line["step"] == 2
        assert math.isfinite(line["train/loss"]) and 0 <= line["val/acc"] <= 100
        result = summary(run_dir)
        assert result["status"] == "completed" and result["optimizer"] == optimizer
        assert result["best"] == result["final"] == line["val/acc"]
        assert 0 <= result["test/acc"] <= 100 and result["test/acc5"] >= result["test/acc"]
        assert checkpoint.load(run_dir / "checkpoints" / "last.pt").epoch == 1
    assert (summary(base)["xgrad"], summary(base)["steps"]) == (False, 0)
    assert (summary(predicted)["xgrad"], summary(predicted)["steps"]) == (True, 1)
    # step 1 has no optimizer state (no prediction); step 2 takes its gradient at θ̂,
    # so its loss and the weights it leads to differ from the baseline's
    assert metrics(predicted)[0]["train/loss"] != metrics(base)[0]["train/loss"]
    assert metrics(predicted)[0]["val/loss"] != metrics(base)[0]["val/loss"]


def test_validation_picks_the_epoch_and_test_is_reported_there(tmp_path):
    """The test split never chooses: ``test`` is read at the epoch the validation metric selects."""
    from xgrad.loggers import RunLogger
    from xgrad.records import Identity

    curves = {"val/acc": [50.0, 71.0, 70.0, 71.0], "test/acc": [49.0, 68.0, 73.0, 69.0]}  # val peaks first at 2
    history = [{"epoch": e + 1, **{k: v[e] for k, v in curves.items()}} for e in range(4)]
    logger = RunLogger(tmp_path, Identity(metric="acc", mode="max"))
    logger.write_summary(history, status="completed", wall_time_s=1.0)
    result = summary(tmp_path)  # as the file holds it
    assert (result["best"], result["best_epoch"], result["test"], result["test/acc"]) == (71.0, 2, 68.0, 68.0)
    assert (result["test_best"], result["test_final"], result["final"]) == (73.0, 69.0, 71.0)
    RunLogger(tmp_path, Identity(metric="ppl", mode="min")).write_summary(
        [{"epoch": 1, "val/ppl": 90.0, "test/ppl": 80.0}, {"epoch": 2, "val/ppl": float("nan"), "test/ppl": 70.0},
         {"epoch": 3, "val/ppl": 85.0, "test/ppl": 75.0}], status="completed", wall_time_s=1.0)
    lower = summary(tmp_path)
    assert (lower["best_epoch"], lower["test"], lower["test_best"]) == (3, 75.0, 70.0)


def test_every_epoch_evaluates_both_splits_and_the_summary_says_what_data_was_read(train_run):
    run_dir = train_run("trainer.epochs=3", *SMALL)
    lines, result = metrics(run_dir), summary(run_dir)
    assert all({"val/acc", "test/acc", "test/loss"} <= line.keys() for line in lines)
    selected = lines[result["best_epoch"] - 1]
    assert selected["val/acc"] == max(line["val/acc"] for line in lines) == result["best"]
    assert result["test"] == selected["test/acc"]
    assert result["data_variant"] == "fashion_mnist"
    assert result["data_sizes"] == {"train": 55000, "val": 5000, "test": 10000, "unit": "images"}


def test_prediction_zero_steps_ahead_is_the_base_optimizer(train_run):
    args = ("optimizer=sgdm", "trainer.limit_train_batches=3", *SMALL)
    assert untimed(train_run(*args, "xgrad=on", "xgrad.steps=0")) == untimed(train_run(*args))


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_mixed_precision_and_channels_last_train(train_run, precision):
    """The GPU paths (autocast, gradient scaling, channels-last) also run on the CPU."""
    run_dir = train_run("xgrad=on", f"trainer.precision={precision}", "trainer.channels_last=true", *SMALL)
    assert summary(run_dir)["status"] == "completed" and math.isfinite(metrics(run_dir)[0]["train/loss"])


def test_gradient_clipping_bounds_the_update(train_run):
    """Clipped to a norm of 1e-12, SGD barely moves: the model evaluates as if the lr were 0."""
    args = ("optimizer=sgdm", "optimizer.weight_decay=0", *SMALL)
    clipped = metrics(train_run(*args, "trainer.grad_clip=1e-12"))[0]
    frozen = metrics(train_run(*args, "optimizer.lr=0"))[0]
    unclipped = metrics(train_run(*args))[0]
    assert clipped["val/loss"] == pytest.approx(frozen["val/loss"], abs=1e-6)
    assert unclipped["val/loss"] != pytest.approx(frozen["val/loss"], abs=1e-3)


# ---------------------------------------------------------------- determinism and resume


def test_the_same_command_twice_gives_the_same_metrics(train_run):
    args = ("xgrad=on", "trainer.epochs=2", "trainer.limit_train_batches=3", "data.module.augment=true", *SMALL)
    first, second = train_run(*args), train_run(*args)
    assert untimed(first) == untimed(second)
    assert all(line["time/epoch_s"] > 0 for line in metrics(first))
    assert untimed(train_run(*args, "seed=1")) != untimed(first)


def test_resume_after_an_interrupted_epoch_ends_like_an_uninterrupted_run(train_run, monkeypatch, tmp_path):
    args = (
        "optimizer=sgdm",
        "xgrad=on",
        "scheduler=multistep",
        "scheduler.milestones=[1]",
        "trainer.epochs=3",
        "trainer.limit_train_batches=3",
        "data.module.augment=true",
        *SMALL,
    )
    whole = train_run(*args)
    run_dir = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        fail_at_step(patch, 5, SimulatedCrash("stopped in epoch 2"))
        with pytest.raises(SimulatedCrash):
            train_run(*args, f"hydra.run.dir={run_dir}")
    assert summary(run_dir)["status"] == "failed" and "SimulatedCrash" in summary(run_dir)["reason"]
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt").epoch == 1
    assert len(metrics(run_dir)) == 1

    train_run(*args, f"hydra.run.dir={run_dir}")
    assert untimed(run_dir) == untimed(whole)
    assert [line["lr"] for line in metrics(run_dir)] == pytest.approx([0.1, 0.01, 0.01])
    resumed, uninterrupted = summary(run_dir), summary(whole)
    assert resumed["status"] == "completed"
    assert {k: resumed[k] for k in ("best", "final", "epochs", "test/acc")} == {
        k: uninterrupted[k] for k in ("best", "final", "epochs", "test/acc")
    }


def test_resume_after_sigkill_mid_epoch_ends_like_an_uninterrupted_run(train_run, tmp_path):
    """The one subprocess of this file: the real entry point, killed with SIGKILL in epoch 2."""
    args = ("optimizer=adam", "xgrad=on", "trainer.epochs=2", "trainer.limit_train_batches=400", *SMALL)
    run_dir = tmp_path / "killed"
    process = start_into_epoch_two(*args, run_dir=run_dir, cwd=tmp_path)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert summary(run_dir)["status"] == "running", "the process ended before it could be killed in epoch 2"
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt").epoch == 1

    train_run(*args, f"hydra.run.dir={run_dir}")
    assert untimed(run_dir) == untimed(train_run(*args))
    assert summary(run_dir)["status"] == "completed"


def test_checkpoint_round_trip_restores_every_generator(tmp_path):
    import random

    import numpy as np
    import torch

    path = tmp_path / "rng.pt"
    from xgrad.records import Checkpoint

    state = Checkpoint(model={}, optimizer={}, scaler={}, rng=checkpoint.rng_state(), epoch=0, step=0, history=[],
                       elapsed_s=0.0)  # fmt: skip
    checkpoint.save(state, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    checkpoint.set_rng_state(checkpoint.load(path).rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["rng.pt"]  # no temporary file left behind


# ---------------------------------------------------------------- W&B


BLOCK, HEADER = 32768, 7


def wandb_records(path: Path):
    """The protobuf records of an offline ``.wandb`` file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer too short for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:
            break
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_multirun_writes_one_offline_wandb_run_per_job(tmp_path, monkeypatch):
    from xgrad.train import main

    sweep = tmp_path / "sweep"
    argv = ["xgrad.train", "-m", "xgrad=off,on", *TEST_OVERRIDES, "logger=wandb", "trainer.log_every_n_steps=1"]
    monkeypatch.setattr(sys, "argv", [*argv, *SMALL, f"hydra.sweep.dir={sweep}"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    try:
        main()
    finally:
        GlobalHydra.instance().clear()

    for job, (job_type, steps) in zip(("0", "1"), (("baseline", 0), ("xgrad", 1)), strict=True):
        run_dir = sweep / job
        result = summary(run_dir)
        assert result["status"] == "completed"
        assert (result["wandb_group"], result["wandb_job_type"]) == ("fashion_mnist-lenet-adam-seed0", job_type)
        (log_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        records = list(wandb_records(log_file))
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.run_group, run.job_type, run.run_id) == (result["wandb_group"], job_type, result["wandb_run_id"])
        assert f"s={steps}" in run.tags
        histories = [r.history for r in records if r.WhichOneof("record_type") == "history"]
        logged = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in h.item} for h in histories]
        assert [h["train/loss"] for h in logged if "train/loss" in h and "epoch" not in h]  # per step
        (epoch,) = [h for h in logged if "val/acc" in h]
        assert epoch["val/acc"] == metrics(run_dir)[0]["val/acc"]
        summaries = [r.summary for r in records if r.WhichOneof("record_type") == "summary"]
        logged_summary = {i.key: json.loads(i.value_json) for s in summaries for i in s.update}
        for key in ("best", "status", "metric", "mode", "hardware", "epochs", "xgrad", "steps"):
            assert logged_summary[key] == result[key], key  # what make_tables.py --wandb reads
        (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
        assert exit_record.exit_code == 0
        # a resumed run continues the same W&B run
        assert checkpoint.load(run_dir / "checkpoints" / "last.pt").wandb_id == result["wandb_run_id"]


def test_a_refused_sweep_job_leaves_a_failed_summary_and_the_others_run(tmp_path, monkeypatch):
    from xgrad.report import load_runs, problems
    from xgrad.train import main

    sweep = tmp_path / "sweep"
    argv = ["xgrad.train", "-m", "xgrad=on", "xgrad.steps=-1,1", *TEST_OVERRIDES, *SMALL, f"hydra.sweep.dir={sweep}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the job's own error, not Hydra's SystemExit(1)
    with pytest.raises(ConfigError, match="xgrad.steps=-1"):
        try:
            main()
        finally:
            GlobalHydra.instance().clear()

    refused, trained = summary(sweep / "0"), summary(sweep / "1")
    assert trained["status"] == "completed"
    assert refused["status"] == "failed" and "xgrad.steps=-1" in refused["reason"]
    assert (refused["model"], refused["optimizer"], refused["seed"]) == (trained["model"], trained["optimizer"], 0)
    assert not (sweep / "0" / "metrics.jsonl").exists()
    [(run, why)] = problems(load_runs([sweep]))
    assert run.path == (sweep / "0").resolve() and why.startswith("failed: refused: xgrad.steps=-1")


def test_wandb_goes_offline_without_an_api_key_and_respects_wandb_mode(monkeypatch, tmp_path):
    from urllib.parse import urlparse

    from xgrad.loggers import wandb_base_url, wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(None) == "offline"
    host = urlparse(wandb_base_url()).hostname  # the server W&B talks to (its default differs between versions)
    (tmp_path / ".netrc").write_text(f"machine {host} login user password k3y\n")
    (tmp_path / ".netrc").chmod(0o600)  # Python refuses a netrc with a password that others can read
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"
    assert wandb_mode("offline") == "offline"  # logger.wandb.mode in the config wins


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("xgrad.steps=-1", "xgrad.steps=-1"),
        ("xgrad.steps=1.5", "xgrad.steps=1.5"),
        ("xgrad.steps=two", "xgrad.steps='two'"),
        ("trainer.epochs=0", "trainer.epochs=0"),
        ("model.input=text", "model.input=text .*data.modality=image"),
        ("trainer.precision=8", "trainer.precision=8"),
        ("trainer.device=tpu", "trainer.device='tpu'"),
        ("trainer.num_threads=0", "trainer.num_threads=0"),
    ],
)
def test_a_bad_value_is_refused_by_name_before_anything_is_written(train_run, tmp_path, override, message):
    run_dir = tmp_path / "bad"
    with pytest.raises(ConfigError, match=message):
        train_run("xgrad=on", override, f"hydra.run.dir={run_dir}")
    assert not (run_dir / "summary.json").exists() and not (run_dir / "metrics.jsonl").exists()


def test_num_threads_sets_torch_threads_and_the_summary_says_so(train_run):
    before = torch.get_num_threads()
    try:
        run_dir = train_run("trainer.num_threads=2", *SMALL)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert summary(run_dir)["hardware"].endswith(", 2 threads")


def test_missing_data_says_where_it_looked_and_how_to_fetch_it(train_run, tmp_path):
    empty = tmp_path / "no-data"
    with pytest.raises(DatasetMissingError, match=f"{empty}.*prepare_data.py fashion_mnist --root {empty}"):
        train_run(f"data.root={empty}", f"hydra.run.dir={tmp_path / 'run'}")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_resuming_with_another_config_is_refused(train_run, tmp_path):
    run_dir = tmp_path / "run"
    train_run(f"hydra.run.dir={run_dir}", *SMALL)
    with pytest.raises(RunDirRefused, match=r"optimizer\.lr=0\.001 there, 0\.01 now"):
        train_run(f"hydra.run.dir={run_dir}", "optimizer.lr=0.01", *SMALL)
    assert summary(run_dir)["status"] == "completed"  # the earlier run's result is left alone


@pytest.mark.parametrize(("every", "steps"), [(10, "steps 1-2"), (1, "step 2")])
def test_a_non_finite_loss_fails_the_run_naming_the_steps_read(train_run, monkeypatch, tmp_path, every, steps):
    """The loss is read every log_every_n_steps steps and at the epoch's end: the failure names the steps since
    the last read (with reads after every step, the very step)."""
    fail_at_step(monkeypatch, 2)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingFailed, match=rf"non-finite training loss \(nan\) at {steps} \(epoch 1;"):
        train_run(f"hydra.run.dir={run_dir}", f"trainer.log_every_n_steps={every}", *SMALL)
    result = summary(run_dir)
    assert result["status"] == "failed" and steps in result["reason"]
    assert not (run_dir / "checkpoints" / "last.pt").exists()


def test_the_command_line_exits_nonzero_with_one_line(monkeypatch, capsys, tmp_path):
    assert main_with(monkeypatch, "trainer.epochs=0", f"hydra.run.dir={tmp_path}") == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: trainer.epochs=0: must be an integer >= 1"]

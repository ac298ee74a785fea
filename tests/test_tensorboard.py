"""``logger=tensorboard`` (xgrad/loggers.py, TensorBoardRun): event files per run that TensorBoard itself reads back,
through its event reader and through a TensorBoard server's HTTP API, with a sweep's runs side by side."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from conftest import SimulatedCrash, fail_at_step, metrics, summary

SMALL = ("data.batch_size=32", "data.eval_batch_size=100", "trainer.limit_train_batches=12")


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``log_dir``'s event files, as TensorBoard's own reader gives it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def hparams(log_dir) -> dict:
    """The hparams TensorBoard's HParams view shows for the run in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(log_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind")) for key, value in start.hparams.items()}


def test_every_epoch_and_the_training_loss_are_in_the_event_files_with_the_runs_hparams(train_run):
    run_dir = train_run("logger=tensorboard", "trainer.epochs=2", "xgrad=on", "seed=3", *SMALL)
    series, lines = scalars(run_dir / "tensorboard"), metrics(run_dir)
    for tag, key in (("val/acc",) * 2, ("val/loss",) * 2, ("test/acc",) * 2, ("lr",) * 2,
                     ("train/epoch_loss", "train/loss")):  # fmt: skip
        assert series[tag] == [(line["step"], pytest.approx(line[key], rel=1e-6)) for line in lines], tag
    assert [s for s, _ in series["train/loss"]] == [10, 20]  # read every log_every_n_steps (10) of the 24 steps
    done = summary(run_dir)
    assert series["summary/best_val"] == [(lines[-1]["step"], pytest.approx(done["best"]))]
    assert series["summary/test"][0][1] == pytest.approx(done["test"])
    shown = hparams(run_dir / "tensorboard")
    assert (shown["cell"], shown["arm"], shown["seed"], shown["s"]) == (done["cell"], "xgrad", 3, 1)
    assert shown["optimizer"] == "adam" and shown["lr"] == pytest.approx(1e-3)


def test_a_resumed_run_shows_each_step_once(train_run, tmp_path):
    run_dir = tmp_path / "run"
    train_run("logger=tensorboard", f"hydra.run.dir={run_dir}", *SMALL)
    train_run("logger=tensorboard", f"hydra.run.dir={run_dir}", "trainer.epochs=3", *SMALL)
    series, lines = scalars(run_dir / "tensorboard"), metrics(run_dir)
    assert series["val/acc"] == [(line["step"], pytest.approx(line["val/acc"])) for line in lines]
    steps = [s for s, _ in series["train/loss"]]
    assert steps == sorted(set(steps))


def test_a_run_resumed_after_a_crash_drops_what_it_logged_after_its_checkpoint(train_run, tmp_path, monkeypatch):
    """Epoch 1's checkpoint is at step 12; the crash at step 22 comes after the loss read at step 20, which the
    resumed run logs again: TensorBoard shows it once (the first file's step 20 is purged)."""
    run_dir = tmp_path / "run"
    fail_at_step(monkeypatch, 22, SimulatedCrash("killed"))
    with pytest.raises(SimulatedCrash):
        train_run("logger=tensorboard", f"hydra.run.dir={run_dir}", "trainer.epochs=2", *SMALL)
    assert [s for s, _ in scalars(run_dir / "tensorboard")["train/loss"]] == [10, 20]  # 20: after the checkpoint
    train_run("logger=tensorboard", f"hydra.run.dir={run_dir}", "trainer.epochs=2", *SMALL)
    series, lines = scalars(run_dir / "tensorboard"), metrics(run_dir)
    assert [s for s, _ in series["train/loss"]] == [10, 20]
    assert series["val/acc"] == [(line["step"], pytest.approx(line["val/acc"])) for line in lines]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(port: int, path: str, **query: str):
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read())


def test_tensorboard_serves_both_arms_of_a_sweep_side_by_side(train_run, tmp_path):
    """``tensorboard --logdir <sweep dir>``: one run per run directory, named by its folder, each arm's curve."""
    sweep = tmp_path / "multirun"
    dirs = {arm: train_run("logger=tensorboard", f"xgrad={arm}", f"hydra.run.dir='{sweep / f'xgrad={arm}'}'", *SMALL)
            for arm in ("off", "on")}  # fmt: skip
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep), "--host", "127.0.0.1",
                               "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline, runs = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            try:
                runs = _get(port, "/data/runs")
            except OSError:
                runs = []
            if {"xgrad=off/tensorboard", "xgrad=on/tensorboard"} <= set(runs):
                break
            time.sleep(0.5)
        assert {"xgrad=off/tensorboard", "xgrad=on/tensorboard"} <= set(runs)
        for arm, run_dir in dirs.items():
            served = _get(port, "/data/plugin/scalars/scalars", run=f"xgrad={arm}/tensorboard", tag="val/acc")
            assert [(step, value) for _, step, value in served] == [
                (line["step"], pytest.approx(line["val/acc"])) for line in metrics(run_dir)]  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)

"""Files that fail cleanly: damaged checkpoints refused in one line, writes that fail leaving the last good
checkpoint, temporary files of killed writes removed, CIFAR pickles read without running their code."""

from __future__ import annotations

import errno
import io
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import main_with, snapshot, summary, write_cifar
from xgrad import atomic, checkpoint
from xgrad.checkpoint import UnreadableCheckpoint
from xgrad.run_dir import RunDirRefused
from xgrad.schema import ConfigError

SMALL = ("data.batch_size=32", "data.eval_batch_size=100")


class Planted:
    """What a hostile file holds: an object whose unpickling runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def damage(path: Path, how: str, tmp_path: Path) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(os.urandom(len(data)))
    elif how == "objects":  # loads only with weights_only=False, which would run the command
        torch.save({"model": Planted(tmp_path / "ran")}, path)
    elif how == "not-a-checkpoint":
        torch.save({"weights": torch.zeros(2)}, path)
    elif how == "engine-only":  # the engine's state without the entry point's config and W&B id
        state = torch.load(path, weights_only=True)
        torch.save({k: v for k, v in state.items() if k not in ("config", "wandb_id")}, path)


@pytest.mark.parametrize("how", ["truncated", "empty", "random", "objects", "not-a-checkpoint", "engine-only"])
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_it(train_run, tmp_path, how):
    run_dir = tmp_path / "run"
    train_run(f"hydra.run.dir={run_dir}", "trainer.epochs=1", *SMALL)
    last = run_dir / "checkpoints" / "last.pt"
    damage(last, how, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(UnreadableCheckpoint) as refused:
        train_run(f"hydra.run.dir={run_dir}", "trainer.epochs=2", *SMALL)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{last} cannot be resumed from (")
    assert f"move it away (mv {last} {last}.bad)" in message and "weights_only=False" not in message
    assert not (tmp_path / "ran").exists() and snapshot(run_dir) == before


def test_the_command_line_refuses_a_damaged_checkpoint_with_exit_status_2(train_run, monkeypatch, capsys, tmp_path):
    run_dir = tmp_path / "run"
    train_run(f"hydra.run.dir={run_dir}", *SMALL)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 half a zip")
    capsys.readouterr()  # what the first run printed (logging handlers an earlier in-process Hydra run left behind)
    assert main_with(monkeypatch, "trainer.epochs=2", *SMALL, f"hydra.run.dir={run_dir}") == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {run_dir / 'checkpoints' / 'last.pt'} cannot be resumed from (")


def test_temporary_files_of_a_killed_write_are_removed_at_start_and_nothing_else(train_run, tmp_path):
    run_dir = tmp_path / "run"
    train_run(f"hydra.run.dir={run_dir}", *SMALL)
    stale = [run_dir / "checkpoints" / f".last.pt.k2j3h4{atomic.SUFFIX}", run_dir / f".summary.json.x8e1q0{atomic.SUFFIX}"]
    users = [run_dir / "thesis.draft.tmp", run_dir / "summary.json.x8e1q0.tmp", run_dir / "checkpoints" / "notes.tmp"]
    for path in stale + users:
        path.write_bytes(b"half")
    with pytest.raises(RunDirRefused):  # a refused start (another config) touches nothing, not even these
        train_run(f"hydra.run.dir={run_dir}", "optimizer.lr=0.5", *SMALL)
    assert all(path.exists() for path in stale + users)
    train_run(f"hydra.run.dir={run_dir}", "trainer.epochs=2", *SMALL)
    assert not any(path.exists() for path in stale)
    assert all(path.read_bytes() == b"half" for path in users), "files the suite did not write are the user's"
    assert not list(run_dir.rglob(f"*{atomic.SUFFIX}"))


def _torch_on_a_full_disk():
    """What torch.save raises when the disk fills (measured on a 300 kB tmpfs): its zip writer's
    RuntimeError, the OSError only in its context."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 214336 vs 214228")  # noqa: B904


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   PermissionError(errno.EACCES, "Permission denied"),
                                   "torch-on-a-full-disk"])  # fmt: skip
def test_a_checkpoint_that_cannot_be_written_fails_in_one_line_and_keeps_the_last_one(
    train_run, monkeypatch, tmp_path, error
):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    saves, save = [], torch.save

    def failing_save(state, f):  # the second epoch's checkpoint: half written, then the disk refuses
        saves.append(1)
        if len(saves) == 2:
            f.write(b"half a checkpoint")
            if error == "torch-on-a-full-disk":
                _torch_on_a_full_disk()
            raise error
        save(state, f)

    if error == "torch-on-a-full-disk":
        error = OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(atomic.WriteFailed) as failed:
        train_run(f"hydra.run.dir={run_dir}", "trainer.epochs=2", *SMALL)
    assert str(failed.value) == (f"cannot write {last}: {error.strerror} "
                                 "(the previous version of the file, if any, is intact)")  # fmt: skip
    assert checkpoint.load(last).epoch == 1  # epoch 1's, whole
    assert not list(run_dir.rglob(f"*{atomic.SUFFIX}"))
    result = summary(run_dir)
    assert result["status"] == "failed" and str(last) in result["reason"]


def test_a_folder_that_refuses_files_fails_in_one_line(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(atomic.WriteFailed, match=f"^cannot write {tmp_path / 'summary.json'}: Permission denied"):
        atomic.write_text(tmp_path / "summary.json", "{}")


# ---------------------------------------------------------------- CIFAR pickles


def test_a_planted_cifar_file_is_refused_without_running_its_code(train_run, tmp_path):
    root = tmp_path / "data"
    write_cifar(root, "cifar10", per_file=4)
    marker = tmp_path / "ran"
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(Planted(marker), protocol=2))
    with pytest.raises(ConfigError, match=r"^xgrad.data.cifar.CIFAR: .*data_batch_3 is not a CIFAR batch file: it "
                                          r"names posix.system, which a CIFAR batch file never holds$"):  # fmt: skip
        train_run("data=cifar10", f"data.root={root}", "data.module.val_size=4", f"hydra.run.dir={tmp_path / 'run'}")
    assert not marker.exists()


def test_cifar_files_pickled_by_numpy_1_and_numpy_2_both_load(tmp_path):
    """The original files name numpy.core.multiarray (numpy 1, Python 2); numpy 2 writes numpy._core."""
    from xgrad.data import cifar

    written = write_cifar(tmp_path, "cifar10", per_file=3)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    numpy1 = path.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert numpy1 != path.read_bytes()
    for data in (path.read_bytes(), numpy1):
        path.write_bytes(data)
        images, labels = cifar.read_batch(path, b"labels", 10)
        assert (images == written["test_batch"][0]).all() and (labels == written["test_batch"][1]).all()
    assert pickle.load(io.BytesIO(numpy1), encoding="bytes")[b"data"].shape == (3, 3072)


def test_a_full_disk_on_the_command_line_is_one_line(monkeypatch, tmp_path, capsys):
    """As a user sees it: one line on stderr naming the checkpoint, exit status 1 (not two tracebacks)."""
    run_dir, save, saves = tmp_path / "run", torch.save, []

    def full_disk_at_the_second_checkpoint(state, f):
        saves.append(1)
        if len(saves) == 2:
            _torch_on_a_full_disk()
        save(state, f)

    monkeypatch.setattr(torch, "save", full_disk_at_the_second_checkpoint)
    capsys.readouterr()
    assert main_with(monkeypatch, "trainer.epochs=2", *SMALL, f"hydra.run.dir={run_dir}") == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: cannot write {run_dir / 'checkpoints' / 'last.pt'}: No space left on device "
                    "(the previous version of the file, if any, is intact)")  # fmt: skip

"""The run directory's records (xgrad/records.py): written with a format version, read back whole; an older record
(no version) is read as it is, a newer one refused in one line naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import metrics, snapshot, summary
from xgrad import checkpoint
from xgrad.records import FORMAT, RecordError, Summary

SMALL = ("data.batch_size=32", "data.eval_batch_size=100")


def _unversioned(run_dir):
    """Rewrite the run's three records as they were written before formats were numbered: no ``format`` key."""
    for name in ("run.json", "summary.json"):
        path = run_dir / name
        data = json.loads(path.read_text())
        assert data.pop("format") == FORMAT
        path.write_text(json.dumps(data, indent=2) + "\n")
    last = run_dir / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state.pop("format") == FORMAT
    torch.save(state, last)


def test_every_record_carries_the_format_and_reads_back_as_written(train_run):
    run_dir = train_run(*SMALL)
    written = summary(run_dir)
    assert written["format"] == json.loads((run_dir / "run.json").read_text())["format"] == FORMAT
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["format"] == FORMAT
    read = Summary.read(run_dir / "summary.json").as_json()
    assert read == {k: v for k, v in written.items() if k != "format"}  # every key, none added or changed
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt").history == metrics(run_dir)


def test_a_run_written_before_formats_were_numbered_resumes_and_is_complete(train_run, tmp_path):
    run_dir = tmp_path / "run"
    train_run(f"hydra.run.dir={run_dir}", *SMALL)
    _unversioned(run_dir)
    before = snapshot(run_dir)
    train_run(f"hydra.run.dir={run_dir}", *SMALL)  # complete: nothing to train, nothing written
    assert snapshot(run_dir) == before
    train_run(f"hydra.run.dir={run_dir}", "trainer.epochs=2", *SMALL)  # trains on from its checkpoint
    assert [line["epoch"] for line in metrics(run_dir)] == [1, 2] and summary(run_dir)["format"] == FORMAT


@pytest.mark.parametrize("record", ["run.json", "summary.json", "checkpoints/last.pt"])
def test_a_record_of_a_newer_format_is_refused_in_one_line_naming_it(train_run, tmp_path, record):
    from xgrad.checkpoint import UnreadableCheckpoint
    from xgrad.run_dir import RunDirRefused

    run_dir = tmp_path / "run"
    train_run(f"hydra.run.dir={run_dir}", *SMALL)
    path = run_dir / record
    if record.endswith(".pt"):
        state = torch.load(path, weights_only=True)
        torch.save({**state, "format": FORMAT + 1}, path)
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), "format": FORMAT + 1}))
    before = snapshot(run_dir)
    with pytest.raises((RunDirRefused, UnreadableCheckpoint)) as refused:
        train_run(f"hydra.run.dir={run_dir}", "trainer.epochs=2", *SMALL)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and f"format {FORMAT + 1}" in message
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("bad", [{"format": "1"}, {"format": True}, {"format": -1}, {"seed": True}, {"epochs": "3"}])
def test_a_summary_of_an_unknown_format_or_a_mistyped_identity_is_one_line(bad):
    with pytest.raises(RecordError, match=r"^summary\.json holds [^\n]*$"):
        Summary.from_json({"status": "completed", "model": "lenet", **bad}, "summary.json")

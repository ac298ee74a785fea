"""scripts/keep_runs.py: a sweep's completed runs, committed without checkpoints, are skipped on a fresh clone."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import main_with
from test_reports import _script, write_run

keep_runs = _script("keep_runs")


def git(*args: str, cwd) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip


def test_completed_runs_kept_in_git_are_not_trained_again_on_a_clone(tmp_path, monkeypatch):
    repo, clone = tmp_path / "repo", tmp_path / "clone"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    (repo / ".gitignore").write_text("multirun/\n*.pt\n")  # as this project's: sweeps and checkpoints untracked
    monkeypatch.chdir(repo)
    sweep = ["-m", "optimizer=adam,sgdm", "data.batch_size=32", "trainer.limit_val_batches=1", "hydra.sweep.dir=multirun/s"]
    assert main_with(monkeypatch, *sweep) == 0
    done, cut = repo / "multirun/s/0", repo / "multirun/s/1"
    assert (done / "checkpoints" / "last.pt").is_file()
    (cut / "summary.json").unlink()  # job #1 stopped before its end

    keep_runs.main(["multirun/s"])
    git("commit", "-qm", "runs", cwd=repo)
    tracked = set(git("ls-files", cwd=repo).split())
    assert {"multirun/s/multirun.yaml", "multirun/s/0/summary.json", "multirun/s/0/run.json",
            "multirun/s/0/metrics.jsonl", "multirun/s/0/.hydra/overrides.yaml"} <= tracked  # fmt: skip
    assert not any(path.startswith("multirun/s/1/") or path.endswith((".pt", ".lock")) for path in tracked), tracked

    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    monkeypatch.chdir(clone)
    metrics = (clone / "multirun/s/0/metrics.jsonl").read_bytes()
    assert main_with(monkeypatch, *sweep) == 0  # the same command, on the clone
    assert (clone / "multirun/s/0/metrics.jsonl").read_bytes() == metrics  # kept: not trained again
    assert not (clone / "multirun/s/0/checkpoints").exists()
    assert json.loads((clone / "multirun/s/1/summary.json").read_text())["status"] == "completed"  # trained


def test_a_folder_that_is_not_a_sweep_is_refused_before_anything_is_staged(tmp_path, monkeypatch, capsys):
    git("init", "-q", cwd=tmp_path)
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        keep_runs.main(["a"])
    assert refused.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.endswith("a: not a sweep directory (no multirun.yaml)")
    assert git("status", "--porcelain", cwd=tmp_path) == ""


def test_run_folders_named_with_brackets_stage_only_their_own_files(tmp_path, monkeypatch):
    """``x=[1,2]`` read as a git glob would also match the folder ``x=1``, a run that did not complete."""
    git("init", "-q", cwd=tmp_path)
    sweep = tmp_path / "multirun" / "s"
    write_run(sweep / "x=[1,2]", seed=0)
    write_run(sweep / "x=1", seed=1, status="failed", reason="OSError: disk full")
    (sweep / "multirun.yaml").write_text("a: 1\n")  # not Hydra's: its jobs are not listed, the runs still are
    monkeypatch.chdir(tmp_path)
    keep_runs.main(["multirun/s"])
    staged = git("diff", "--cached", "--name-only", cwd=tmp_path).split()
    assert "multirun/s/x=[1,2]/summary.json" in staged
    assert not any(path.startswith("multirun/s/x=1/") for path in staged), staged

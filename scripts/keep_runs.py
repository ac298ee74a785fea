"""Stage a sweep's completed runs in git, so that the same sweep command on a fresh clone skips them.

    python scripts/keep_runs.py multirun/converged_lstm/converged
    git commit -m "converged_lstm: the runs that have completed"

A long study (experiments/converged_*.yaml) may outlast the machine it runs
on, and ``multirun/`` is not tracked. A completed run needs no checkpoint to be
skipped by a rerun of its sweep (xgrad/run_dir.py: its record and summary say
it is done), so its record files alone are staged (``git add -f``): summary.json,
run.json, metrics.jsonl, train.log and ``.hydra/``, and the sweep's own
``multirun.yaml``. Checkpoints, locks and the runs that did not complete are
left out; those train again from their start on the clone. The pages are then
rebuilt from the runs kept and those that land later.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from xgrad.report import load_runs

#: a completed run's files that a rerun and the reports read (xgrad/run_dir.py, xgrad/report/readers.py)
RECORDS = ("summary.json", "run.json", "metrics.jsonl", "train.log", ".hydra/config.yaml", ".hydra/hydra.yaml",
           ".hydra/overrides.yaml")  # fmt: skip


def main(argv: list[str] | None = None) -> list[Path]:
    """Stage the records of every completed run under the sweep directories given; return the files staged."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep directories (multirun/<experiment>/<scale>)")
    args = parser.parse_args(argv)
    for sweep in args.sweeps:
        if not (sweep / "multirun.yaml").is_file():
            parser.error(f"{sweep}: not a sweep directory (no multirun.yaml)")
    files, kept, left = [], 0, 0
    for sweep in args.sweeps:
        files.append(sweep / "multirun.yaml")
        for run in load_runs([sweep]):
            if run.status != "completed" or not (run.path / "summary.json").is_file():
                left += run.path != sweep.resolve()  # a job that never started has no folder to leave out
                continue
            kept += 1
            files += [run.path / name for name in RECORDS if (run.path / name).is_file()]
    # literal paths: run folders may be named with [ ] (tuned.grid=[...]), which git would read as a glob
    staged = subprocess.run(["git", "--literal-pathspecs", "add", "-f", "--", *map(str, files)], capture_output=True,
                            text=True)  # fmt: skip
    if staged.returncode:
        why = (staged.stderr.strip() or f"exit status {staged.returncode}").splitlines()[-1]
        sys.exit(f"keep_runs: git add failed: {why}")
    print(f"staged the records of {kept} completed run(s) ({len(files)} files); {left} run(s) not completed are left out")
    return files


if __name__ == "__main__":
    main()

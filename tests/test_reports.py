"""Tables and plots from run directories (scripts/make_tables.py, scripts/plot_curves.py).

The sweeps here are written by the tests in the on-disk shape a real sweep
leaves (DESIGN.md, "What a run leaves behind"): a Hydra multirun folder with
numbered job folders holding .hydra/config.yaml, metrics.jsonl and
summary.json — including a job that failed and one that died before writing
its summary. Expected numbers are computed here with numpy, independently of
xgrad.reports.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """Import scripts/<name>.py as a module, so its main() runs in-process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_tables = _script("make_tables")
plot_curves = _script("plot_curves")

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, *, data="fashion_mnist", model="lenet", optimizer="adam", xgrad=False, steps=1,
              seed=0, metric="acc", mode="max", curve=(0.5, 0.6, 0.7), status="completed", reason=None,
              summary=True, experiment="adam", scale="quick", hardware="cpu") -> dict:  # fmt: skip
    """One run directory as the engine leaves it; returns its summary."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\ndata:\n  name: {data}\nmodel:\n  name: {model}\noptimizer:\n  name: {optimizer}\n"
        f"xgrad:\n  enabled: {str(xgrad).lower()}\n  steps: {steps}\n"
    )
    with open(folder / "metrics.jsonl", "w") as f:
        for epoch, value in enumerate(curve):
            f.write(json.dumps({"epoch": epoch, "step": 10 * (epoch + 1), "lr": 1e-3, "train/loss": 1.0,
                                f"val/{metric}": value, "time/epoch_s": 0.5}) + "\n")  # fmt: skip
    best = float(max(curve) if mode == "max" else min(curve))
    record = dict(task="classification", model=model, data=data, optimizer=optimizer, xgrad=xgrad, steps=steps,
                  seed=seed, metric=metric, mode=mode, best=best, final=float(curve[-1]), epochs=len(curve),
                  wall_time_s=3.0 + seed, status=status, reason=reason, experiment=experiment, scale=scale,
                  hardware=hardware)  # fmt: skip
    if summary:
        (folder / "summary.json").write_text(json.dumps(record))
    return record


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """A multirun folder: Adam on LeNet, baseline and XGrad s=1 and s=2 over three seeds.

    XGrad s=2 seed 2 failed; an SGDM job died without a summary; a PTB cell
    (perplexity, lower is better) gives the other direction.
    """
    monkeypatch.chdir(tmp_path)  # the default output, results/<experiment>.md, lands here
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    rng = np.random.default_rng(7)
    runs, job = [], 0
    for xgrad, steps in [(False, 1), (True, 1), (True, 2)]:
        for seed in range(3):
            failed = xgrad and steps == 2 and seed == 2
            curve = rng.uniform(0.5, 0.9, size=4).round(4)
            runs.append(write_run(root / str(job), xgrad=xgrad, steps=steps, seed=seed, curve=curve,
                                  status="failed" if failed else "completed",
                                  reason="non-finite loss at step 17" if failed else None))  # fmt: skip
            job += 1
    write_run(root / str(job), optimizer="sgdm", summary=False, curve=(0.3,))
    job += 1
    for xgrad, ppl in [(False, (150.0, 120.0, 130.0)), (True, (140.0, 110.0, 112.0))]:
        runs.append(write_run(root / str(job), data="ptb", model="lstm1", xgrad=xgrad, metric="ppl", mode="min",
                              curve=ppl))  # fmt: skip
        job += 1
    return root, runs


def table_rows(text: str) -> list[dict[str, str]]:
    """The Markdown table's body rows as dicts keyed by column header."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split(" | ")))) for line in lines[1:]]


def section(text: str, heading: str) -> str:
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def mean_pm_std(values) -> str:
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return f"{values.mean():.4g}"
    return f"{values.mean():.4g} ± {values.std(ddof=1):.4g}"


def test_table_rows_hold_means_stds_differences_and_wins(sweep, tmp_path):
    root, runs = sweep
    out = tmp_path / "results" / "adam.md"
    text = make_tables.main([str(root), "--out", str(out)])
    assert out.read_text() == text

    rows = table_rows(text)
    keys = [(r["data"], r["model"], r["optimizer"], r["s"]) for r in rows]
    assert keys == [("fashion_mnist", "lenet", "adam", "1"), ("fashion_mnist", "lenet", "adam", "2"),
                    ("ptb", "lstm1", "adam", "1")]  # fmt: skip

    baseline = [r for r in runs if r["data"] == "fashion_mnist" and not r["xgrad"]]
    for row, steps in zip(rows[:2], (1, 2)):
        xgrad = [r for r in runs if r["data"] == "fashion_mnist" and r["xgrad"] and r["steps"] == steps
                 and r["status"] == "completed"]  # fmt: skip
        base_best, xgrad_best = [r["best"] for r in baseline], [r["best"] for r in xgrad]
        assert row["baseline best"] == mean_pm_std(base_best)
        assert row["XGrad best"] == mean_pm_std(xgrad_best)
        assert row["baseline final"] == mean_pm_std([r["final"] for r in baseline])
        difference = np.mean(xgrad_best) - np.mean(base_best)
        assert row["Δ XGrad − baseline"] == f"{difference:+.4g} ({'better' if difference > 0 else 'worse'})"
        base_by_seed = {r["seed"]: r["best"] for r in baseline}
        wins = sum(r["best"] > base_by_seed[r["seed"]] for r in xgrad)
        assert row["XGrad wins (paired seeds)"] == f"{wins} / {len(xgrad)}"
        assert row["runs (base / XGrad)"] == f"3 / {len(xgrad)}"
        assert row["direction"] == "higher is better"
        assert (row["metric"], row["epochs"], row["scale"], row["hardware"]) == ("acc", "4", "quick", "cpu")


def test_lower_is_better_metric_reads_a_drop_as_better(sweep):
    root, _ = sweep
    ptb = table_rows(make_tables.main([str(root)]))[2]
    assert ptb["direction"] == "lower is better"
    # one seed each: no std; the best perplexity is each curve's minimum
    assert (ptb["baseline best"], ptb["XGrad best"]) == ("120", "110")
    assert ptb["Δ XGrad − baseline"] == "-10 (better)"
    assert ptb["XGrad wins (paired seeds)"] == "1 / 1"


def test_failed_and_summaryless_runs_are_listed_not_dropped(sweep):
    root, _ = sweep
    text = make_tables.main([str(root)])
    missing = section(text, "Missing or failed runs")
    failed = [line for line in missing.splitlines() if "failed: non-finite loss at step 17" in line]
    assert len(failed) == 1 and "XGrad s=2" in failed[0] and "seed 2" in failed[0] and "/8`" in failed[0]
    died = [line for line in missing.splitlines() if "no summary.json" in line]
    assert len(died) == 1 and "sgdm" in died[0] and "/9`" in died[0]
    assert "seed 2 has a baseline but no XGrad s=2 run" in missing
    # the job without summary never enters a table row
    assert all(row["optimizer"] != "sgdm" for row in table_rows(text))
    assert "**sgdm**" not in section(text, "Verdict")


def test_verdict_counts_each_comparison(sweep):
    root, runs = sweep
    verdict = section(make_tables.main([str(root)]), "Verdict")
    better = 0
    for data, steps in [("fashion_mnist", 1), ("fashion_mnist", 2), ("ptb", 1)]:
        sign = 1 if data == "fashion_mnist" else -1
        base = np.mean([r["best"] for r in runs if r["data"] == data and not r["xgrad"]])
        xg = np.mean([r["best"] for r in runs if r["data"] == data and r["xgrad"] and r["steps"] == steps
                      and r["status"] == "completed"])  # fmt: skip
        better += sign * (xg - base) > 0
    assert f"XGrad's mean is better in {better} of 3 comparison(s), worse in {3 - better}" in verdict


def test_demo_pair_shows_best_final_epochs_and_wall_time(tmp_path):
    write_run(tmp_path / "off", xgrad=False, curve=(0.70, 0.82, 0.80), seed=0, experiment=None)
    write_run(tmp_path / "on", xgrad=True, curve=(0.72, 0.81, 0.84), seed=0, experiment=None)
    text = make_tables.main([str(tmp_path / "off"), str(tmp_path / "on"), "--title", "Demo"])
    assert text.startswith("# Demo\n")
    [row] = table_rows(text)
    assert (row["baseline best"], row["XGrad best"]) == ("0.82", "0.84")
    assert (row["baseline final"], row["XGrad final"]) == ("0.8", "0.84")
    assert row["Δ XGrad − baseline"] == f"{0.84 - 0.82:+.4g} (better)"
    assert (row["epochs"], row["wall time s (base / XGrad)"]) == ("3", "3.0 / 3.0")
    assert "None: every run completed" in section(text, "Missing or failed runs")


def test_plots_one_png_per_cell_and_an_overview(sweep, tmp_path):
    root, _ = sweep
    out = tmp_path / "plots"
    written = plot_curves.main([str(root), "--out", str(out)])
    names = sorted(path.name for path in written)
    assert names == ["fashion_mnist-lenet-adam-quick.png", "overview.png", "ptb-lstm1-adam-quick.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_HEADER and path.stat().st_size > 5000


def test_a_path_without_runs_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        make_tables.main([str(tmp_path / "nowhere")])
    assert exit_.value.code == 2 and f"directory not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        plot_curves.main([str(tmp_path / "empty"), "--out", str(tmp_path / "plots")])
    assert f"no run directory (summary.json or .hydra/config.yaml) under {tmp_path / 'empty'}" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


def test_a_steps_sweep_without_baseline_compares_against_s0(tmp_path):
    for steps, curve in [(0, (0.6, 0.7)), (1, (0.6, 0.75)), (2, (0.6, 0.65))]:
        write_run(tmp_path / f"s{steps}", xgrad=True, steps=steps, curve=curve)
    rows = table_rows(make_tables.main([str(tmp_path), "--out", str(tmp_path / "steps.md")]))
    assert [(r["s"], r["baseline best"], r["XGrad best"]) for r in rows] == [("1", "0.7", "0.75"), ("2", "0.7", "0.65")]
    assert [r["Δ XGrad − baseline"] for r in rows] == [f"{0.75 - 0.7:+.4g} (better)", f"{0.65 - 0.7:+.4g} (worse)"]


def test_ties_duplicates_and_summaries_without_values(tmp_path):
    write_run(tmp_path / "a" / "off", xgrad=False, curve=(0.5, 0.8))
    write_run(tmp_path / "a" / "on", xgrad=True, curve=(0.8, 0.7))
    write_run(tmp_path / "b" / "on", xgrad=True, curve=(0.9, 0.9))  # seed 0 again: left out, not averaged in
    empty = tmp_path / "c" / "off"
    summary = write_run(empty, xgrad=False, seed=1)
    (empty / "summary.json").write_text(json.dumps({**summary, "best": None, "final": None}))
    (empty / "metrics.jsonl").write_text("")

    text = make_tables.main([str(tmp_path), "--out", str(tmp_path / "edge.md")])
    [row] = table_rows(text)
    assert (row["XGrad best"], row["Δ XGrad − baseline"], row["XGrad wins (paired seeds)"]) == ("0.8", "+0 (tie)", "0 / 1")
    assert "tied in 1" in section(text, "Verdict")
    missing = section(text, "Missing or failed runs")
    assert "duplicate of seed 0" in missing and "b/on`" in missing
    assert "says completed but has no metric or best value" in missing and "c/off`" in missing


def test_a_job_without_summary_is_described_from_its_hydra_files(compose_config, tmp_path):
    from omegaconf import OmegaConf

    from xgrad.reports import load_run

    cfg = compose_config("optimizer=sgdm", "xgrad=on", "xgrad.steps=3", "seed=4")
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    (tmp_path / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      experiment: steps\n")
    run = load_run(tmp_path)
    assert (run.status, run.data, run.model, run.optimizer) == ("missing", "fashion_mnist", "lenet", "sgdm")
    assert (run.xgrad, run.steps, run.seed, run.experiment) == (True, 3, 4, "steps")
    assert "no summary.json" in run.reason


def test_two_real_runs_through_both_scripts(train_run, tmp_path):
    baseline, xgrad = train_run("xgrad=off"), train_run("xgrad=on")
    summaries = [json.loads((run / "summary.json").read_text()) for run in (baseline, xgrad)]
    text = make_tables.main([str(baseline), str(xgrad), "--out", str(tmp_path / "demo.md")])
    [row] = table_rows(text)
    assert (row["data"], row["model"], row["optimizer"], row["s"]) == ("fashion_mnist", "lenet", "adam", "1")
    assert (row["metric"], row["direction"], row["runs (base / XGrad)"]) == ("acc", "higher is better", "1 / 1")
    assert (row["baseline best"], row["XGrad best"]) == tuple(f"{s['best']:.4g}" for s in summaries)
    assert (row["baseline final"], row["XGrad final"]) == tuple(f"{s['final']:.4g}" for s in summaries)
    assert "None: every run completed" in section(text, "Missing or failed runs")
    written = plot_curves.main([str(baseline), str(xgrad), "--out", str(tmp_path / "demo")])
    assert sorted(path.name for path in written) == ["fashion_mnist-lenet-adam.png", "overview.png"]
    assert all(path.read_bytes()[:8] == PNG_HEADER for path in written)

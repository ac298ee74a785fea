"""The paper's experiments: each figure's sweep, its cells, its first run, its reports and launchers.

What each figure must contain is written down here from issue 5 and docs/paper.md
(which models, data, optimizers, arms and seeds; the protocol's numbers), not
read from experiments/*.yaml, so a config that drifts from the paper fails.
Runs go through the real engine at the smallest size (conftest.TEST_OVERRIDES).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import OmegaConf

from conftest import CONF_DIR, write_cifar
from xgrad.callbacks import SweepReports, claim_slot
from xgrad.data.base import DatasetMissingError
from xgrad.report.tables import spread

ROOT = Path(__file__).resolve().parents[1]
PNG_HEADER = b"\x89PNG\r\n\x1a\n"

OPTIMIZERS = ["sgdm", "rmsprop", "adam", "adamw", "adabelief", "adam3"]
SEEDS = [0, 1, 2, 3, 4]
VISION = ["lenet", "resnet34", "densenet121", "inception_v3", "vit"]
#: Inception-V3 has no width setting and is too slow for the CPU at full size: the quick scale leaves it out
QUICK_VISION = ["lenet", "resnet34", "densenet121", "vit"]
TRAINING_FIGURES = ["cifar10", "cifar100", *OPTIMIZERS, "steps"]
SCALES = ["paper", "quick", "converged"]
#: the converged studies of SGDM and Adam beyond LeNet-5: experiment → its one cell
CONVERGED_STUDIES = {"converged_vae": "converged/fashion_mnist_vae", "converged_resnet": "converged/fashion_mnist_resnet34",
                     "converged_lstm": "converged/ptb_lstm1"}  # fmt: skip
#: (figure, scale) of every sweep there is: cifar100 has no quick scale, the converged study only its own
SWEEPS = [*((figure, "paper") for figure in TRAINING_FIGURES),
          *((figure, "quick") for figure in TRAINING_FIGURES if figure != "cifar100"),
          ("converged", "converged"), *((study, "converged") for study in CONVERGED_STUDIES)]

#: every cell (conf/protocol/<scale>/<cell>.yaml) and the (data, model) it must train
CELLS = {
    **{f"paper/{data}_{model}": (data, model) for data in ("cifar10", "cifar100") for model in VISION},
    **{f"paper/ptb_lstm{n}{variant}": ("ptb", f"lstm{n}") for n in (1, 2, 3) for variant in ("", "_adabelief")},
    "paper/wmt16_gnmt8": ("wmt16_en_de", "gnmt8"),
    "paper/mnist_vae": ("mnist", "vae"),
    **{f"quick/fashion_mnist_{model}": ("fashion_mnist", model) for model in QUICK_VISION},
    **{f"quick/ptb_lstm{n}": ("ptb", f"lstm{n}") for n in (1, 2, 3)},
    "quick/mnist_vae": ("mnist", "vae"),
    "converged/fashion_mnist_lenet": ("fashion_mnist", "lenet"),
    "converged/fashion_mnist_vae": ("fashion_mnist", "vae"),
    "converged/fashion_mnist_resnet34": ("fashion_mnist", "resnet34"),
    "converged/ptb_lstm1": ("ptb", "lstm1"),
}


def figure_cells(figure: str, scale: str) -> list[str]:
    """The cells issue 5 asks of ``figure`` at ``scale`` (GNMT and Inception-V3 are not run at quick)."""
    if figure == "converged":
        return ["converged/fashion_mnist_lenet"]
    if figure in CONVERGED_STUDIES:
        return [CONVERGED_STUDIES[figure]]
    if figure in ("cifar10", "cifar100"):
        if scale == "paper":
            return [f"paper/{figure}_{model}" for model in VISION]
        return [f"quick/fashion_mnist_{model}" for model in QUICK_VISION]
    if figure == "steps":
        if scale == "paper":
            return ["paper/cifar10_resnet34", "paper/cifar100_resnet34", "paper/ptb_lstm2", "paper/mnist_vae"]
        return ["quick/fashion_mnist_lenet", "quick/fashion_mnist_resnet34", "quick/ptb_lstm1", "quick/mnist_vae"]
    if scale == "paper":
        lstm = "_adabelief" if figure == "adabelief" else ""
        return [
            *(f"paper/{data}_{model}" for data in ("cifar10", "cifar100") for model in VISION),
            *(f"paper/ptb_lstm{n}{lstm}" for n in (1, 2, 3)),
            "paper/wmt16_gnmt8",
            "paper/mnist_vae",
        ]
    return [*(f"quick/fashion_mnist_{m}" for m in QUICK_VISION), *(f"quick/ptb_lstm{n}" for n in (1, 2, 3)),
            "quick/mnist_vae"]


def expected_jobs(figure: str, scale: str) -> list[tuple]:
    """(cell, optimizer, xgrad arm, seed) of every run of the figure."""
    all_six = figure in ("cifar10", "cifar100", "converged")
    optimizers = (OPTIMIZERS if all_six else ["adam"] if figure == "steps" else ["sgdm", "adam"]
                  if figure in CONVERGED_STUDIES else [figure])  # fmt: skip
    arms = [("on", s) for s in range(5)] if figure == "steps" else [("off", 0), ("on", 1)]
    return [(c, o, a, s) for c in figure_cells(figure, scale) for o in optimizers for a in arms for s in SEEDS]


def sweep_jobs(figure: str, scale: str) -> list[list[str]]:
    """The override lists Hydra's basic sweeper makes of the experiment's ``hydra.sweeper.params``."""
    cfg = compose_job(figure, scale, [], hydra=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    overrides = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    [jobs] = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return jobs


def compose_job(figure: str, scale: str, job: list[str], hydra: bool = False):
    """One job's config as the sweep composes it (without the tests' small-run overrides)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"experiment={figure}", f"scale={scale}", *job], return_hydra_config=hydra)


def describe(figure: str, scale: str, job: list[str]) -> tuple:
    """A composed job as (cell, optimizer, xgrad arm, seed)."""
    cfg = compose_job(figure, scale, job)
    cell = dict(item.split("=", 1) for item in job)["protocol"]
    arm = ("on", cfg.xgrad.steps) if cfg.xgrad.enabled else ("off", 0)
    return cell, cfg.optimizer.name, arm, cfg.seed


@pytest.mark.parametrize("figure, scale", SWEEPS)
def test_the_sweep_runs_the_figure(figure, scale):
    jobs = sweep_jobs(figure, scale)
    expected = expected_jobs(figure, scale)
    # composed, the first and last jobs are what the figure asks for (optimizer and arm included) ...
    assert describe(figure, scale, jobs[0]) == expected[0]
    assert describe(figure, scale, jobs[-1]) == expected[-1]
    # ... and so is every job, read off its overrides (a figure that fixes its optimizer does it in the config)
    fixed_optimizer = expected[0][1]

    def read(job: list[str]) -> tuple:
        values = dict(item.split("=", 1) for item in job)
        if "xgrad.steps" in values:
            arm = ("on", int(values["xgrad.steps"]))
        else:
            arm = (values["xgrad"], int(values["xgrad"] == "on"))  # conf/xgrad/on.yaml: s = 1
        return values["protocol"], values.get("optimizer", fixed_optimizer), arm, int(values["seed"])

    assert sorted(read(job) for job in jobs) == sorted(expected)


def pairs_to_compose(scale: str) -> list[tuple[str, str, str]]:
    """(figure, cell, optimizer): each cell with each optimizer any figure runs it with, once."""
    seen = {}
    for figure in (figure for figure, at in SWEEPS if at == scale):
        for cell, optimizer, _, _ in expected_jobs(figure, scale):
            seen.setdefault((cell, optimizer), figure)
    return [(figure, cell, optimizer) for (cell, optimizer), figure in seen.items()]


@pytest.mark.parametrize("scale", SCALES)
def test_every_cell_composes_to_the_protocol_with_every_optimizer(scale):
    """The protocol numbers of docs/paper.md, checked on every (cell, optimizer) a figure runs."""
    for figure, cell, optimizer in pairs_to_compose(scale):
        cfg = compose_job(figure, scale, [f"protocol={cell}", f"optimizer={optimizer}"])
        resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation has a value
        where = f"{cell} with {optimizer}"
        assert (resolved["data"]["name"], resolved["model"]["name"]) == CELLS[cell], where
        assert resolved["scale"] == scale and resolved["optimizer"]["name"] == optimizer, where
        opt, trainer = resolved["optimizer"], resolved["trainer"]
        if scale == "quick":  # minutes on a CPU: few epochs, each cut short (the VAE's 4,000 digits are short)
            assert trainer["epochs"] <= 10, where
            assert trainer["limit_train_batches"] is not None or cell == "quick/mnist_vae", where
            assert resolved["paper_epochs"] == (50 if cell == "quick/mnist_vae" else 200), where
            continue
        if cell == "converged/fashion_mnist_vae":  # the paper's VAE protocol, whole, on the full Fashion-MNIST
            assert opt["lr"] == 1e-3 and opt["weight_decay"] == (1e-2 if optimizer == "adamw" else 0.0), where
            assert (trainer["epochs"], resolved["scheduler"]["name"], resolved["data"]["batch_size"]) == (50, "none", 128)
            assert trainer["limit_train_batches"] is None and trainer["limit_val_batches"] is None, where
            continue
        if cell == "converged/ptb_lstm1":  # the PTB protocol's optimizer settings at width 64, 7 whole epochs
            assert opt["lr"] == (3.0 if optimizer == "sgdm" else 1e-2) and opt["weight_decay"] == 1.2e-6, where
            assert (trainer["epochs"], resolved["scheduler"]["milestones"], trainer["grad_clip"]) == (7, [3, 5], 0.25)
            assert (resolved["data"]["batch_size"], resolved["data"]["bptt"], resolved["model"]["net"]["emb_size"]) == (
                20, 35, 64)
            assert trainer["limit_train_batches"] is None and trainer["limit_val_batches"] is None, where
            continue
        if scale == "converged":  # the CIFAR protocol's optimizer settings, a whole schedule (20 or 10 epochs)
            assert opt["lr"] == (0.1 if optimizer == "sgdm" else 1e-3), where
            assert opt["weight_decay"] == (1e-2 if optimizer == "adamw" else 5e-4), where
            schedule = (10, [7]) if cell == "converged/fashion_mnist_resnet34" else (20, [15])
            assert (trainer["epochs"], resolved["scheduler"]["milestones"]) == schedule, where
            assert trainer["limit_train_batches"] is None and trainer["limit_val_batches"] is None, where
            continue
        if cell.startswith("paper/cifar"):
            assert opt["lr"] == (0.1 if optimizer == "sgdm" else 1e-3), where
            assert opt["weight_decay"] == (1e-2 if optimizer == "adamw" else 5e-4), where
            assert (trainer["epochs"], resolved["scheduler"]["milestones"]) == (200, [150]), where
            assert resolved["data"]["batch_size"] == 128, where
        elif cell.startswith("paper/ptb"):
            adabelief_deep = optimizer == "adabelief" and not cell.startswith("paper/ptb_lstm1")
            assert opt["lr"] == (3.0 if optimizer == "sgdm" else 1e-2 if adabelief_deep else 1e-3), where
            assert opt["weight_decay"] == 1.2e-6, where
            if optimizer == "adabelief":
                assert opt["eps"] == (1e-12 if adabelief_deep else 1e-16), where
            assert (trainer["epochs"], trainer["grad_clip"]) == (200, 0.25), where
            assert resolved["scheduler"]["milestones"] == [100, 145], where
            assert (resolved["data"]["batch_size"], resolved["data"]["bptt"]) == (20, 70)
        elif cell == "paper/wmt16_gnmt8" and optimizer != "sgdm":
            assert opt["lr"] == 2e-3, where
        elif cell == "paper/mnist_vae":
            assert resolved["data"]["batch_size"] == 128 and (optimizer == "sgdm" or opt["lr"] == 1e-3), where


@pytest.mark.parametrize("figure, scale", [(figure, scale) for figure, scale in SWEEPS if scale != "paper"])
def test_the_first_job_trains_on_this_cpu(figure, scale, train_run):
    first = sweep_jobs(figure, scale)[0]
    run_dir = train_run(f"experiment={figure}", f"scale={scale}", *first)
    summary = json.loads((run_dir / "summary.json").read_text())
    cell, optimizer, (xgrad, steps), seed = expected_jobs(figure, scale)[0]
    assert summary["status"] == "completed" and summary["epochs"] == 1
    assert (summary["experiment"], summary["scale"]) == (figure, scale)
    assert (summary["data"], summary["model"]) == CELLS[cell]
    assert (summary["optimizer"], summary["xgrad"], summary["steps"]) == (optimizer, xgrad == "on", steps)
    assert summary["seed"] == seed


@pytest.mark.parametrize("figure", TRAINING_FIGURES)
def test_the_first_job_at_paper_scale_asks_for_its_dataset(figure, train_run, tmp_path):
    """Offline, the paper's first cells (CIFAR) stop at the data, naming it, before any training."""
    first = sweep_jobs(figure, "paper")[0]
    data = CELLS[expected_jobs(figure, "paper")[0][0]][0]
    with pytest.raises(DatasetMissingError, match=data):
        train_run(f"experiment={figure}", "scale=paper", *first, f"data.root={tmp_path / 'no-data'}")


@pytest.mark.parametrize("figure", TRAINING_FIGURES)
def test_the_first_job_trains_at_paper_scale_on_cifar_files(figure, train_run, tmp_path):
    """The paper's first cells run as composed, on CIFAR folders in the real format (random images)."""
    first = sweep_jobs(figure, "paper")[0]
    cell, optimizer, (xgrad, steps), seed = expected_jobs(figure, "paper")[0]
    data, model = CELLS[cell]
    write_cifar(tmp_path, data, per_file=16)
    run_dir = train_run(f"experiment={figure}", "scale=paper", *first, f"data.root={tmp_path}",
                        "data.batch_size=8", "data.eval_batch_size=8", "data.module.val_size=8")  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 1
    assert (summary["data"], summary["model"], summary["scale"]) == (data, model, "paper")
    assert (summary["optimizer"], summary["xgrad"], summary["steps"], summary["seed"]) == (
        optimizer, xgrad == "on", steps, seed)  # fmt: skip


def test_a_figure_without_cells_at_a_scale_is_refused_in_one_line(capsys):
    """cifar100 at quick scale would repeat cifar10's Fashion-MNIST cells: refused before any job."""
    from xgrad.callbacks import require_cells

    require_cells(compose_job("cifar10", "quick", [], hydra=True))  # has cells: nothing happens
    with pytest.raises(SystemExit) as refused:
        require_cells(compose_job("cifar100", "quick", [], hydra=True))
    assert refused.value.code == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "experiment=cifar100 has no cells at scale=quick (it has: paper)" in message


def test_the_translation_cell_asks_for_wmt16(train_run, tmp_path):
    with pytest.raises(DatasetMissingError, match="wmt16_en_de"):
        train_run("experiment=adam", "protocol=paper/wmt16_gnmt8", f"data.root={tmp_path / 'no-data'}")


def test_runs_land_in_a_fixed_folder_named_by_what_they_train():
    """A rerun of the same command, or a SLURM requeue, finds each run's directory and resumes it."""
    first = sweep_jobs("adam", "quick")[0]
    cfg = compose_job("adam", "quick", [*first, "trainer.epochs=10", "logger=none"], hydra=True)
    assert cfg.hydra.sweep.dir == "multirun/adam/quick"
    # more epochs or another logger on a rerun train the same runs on: not part of the name
    assert cfg.hydra.sweep.subdir == "fashion_mnist-lenet/adam/seed=0,xgrad=off"
    job = ["protocol=paper/ptb_lstm2", "xgrad.steps=3", "seed=1", "trainer.grad_clip=1"]
    steps = compose_job("steps", "paper", job, hydra=True)
    assert steps.hydra.sweep.dir == "multirun/steps/paper"
    assert steps.hydra.sweep.subdir == "ptb-lstm2/adam/seed=1,trainer.grad_clip=1,xgrad.steps=3"


def test_slurm_launcher_requeues_on_timeout_with_one_gpu_per_run():
    from hydra.plugins.launcher import Launcher

    cfg = compose_job("adam", "paper", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra=True)
    launcher = cfg.hydra.launcher
    assert issubclass(get_class(launcher._target_), Launcher) and launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.max_num_timeout > 0 and launcher.timeout_min > 0 and launcher.array_parallelism > 0
    assert launcher.submitit_folder == "multirun/adam/paper/.submitit/%j"


def test_gpu_slots_are_claimed_once_each(tmp_path):
    first, second = claim_slot(tmp_path, 2), claim_slot(tmp_path, 2)
    assert (first[0], second[0]) == (0, 1)
    assert claim_slot(tmp_path, 2) is None  # both held
    first[1].close()  # the worker holding GPU 0 exits
    again = claim_slot(tmp_path, 2)
    assert again[0] == 0
    second[1].close()
    child = subprocess.run([sys.executable, "-c", "import pathlib; from xgrad.callbacks import claim_slot; "
                            f"print(claim_slot(pathlib.Path({str(tmp_path)!r}), 2)[0])"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert child.stdout.strip() == "1"  # another process: slot 0 is still held here, slot 1 was released
    again[1].close()



@pytest.fixture
def tiny_sweep(tmp_path, train_run):
    """A quick-scale Adam sweep on disk: baseline and XGrad for two seeds, and a job that died."""
    sweep = tmp_path / "multirun" / "adam" / "quick"
    for xgrad in ("off", "on"):
        for seed in (0, 1):
            train_run("experiment=adam", "scale=quick", "protocol=quick/fashion_mnist_lenet", f"xgrad={xgrad}",
                      f"seed={seed}", f"hydra.run.dir={sweep / xgrad / str(seed)}")  # fmt: skip
    dead = sweep / "on" / "2"
    shutil.copytree(sweep / "on" / "1" / ".hydra", dead / ".hydra")  # composed, then killed before any summary
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/*/summary.json"))]
    return sweep, summaries, dead


def hydra_config(sweep: Path):
    """What a multirun hands its callbacks: the sweep folder, the experiment chosen, the scale."""
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "runtime": {"choices": {"experiment": "adam"}}},
                             "scale": "quick"})  # fmt: skip


def test_the_end_of_a_sweep_writes_its_table_and_plots(tiny_sweep, tmp_path):
    sweep, summaries, dead = tiny_sweep
    reports = SweepReports(results=str(tmp_path / "results"), notes={"quick": ["Inception-V3 is left out."]})
    reports.on_multirun_end(hydra_config(sweep))

    text = (tmp_path / "results" / "adam.md").read_text()
    assert text.startswith("# XGrad vs baseline: adam (quick scale)\n")
    row = next(line for line in text.splitlines() if line.startswith("| fashion_mnist | lenet | adam | 1 |"))  # main table
    basis = "test" if all(s.get("test") is not None for s in summaries) else "best"  # older runs: validation
    for xgrad in (False, True):
        values = [s[basis] for s in summaries if s["xgrad"] == xgrad]
        assert f"{statistics.fmean(values):.4g} ± {np.std(values, ddof=1):.4g}" in row
    assert "| too few seeds |" in row  # two seed pairs: no interval, no verdict
    failed = text.split("## Missing or failed runs", 1)[1].split("## Notes", 1)[0]
    assert "on/2" in failed and "no summary.json" in failed
    assert text.rstrip().endswith("## Notes\n\n- Inception-V3 is left out.")
    assert (tmp_path / "results" / "adam" / "overview.png").read_bytes()[:8] == PNG_HEADER


def test_a_figures_wandb_report_has_a_section_per_cell_filtered_on_the_runs_own_cell(tiny_sweep, tmp_path, capsys,
                                                                                      monkeypatch):
    """scripts/wandb_report.py: built offline from the page and its raw data; each section's run set is the cell the
    runs themselves logged to W&B (their summary.json's cell), grouped by arm."""
    import wandb_workspaces.reports.v2 as wr

    spec = importlib.util.spec_from_file_location("wandb_report", ROOT / "scripts" / "wandb_report.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "wandb_report", script)  # its dataclass looks its module up
    spec.loader.exec_module(script)
    sweep, summaries, _ = tiny_sweep
    SweepReports(results=str(tmp_path / "results"), notes={}).on_multirun_end(hydra_config(sweep))
    [section] = script.sections(tmp_path / "results" / "adam.md")
    assert section.cell == summaries[0]["cell"] and {s["cell"] for s in summaries} == {section.cell}
    assert section.rows[2].startswith("| fashion_mnist | lenet | adam | 1 |")
    report = script.build("adam", "quick", [section], "team", "xgrad-repro")
    [grid] = [block for block in report.blocks if isinstance(block, wr.PanelGrid)]
    [runset] = grid.runsets
    assert runset.filters == f"Config('cell') == '{section.cell}'" and runset.groupby == ["config.arm"]
    assert [panel.y for panel in grid.panels] == [["val/acc"], ["test/acc"]]
    assert all(p.groupby_aggfunc == "mean" and p.groupby_rangefunc == "stderr" for p in grid.panels)
    argv = ["adam", "--results", str(tmp_path), "--scale", "results", "--dry-run"]
    assert script.main(argv) == 0
    assert f"runs with cell == {section.cell}, grouped by arm" in capsys.readouterr().out
    assert script.main(["adam", "--results", str(tmp_path / "nowhere"), "--dry-run"]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line naming what is missing


def test_a_sweep_that_raised_still_gets_its_table(tiny_sweep, tmp_path):
    """Hydra skips on_multirun_end when a job failed; the reports are then written at exit."""
    sweep, _, _ = tiny_sweep
    reports = SweepReports(results=str(tmp_path / "results"))
    reports.on_multirun_start(hydra_config(sweep))
    try:
        reports._write_pending()  # what the interpreter runs at exit
    finally:
        atexit.unregister(reports._write_pending)
    assert "| fashion_mnist | lenet | adam | 1 |" in (tmp_path / "results" / "adam.md").read_text()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeWandbRun:
    """The parts of ``wandb.apis.public.Run`` the table reads."""

    def __init__(self, run_id, *, model="lstm1", xgrad, seed, best, state="finished", status="completed", curve=()):
        self.path = ["team", "xgrad-repro", run_id]
        self.state, self.tags = state, ["adam", f"s={1 if xgrad else 0}"]
        task = {"_target_": "xgrad.tasks.language_model.LanguageModelTask"}
        self.config = {
            "data": {"name": "ptb"}, "model": {"name": model, "task": task}, "optimizer": {"name": "adam"},
            "xgrad": {"enabled": xgrad, "steps": 1}, "seed": seed, "scale": "quick",
        }  # fmt: skip
        # what RunLogger puts in the W&B summary (summary.json's keys)
        self.summary = {"status": status, "epochs": 4, "_runtime": 12.5, "hardware": "NVIDIA H200",
                        "metric": "ppl", "mode": "min"}  # fmt: skip
        if best is not None:
            self.summary |= {"best": best, "final": best + 5}
        self._curve = curve

    def scan_history(self, keys):
        return [{"epoch": epoch, "val/ppl": value} for epoch, value in self._curve]


def test_make_tables_reads_a_wandb_project(monkeypatch, tmp_path):
    import wandb

    runs = [
        FakeWandbRun("b0", xgrad=False, seed=0, best=130.0),
        FakeWandbRun("b1", xgrad=False, seed=1, best=None, curve=[(1, 150.0), (2, 126.0), (3, 128.0)]),
        FakeWandbRun("x0", xgrad=True, seed=0, best=120.0),
        FakeWandbRun("x1", xgrad=True, seed=1, best=127.0),
        FakeWandbRun("x2", xgrad=True, seed=2, best=None, state="crashed", status="running"),
    ]
    asked = []

    class FakeApi:
        def runs(self, path, filters=None):
            asked.append((path, filters))
            return runs

    monkeypatch.setattr(wandb, "Api", FakeApi)
    out = tmp_path / "adam.md"
    text = _script("make_tables").main(["--wandb", "team/xgrad-repro", "--experiment", "adam", "--out", str(out)])
    assert asked == [("team/xgrad-repro", {"tags": {"$in": ["adam"]}})]
    from test_reports import table_rows  # the comparison table's rows joined with their details

    [row] = [r for r in table_rows(text) if (r["data"], r["model"], r["optimizer"], r["s"]) == ("ptb", "lstm1", "adam", "1")]
    base, xgrad = [130.0, 126.0], [120.0, 127.0]  # b1's best: the lowest perplexity of its curve
    assert row["direction"] == "lower is better"
    assert row["basis"] == "best val (no test metric)"  # these W&B summaries carry no test value
    assert row["baseline"] == f"{np.mean(base):.4g} ± {np.std(base, ddof=1):.4g}"
    assert row["XGrad"] == f"{np.mean(xgrad):.4g} ± {np.std(xgrad, ddof=1):.4g}"
    assert (row["pairs"], row["verdict"]) == ("2", "too few seeds")
    assert row["hardware"] == "NVIDIA H200"
    assert "`wandb:team/xgrad-repro/x2`" in text and "failed: W&B run state: crashed" in text
    assert out.read_text() == text


def test_make_tables_refuses_a_malformed_wandb_path(capsys):
    with pytest.raises(SystemExit) as exit_:
        _script("make_tables").main(["--wandb", "just-a-project"])
    assert exit_.value.code == 2 and "'just-a-project': expected ENTITY/PROJECT" in capsys.readouterr().err


def test_overhead_benchmark_times_both_arms_and_lists_what_it_cannot_run(tmp_path):
    out = tmp_path / "overhead.md"
    bench = _script("bench_overhead")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        quick_cells = compose("config", overrides=["experiment=overhead"]).overhead.quick.cells
    [vae_cell] = [cell for cell in quick_cells if "mnist_vae" in cell]  # as configured: offline, on the subset
    cells = ["protocol=paper/cifar10_lenet data=fashion_mnist", vae_cell, f"protocol=paper/wmt16_gnmt8 data.root={tmp_path}"]
    bench.main([
        "scale=quick", "trainer.device=cpu", "overhead.optimizers=[adam]", f"overhead.out={out}",
        "overhead.quick.cells=[" + ",".join(f"'{cell}'" for cell in cells) + "]",
        "overhead.quick.warmup=1", "overhead.quick.rounds=2", "overhead.quick.iterations=2",
    ])  # fmt: skip
    text = out.read_text()
    assert text.startswith("# XGrad overhead per training iteration (quick scale)\n")
    [row] = [line.split(" | ") for line in text.splitlines() if line.startswith("| fashion_mnist | lenet | adam |")]
    baseline_ms, xgrad_ms = float(row[5]), float(row[6])
    assert baseline_ms > 0 and xgrad_ms > 0 and row[4] == "8"
    # the overhead is computed from the unrounded times: allow the rounding of the two shown to 0.01 ms
    rounding = 100 * 0.005 * (1 / baseline_ms + xgrad_ms / baseline_ms**2) + 0.05
    assert abs(float(row[7].rstrip("%")) - 100 * (xgrad_ms / baseline_ms - 1)) <= rounding
    assert row[8].startswith("±") and float(row[8].strip("±%")) >= 0
    assert spread([0.010, 0.012, 0.011]) == pytest.approx(100 * 0.002 / 0.011)
    assert "n/a (CPU)" in row[9]
    assert any(line.startswith("| mnist | vae | adam |") for line in text.splitlines())
    not_measured = text.split("## Not measured", 1)[1]
    assert "protocol=paper/wmt16_gnmt8" in not_measured and "wmt16_en_de" in not_measured
    assert "mnist_vae" not in not_measured


def test_a_figures_run_directories_are_named_without_what_does_not_change_the_training():
    """One mark on the schema's fields decides both: the resume check ignores a key, the run folder's name leaves it
    out, so rerunning a figure with any of them finds the same run directories."""
    from conftest import compose_config
    from xgrad.schema import not_trained
    from xgrad.trained_config import RESUME_IGNORES, flatten

    base = ("experiment=adam", "scale=quick", "seed=3", "xgrad=on")
    named = compose_config(*base, return_hydra_config=True).hydra.job.override_dirname
    # the test defaults (conftest.TEST_OVERRIDES) are overrides too: those that change the training are in the name
    assert named == "seed=3,trainer.limit_train_batches=2,trainer.limit_val_batches=2,xgrad=on"
    how_it_runs = ("trainer.tf32=false", "trainer.channels_last=false", "data.on_device=false",
                   "trainer.sync_batchnorm=true", "trainer.compile=true", "trainer.epochs=7", "trainer.num_threads=1",
                   "logger=none", "data.root=elsewhere", "model.compiles=false", "trainer.device=cpu",
                   "trainer.progress=false", "trainer.log_every_n_steps=3", "trainer.checkpoint_every_n_steps=5",
                   "+data.module.num_workers=1", "model.channels_last=true")  # fmt: skip
    # every key the schema marks is tried here, and the resume check ignores exactly those
    assert {o.lstrip("+").split("=")[0] for o in how_it_runs} == set(not_trained()) == set(RESUME_IGNORES)
    for override in how_it_runs:
        assert compose_config(*base, override, return_hydra_config=True).hydra.job.override_dirname == named, override
    cfg = compose_config(*base, return_hydra_config=True)
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    keys = flatten({k: v for k, v in cfg.items() if k != "hydra"})
    assert {k for k in keys if any(k == i or k.startswith(i + ".") for i in RESUME_IGNORES)} <= excluded
    assert compose_config(*base, "optimizer.lr=0.01", return_hydra_config=True).hydra.job.override_dirname != named

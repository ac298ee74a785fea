"""experiments/tuned.yaml: each arm at its own learning rate, chosen on the validation split of a grid
(xgrad/report/tuning.py, the ``xgrad_tuned_lr`` resolver), and the two arms paired by seed across their lrs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from omegaconf import OmegaConf

from conftest import fail_at_step, main_with
from test_experiments import compose_job
from test_reports import write_run
from xgrad.engine import TrainingFailed
from xgrad.schema import ConfigError, check

GRID = [0.25, 0.5, 1.0, 2.0, 4.0]  # a grid for the choice's tests
#: experiments/tuned.yaml's grid: 7 factors ×2 apart around the protocol's lr
STUDY_GRID = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def test_the_grid_stage_trains_every_arm_at_every_factor_of_the_protocols_lr_on_its_own_seed():
    cfg = compose_job("tuned", "converged", ["tuned.stage=grid"], hydra=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    assert params["tuned.factor"] == "0.125,0.25,0.5,1,2,4,8" and cfg.tuned.grid == STUDY_GRID
    assert params["seed"] == "100" and params["optimizer"] == "sgdm,adam"
    assert cfg.hydra.sweep.dir == "multirun/tuned/grid" == cfg.tuned.grid_dir
    for cell, base in (("converged/fashion_mnist_lenet", {"sgdm": 0.1, "adam": 1e-3}), ("quick/mnist_vae", {"sgdm": 1e-3, "adam": 1e-3})):
        for optimizer in ("sgdm", "adam"):
            for factor in params["tuned.factor"].split(","):
                job = compose_job("tuned", "converged", ["tuned.stage=grid", f"protocol={cell}", f"optimizer={optimizer}",
                                                         "xgrad=on", f"tuned.factor={factor}", "seed=100"])  # fmt: skip
                typed = check(job)
                assert typed.optimizer.lr == pytest.approx(base[optimizer] * float(factor)), (cell, optimizer, factor)
    for bad in ("0", "-1", "x", "inf"):  # one line naming the value, before any work
        job = compose_job("tuned", "converged", ["protocol=quick/mnist_vae", "optimizer=adam", f"tuned.factor={bad}"])
        with pytest.raises(ConfigError, match=rf"tuned\.factor='?{bad}'?") as refused:
            check(job)
        assert "\n" not in str(refused.value)


def test_tuned_vae_is_tuneds_study_on_the_converged_vae_in_folders_and_pages_of_its_own():
    """experiments/tuned_vae.yaml: the VAE trained to its plateau (the paper's 50 epochs on the full Fashion-MNIST),
    tuned's seeds over a 5-point grid of its own, its sweeps and pages beside tuned's, never in them."""
    for stage, seeds, results in (("grid", "100", "results/converged/tuned_vae_grid"), ("final", "0,1,2,3,4", "results/converged")):  # fmt: skip
        cfg = compose_job("tuned_vae", "converged", [f"tuned.stage={stage}"], hydra=True)
        params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
        assert params["protocol"] == "converged/fashion_mnist_vae" and params["seed"] == seeds, params
        assert cfg.hydra.sweep.dir == f"multirun/tuned_vae/{stage}" and cfg.tuned.grid_dir == "multirun/tuned_vae/grid"
        assert cfg.hydra.callbacks.reports.results == results and cfg.tuned.grid == [0.5, 1.0, 2.0, 4.0, 8.0]
        assert params["tuned.factor"] == ("0.5,1,2,4,8" if stage == "grid" else "chosen"), params
    job = check(compose_job("tuned_vae", "converged", ["optimizer=sgdm", "xgrad=on", "tuned.factor=0.25", "seed=100"]))
    assert (job.data.name, job.model.name, job.trainer.epochs, job.data.module["val_size"]) == ("fashion_mnist", "vae", 50, 5000)
    assert job.optimizer.lr == pytest.approx(0.25 * 1e-3)  # the paper's VAE lr × the factor


def test_a_stage_named_on_the_command_line_or_not_finds_the_same_run_folders():
    """The stage names the sweep folder (multirun/tuned/<stage>), not the runs in it: `tuned.stage=grid` written out
    on a rerun of the grid's command must resume its runs, not train them again beside them."""
    grid_job = ["protocol=converged/fashion_mnist_lenet", "optimizer=sgdm", "xgrad=off", "tuned.factor=0.125", "seed=100"]
    for stage, job, folder in (("grid", grid_job, "seed=100,tuned.factor=0.125,xgrad=off"),
                               ("final", [*grid_job[:3], "tuned.factor=chosen", "seed=0"], "seed=0,tuned.factor=chosen,xgrad=off")):  # fmt: skip
        named = [compose_job("tuned", "converged", [*job, *stage_given], hydra=True).hydra
                 for stage_given in ([], [f"tuned.stage={stage}"])]  # fmt: skip
        assert [h.sweep.subdir for h in named] == [f"fashion_mnist-lenet/sgdm/{folder}"] * 2, stage


def _grid(folder, scores: dict[tuple[str, bool], list[float | None]], mode="min", data="mnist", model="vae",
          metric="loss", grid=GRID):  # fmt: skip
    """A grid sweep on disk: one run per (optimizer, arm, factor of ``grid``) whose best validation value is the
    score."""
    for (optimizer, xgrad), values in scores.items():
        for factor, score in zip(grid, values):
            if score is None:
                continue
            run = folder / f"{optimizer}-{xgrad}-{factor}"
            write_run(run, data=data, model=model, optimizer=optimizer, xgrad=xgrad, seed=100, metric=metric,
                      mode=mode, curve=(score + 5 * (1 if mode == "min" else -1), score), scale="converged")  # fmt: skip
            record = {"seed": 100, "optimizer.name": optimizer, "xgrad.enabled": xgrad, "tuned.factor": factor}
            (run / "run.json").write_text(json.dumps({"config": record, "epochs": 2}))


def test_each_arm_takes_the_factor_its_grid_runs_scored_best_on_validation(tmp_path):
    from xgrad.report.tuning import chosen_factor, grid_notes

    _grid(tmp_path, {("adam", False): [130, 125, 120, 121, 140], ("adam", True): [131, 126, 122, 119, 139],
                     ("sgdm", False): [150, 140, 140, 145, 160]})  # fmt: skip
    assert chosen_factor(tmp_path, GRID, "mnist", "vae", "adam", False) == 1.0
    assert chosen_factor(tmp_path, GRID, "mnist", "vae", "adam", True) == 2.0
    assert chosen_factor(tmp_path, GRID, "mnist", "vae", "sgdm", False) == 1.0  # a tie: the factor nearest 1
    with pytest.raises(ValueError, match=r"^no lr grid for mnist · vae · sgdm · XGrad in .*: run the grid stage first"):
        chosen_factor(tmp_path, GRID, "mnist", "vae", "sgdm", True)
    notes = grid_notes(tmp_path, GRID)
    assert any("adam · XGrad" in line and "×2: 119," in line and line.endswith("chosen ×2.") for line in notes), notes


def test_an_arm_trained_beyond_the_grid_chooses_among_every_factor_it_has(tmp_path):
    """An arm best at the grid's low edge is trained at lower factors too (run folders are named by factor, so the
    extension lands beside the grid): its choice is then bracketed, and its final job trains at it."""
    from xgrad.report.tuning import chosen_factor, grid_notes

    _grid(tmp_path, {("sgdm", False): [120, 125, 130, 135, 140]})  # best at ×0.25, the grid's lowest factor
    assert chosen_factor(tmp_path, GRID, "mnist", "vae", "sgdm", False) == 0.25
    [line] = grid_notes(tmp_path, GRID)
    assert line.endswith("chosen ×0.25 (at the edge of the grid: a lr beyond it might score better still)."), line
    _grid(tmp_path, {("sgdm", False): [119, 118]}, grid=[0.0625, 0.125])  # the extension: ×0.125 best, ×0.0625 worse
    assert chosen_factor(tmp_path, GRID, "mnist", "vae", "sgdm", False) == 0.125
    [line] = grid_notes(tmp_path, GRID)
    assert "(best validation value per factor of the protocol's lr): ×0.0625: 119, ×0.125: 118, ×0.25: 120," in line
    assert line.endswith("×4: 140; chosen ×0.125."), line
    job = compose_job("tuned", "converged", ["tuned.stage=final", "protocol=quick/mnist_vae", "optimizer=sgdm",
                                             "xgrad=off", "tuned.factor=chosen", "seed=0", f"tuned.grid_dir={tmp_path}",
                                             f"tuned.grid=[{','.join(map(str, GRID))}]"])  # fmt: skip
    assert check(job).optimizer.lr == pytest.approx(0.125 * 1e-3)


def test_the_sweep_names_every_factor_as_the_same_number_the_grid_holds():
    """A factor the short form would round (√2) keeps every digit: its runs must be found as the grid's factor."""
    from xgrad.trained_config import sweep_values

    grid = [0.03125, 0.125, 1.0, 8, 1e-05, math.sqrt(2)]
    assert sweep_values(grid) == "0.03125,0.125,1,8,1e-05,1.4142135623730951"
    assert [float(text) for text in sweep_values(grid).split(",")] == grid


def test_a_factor_beyond_the_grid_that_has_not_completed_leaves_the_choice_open(tmp_path):
    from xgrad.report.tuning import chosen_factor, grid_notes

    _grid(tmp_path, {("sgdm", False): [120, 125, 130, 135, 140]})
    run = tmp_path / "extension"
    write_run(run, data="mnist", model="vae", optimizer="sgdm", seed=100, metric="loss", mode="min", curve=(150.0,),
              status="failed", reason="OSError: [Errno 28] No space left on device", scale="converged")  # fmt: skip
    (run / "run.json").write_text(json.dumps({"config": {"seed": 100, "tuned.factor": 0.125}}))
    with pytest.raises(ValueError, match=r"lacks ×0\.125: run the grid stage first"):
        chosen_factor(tmp_path, GRID, "mnist", "vae", "sgdm", False)
    [line] = grid_notes(tmp_path, GRID)
    assert "×0.125: —, ×0.25: 120," in line and line.endswith("no choice yet: grid incomplete."), line


def test_an_incomplete_grid_chooses_nothing_and_the_final_job_is_refused_in_one_line(tmp_path):
    from xgrad.report.tuning import chosen_factor

    _grid(tmp_path, {("adam", False): [135, 130, None, 120, 121, 140, 150]}, grid=STUDY_GRID)  # all but ×0.5
    with pytest.raises(ValueError, match=r"lacks ×0\.5: run the grid stage first"):
        chosen_factor(tmp_path, STUDY_GRID, "mnist", "vae", "adam", False)
    job = compose_job("tuned", "converged", ["tuned.stage=final", "protocol=quick/mnist_vae", "optimizer=adam",
                                             "xgrad=off", "tuned.factor=chosen", "seed=0", f"tuned.grid_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        check(job)
    assert "\n" not in str(refused.value) and "lacks ×0.5" in str(refused.value)


def test_a_grid_run_that_diverged_scores_worst_while_one_that_failed_otherwise_leaves_its_factor_missing(
        train_run, monkeypatch, tmp_path):  # fmt: skip
    """A real run stopped by a NaN loss at ×4 is that lr's outcome: the arm takes the best finite factor; a run that
    failed for another reason (here a full disk) is no outcome, so the grid is incomplete until it is rerun."""
    from xgrad.report.tuning import chosen_factor, grid_notes

    grid = tmp_path / "grid"
    _grid(grid, {("adam", False): [80.0, 85.0, None, 86.0, None]}, mode="max", data="fashion_mnist", model="lenet",
          metric="acc")  # fmt: skip
    diverged = grid / "adam-False-4.0"
    fail_at_step(monkeypatch, 1)
    with pytest.raises(TrainingFailed):
        train_run(f"hydra.run.dir={diverged}", "trainer.log_every_n_steps=1", "data.batch_size=32")
    record = json.loads((diverged / "run.json").read_text())
    record["config"]["tuned.factor"] = 4.0
    (diverged / "run.json").write_text(json.dumps(record))
    other = grid / "adam-False-1.0"
    write_run(other, optimizer="adam", seed=100, curve=(0.5,), status="failed", reason="OSError: [Errno 28] No space "
              "left on device", scale="converged")  # fmt: skip
    (other / "run.json").write_text(json.dumps({"config": {"seed": 100, "optimizer.name": "adam", "tuned.factor": 1}}))

    with pytest.raises(ValueError, match=r"lacks ×1: run the grid stage first"):
        chosen_factor(grid, GRID, "fashion_mnist", "lenet", "adam", False)
    [line] = grid_notes(grid, GRID)
    assert "×1: —, ×2: 86, ×4: diverged; no choice yet: grid incomplete." in line, line

    shutil.rmtree(other)  # the factor run again, to the end
    _grid(grid, {("adam", False): [None, None, 84.0]}, mode="max", data="fashion_mnist", model="lenet", metric="acc")
    assert chosen_factor(grid, GRID, "fashion_mnist", "lenet", "adam", False) == 2.0  # 86 at ×2; ×4 diverged
    [line] = grid_notes(grid, GRID)
    assert line.endswith("×4: diverged; chosen ×2."), line
    job = compose_job("tuned", "converged", ["tuned.stage=final", "protocol=converged/fashion_mnist_lenet",
                                             "optimizer=adam", "xgrad=off", "tuned.factor=chosen", "seed=0",
                                             f"tuned.grid_dir={grid}", f"tuned.grid=[{','.join(map(str, GRID))}]"])  # fmt: skip
    assert check(job).optimizer.lr == pytest.approx(2 * 1e-3)


def test_a_grid_that_diverged_at_every_factor_chooses_nothing(tmp_path):
    from xgrad.report.tuning import Arm, choose, grid_notes

    arm = Arm("mnist", "vae", "sgdm", True, "min", tuple(GRID), (math.inf,) * len(GRID))
    with pytest.raises(ValueError, match=r"every lr of the grid of mnist · vae · sgdm · XGrad diverged"):
        choose(arm)
    for factor in GRID:  # the same on disk: every run stopped by a NaN loss, as the engine records it
        run = tmp_path / str(factor)
        write_run(run, data="mnist", model="vae", optimizer="sgdm", xgrad=True, seed=100, metric="loss", mode="min",
                  curve=(150.0,), status="failed", reason="non-finite training loss (nan) at step 3 (epoch 1; ...)",
                  scale="converged")  # fmt: skip
        (run / "run.json").write_text(json.dumps({"config": {"seed": 100, "tuned.factor": factor}}))
    [line] = grid_notes(tmp_path, GRID)
    assert line.endswith("×4: diverged; no choice: every factor diverged."), line


def test_the_arms_pair_across_their_own_learning_rates_only_where_the_runs_say_so(tmp_path):
    from xgrad.report import group_cells, load_runs

    for per_arm in ([], ["optimizer.lr"]):
        folder = tmp_path / str(len(per_arm))
        for seed in range(3):
            for xgrad, lr in ((False, 4e-3), (True, 2e-3)):
                run = folder / f"{xgrad}{seed}"
                write_run(run, optimizer="adam", xgrad=xgrad, seed=seed, curve=(0.5, 0.6 + 0.01 * seed + 0.02 * xgrad))
                record = {"seed": seed, "optimizer.name": "adam", "optimizer.lr": lr, "xgrad.enabled": xgrad,
                          "tuned.per_arm": per_arm}  # fmt: skip
                (run / "run.json").write_text(json.dumps({"config": record, "epochs": 2}))
        cells = group_cells(load_runs([folder]))
        if per_arm:  # one comparison, three pairs, each arm at its lr
            [cell] = cells
            assert len(cell.baseline) == 3 and len(cell.xgrad[1]) == 3
        else:  # the lr sets the runs apart: two cells, neither with both arms
            assert len(cells) == 2 and all(not c.baseline or not c.xgrad for c in cells)


def test_the_arms_of_a_tuned_comparison_share_one_cell_in_the_dashboards():
    """W&B's cell pairs the arms as the report does: each arm's own lr (tuned.per_arm) does not split the cell."""
    from xgrad.trained_config import cell

    trains = {"data.name": "mnist", "model.name": "vae", "optimizer.name": "adam", "trainer.grad_clip": None, "seed": 0}
    baseline, xgrad = {**trains, "optimizer.lr": 4e-3}, {**trains, "optimizer.lr": 2e-3, "xgrad.enabled": True}
    assert cell(baseline) != cell(xgrad)  # without the mark: two settings
    tuned = {"tuned.per_arm": ["optimizer.lr"]}
    assert cell({**baseline, **tuned}) == cell({**xgrad, **tuned}) != cell({**baseline, **tuned, "trainer.grad_clip": 1.0})


def test_both_stages_run_as_hydra_sweeps_and_the_final_page_lists_the_grid(tmp_path, monkeypatch):
    """The study's own commands, at test size: the grid sweep names its runs by factor, the final sweep's jobs read
    it back and train at each arm's choice, and the final page lists each arm's grid scores."""
    monkeypatch.chdir(tmp_path)
    cell = ["-m", "experiment=tuned", "protocol=quick/mnist_vae", "optimizer=adam", "tuned.grid=[0.5,2.0]",
            "data.batch_size=32", "trainer.limit_val_batches=1"]  # fmt: skip
    assert main_with(monkeypatch, *cell) == 0
    grid = tmp_path / "multirun/tuned/grid/mnist-vae/adam"

    def folder(sweep, factor, xgrad):  # the run folder named by (among the test's own overrides) factor and arm
        [found] = [p for p in sweep.iterdir() if f",tuned.factor={factor}," in f",{p.name}," and p.name.endswith(f"xgrad={xgrad}")]
        return found

    assert len(list(grid.iterdir())) == 4 and all(folder(grid, f, x) for f in ("0.5", "2") for x in ("off", "on"))
    assert main_with(monkeypatch, *cell, "tuned.stage=final", "seed=0") == 0
    page = (tmp_path / "results/converged/tuned.md").read_text()
    for arm, xgrad in (("baseline", "off"), ("XGrad", "on")):
        [line] = [line for line in page.splitlines() if f"lr grid, mnist · vae · adam · {arm} " in line]
        scores = {f: json.loads((folder(grid, f, xgrad) / "summary.json").read_text())["best"] for f in ("0.5", "2")}
        chosen = min(scores, key=scores.get)  # a loss: the lowest validation value
        assert f"chosen ×{chosen}" in line, line
        final = folder(tmp_path / "multirun/tuned/final/mnist-vae/adam", "chosen", xgrad)
        trained = json.loads((final / "run.json").read_text())["config"]["optimizer.lr"]
        assert trained == pytest.approx(1e-3 * float(chosen))

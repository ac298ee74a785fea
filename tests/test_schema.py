"""The config schema (xgrad/schema.py): every bad value and unknown key refused in one line, before anything runs.

Refusals are checked where a user meets them: the in-process run (nothing
written), the command line (one line on stderr, exit status 2) and a sweep
(each refused job's summary.json carries the same line, the others train).
"""

from __future__ import annotations

import json

import pytest

from conftest import CONF_DIR, main_with
from xgrad.schema import GROUPS, ConfigError, check

SMALL = ("data.batch_size=32", "data.eval_batch_size=100")

#: the issue's list of values that used to crash (some after a whole epoch) or train as if not given
BAD_VALUES = [
    ("optimizer.lr=-1", "optimizer.lr=-1: must be a finite number in \\[0, 1000\\]"),
    ("optimizer.lr=nan", "optimizer.lr=nan: must be a finite number in \\[0, 1000\\]"),
    ("optimizer.lr=abc", "optimizer.lr='abc': must be a finite number in \\[0, 1000\\]"),
    ("optimizer.betas=[2,0.9]", r"optimizer.betas=\[2, 0.9\]: must be two numbers in \[0, 1\)"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1: must be a finite number >= 0"),
    ("data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
    ("data.batch_size=-5", "data.batch_size=-5: must be an integer >= 1"),
    ("data.batch_size=abc", "data.batch_size='abc': must be an integer >= 1"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0: must be an integer >= 1"),
    ("trainer.device=null", "trainer.device=None: must be auto, cpu, cuda or cuda:N"),
    ("trainer.epochs='5'", "trainer.epochs='5': must be an integer >= 1"),
    ("trainer.checkpoint_every_n_steps=0", "trainer.checkpoint_every_n_steps=0: must be null or an integer >= 1"),
    ("+foo=1", "foo=1: not a key of the config"),
    ("+trainer.epoch=2", r"trainer.epoch=2: not a key of trainer \(did you mean trainer.epochs\?\)"),
    ("logger.wandb.init_timeout=0", "logger.wandb.init_timeout=0: must be a finite number > 0"),
    ("logger.wandb.init_timeout=abc", "logger.wandb.init_timeout='abc': must be a finite number > 0"),
    ("+logger.wandb.projct=x", r"logger.wandb.projct='x': not a key of logger.wandb \(did you mean logger.wandb.project\?\)"),
    ("optimizer.lr=1e308", r"optimizer.lr=1e\+308: must be a finite number in \[0, 1000\]"),
    ("seed=4294967296", r"seed=4294967296: must be an integer in \[0, 2\*\*32 - 1\]"),
    ("seed=-1", r"seed=-1: must be an integer in \[0, 2\*\*32 - 1\]"),
]
MULTISTEP_BAD = [
    ("scheduler.milestones=1", "scheduler.milestones=1: must be a list of increasing integers >= 1"),
    ("scheduler.milestones=abc", "scheduler.milestones='abc': must be a list of increasing integers >= 1"),
    ("scheduler.milestones=[3,2]", r"scheduler.milestones=\[3, 2\]: must be a list of increasing integers >= 1"),
]


@pytest.mark.parametrize(("overrides", "message"), [((o,), m) for o, m in BAD_VALUES]
                         + [(("scheduler=multistep", o), m) for o, m in MULTISTEP_BAD])  # fmt: skip
def test_a_bad_value_is_refused_in_one_line_before_anything_is_written(train_run, tmp_path, overrides, message):
    run_dir = tmp_path / "bad"
    with pytest.raises(ConfigError, match=f"^{message}") as refused:
        train_run("logger=wandb", *overrides, f"hydra.run.dir={run_dir}")
    assert "\n" not in str(refused.value)
    assert not run_dir.exists()


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_option_of_every_group_has_its_schema_in_the_config_store(compose_config, group):
    """A new conf/<group>/<option>.yaml fails here until xgrad/schema.py describes it."""
    from test_configs import compatible_pairs

    partner = {"data": {d: f"model={m}" for m, d in compatible_pairs()},
               "model": {m: f"data={d}" for m, d in compatible_pairs()}}.get(group, {})  # fmt: skip
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        cfg = compose_config(f"{group}={option}", *[partner[option]] if option in partner else [])
        check(cfg)  # loads the option's schema from the ConfigStore: raises if it is not there


def test_a_key_of_another_option_is_refused_naming_the_keys_allowed(compose_config):
    with pytest.raises(ConfigError, match=r"^optimizer.momentum=0.9: not a key of optimizer=adam; its keys: name, "):
        check(compose_config("optimizer=adam", "+optimizer.momentum=0.9"))
    with pytest.raises(ConfigError, match=r"^optimizer.name='nadam': must be one of adabelief, adam, adam3, adamw, "):
        check(compose_config("optimizer.name=nadam"))


def test_a_value_a_constructor_refuses_is_one_line_naming_the_option(train_run, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^optimizer=sgdm: Nesterov momentum requires a momentum and zero dampening"):
        train_run("optimizer=sgdm", "optimizer.nesterov=true", "optimizer.momentum=0", f"hydra.run.dir={run_dir}")
    with pytest.raises(ConfigError, match=r"^xgrad.models.lenet.LeNet5: .*unexpected keyword argument 'foo'"):
        train_run("+model.net.foo=1", f"hydra.run.dir={run_dir}")
    assert not (run_dir / "summary.json").exists()


@pytest.mark.parametrize(("override", "line"), [
    ("optimizer.lr=abc", "error: optimizer.lr='abc': must be a finite number in [0, 1000]"),
    ("+trainer.epoch=2", "error: trainer.epoch=2: not a key of trainer (did you mean trainer.epochs?); its keys: "),
    ("+optimizer.nesterov=true", "error: optimizer.nesterov=True: not a key of optimizer=adam; its keys: "),
])  # fmt: skip
def test_the_command_line_refuses_with_one_line_and_exit_status_2(monkeypatch, capsys, tmp_path, override, line):
    assert main_with(monkeypatch, "optimizer=adam", override, f"hydra.run.dir={tmp_path / 'run'}") == 2
    [printed] = capsys.readouterr().err.strip().splitlines()
    assert printed.startswith(line)
    assert list((tmp_path / "run").iterdir()) == []  # not even Hydra's train.log: it is opened by the first line logged


@pytest.mark.parametrize(("env", "line"), [
    ({"SUBMITIT_PREEMPT_SIGNAL": "KILL"}, "error: SUBMITIT_PREEMPT_SIGNAL='KILL': SIGKILL cannot be caught"),
    ({"SUBMITIT_PREEMPT_SIGNAL": "NOPE"}, "error: SUBMITIT_PREEMPT_SIGNAL='NOPE' names no signal"),
    ({"RANK": "0", "WORLD_SIZE": "4"}, "error: RANK=0 WORLD_SIZE=4 are set but MASTER_ADDR and MASTER_PORT not"),
    ({"WANDB_MODE": "onlin"}, "error: WANDB_MODE='onlin': W&B accepts online, offline"),
])  # fmt: skip
def test_an_environment_the_run_would_trip_over_is_one_line_and_exit_status_2(monkeypatch, capsys, tmp_path, env,
                                                                                line):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main_with(monkeypatch, "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}") == 2
    [printed] = capsys.readouterr().err.strip().splitlines()
    assert printed.startswith(line), printed
    assert list((tmp_path / "run").iterdir()) == []


def test_a_run_directory_that_is_a_file_is_one_line_and_the_file_is_untouched(monkeypatch, capsys, tmp_path):
    for given in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        (tmp_path / "notes.txt").write_text("mine")
        assert main_with(monkeypatch, f"hydra.run.dir={given}") == 2
        [printed] = capsys.readouterr().err.strip().splitlines()
        assert "notes.txt" in printed and "not a folder" in printed, printed
        assert (tmp_path / "notes.txt").read_text() == "mine"
    assert main_with(monkeypatch, "-m", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'notes.txt'}") == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_sweep_records_each_refusal_whatever_stage_refused_it(monkeypatch, capsys, tmp_path):
    """Four jobs: two refused by the schema, one by the predictor (when it is built), one that trains."""
    sweep = tmp_path / "sweep"
    argv = ["-m", "xgrad=on", "optimizer.lr=-1,0.01", "xgrad.rule=nosuch,auto", *SMALL, f"hydra.sweep.dir={sweep}"]
    assert main_with(monkeypatch, *argv) == 1  # Hydra ends a sweep with a failed job nonzero
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    summaries = [json.loads((sweep / str(job) / "summary.json").read_text()) for job in range(4)]
    assert sorted(s["status"] for s in summaries) == ["completed", "failed", "failed", "failed"]
    reasons = sorted(s["reason"] for s in summaries if s["status"] == "failed")
    schema_line = "refused: optimizer.lr=-1: must be a finite number in [0, 1000]"
    assert reasons[:2] == [schema_line, schema_line]
    assert reasons[2].startswith("refused: optimizer=adam xgrad.rule=nosuch: ") and "\n" not in reasons[2]
    assert all(not (sweep / str(job) / "metrics.jsonl").exists() for job, s in enumerate(summaries) if s["status"] == "failed")
    assert f"\n{schema_line.removeprefix('refused: ')}\n" in stderr  # the sweep's first failure, as Hydra prints it


def test_the_sweep_jobs_of_every_experiment_pass_the_schema():
    """Experiments add top-level keys (scale, protocol, cells, ...): the first and last job of every sweep compose
    and pass; overhead, which is no sweep, its one benchmark job."""
    from test_experiments import SWEEPS, compose_job, sweep_jobs

    experiments = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    assert sorted({figure for figure, _ in SWEEPS} | {"overhead", "tuned", "tuned_vae"}) == experiments  # tuned*: tests/test_tuned.py
    check(compose_job("overhead", "quick", ["protocol=quick/fashion_mnist_lenet"]))
    for experiment, scale in SWEEPS:
        jobs = sweep_jobs(experiment, scale)
        assert jobs, (experiment, scale)
        for job in jobs[:1] + jobs[-1:]:
            check(compose_job(experiment, scale, job))


@pytest.mark.parametrize("given, precision", [(32, "fp32"), ("bf16", "bf16"), (16, "fp16")])
def test_the_checked_config_is_the_typed_object_the_engine_reads(compose_config, given, precision):
    """check returns the schema's dataclasses, with enums where a key has a fixed set of values; the engine's
    autocast dtype and gradient scaler follow that enum."""
    import torch

    from xgrad.engine import Engine
    from xgrad.schema import Config, Precision, Trainer

    job = check(compose_config(f"trainer.precision={given}", "trainer.channels_last=false", "data.on_device=auto"))
    assert isinstance(job, Config) and isinstance(job.trainer, Trainer)
    assert job.trainer.precision is Precision[precision] and str(job.trainer.precision) == str(given)
    assert job.trainer.channels_last is False and job.data.on_device == "auto"
    engine = Engine.__new__(Engine)  # only the two attributes the autocast reads
    engine.trainer, engine.device = job.trainer, torch.device("cpu")
    expected = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with engine._autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == expected

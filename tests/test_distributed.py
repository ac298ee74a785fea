"""One run on several processes (xgrad/distributed.py): the same training as one process, one writer, one stop.

Processes are real: torchrun, submitit's local executor (the SLURM launcher's
stand-in) and ``torch.multiprocessing``, two ranks of one thread each, backend
gloo. Each process imports torch (seconds here), so the runs are few and
shared: LeNet on Fashion-MNIST, 2 epochs of 30 batches of 32, once through
torchrun with XGrad and once as a two-task submitit job without it, each
compared with the same run in this process; then the torchrun run again,
stopped twice by SIGTERM (one rank alone, then torchrun, which forwards it)
and rerun each time. "The same" for two ranks against one process means the
training loss to a relative 1e-4 and the validation accuracy to 0.1 points
(the gradients are summed in another order); for two ranks against two ranks,
metrics.jsonl without its timings, equal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TEST_OVERRIDES, summary, untimed
from xgrad import checkpoint, distributed
from xgrad.distributed import Launch
from xgrad.run_dir import RunDirectory, RunDirRefused, fingerprint
from xgrad.schema import ConfigError
from xgrad.train import validate

TESTS = Path(__file__).resolve().parent
#: a few dozen steps of LeNet: two epochs of 30 global batches of 32 (16 per rank)
ARGS = (*TEST_OVERRIDES, "trainer.epochs=2", "trainer.limit_train_batches=30", "data.batch_size=32",
        "data.eval_batch_size=100")  # fmt: skip
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def environment(**extra: str) -> dict[str, str]:
    """This process's (offline) environment, one thread per rank, and ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def launch(command: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=environment(**extra), capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, Path]:
    """The shared 2-rank runs: ``on`` (XGrad, torchrun) and ``off`` (baseline, a submitit job of two tasks)."""
    root = tmp_path_factory.mktemp("two_ranks")
    torchrun = launch([*TORCHRUN, "-m", "xgrad.train", *ARGS, "xgrad=on", f"hydra.run.dir={root / 'on'}"], root)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    sweep = root / "submitit"
    job = launch([sys.executable, "-m", "xgrad.train", "-m", "hydra/launcher=submitit_local",
                  "hydra.launcher.tasks_per_node=2", *ARGS, "xgrad=off", f"hydra.sweep.dir={sweep}"], root)  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    return {"on": root / "on", "off": sweep / "0", "submitit": sweep / ".submitit"}


# ---------------------------------------------------------------- two ranks train as one process


@pytest.mark.parametrize("arm", ["off", "on"])
def test_two_ranks_train_what_one_process_trains(two_ranks, train_run, arm):
    alone = train_run(*ARGS, f"xgrad={arm}")
    together = two_ranks[arm]
    assert [line["step"] for line in untimed(together)] == [line["step"] for line in untimed(alone)] == [30, 60]
    for two, one in zip(untimed(together), untimed(alone), strict=True):
        assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-4)
        assert two["val/acc"] == pytest.approx(one["val/acc"], abs=0.1)
    assert (summary(together)["world_size"], summary(together)["backend"]) == (2, "gloo")
    assert (summary(alone)["world_size"], summary(alone)["backend"]) == (1, None)
    saved = checkpoint.load(together / "checkpoints" / "last.pt")
    assert saved.world_size == 2 and len(saved.ranks) == 2  # every rank's random state, in rank 0's file


def test_the_slurm_launchers_tasks_join_one_run(two_ranks):
    """submitit (what hydra/launcher=slurm submits through) starts two tasks of one job; they train one run."""
    (task_0,) = two_ranks["submitit"].glob("*/*_0_log.out")
    (task_1,) = two_ranks["submitit"].glob("*/*_1_log.out")
    assert "global_rank=0(2)" in task_0.read_text() and "global_rank=1(2)" in task_1.read_text()
    assert summary(two_ranks["off"])["status"] == "completed" and summary(two_ranks["off"])["world_size"] == 2


# ---------------------------------------------------------------- stopped and resumed


def test_two_ranks_stopped_mid_epoch_and_rerun_end_as_the_uninterrupted_run(two_ranks, tmp_path):
    """SIGTERM to rank 1 alone in epoch 1, then to torchrun (which forwards it) in epoch 2: each time every rank
    stops after the same step, rank 0 writes one checkpoint, and the rerun continues at the next batch."""
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    command = [*TORCHRUN, str(TESTS / "signal_at_step.py"), *ARGS, "xgrad=on", f"hydra.run.dir={run_dir}"]

    first = launch(command, tmp_path, SIGNAL_RANK="1", SIGNAL_AT_STEP="10", SIGNAL_TO="self")
    assert first.returncode != 0 and "exitcode  : 143" in first.stderr, first.stderr[-3000:]
    assert summary(run_dir)["reason"].startswith("stopped by SIGTERM after batch 10 of 30 in epoch 1")
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert (saved.step, saved.position["batch"], len(saved.ranks)) == (10, 10, 2)
    assert saved.position["samples"] == 10 * 32  # each rank trained on its 16 of every 32

    # rank 1's Hydra names another folder (as ${now:...} may): it still resumes rank 0's run
    second = launch(command, tmp_path, SIGNAL_RANK="0", SIGNAL_AT_STEP="30", SIGNAL_TO="parent",
                    OTHER_RUN_DIR=str(elsewhere))  # fmt: skip
    assert second.returncode != 0 and summary(run_dir)["status"] == "interrupted", second.stderr[-3000:]
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert saved.epoch == 1 and 10 <= saved.position["batch"] < 30  # 20 steps of epoch 1, then into epoch 2
    assert {path.name for path in elsewhere.iterdir()} <= {"train.log"}  # nothing of the run's was written there

    third = launch([*TORCHRUN, "-m", "xgrad.train", *ARGS, "xgrad=on", f"hydra.run.dir={run_dir}"], tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert untimed(run_dir) == untimed(two_ranks["on"])
    assert summary(run_dir)["status"] == "completed"


# ---------------------------------------------------------------- the collectives, in two processes


def _collectives(rank: int, port: int, out: Path) -> None:
    """Rank ``rank`` of two, through :func:`distributed.start` as under torchrun; writes what it saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    world = distributed.start(distributed.launch(), torch.device("cpu"))
    seen: dict = {"world": [world.rank, world.size, world.backend]}

    torch.manual_seed(0)  # the same model and batch on both ranks
    model, inputs, targets = nn.Linear(3, 1), torch.randn(8, 3), torch.randn(8, 1)
    reference = nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    F.mse_loss(reference(inputs), targets).backward()  # one process, the whole batch
    mine = slice(0, 3) if rank == 0 else slice(3, 8)  # unequal shares: 3 and 5 samples

    class Stop:
        requested = signal.SIGTERM if rank == 1 else None

    ddp = world.wrap(model, torch.device("cpu"))  # held: DDP all-reduces in the backward of a live wrapper
    loss = F.mse_loss(ddp(inputs[mine]), targets[mine])
    loss, step = world.weigh(loss, mine.stop - mine.start, Stop)
    loss.backward()
    seen["gradient_error"] = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(),
                                                                                       reference.parameters()))  # fmt: skip
    seen["totals"] = [(step.loss_sum / step.samples).item(), int(step.samples)]  # summed over the ranks on the device
    seen["whole_loss"] = F.mse_loss(reference(inputs), targets).item()
    seen["step_signal"] = step.signal()
    seen["stop_signal"] = world.stop_signal(signal.SIGUSR2 if rank == 1 else None)
    seen["gathered"] = world.gather(rank * 10)
    seen["chosen"] = world.from_rank_zero(lambda: f"chosen by rank {rank}")

    def refuse() -> None:
        raise RunDirRefused("the folder is in use by another run")

    def fail_on_rank_one() -> str:
        if rank == 1:
            raise ValueError("bad value on rank 1")
        return "fine"

    for name, attempt in (("from_rank_zero", lambda: world.from_rank_zero(refuse)),
                          ("on_every_rank", lambda: world.on_every_rank(fail_on_rank_one))):  # fmt: skip
        try:
            attempt()
            seen[name] = None
        except Exception as error:  # noqa: BLE001 -- what each rank raises is the point
            seen[name] = [type(error).__name__, str(error)]
    (out / f"{rank}.json").write_text(json.dumps(seen))
    world.barrier()  # both ranks done before either exits and tears the process group down


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_ranks_agree_on_gradients_stops_values_and_failures(tmp_path):
    torch.multiprocessing.start_processes(_collectives, args=(free_port(), tmp_path), nprocs=2, start_method="spawn")
    zero, one = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert zero["world"] == [0, 2, "gloo"] and one["world"] == [1, 2, "gloo"]
    # shares of 3 and 5 samples, weighted: DDP's average is the gradient of the mean over all 8
    assert zero["gradient_error"] < 1e-6 and one["gradient_error"] < 1e-6
    assert zero["totals"] == one["totals"] == [pytest.approx(zero["whole_loss"], rel=1e-6), 8]
    # a signal that only rank 1 received stops both
    assert zero["step_signal"] == one["step_signal"] == signal.SIGTERM
    assert zero["stop_signal"] == one["stop_signal"] == signal.SIGUSR2
    assert (zero["gathered"], one["gathered"]) == ([0, 10], None)
    assert zero["chosen"] == one["chosen"] == "chosen by rank 0"
    # a refusal on rank 0, a failure on rank 1: every rank stops, the others naming the rank that failed
    assert zero["from_rank_zero"] == ["RunDirRefused", "the folder is in use by another run"]
    assert one["from_rank_zero"] == ["RankFailed", "rank 0 stopped: the folder is in use by another run"]
    assert zero["on_every_rank"] == ["RankFailed", "rank 1 stopped: bad value on rank 1"]
    assert one["on_every_rank"] == ["ValueError", "bad value on rank 1"]


# ---------------------------------------------------------------- in this process


def test_the_launch_is_read_from_torchrun_then_submitit_else_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch() == Launch()
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")  # a task of a submitit job, as on SLURM
    for key, value in (("JOB_ID", "7"), ("NTASKS", "4"), ("GLOBALID", "3"), ("LOCALID", "1"), ("JOB_NUM_NODES", "2"),
                       ("NODEID", "1")):  # fmt: skip
        monkeypatch.setenv(f"SUBMITIT_LOCAL_{key}", value)
    assert distributed.launch() == Launch(rank=3, world_size=4, local_rank=1, launcher="submitit")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert distributed.launch() == Launch(rank=1, world_size=2, local_rank=1, launcher="torchrun")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "1", "WORLD_SIZE": "2"}, r"^RANK=1 WORLD_SIZE=2 are set but MASTER_ADDR and MASTER_PORT not"),
        ({"RANK": "one", "WORLD_SIZE": "2"}, r"^RANK=one WORLD_SIZE=2: not integers"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, r"^RANK=2 WORLD_SIZE=2: the rank"),
    ],
)
def test_leftover_or_broken_launch_variables_are_refused_in_one_line(monkeypatch, env, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.LaunchRefused, match=message) as caught:
        distributed.launch()
    assert "\n" not in str(caught.value)


def test_torchrun_with_one_process_is_the_one_process_run():
    world = distributed.start(Launch(rank=0, world_size=1, launcher="torchrun"), torch.device("cpu"))
    assert (world.size, world.backend, world.main) == (1, None, True)
    assert not torch.distributed.is_initialized()
    model = nn.Linear(2, 2)
    assert world.wrap(model, torch.device("cpu")) is model  # no DDP wrapper


@pytest.mark.parametrize(
    ("overrides", "ranks", "message"),
    [
        (("data.batch_size=30",), 4, r"^data\.batch_size=30: not divisible by the 4 processes of this run"),
        (("data=ptb", "model=lstm1", "data.batch_size=20"), 3, r"^data\.batch_size=20: not divisible by the 3"),
        (("trainer.sync_batchnorm=true",), 2, r"^trainer\.sync_batchnorm=true: synchronised batch norm needs CUDA"),
    ],
)
def test_what_the_ranks_cannot_share_is_refused_before_training(compose_config, overrides, ranks, message):
    cfg = compose_config(*overrides)
    validate(cfg)  # one process: fine
    with pytest.raises(ConfigError, match=message):
        validate(cfg, Launch(rank=0, world_size=ranks))


def test_a_mid_epoch_checkpoint_with_carried_state_resumes_on_as_many_ranks_only(compose_config, tmp_path):
    """A language model's mid-epoch checkpoint holds each rank's hidden state for its own columns."""
    from xgrad.records import Checkpoint

    cfg = compose_config("data=ptb", "model=lstm1")
    directory = RunDirectory(tmp_path)
    directory.accept(cfg)
    config = fingerprint(cfg)  # what the entry point stores in every checkpoint
    engine_state = {"model": {}, "optimizer": {}, "scaler": {}, "rng": {}, "step": 3, "history": [], "elapsed_s": 0.0}
    saved = Checkpoint.from_dict({**engine_state, "epoch": 0, "position": {"batch": 3, "task": {"state": None}},
                                  "world_size": 2, "config": config}, "it")  # fmt: skip
    assert directory.check(cfg, saved, world_size=2) is None
    with pytest.raises(RunDirRefused, match=r"by 2 process\(es\), .* continue it on 2 process\(es\) \(this start has 1\)"):
        directory.check(cfg, saved, world_size=1)
    at_epoch_end = Checkpoint.from_dict({**engine_state, "epoch": 1, "position": None, "world_size": 2,
                                         "config": config}, "it")  # fmt: skip
    assert directory.check(cfg, at_epoch_end, world_size=3) is None  # batches are global: any number of ranks


def test_the_slurm_launcher_submits_one_task_per_gpu_on_every_node(monkeypatch, tmp_path):
    """What ``hydra/launcher=slurm`` hands sbatch for one run on 2 nodes × 4 GPUs (read, not submitted: no cluster)."""
    from hydra.core.global_hydra import GlobalHydra
    from submitit.slurm.slurm import SlurmExecutor

    from xgrad.train import main

    class Submitted(Exception):
        pass

    scripts = []

    def sbatch(self, script: Path) -> list[str]:
        scripts.append(Path(script).read_text())
        raise Submitted

    monkeypatch.setattr(SlurmExecutor, "affinity", staticmethod(lambda: 1))  # "srun is here"
    monkeypatch.setattr(SlurmExecutor, "_make_submission_command", sbatch)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["xgrad.train", "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
                                      "hydra.launcher.tasks_per_node=4", "hydra.launcher.nodes=2", *TEST_OVERRIDES,
                                      f"hydra.sweep.dir={tmp_path}"])  # fmt: skip
    try:
        with pytest.raises(Submitted):
            main()
    finally:
        GlobalHydra.instance().clear()
    (script,) = scripts
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --signal=USR2@120"):
        assert line in script.splitlines(), line
    assert "srun" in script and "submitit.core._submit" in script  # every task runs the same Hydra job


def test_a_sweep_run_by_every_rank_is_reported_by_rank_zero_alone(monkeypatch, tmp_path, train_run):
    """Under torchrun each process runs the sweep (each job on all of them): one writes the figure's table."""
    from omegaconf import OmegaConf

    from xgrad.callbacks import SweepReports

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")},
                                         "runtime": {"choices": {"experiment": "adam"}}}, "scale": "quick"})  # fmt: skip
    train_run("data.batch_size=32", f"hydra.run.dir={tmp_path / 'sweep' / '0'}")
    for rank, written in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29500")
        reports = SweepReports(results=str(tmp_path / f"results{rank}"))
        reports.on_multirun_start(config)
        reports.on_multirun_end(config)
        assert (tmp_path / f"results{rank}" / "adam.md").is_file() == written


@pytest.mark.parametrize("device", ["auto", "cuda"])
@pytest.mark.parametrize(("visible", "expected"), [(8, [f"cuda:{rank % 4}" for rank in range(8)]), (1, ["cuda:0"] * 8)])
def test_each_process_of_a_gpu_run_is_put_on_the_gpu_of_its_local_rank(monkeypatch, device, visible, expected):
    """CUDA mocked: 8 ranks on two nodes of 4 (torchrun), seeing a node's GPUs or one GPU each (--gpus-per-task)."""
    from xgrad.train import resolve_device

    put_on = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", put_on.append)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.atexit, "register", lambda *args: None)
    for rank in range(8):
        where = Launch(rank=rank, world_size=8, local_rank=rank % 4, launcher="torchrun")
        distributed.start(where, resolve_device(device, where))
    assert [str(d) for d in put_on] == expected
    for d in put_on:
        torch.cuda._get_device_index(d, optional=False)  # what set_device requires: an index (raises without one)

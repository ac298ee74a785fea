"""The GPU habits, checked on the CPU: no read off the device per step, data on the device, compile, threads.

A GPU makes the host wait whenever a value is read off it (``.item()``,
``float(t)``, ``.tolist()``, ``.cpu()``); on the CPU nothing waits, so the
tests count those calls instead. Tensors that torch keeps on the host even
in a GPU run (the optimizers' step counts) are not counted.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from conftest import summary, untimed
from xgrad import WeightPredictor, performance
from xgrad.engine import Engine
from xgrad.schema import ConfigError

SMALL = ("data.batch_size=32", "data.eval_batch_size=100")
TINY_PTB = ("model=lstm1", "data=ptb", "model.net.emb_size=16", "model.net.hidden_size=16", "data.batch_size=4",
            "data.eval_batch_size=4", "data.bptt=8")  # fmt: skip
#: the Tensor methods that read a value off the tensor's device
READS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"}


class CountReads(TorchFunctionMode):
    """Counts the reads of tensor values, except of the tensors ``host_tensors()`` names (host-resident by design)."""

    def __init__(self, host_tensors):
        super().__init__()
        self.host_tensors, self.reads = host_tensors, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS and args and not any(args[0] is t for t in self.host_tensors()):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def count_training_reads(monkeypatch) -> list[list[str]]:
    """Patch the engine so that each epoch's training pass records the reads it makes (one list per epoch)."""
    epochs, train = [], Engine._train

    def counted(self, epoch):
        def optimizer_steps():
            return [state["step"] for state in self.optimizer.state.values() if "step" in state]

        with CountReads(optimizer_steps) as counter:
            try:
                return train(self, epoch)
            finally:
                epochs.append(counter.reads)

    monkeypatch.setattr(Engine, "_train", counted)
    return epochs


@pytest.mark.parametrize("model", [(), TINY_PTB], ids=["lenet", "lstm"])
def test_training_reads_the_loss_once_per_window_not_per_step(train_run, monkeypatch, model):
    """12 steps, the loss read every 5 steps and at the epoch's end: 3 reads, one value each."""
    epochs = count_training_reads(monkeypatch)
    train_run("xgrad=on", "trainer.limit_train_batches=12", "trainer.log_every_n_steps=5", *SMALL, *model)
    assert epochs == [["item", "item", "item"]]


def test_a_read_per_step_would_be_counted(train_run, monkeypatch):
    """The counter sees what a per-step ``loss.item()`` would cost: one read per step more."""
    epochs = count_training_reads(monkeypatch)
    train_step = Engine.train_step

    def reading_train_step(self, batch):
        step = train_step(self, batch)
        step.loss_sum.item()
        return step

    monkeypatch.setattr(Engine, "train_step", reading_train_step)
    train_run("trainer.limit_train_batches=12", "trainer.log_every_n_steps=5", *SMALL)
    assert len(epochs[0]) == 12 + 3


# ---------------------------------------------------------------- data on the device


@pytest.mark.parametrize("data", [("data.module.augment=true",), TINY_PTB], ids=["fashion_mnist", "ptb"])
def test_data_on_the_device_trains_the_same_run_on_the_cpu(train_run, data):
    """On the CPU the device is the host: batches made from data moved there are the same, bit for bit."""
    args = ("xgrad=on", "trainer.epochs=2", "trainer.limit_train_batches=3", *SMALL, *data)
    assert untimed(train_run(*args, "data.on_device=true")) == untimed(train_run(*args, "data.on_device=false"))


def test_translation_batches_built_by_loader_workers_train_the_same_run(train_run, tmp_path):
    """WMT16's padded batches come from worker processes (pinned memory on a GPU): the same batches, in the same
    order, and the loader draws nothing from the global generator, so the dropout masks are the same too."""
    from test_translation import write_corpus

    root = write_corpus(tmp_path / "wmt")
    args = ("model=gnmt_tiny", "data=wmt16_en_de", f"data.root={root}", "data.vocab_size=96", "data.batch_size=16",
            "trainer.epochs=2", "trainer.limit_train_batches=4", "xgrad=on")  # fmt: skip
    workers = untimed(train_run(*args, "data.module.num_workers=2"))
    assert workers == untimed(train_run(*args, "data.module.num_workers=0"))


def test_data_built_on_the_host_has_no_on_device_key(train_run, tmp_path):
    """WMT16's batches are padded on the host (by loader workers, into pinned memory): the key is refused."""
    from test_translation import write_corpus

    root = write_corpus(tmp_path / "wmt")
    with pytest.raises(ConfigError, match="data.on_device=True: not a key of data"):
        train_run("model=gnmt_tiny", "data=wmt16_en_de", f"data.root={root}", "data.vocab_size=96",
                  "+data.on_device=true")  # fmt: skip


def test_auto_settings_resolve_for_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [performance.channels_last("auto", conv, device) for conv in (True, False) for device in (cpu, cuda)] == [
        False, True, False, False]  # fmt: skip
    assert performance.channels_last(True, False, cpu) and not performance.channels_last(False, True, cuda)
    assert [performance.data_on_device(s, d) for s in ("auto", True, False) for d in (cpu, cuda)] == [
        False, True, True, True, False, False]  # fmt: skip


def test_tf32_is_set_for_cuda_in_a_way_every_reader_of_torchs_flags_accepts():
    """Set through the calls that keep torch's older and newer flags consistent: reading either never raises (as
    it does once only a newer flag was set), and the CPU is left alone."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        performance.use_tf32(torch.device("cpu"), True)
        assert torch.get_float32_matmul_precision() == before[0]
        for enabled, precision in ((True, "tf32"), (False, "ieee")):
            performance.use_tf32(torch.device("cuda"), enabled)
            assert torch.backends.cuda.matmul.allow_tf32 is enabled and torch.backends.cudnn.allow_tf32 is enabled
            assert torch.backends.cuda.matmul.fp32_precision == precision
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


# ---------------------------------------------------------------- compile


def test_compiled_training_with_xgrad_follows_the_eager_one():
    """XGrad's in-place predict and restore keep a compiled model's graphs valid: trained side by side from the
    same weights on the same batches, the compiled model's losses and weights follow the eager model's, with
    no recompilation after the first steps; and the prediction reaches the compiled graph (its losses differ
    from a compiled baseline's)."""
    torch.manual_seed(0)
    batches = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(6)]
    initial = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).state_dict()

    def train(compiled: bool, xgrad: bool) -> tuple[list[float], nn.Module]:
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        model.load_state_dict(initial)
        run = torch.compile(model) if compiled else model
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        predictor = WeightPredictor(optimizer, steps=1 if xgrad else 0)
        losses = []
        for i, (x, y) in enumerate(batches):
            with torch._dynamo.config.patch(error_on_recompile=compiled and i >= 2), predictor.predicted():
                loss = nn.functional.cross_entropy(run(x), y)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, model

    torch._dynamo.reset()
    (compiled, compiled_model), (eager, eager_model) = train(True, True), train(False, True)
    assert compiled == pytest.approx(eager, rel=1e-5)
    for p, q in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    baseline, _ = train(True, False)
    assert baseline[0] == pytest.approx(compiled[0], rel=1e-5)  # step 1 has no state to predict from
    assert abs(baseline[-1] - compiled[-1]) > 1e-3


# ---------------------------------------------------------------- threads


def test_a_joblib_job_takes_the_cores_divided_by_the_jobs(train_run):
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        run_dir = train_run("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SMALL)
        assert torch.get_num_threads() == max(cores // 2, 1)
    finally:
        torch.set_num_threads(before)
    assert summary(run_dir)["hardware"].endswith(f", {max(cores // 2, 1)} threads")


@pytest.mark.parametrize(("configured", "n_jobs", "expected"), [(None, 2, "half"), (None, -1, 1), (3, 2, 3)])
def test_threads_per_job(configured, n_jobs, expected):
    cores = len(os.sched_getaffinity(0))
    joblib = {"_target_": performance.JOBLIB_LAUNCHER, "n_jobs": n_jobs}
    wanted = max(cores // 2, 1) if expected == "half" else expected
    assert performance.threads_per_job(configured, joblib) == wanted
    assert performance.threads_per_job(None, {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}) is None
    assert performance.threads_per_job(None, None) is None


def test_a_benchmarks_xgrad_arm_predicts_and_its_baseline_does_not(compose_config, tmp_path):
    """The two arms bench_throughput and bench_overhead time side by side: one with a predictor, one without."""
    from xgrad.builder import benchmark_arm, build_data

    cfg = compose_config("xgrad=on", "logger=none")
    data = build_data(cfg, torch.device("cpu"))
    baseline = benchmark_arm(cfg, data, torch.device("cpu"), tmp_path / "baseline", xgrad=False)
    xgrad = benchmark_arm(cfg, data, torch.device("cpu"), tmp_path / "xgrad", xgrad=True)
    assert baseline.predictor is None and isinstance(xgrad.predictor, WeightPredictor)
    with pytest.raises(ValueError, match=r"xgrad=on"):  # an XGrad arm without XGrad would time the baseline twice
        benchmark_arm(compose_config("xgrad=off"), data, torch.device("cpu"), tmp_path / "off", xgrad=True)

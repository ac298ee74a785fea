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
from torch.utils._python_dispatch import TorchDispatchMode

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


def test_a_compiled_image_model_compiles_once_per_mode_whatever_the_batch_size(train_run, monkeypatch):
    """Two epochs of 6 batches of 512 and one of 188, evaluations in batches of 200 and 100: two graphs in all
    (training, evaluation), no graph break. Counted with dynamo's CompileCounter backend, which compiles nothing."""
    from torch._dynamo.testing import CompileCounter

    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compile_(model, backend=counter))
    torch._dynamo.reset()
    run_dir = train_run("data=mnist", "data.batch_size=512", "data.eval_batch_size=200", "trainer.epochs=2",
                        "trainer.limit_train_batches=null", "trainer.limit_val_batches=null", "xgrad=on",
                        "trainer.compile=true")  # fmt: skip
    assert summary(run_dir)["status"] == "completed"
    assert (counter.frame_count, torch._dynamo.utils.counters["graph_break"].total()) == (2, 0)


def test_compile_runs_a_model_that_dynamo_cannot_capture_eagerly_saying_so(train_run, monkeypatch, caplog):
    from torch._dynamo.testing import CompileCounter

    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compile_(model, backend=counter))
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="xgrad.builder"):
        train_run(*TINY_PTB, "trainer.compile=true")
    assert counter.frame_count == 0
    assert "trainer.compile=true: model=lstm1 runs eagerly (model.compiles=false: dynamo breaks its graph" in caplog.text


def test_dynamo_does_break_the_graph_of_the_models_that_say_so():
    """What ``compiles: false`` in conf/model/ rests on: dynamo's own account of the recurrent models' forward."""
    from xgrad.models.gnmt import GNMT
    from xgrad.models.lstm_lm import AWDLSTM

    calls = [(AWDLSTM(50, 8, 8, 2), (torch.randint(0, 50, (5, 3)),)),
             (GNMT(50, 8, 2, 2), (torch.randint(4, 50, (3, 5)), (5, 4, 2), torch.randint(4, 50, (3, 4))))]  # fmt: skip
    for model, args in calls:
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(*args).graph_break_count > 0, type(model).__name__


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


# ---------------------------------------------------------------- every model's step, on the meta device


class CountTransfers(TorchDispatchMode):
    """Every value read off the device and every host→device copy, seen where torch dispatches them.

    The model and its optimizer live on ``meta`` (shapes, no values), which
    stands for the GPU: a read (``item()``, ``bool()``, a copy to the host,
    also the ones torch makes internally, e.g. in ``pack_padded_sequence``) is
    recorded and answered with a dummy value, and a copy from the host is
    recorded with whether it blocks. Tensors that torch keeps on the host in a
    GPU run too (the optimizers' step counts) are host tensors here as well,
    not counted.
    """

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            self.events.append("read")
            return 1
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device", source.device)
            if source.device.type == "meta" and target.type == "cpu":
                self.events.append("read")
                return torch.empty(source.shape, dtype=kwargs.get("dtype") or source.dtype)
            if source.device.type == "cpu" and target.type == "meta":
                self.events.append("copy to device" if kwargs.get("non_blocking") else "blocking copy to device")
        return func(*args, **kwargs)


def _every_model_with_its_data():
    from test_configs import model_input, options

    data = {"image": ("data=fashion_mnist",), "text": ("data=ptb", "data.bptt=8"),
            "translation": ("data=wmt16_en_de",)}  # fmt: skip
    return [pytest.param(model, data[model_input(model)], id=model) for model in options("model")]


@pytest.mark.parametrize(("model", "data"), _every_model_with_its_data())
def test_no_training_step_of_any_model_waits_for_the_device(compose_config, tmp_path_factory, model, data):
    """Steps 2 and 3 of every model with XGrad and clipping: nothing read off the device, only the batch copied to it.

    (Step 1 may move a task's constants once, and creates the optimizer's state.)
    """
    from xgrad.builder import build_run
    from xgrad.engine import to_device
    from xgrad.loggers import RunLogger
    from xgrad.records import Identity

    extra = ()
    if "data=wmt16_en_de" in data:
        from test_translation import VOCAB, write_corpus

        root = tmp_path_factory.mktemp("wmt16")
        extra = (f"data.root={write_corpus(root)}", f"data.vocab_size={VOCAB}")
    meta = torch.device("meta")
    cfg = compose_config(f"model={model}", *data, *extra, "xgrad=on", "trainer.grad_clip=1.0", "data.batch_size=4")
    parts = build_run(cfg, meta)
    run_dir = tmp_path_factory.mktemp("run")
    engine = parts.engine(run_dir, RunLogger(run_dir, Identity()))
    parts.forward.train()
    parts.task.start_epoch(parts.forward, training=True)
    batches = iter(parts.data.train_batches(0, 0))
    for step in range(3):
        batch = next(batches)
        with CountTransfers() as counted:
            engine.train_step(to_device(batch, meta, engine.channels_last))
        tensors = [t for t in (batch.values() if isinstance(batch, dict) else batch) if torch.is_tensor(t)]
        if step > 0:
            assert counted.events == ["copy to device"] * len(tensors), f"step {step + 1}: {counted.events}"


@pytest.mark.parametrize("model", [("model=lenet",), ("model=vae",), TINY_PTB], ids=["lenet", "vae", "lstm"])
def test_an_evaluation_reads_its_metrics_off_the_device_once(compose_config, model):
    """Three batches, one read: the sums stay on the device until the pass ends (translation decodes on the host)."""
    from itertools import islice

    from xgrad.builder import build_run

    parts = build_run(compose_config(*model, "data.eval_batch_size=8"), torch.device("cpu"))
    parts.model.eval()
    parts.task.start_epoch(parts.model, training=False)
    with torch.no_grad(), CountReads(lambda: []) as counter:
        metrics = parts.task.evaluate(parts.model, islice(parts.data.val_batches(), 3))
    assert len(counter.reads) == 1, counter.reads
    assert all(isinstance(value, float) for key, value in metrics.items() if key != "size")
    assert isinstance(metrics["size"], int)  # counted on the host, never read off the device


# ---------------------------------------------------------------- bf16: never float16 by the back door


@pytest.mark.parametrize(("model", "data"), _every_model_with_its_data())
def test_no_model_has_a_recurrent_layer_that_autocast_would_run_in_float16(compose_config, tmp_path_factory, model,
                                                                           data):  # fmt: skip
    """torch's autocast casts cuDNN RNNs to float16 even when asked for bf16: every LSTM is xgrad's float32 one."""
    from hydra.utils import instantiate

    extra = ()
    if "data=wmt16_en_de" in data:
        from test_translation import VOCAB

        extra = (f"data.vocab_size={VOCAB}",)
    net = compose_config(f"model={model}", *data, *extra).model.net
    with torch.device("meta"):
        modules = list(instantiate(net).modules())
    plain = [type(m).__name__ for m in modules if isinstance(m, nn.RNNBase) and not getattr(m, "autocast_float32", None)]
    assert plain == []


def test_under_bf16_autocast_the_lstm_layers_run_in_float32_and_the_rest_in_bf16():
    from xgrad.models.lstm_lm import AWDLSTM

    torch.manual_seed(0)
    model = AWDLSTM(vocab_size=50, emb_size=8, hidden_size=8, num_layers=2).eval()
    tokens = torch.randint(0, 50, (5, 3))
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((getattr(m, "autocast_float32", "other"),
                                                                 (o[0] if isinstance(o, tuple) else o).dtype)))
             for m in (*model.rnns, model.decoder)]  # fmt: skip
    with torch.no_grad():
        plain = [model.rnns[0](model.encoder(tokens))[0]]
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _ = model(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first = model.rnns[0](model.encoder(tokens))[0]
    for hook in hooks:
        hook.remove()
    assert seen[:3] == [("LSTM", torch.float32), ("LSTM", torch.float32), ("other", torch.bfloat16)]
    assert logits.dtype == torch.bfloat16  # the decoder ran in bf16
    assert torch.equal(first, plain[0])  # exactly the float32 layer


def test_a_run_says_what_its_precision_ran_as(train_run):
    from xgrad import performance
    from xgrad.models.lenet import LeNet5
    from xgrad.models.lstm_lm import AWDLSTM

    lstm = AWDLSTM(vocab_size=10, emb_size=4, hidden_size=4, num_layers=1)
    assert performance.precision_label(lstm, "bf16") == "bf16 (LSTM layers in float32)"
    assert performance.precision_label(lstm, 32) == "32"
    assert performance.precision_label(LeNet5(1, 10, 28), "bf16") == "bf16"
    assert summary(train_run(*TINY_PTB, "trainer.precision=bf16"))["precision"] == "bf16 (LSTM layers in float32)"

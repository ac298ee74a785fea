"""How a run uses its hardware: the settings the configs leave at ``auto``, resolved for the device at hand.

The configs hold the choices (which models are convolutional, whether a
dataset may live on the device); this module holds the mechanisms, and each
of them leaves a CPU run exactly as it always was, so that runs on the CPU
stay bit-identical to those the results tables were made from:

- TF32 (``trainer.tf32``, default true): on CUDA, float32 matrix products and
  convolutions run on the tensor cores with a 10-bit mantissa, several times
  faster; the CPU has no such mode and is left alone.
- channels-last (``trainer.channels_last=auto``): on CUDA, the networks whose
  model config says ``channels_last: true`` (the convolutional ones) keep
  weights and images as NHWC, the layout cuDNN's fastest convolutions read.
- data on the device (``data.on_device=auto``): on CUDA, datasets small
  enough to sit in memory are moved to the GPU once and batched there
  (xgrad/data/images.py, xgrad/data/ptb.py).
- compile (``trainer.compile``, xgrad/builder.py): one process compiles the
  model once, and trains and evaluates through that one compiled module
  (dynamo keeps a graph per mode); several processes compile the DDP wrapper
  for training, so that the all-reduce overlaps the backward pass, and the
  model itself for evaluation. The batch dimension is dynamic from the first
  call (:class:`DynamicBatch`), so an epoch's smaller last batch and the
  evaluation batch size reuse the graphs instead of compiling new ones. A model
  whose config says ``compiles: false`` (the LSTMs: dynamo breaks the graph at
  every ``nn.LSTM`` and would fall back to eager anyway) runs eagerly, with a
  line in the log saying so. The predictor writes θ̂ and restores θ with
  in-place copies into the same parameter storage, which the compiled graphs
  read as inputs: they stay valid and are not recompiled
  (tests/test_performance.py trains a compiled and an eager model with XGrad
  side by side on the CPU and compares them step by step).
- CPU threads (``trainer.num_threads=null``): a job of a joblib sweep takes the
  cores ÷ the parallel jobs, so that the jobs do not oversubscribe the cores.
"""

from __future__ import annotations

import os
from typing import Any

import torch

#: Hydra's joblib launcher, as its config names it
JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def use_tf32(device: torch.device, enabled: bool) -> None:
    """On CUDA, TF32 for float32 matrix products, convolutions and RNNs (or full float32); nothing on the CPU.

    The setting is global to the process, so it is set either way: a process
    that runs several jobs (a sweep, the tests) gets each job's own choice.
    Set through the two calls that keep torch's older flags and its newer
    ``fp32_precision`` ones consistent (torch >= 2.9 refuses to read an older
    flag, as compiled code may, once only a newer one was set).
    """
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def precision_label(model: torch.nn.Module, precision: Any) -> str:
    """What ``trainer.precision`` ran as for ``model``: ``32``, ``bf16`` or ``16``, naming the modules kept in float32.

    A module whose ``autocast_float32`` names its layers runs in float32 under
    autocast (xgrad/models/rnn.py: torch's cuDNN RNNs would otherwise run in float16 under bf16).
    """
    precision = str(precision)
    kept = sorted({m.autocast_float32 for m in model.modules() if getattr(m, "autocast_float32", None)})
    if precision in ("bf16", "16") and kept:
        return f"{precision} ({', '.join(kept)} layers in float32)"
    return precision


class DynamicBatch(torch.nn.Module):
    """``torch.compile(module)``, called with the first dimension of every tensor argument marked dynamic.

    Without it, dynamo specialises the graph on the first batch size and
    compiles again when an epoch's last batch is smaller, and again for the
    evaluation batch size (tens of seconds of Inductor each, on a ResNet).
    Attributes other than the module's own (``model.latent``, ``model.greedy``)
    are the compiled module's, i.e. the model's.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.compiled = torch.compile(module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        return self.compiled(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.compiled, name)


def channels_last(setting: Any, convolutional: bool, device: torch.device) -> bool:
    """``trainer.channels_last``: auto → on CUDA for a convolutional model (``model.channels_last``)."""
    if setting == "auto":
        return convolutional and device.type == "cuda"
    return bool(setting)


def data_on_device(setting: Any, device: torch.device) -> bool:
    """``data.on_device``: auto → on CUDA (on the CPU the data is where it would be anyway)."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def threads_per_job(configured: int | None, launcher: Any = None) -> int | None:
    """CPU threads for this job: ``configured``; else, under Hydra's joblib launcher, the cores ÷ its jobs; else None.

    ``launcher`` is the ``hydra.launcher`` node of the running job (None
    outside Hydra). joblib's ``n_jobs`` counts like joblib does: -1 is one job
    per core, -2 one fewer, and so on. None leaves torch's default (all cores,
    or ``OMP_NUM_THREADS``).
    """
    if configured is not None:
        return configured
    if launcher is None or launcher.get("_target_") != JOBLIB_LAUNCHER:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = launcher.get("n_jobs") or -1
    jobs = jobs if jobs > 0 else max(cores + 1 + jobs, 1)
    return max(cores // jobs, 1)

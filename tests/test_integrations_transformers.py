"""``xgrad.integrations.transformers.XGradCallback`` trains exactly as the suite's own loop (tests/suite_loop.py).

A tiny classifier is trained by ``transformers.Trainer`` with the callback and
by the hand-written loop on the same batches, from the same weights; their
parameters must agree to 1e-6 relative (float32) — with the Trainer's
gradient accumulation, clipping, bf16 mixed precision, after
``resume_from_checkpoint`` — and each XGrad run must also differ from the
unpredicted loop, so the prediction is what the comparison sees. ``steps=0``
must equal the Trainer without the callback.

Not here: ``fp16=True``. On the CPU accelerate 1.15 runs it in float32, with
no autocast and no GradScaler, so a CPU test would only repeat the 32-bit one
(tests/test_integrations_lightning.py runs Lightning's fp16 scaler path on the CPU).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from suite_loop import (
    loss_fn, make_batches, make_net, make_optimizer, make_scheduler, relative_difference, train_suite_loop,
)
from xgrad import WeightPredictor
from xgrad.integrations.transformers import XGradCallback
from xgrad.rules import RECORD

WINDOWS = 4  # optimizer steps per run


class Classifier(nn.Module):
    """The suite loop's network behind the Trainer's interface: keyword inputs in, ``{"loss": ...}`` out."""

    def __init__(self):
        super().__init__()
        self.net = make_net()

    def forward(self, x, labels):
        return {"loss": loss_fn(self.net(x), labels)}


def train(batches, output_dir, *, callbacks=(), accumulate=1, clip=None, precision="32", save_steps=None,
          resume_from_checkpoint=None):
    """Train a fresh Classifier on ``batches`` in order (one micro-batch per item); returns its network."""
    model = Classifier()
    optimizer = make_optimizer(model.parameters())
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=len(batches) // accumulate, gradient_accumulation_steps=accumulate,
        max_grad_norm=clip or 0.0, bf16=precision == "bf16-mixed", fp16=precision == "16-mixed", use_cpu=True,
        per_device_train_batch_size=1, train_sampling_strategy="sequential", dataloader_num_workers=0,
        remove_unused_columns=False, report_to="none", logging_strategy="no", disable_tqdm=True,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=[{"x": x, "labels": y} for x, y in batches],
        data_collator=lambda items: items[0], optimizers=(optimizer, make_scheduler(optimizer)),
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return model.net


@pytest.mark.parametrize(
    "steps, accumulate, clip, precision",
    [
        (1, 1, None, "32"),
        (2, 3, 0.05, "32"),  # the Trainer's accumulation (loss / k) and clipping
        (1, 2, 0.05, "bf16-mixed"),
    ],
)
def test_the_callback_trains_exactly_as_the_suite_loop(tmp_path, steps, accumulate, clip, precision):
    batches = make_batches(WINDOWS * accumulate)
    trained = train(batches, tmp_path, callbacks=[XGradCallback(steps)], accumulate=accumulate, clip=clip,
                    precision=precision)
    settings = dict(accumulate=accumulate, clip=clip, precision=precision)
    assert relative_difference(trained, train_suite_loop(batches, steps=steps, **settings)) < 1e-6
    assert relative_difference(trained, train_suite_loop(batches, steps=0, **settings)) > 1e-3


def test_steps_0_is_the_plain_trainer_run(tmp_path):
    batches = make_batches(WINDOWS * 2)
    with_callback = train(batches, tmp_path / "xgrad", callbacks=[XGradCallback(0)], accumulate=2, clip=0.05)
    plain = train(batches, tmp_path / "plain", accumulate=2, clip=0.05)
    assert relative_difference(with_callback, plain) < 1e-6


@pytest.mark.parametrize("moved", [False, True])
def test_a_resumed_run_ends_as_the_uninterrupted_one(tmp_path, moved):
    """The last-update rule's recorded direction is the state a resume needs: in optimizer.pt, wherever it goes."""
    batches = make_batches(WINDOWS * 2)

    def callbacks():
        return [XGradCallback(1, rule="last_update")]

    settings = dict(accumulate=2, clip=0.05, save_steps=2)
    uninterrupted = train(batches, tmp_path / "run", callbacks=callbacks(), **settings)  # checkpoint-2 and -4
    halfway = tmp_path / "run" / "checkpoint-2"
    if moved:
        halfway = halfway.rename(tmp_path / "elsewhere")
    resumed = train(batches, tmp_path / "resumed", callbacks=callbacks(), resume_from_checkpoint=str(halfway),
                    **settings)
    assert relative_difference(resumed, uninterrupted) < 1e-6

    optimizer_state = torch.load(halfway / "optimizer.pt", weights_only=True)
    assert all(RECORD in entry for entry in optimizer_state["state"].values()), "the records are in optimizer.pt"
    for entry in optimizer_state["state"].values():
        del entry[RECORD]
    torch.save(optimizer_state, halfway / "optimizer.pt")
    fresh = train(batches, tmp_path / "fresh", callbacks=callbacks(), resume_from_checkpoint=str(halfway), **settings)
    assert relative_difference(fresh, uninterrupted) > 1e-4, "without the records the resume is not exact"


def test_a_window_cut_short_leaves_the_real_weights(tmp_path):
    """A callback stops training after the first micro-batch of the second window: that window is never stepped."""

    class StopInTheSecondWindow(TrainerCallback):
        def on_substep_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                control.should_training_stop = True

    batches = make_batches(WINDOWS * 2)
    trained = train(batches, tmp_path, callbacks=[XGradCallback(1), StopInTheSecondWindow()], accumulate=2)
    assert relative_difference(trained, train_suite_loop(batches[:2], steps=1, accumulate=2)) < 1e-6


def test_repeated_train_calls_leave_no_predictor_behind(tmp_path):
    """One Trainer, one optimizer (passed in), train() three times."""
    model = Classifier()
    optimizer = make_optimizer(model.parameters(), "rmsprop")
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, use_cpu=True, per_device_train_batch_size=1, report_to="none",
        logging_strategy="no", disable_tqdm=True, save_strategy="no", remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=[{"x": x, "labels": y} for x, y in make_batches(2)],
        data_collator=lambda items: items[0], optimizers=(optimizer, make_scheduler(optimizer)),
        callbacks=[XGradCallback(1)],
    )
    for _ in range(3):
        trainer.train()
        assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_the_predictor_unwraps_acceleratess_optimizer():
    from accelerate.optimizer import AcceleratedOptimizer

    optimizer = make_optimizer(Classifier().parameters())
    assert WeightPredictor(AcceleratedOptimizer(optimizer, device_placement=False)).optimizer is optimizer


@pytest.mark.parametrize("arguments", [dict(steps=-1), dict(rule="bogus"), dict(decoupled_decay=2)])
def test_bad_arguments_are_refused_when_the_callback_is_built(arguments):
    with pytest.raises(ValueError) as refusal:
        XGradCallback(**arguments)
    assert "\n" not in str(refusal.value)

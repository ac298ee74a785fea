"""``xgrad.integrations.lightning.XGradCallback`` trains exactly as the suite's own loop (tests/suite_loop.py).

A tiny classifier is trained by ``lightning.Trainer`` with the callback and by
the hand-written loop on the same batches, from the same weights; their
parameters must agree to 1e-6 relative (float32) — with gradient accumulation,
clipping, bf16 and fp16 autocast, after a ``ckpt_path`` resume — and each
XGrad run must also differ from the unpredicted loop, so the prediction is
what the comparison sees. ``steps=0`` must equal Lightning without the callback.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from suite_loop import (
    loss_fn, make_batches, make_net, make_optimizer, make_scheduler, relative_difference, train_suite_loop,
)
from xgrad.integrations.lightning import XGradCallback
from xgrad.rules import RECORD

WINDOWS = 4  # optimizer steps per run
# Lightning 2.6 on torch 2.14: a deprecation inside Lightning, nothing this test can act on
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated")


class Classifier(L.LightningModule):
    def __init__(self, optimizer: str = "adam"):
        super().__init__()
        self.net = make_net()
        self.optimizer_name = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return loss_fn(self.net(x), y)

    def configure_optimizers(self):
        optimizer = make_optimizer(self.parameters(), self.optimizer_name)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": make_scheduler(optimizer), "interval": "step"}}


def fit(batches, *, callbacks=(), accumulate=1, clip=None, precision="32", max_epochs=1, ckpt_path=None,
        module=None, optimizer="adam"):
    """Train ``module`` (a fresh Classifier) on ``batches`` in order; returns (net, trainer)."""
    module = module or Classifier(optimizer)
    if precision == "16-mixed":  # Lightning turns '16-mixed' into bf16 on the CPU; its fp16 plugin runs there
        precision_settings = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    else:
        precision_settings = {"precision": precision}
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=list(callbacks),
        accumulate_grad_batches=accumulate, gradient_clip_val=clip, **precision_settings,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return module.net, trainer


@pytest.mark.parametrize(
    "steps, accumulate, clip, precision, optimizer",
    [
        (1, 1, None, "32", "adam"),  # the closure runs inside optimizer.step, after its pre-hooks
        (2, 3, 0.05, "32", "adam"),  # accumulation (the first two micro-batches run with no step) and clipping
        (1, 2, 0.05, "bf16-mixed", "adam"),
        (1, 2, 0.05, "16-mixed", "adam"),  # a GradScaler: the closure runs before optimizer.step, then unscale, clip
        (1, 1, None, "32", "rmsprop"),  # the last-update record, taken around a step whose closure predicts
        (2, 3, 0.05, "32", "rmsprop"),
        (1, 2, 0.05, "16-mixed", "rmsprop"),
    ],
)
def test_the_callback_trains_exactly_as_the_suite_loop(steps, accumulate, clip, precision, optimizer):
    batches = make_batches(WINDOWS * accumulate)
    trained, trainer = fit(batches, callbacks=[XGradCallback(steps)], accumulate=accumulate, clip=clip,
                           precision=precision, optimizer=optimizer)
    settings = dict(accumulate=accumulate, clip=clip, precision=precision, optimizer_name=optimizer)
    assert relative_difference(trained, train_suite_loop(batches, steps=steps, **settings)) < 1e-6
    assert relative_difference(trained, train_suite_loop(batches, steps=0, **settings)) > 1e-3
    assert "training_step" not in vars(trainer.strategy), "the strategy's own training_step is back after the fit"


def test_steps_0_is_the_plain_lightning_run():
    batches = make_batches(WINDOWS * 2)
    with_callback, _ = fit(batches, callbacks=[XGradCallback(0)], accumulate=2, clip=0.05)
    plain, _ = fit(batches, accumulate=2, clip=0.05)
    assert relative_difference(with_callback, plain) < 1e-6


def test_a_resumed_fit_ends_as_the_uninterrupted_one(tmp_path):
    """The last-update rule's recorded direction is the predictor state a resume needs: it is in the optimizer's."""
    batches = make_batches(WINDOWS)  # one epoch: WINDOWS / 2 optimizer steps

    def callbacks():
        return [XGradCallback(1, rule="last_update")]

    settings = dict(accumulate=2, clip=0.05)
    uninterrupted, _ = fit(batches, callbacks=callbacks(), max_epochs=2, **settings)
    _, first_epoch = fit(batches, callbacks=callbacks(), max_epochs=1, **settings)
    first_epoch.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = fit(batches, callbacks=callbacks(), max_epochs=2, ckpt_path=tmp_path / "epoch1.ckpt", **settings)
    assert relative_difference(resumed, uninterrupted) < 1e-6

    checkpoint = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)
    entries = checkpoint["optimizer_states"][0]["state"].values()
    assert all(RECORD in entry for entry in entries), "the records are in the optimizer's state"
    for entry in entries:
        del entry[RECORD]
    torch.save(checkpoint, tmp_path / "without_predictor.ckpt")
    fresh, _ = fit(batches, callbacks=callbacks(), max_epochs=2, ckpt_path=tmp_path / "without_predictor.ckpt",
                   **settings)
    assert relative_difference(fresh, uninterrupted) > 1e-4, "without that state the resume is not exact"


def test_manual_optimization_is_refused_before_training():
    class Manual(Classifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="manual optimization is not supported"):
        fit(make_batches(1), callbacks=[XGradCallback()], module=Manual())


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_a_skipped_or_failed_training_step_leaves_the_real_weights():
    """A step that returns None has no backward to restore after; one that raises must not leave θ̂ behind."""
    batches = make_batches(WINDOWS)

    class Skipping(Classifier):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    class Failing(Classifier):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise KeyError("failed at the third batch")
            return super().training_step(batch, batch_idx)

    skipping = XGradCallback()
    fit(batches, callbacks=[skipping], module=Skipping())
    assert not skipping.predictor.is_predicted

    failing, module = XGradCallback(), Failing()
    with pytest.raises(KeyError, match="third batch"):
        fit(batches, callbacks=[failing], module=module)
    assert relative_difference(module.net, train_suite_loop(batches[:2], steps=1)) < 1e-6


def test_repeated_fits_on_one_optimizer_leave_no_predictor_behind():
    """Three fit() calls with one callback and a module that hands back the same optimizer each time."""

    class SameOptimizer(Classifier):
        def configure_optimizers(self):
            if not hasattr(self, "kept"):
                self.kept = make_optimizer(self.parameters(), "rmsprop")
            return self.kept

    module, callback = SameOptimizer(), XGradCallback(1)
    for _ in range(3):
        fit(make_batches(WINDOWS), callbacks=[callback], module=module)
        assert not module.kept._optimizer_step_pre_hooks and not module.kept._optimizer_step_post_hooks


@pytest.mark.parametrize("arguments", [dict(steps=-1), dict(rule="bogus"), dict(decoupled_decay="yes")])
def test_bad_arguments_are_refused_when_the_callback_is_built(arguments):
    with pytest.raises(ValueError) as refusal:
        XGradCallback(**arguments)
    assert "\n" not in str(refusal.value)


def test_the_predictor_unwraps_lightnings_optimizer():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    from xgrad import WeightPredictor

    optimizer = make_optimizer(Classifier().parameters())
    assert WeightPredictor(LightningOptimizer(optimizer)).optimizer is optimizer

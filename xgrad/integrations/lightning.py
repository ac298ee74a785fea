"""XGrad for ``lightning.Trainer``: one callback, the suite's update exactly.

    trainer = lightning.Trainer(callbacks=[XGradCallback(steps=1)], ...)

Where the prediction goes, from Lightning 2.6's own order under automatic
optimisation (``loops/optimization/automatic.py``, ``plugins/precision/``):

    on_train_batch_start
    optimizer.step(closure)            32-bit, bf16-mixed: the micro-batch that ends a window
      step pre-hooks                   ← the predictor's guard: no step while θ̂ is in place
      closure: training_step, zero_grad (first micro-batch), on_before_backward, backward,
               on_after_backward, on_before_optimizer_step, gradient clipping
      the update, step post-hooks

Under 16-mixed the closure runs *before* ``optimizer.step`` (the scaler unscales
and clipping runs in between), and a micro-batch that only accumulates runs
the closure with no step at all. So the forward may start after the step's
pre-hooks, and no callback hook sits between those pre-hooks and the forward:
predicting in ``on_train_batch_start`` would trip the guard, and any hook after
``training_step`` comes once the forward has run at θ. The one point that
precedes every training forward on every path is ``Strategy.training_step``
(Lightning's call into the module's ``training_step``): for the length of a fit
the callback wraps it to predict first, and it restores in
``on_after_backward`` — after the backward, before the unscale, gradient
clipping and the step, which read and change only the gradients.

With ``accumulate_grad_batches=k`` the weights are predicted before each
micro-batch and restored after its backward. ``predict()`` is a function of θ,
the optimizer's state and its learning rate, none of which changes inside a
window (the optimizer, and a scheduler with ``interval="step"``, step only at
its end), so every micro-batch is taken at the window-start θ̂, bit for bit:
the update of predicting once at the start of the window. θ̂ cannot stay in
place across the window: the last micro-batch's forward runs inside
``optimizer.step``, after the guard, and between micro-batches other callbacks
(checkpoints, loggers, weight averaging) would see it.

Resume: the last-update rule's records live in the optimizer's own state, so
they travel in Lightning's checkpoint with the optimizer's state and come back
with ``ckpt_path``. The callback's own state is the predictor's settings; on
``ckpt_path`` resume Lightning loads callback states before it builds the
optimizer, so they are checked in ``on_fit_start``, which builds the predictor
(a checkpoint of other settings is refused in one line).

Life cycle: the predictor is built when a fit starts and detached (its step
hooks removed, its stash freed) when the fit ends or fails, so repeated
``fit()`` calls on one optimizer leave at most one predictor's hooks.

Refused with one line: manual optimisation (the training step steps its own
optimizers; wrap its forward and backward in ``WeightPredictor.predicted()``
instead). Several optimizers need manual optimisation in Lightning 2.x (it
refuses them under automatic optimisation), so they are refused with it. This
is the unified ``lightning`` package's callback; the standalone
``pytorch_lightning`` package has its own ``Callback`` class.
"""

from __future__ import annotations

import functools
from typing import Any

from xgrad.predict import WeightPredictor, check_arguments

try:
    import lightning.pytorch as pl
except ImportError as error:  # the extra is not installed
    raise ImportError("xgrad.integrations.lightning needs Lightning: pip install 'xgrad[lightning]'") from error


class XGradCallback(pl.Callback):
    """Train with the gradient at the weights ``steps`` updates ahead (see the module docstring for the hooks).

    The arguments are ``WeightPredictor``'s; ``self.predictor`` is built on the
    module's optimizer when the fit starts.
    """

    def __init__(self, steps: int = 1, rule: str = "auto", decoupled_decay: bool | None = None):
        check_arguments(steps, rule, decoupled_decay)
        self.steps = steps
        self.rule = rule
        self.decoupled_decay = decoupled_decay
        self.predictor: WeightPredictor | None = None
        self._resumed_state: dict | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not pl_module.automatic_optimization:
            raise ValueError(
                "XGradCallback: manual optimization is not supported (the training step steps its own "
                "optimizers); wrap its forward and backward in WeightPredictor.predicted() instead"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # one optimizer: Lightning refuses several under automatic optimisation itself
        self._detach()  # a predictor of an earlier fit
        self.predictor = WeightPredictor(trainer.optimizers[0], self.steps, self.rule, self.decoupled_decay)
        if self._resumed_state is not None:
            self.predictor.load_state_dict(self._resumed_state)
            self._resumed_state = None
        predictor, training_step = self.predictor, trainer.strategy.training_step

        @functools.wraps(training_step)
        def training_step_at_predicted_weights(*args: Any, **kwargs: Any) -> Any:
            predictor.predict()
            output = training_step(*args, **kwargs)  # if it raises, on_exception restores
            if output is None:  # Lightning skips this backward, so on_after_backward will not restore
                predictor.restore()
            return output

        trainer.strategy.training_step = training_step_at_predicted_weights

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.predictor.restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()  # restores the real weights, whatever failed between the prediction and the backward
        _unwrap_training_step(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._detach()
            _unwrap_training_step(trainer)

    def _detach(self) -> None:
        if self.predictor is not None:
            self.predictor.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "rule": self.rule, "decoupled_decay": self.decoupled_decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_state = state_dict or None


def _unwrap_training_step(trainer: pl.Trainer) -> None:
    """Give the strategy back its own ``training_step`` (the wrapper is an attribute of the instance)."""
    vars(trainer.strategy).pop("training_step", None)

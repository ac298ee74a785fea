"""XGrad for ``transformers.Trainer``: one callback, the suite's update exactly.

    trainer = transformers.Trainer(model, args, callbacks=[XGradCallback(steps=1)], ...)

Where the prediction goes, from the Trainer's own order (``Trainer._run_epoch``
in transformers 5.24), for one optimizer step over k micro-batches:

    on_step_begin                          ← predict (once, at the start of the window)
    k × training_step: forward, backward of loss/k (accelerate's autocast and scaler)
        on_substep_end between micro-batches
    clip_grad_norm_ (fp16 gradients unscaled first)
    on_pre_optimizer_step                  ← restore
    optimizer.step()                       accelerate's AcceleratedOptimizer → the real optimizer
    on_optimizer_step, lr_scheduler.step(), zero_grad, on_step_end

Nothing steps the optimizer inside a window, so θ̂ stays in place from the
first forward to the last backward (the predictor's step pre-hook guard never
sees it). No callback event lies between the last backward and the clip, so
the weights come back just after it: the clip reads and rescales only the
gradients and the restore writes only the weights, so their order does not
change the update. The optimizer then steps θ_t with the gradient taken at θ̂.

The predictor is built in ``on_train_begin`` on the optimizer inside
accelerate's ``AcceleratedOptimizer`` (``WeightPredictor`` unwraps it); its
step hooks fire when the wrapper steps it, also through the fp16 scaler, and
it is detached in ``on_train_end``, so repeated ``train()`` calls leave at most
one predictor's hooks. A window cut short (a callback asks to stop in
``on_substep_end``) ends the epoch with θ̂ in place: ``on_epoch_end`` restores
it, before the Trainer evaluates or saves. The Trainer has no exception event,
so an exception inside a window leaves θ̂ in the model.

Resume: the last-update rule's records live in the optimizer's own state, so
they are saved in each checkpoint folder's ``optimizer.pt`` and loaded with it
by ``resume_from_checkpoint``, wherever the folder has been moved; the Trainer
loads it before ``on_train_begin``. The closed-form rules read only the
optimizer's state, so nothing else needs saving.
"""

from __future__ import annotations

from xgrad.predict import WeightPredictor, check_arguments

try:
    from transformers import TrainerCallback
except ImportError as error:  # the extra is not installed
    raise ImportError(
        "xgrad.integrations.transformers needs Transformers and Accelerate: pip install 'xgrad[transformers]'"
    ) from error


class XGradCallback(TrainerCallback):
    """Train with the gradient at the weights ``steps`` updates ahead (see the module docstring for the events).

    The arguments are ``WeightPredictor``'s, checked here; ``self.predictor`` is
    built on the Trainer's optimizer when training begins.
    """

    def __init__(self, steps: int = 1, rule: str = "auto", decoupled_decay: bool | None = None):
        check_arguments(steps, rule, decoupled_decay)
        self.steps = steps
        self.rule = rule
        self.decoupled_decay = decoupled_decay
        self.predictor: WeightPredictor | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._detach()  # a predictor of an earlier train()
        self.predictor = WeightPredictor(optimizer, self.steps, self.rule, self.decoupled_decay)

    def on_step_begin(self, args, state, control, **kwargs):
        self.predictor.predict()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.predictor.restore()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.predictor.is_predicted:  # a window cut short: its gradient is never applied
            self.predictor.restore()

    def on_train_end(self, args, state, control, **kwargs):
        self._detach()

    def _detach(self) -> None:
        if self.predictor is not None:
            self.predictor.detach()

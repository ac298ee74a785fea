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
accelerate's ``AcceleratedOptimizer`` (a wrapper with no rule of its own); its
step hooks fire when the wrapper steps it, also through the fp16 scaler.
A window cut short (a callback asks to stop in ``on_substep_end``) ends the
epoch with θ̂ in place: ``on_epoch_end`` restores it, before the Trainer
evaluates or saves. The Trainer has no exception event, so an exception
inside a window leaves θ̂ in the model.

Resume: the predictor's ``state_dict()`` goes into the checkpoint folder as
``xgrad_predictor.pt``. The Trainer tells callbacks neither the folder it saves
to nor the one it resumes from; it saves into
``<output_dir>/checkpoint-<global step>`` (outside hyperparameter search, whose
trials keep their own folders: saving there is refused). On resume (a global
step above 0 at ``on_train_begin``) the file is read from
``args.resume_from_checkpoint`` when that is set, else from that folder; when
neither holds it the predictor starts fresh, with a warning (exact for the
closed-form rules, which read only the optimizer's state; the last-update
rule then predicts nothing on its first step).
"""

from __future__ import annotations

import logging
import os

import torch

from xgrad.predict import WeightPredictor

try:
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:  # the extra is not installed
    raise ImportError(
        "xgrad.integrations.transformers needs Transformers and Accelerate: pip install 'xgrad[transformers]'"
    ) from error

log = logging.getLogger(__name__)

#: the predictor's state, beside the Trainer's own files in each checkpoint folder
STATE_FILE = "xgrad_predictor.pt"


class XGradCallback(TrainerCallback):
    """Train with the gradient at the weights ``steps`` updates ahead (see the module docstring for the events).

    The arguments are ``WeightPredictor``'s; ``self.predictor`` is built on the
    Trainer's optimizer when training begins.
    """

    def __init__(self, steps: int = 1, rule: str = "auto", decoupled_decay: bool = False):
        self.steps = steps
        self.rule = rule
        self.decoupled_decay = decoupled_decay
        self.predictor: WeightPredictor | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if isinstance(optimizer, AcceleratedOptimizer):
            optimizer = optimizer.optimizer
        self.predictor = WeightPredictor(optimizer, self.steps, self.rule, self.decoupled_decay)
        if state.global_step > 0:
            self._load(args, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.predictor.predict()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.predictor.restore()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.predictor.is_predicted:  # a window cut short: its gradient is never applied
            self.predictor.restore()

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:  # the main process writes
            return
        folder = _checkpoint_folder(args, state.global_step)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"XGradCallback: no checkpoint folder {folder} to save the predictor's state beside "
                "(hyperparameter-search trials keep their checkpoints elsewhere)"
            )
        torch.save(self.predictor.state_dict(), os.path.join(folder, STATE_FILE))

    def _load(self, args, global_step: int) -> None:
        folders = [args.resume_from_checkpoint] if isinstance(args.resume_from_checkpoint, str) else []
        folders.append(_checkpoint_folder(args, global_step))
        for folder in folders:
            path = os.path.join(folder, STATE_FILE)
            if os.path.isfile(path):
                self.predictor.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                return
        log.warning(
            "XGradCallback: resuming at step %d but no %s in %s: the predictor starts fresh",
            global_step, STATE_FILE, " or ".join(folders),
        )


def _checkpoint_folder(args, global_step: int) -> str:
    """Where the Trainer saves the checkpoint of ``global_step`` (outside hyperparameter search)."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")

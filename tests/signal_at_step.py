"""``python -m xgrad.train`` with what tests/test_distributed.py cannot arrange from outside a torchrun process.

torchrun starts this file in place of ``-m xgrad.train`` (same arguments), and
the environment says what to arrange:

- ``SIGNAL_RANK``, ``SIGNAL_AT_STEP``, ``SIGNAL_TO``: on that rank, at that
  training step of this process (counted from its start), send SIGTERM to
  ``self`` (that rank alone receives it) or to ``parent`` (the torchrun
  process, which forwards it to every rank, as an operator's ``kill`` or a
  scheduler's would): a kill that lands where the test wants it;
- ``OTHER_RUN_DIR``: every rank but 0 is given this ``hydra.run.dir``, as
  Hydra's ``${now:...}`` does when a rank's clock passes a second before
  rank 0's.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys

from xgrad.tasks.classification import Classification
from xgrad.train import main

if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    if rank == int(os.environ.get("SIGNAL_RANK", -1)):
        at_step, to = int(os.environ["SIGNAL_AT_STEP"]), os.environ["SIGNAL_TO"]
        steps, train_loss = itertools.count(1), Classification.train_loss

        def signalling_train_loss(self, model, batch):
            if next(steps) == at_step:
                os.kill(os.getpid() if to == "self" else os.getppid(), signal.SIGTERM)
            return train_loss(self, model, batch)

        Classification.train_loss = signalling_train_loss
    if rank != 0 and os.environ.get("OTHER_RUN_DIR"):
        sys.argv.append(f"hydra.run.dir={os.environ['OTHER_RUN_DIR']}")
    main()

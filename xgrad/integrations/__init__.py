"""XGrad inside the trainers people already use, one callback each.

- ``xgrad.integrations.lightning.XGradCallback`` for ``lightning.Trainer``;
- ``xgrad.integrations.transformers.XGradCallback`` for ``transformers.Trainer``.

Each module imports its framework when it is itself imported, never before:
``import xgrad`` loads neither, and neither is a dependency of the library
(they are the extras ``xgrad[lightning]`` and ``xgrad[transformers]``).
"""

"""An ``nn.LSTM`` that runs in float32 under autocast, so that ``precision=bf16`` never means float16.

torch's autocast wrapper for cuDNN RNNs (aten/src/ATen/cudnn/AutocastRNN.cpp,
registered for ``_cudnn_rnn``) casts the input, the state and a flat copy of
the weights to float16 whatever dtype autocast was asked for: under
``torch.autocast("cuda", dtype=torch.bfloat16)`` a plain ``nn.LSTM`` runs in
float16, without the gradient scaler float16 needs. cuDNN's RNNs take no
bfloat16 through that path, so the recurrent layers run in float32 (autocast
off inside them, input and state cast up) and everything around them
(embeddings, attention, classifiers) in the dtype autocast was asked for.
Without autocast this is ``nn.LSTM`` exactly; parameter names, state dicts and
parametrizations (the PTB models' weight drop) are those of ``nn.LSTM``.
Runs say so in their ``precision`` (:func:`xgrad.performance.precision_label`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence


class LSTM(nn.LSTM):
    """``nn.LSTM``, in float32 when called under autocast (see the module docstring)."""

    #: read by :func:`xgrad.performance.precision_label`: the layers this module runs in float32 under autocast
    autocast_float32 = "LSTM"

    def forward(self, input: torch.Tensor | PackedSequence, hx: Any = None) -> Any:
        device = input.data.device.type
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
            return super().forward(input, hx)
        with torch.autocast(device, enabled=False):
            return super().forward(input.float(), _float(hx))


def _float(state: Any) -> Any:
    """The state ``(h, c)`` (or None) in float32."""
    if state is None:
        return None
    return tuple(t.float() for t in state)

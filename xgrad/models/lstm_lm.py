"""The AWD-LSTM word-level language model (Merity, Keskar & Socher, 2018).

The PTB LSTMs that XGrad is compared on (1, 2 and 3 layers) follow the
AWD-LSTM code base that AdaBelief and AdaM3 released: a word embedding, a stack
of single-layer LSTMs, and a decoder that shares the embedding matrix. What
makes it work on a corpus as small as PTB is regularisation, four kinds of it:

- embedding dropout (``dropoute``): whole words are dropped from the embedding
  matrix, so a word is either seen or absent for a whole batch;
- locked (variational) dropout: one mask per sequence, reused at every time
  step, on the embeddings (``dropouti``), between layers (``dropouth``) and on
  the last layer's output (``dropout``);
- weight drop (``wdrop``, DropConnect): a dropout mask on the hidden-to-hidden
  matrices, drawn once per forward pass, which regularises the recurrence
  itself without touching cuDNN's fused kernel;
- tied weights: the decoder reuses the embedding matrix, so the last LSTM's
  hidden size equals the embedding size.

Weight drop is a ``torch.nn.utils.parametrize`` parametrization of each LSTM's
``weight_hh_l0``: the trainable matrix stays a real ``nn.Parameter`` (at
``rnns.<i>.parametrizations.weight_hh_l0.original``), which matters here
because the XGrad weight predictor writes predicted values into every parameter
in place and must find them all in ``model.parameters()``. ``nn.LSTM``
notices the freshly masked matrix at each forward and re-gathers its weights;
on CUDA that costs one copy of the layer's weights per step and may print
cuDNN's "weights are not part of single contiguous chunk" warning, both harmless.

Shapes are time-major, as in AWD-LSTM: tokens ``[T, B]`` → logits ``[T, B, V]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from xgrad.models.rnn import LSTM

#: the hidden state of the whole stack: one ``(h, c)`` pair per layer, each ``[1, B, H_layer]``
Hidden = list[tuple[torch.Tensor, torch.Tensor]]


class WeightDrop(nn.Module):
    """DropConnect as a parametrization: a fresh dropout mask on the weight each forward.

    In eval mode it returns the weight itself (no copy), so evaluation runs on
    the plain parameter.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return F.dropout(weight, self.p, self.training)


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Variational dropout on ``x [T, B, D]``: one mask per sequence, shared by all T steps."""
    if not training or p == 0:
        return x
    mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p) / (1 - p)
    return x * mask


def embedding_dropout(embed: nn.Embedding, tokens: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drop whole words: zero rows of the embedding matrix (scaled by 1/(1-p)), then look up."""
    if not training or p == 0:
        return embed(tokens)
    mask = embed.weight.new_empty(embed.weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
    return F.embedding(tokens, embed.weight * mask, embed.padding_idx)


class AWDLSTM(nn.Module):
    """Embedding → ``num_layers`` LSTMs with locked dropout between them → (tied) decoder.

    Layer sizes: emb_size → hidden_size → ... → hidden_size → emb_size when the
    weights are tied (the last layer must produce what the embedding matrix
    decodes); with one layer that is emb_size → emb_size and ``hidden_size`` is
    unused, as in AWD-LSTM.
    """

    def __init__(
        self,
        vocab_size: int,
        emb_size: int = 400,
        hidden_size: int = 1150,
        num_layers: int = 3,
        dropout: float = 0.4,
        dropouth: float = 0.25,
        dropouti: float = 0.4,
        dropoute: float = 0.1,
        wdrop: float = 0.5,
        tie_weights: bool = True,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("emb_size", emb_size),
                            ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.net.{name} must be a positive integer, got {value!r}")
        for name, value in (("dropout", dropout), ("dropouth", dropouth), ("dropouti", dropouti),
                            ("dropoute", dropoute), ("wdrop", wdrop)):
            if not 0 <= value < 1:
                raise ValueError(f"model.net.{name} must be in [0, 1), got {value!r}")
        self.dropout, self.dropouth, self.dropouti, self.dropoute = dropout, dropouth, dropouti, dropoute

        self.encoder = nn.Embedding(vocab_size, emb_size)
        last = emb_size if tie_weights else hidden_size
        sizes = [emb_size] + [hidden_size] * (num_layers - 1) + [last]
        self.rnns = nn.ModuleList(LSTM(sizes[i], sizes[i + 1]) for i in range(num_layers))
        if wdrop > 0:
            for rnn in self.rnns:
                parametrize.register_parametrization(rnn, "weight_hh_l0", WeightDrop(wdrop))
        self.decoder = nn.Linear(last, vocab_size)

        # AWD-LSTM's initialisation: small uniform embeddings, zero decoder bias;
        # the LSTMs keep PyTorch's uniform(±1/sqrt(hidden)).
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        """``tokens [T, B]`` and the previous window's state (None: zeros) → ``logits [T, B, V]``, new state."""
        x = embedding_dropout(self.encoder, tokens, self.dropoute, self.training)
        x = locked_dropout(x, self.dropouti, self.training)
        hidden = hidden if hidden is not None else [None] * len(self.rnns)
        new_hidden = []
        # cached(): nn.LSTM reads its weight more than once per call; one mask per forward.
        with parametrize.cached():
            for i, (rnn, state) in enumerate(zip(self.rnns, hidden, strict=True)):
                x, state = rnn(x, state)
                new_hidden.append(state)
                last = i == len(self.rnns) - 1
                x = locked_dropout(x, self.dropout if last else self.dropouth, self.training)
        return self.decoder(x), new_hidden

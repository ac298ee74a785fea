"""GNMT: the LSTM encoder-decoder with attention of Wu et al. (2016), in its GNMT-v2 form.

The shape is the one of the MLPerf reference / NVIDIA DeepLearningExamples
"GNMT v2" that PipeDream also trains (and the XGrad paper's GNMT-8 follows):

- encoder: embedding → a bidirectional LSTM (hidden H per direction, so 2H
  out) → a unidirectional LSTM (2H → H) → unidirectional LSTMs (H → H) with a
  residual connection around each, from the third layer on; dropout on every
  layer's input;
- decoder: embedding → one LSTM whose output is the attention query →
  normalised Bahdanau attention over the encoder outputs → LSTMs that each
  read ``[previous layer's output, attention context]``, with residual
  connections from the third decoder layer on → a linear classifier.
  The attention is computed once, from the first decoder layer, and fed to
  every later layer (no input feeding), so training runs each layer over the
  whole target sequence at once;
- "GNMT-8" is 8 LSTM layers in all: ``encoder_layers=4`` (the bidirectional
  one counts as one) and ``decoder_layers=4`` (the attention LSTM counts as
  one), as in MLPerf and PipeDream;
- source and target share one sentencepiece vocabulary, and by default one
  embedding matrix (``share_embedding``, as in the MLPerf reference); the
  classifier has its own weights;
- every parameter starts uniform in ``[-init_range, init_range]`` (0.1), then
  the attention's normalisation scalar is set to ``1/sqrt(H)`` and its bias to 0.

Padding: the bidirectional layer reads a packed sequence, so its backward
direction starts at each sentence's own last token; later layers run over the
padded tensor (padding only ever follows the real tokens, so it cannot leak
into them), and the attention masks padded source positions (``src == pad_id``).
The lengths are read on the host (a batch's tuple of ints), so packing
copies nothing off the device; a batch given longest first (as the data
module gives them) is packed without sorting on the device either.

Decoding (:meth:`GNMT.greedy`, :meth:`GNMT.beam_search`) never emits the
padding or BOS token. Beam search ranks hypotheses by GNMT's length-normalised
score ``log P(Y|X) / lp(Y)`` with ``lp(Y) = ((5 + |Y|) / 6) ** alpha`` (|Y|
counts EOS); GNMT's coverage penalty is not used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from xgrad.models.rnn import LSTM

#: the decoder's recurrent state: one ``(h, c)`` pair per LSTM layer, each ``[1, B, H]``
State = list[tuple[torch.Tensor, torch.Tensor]]
#: source lengths: ints on the host (a batch's tuple, longest first: nothing is read off the device), or a tensor
Lengths = Sequence[int] | torch.Tensor
#: decoding checks whether every sentence has ended once per this many tokens: each check waits for the device,
#: and the tokens decoded past a sentence's end are padding, stripped, so the result is the same
DONE_CHECK_EVERY = 8


class BahdanauAttention(nn.Module):
    """Additive attention with a weight-normalised score vector (GNMT's "normalized Bahdanau").

    ``score(q, k) = g · v/|v| · tanh(W_q q + W_k k + b)``; padded keys get no weight.
    """

    def __init__(self, query_size: int, key_size: int, units: int):
        super().__init__()
        self.query = nn.Linear(query_size, units, bias=False)
        self.key = nn.Linear(key_size, units, bias=False)
        self.v = nn.Parameter(torch.empty(units))
        self.g = nn.Parameter(torch.empty(()))
        self.b = nn.Parameter(torch.empty(units))

    def reset_normalisation(self) -> None:
        """GNMT's start: the scalar at ``1/sqrt(units)`` and the bias at zero."""
        with torch.no_grad():
            self.g.fill_(1 / math.sqrt(self.v.numel()))
            self.b.zero_()

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Context vectors ``[B, T, K]`` for queries ``[B, T, Q]`` over keys ``[B, S, K]``.

        ``mask [B, S]`` is True at real source tokens.
        """
        v = self.g * self.v / self.v.norm()
        hidden = torch.tanh(self.query(query).unsqueeze(2) + self.key(keys).unsqueeze(1) + self.b)
        scores = (hidden @ v).masked_fill(~mask.unsqueeze(1), float("-inf"))  # [B, T, S]
        return torch.softmax(scores, dim=-1) @ keys


class Encoder(nn.Module):
    """Bidirectional LSTM, then unidirectional LSTMs with residuals from the third layer on."""

    def __init__(self, embedding: nn.Embedding, hidden_size: int, num_layers: int, dropout: float):
        super().__init__()
        self.embedding = embedding
        self.bidirectional = LSTM(hidden_size, hidden_size, batch_first=True, bidirectional=True)
        self.layers = nn.ModuleList(
            LSTM(2 * hidden_size if i == 0 else hidden_size, hidden_size, batch_first=True)
            for i in range(num_layers - 1)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, src_len: Lengths) -> torch.Tensor:
        """Encoder outputs ``[B, S, H]`` for padded tokens ``[B, S]``."""
        lengths = torch.as_tensor(src_len, dtype=torch.int64, device="cpu")  # read off the device if it is there
        longest_first = bool((lengths[:-1] >= lengths[1:]).all())  # else packing sorts, copying indices to the device
        packed = pack_padded_sequence(self.dropout(self.embedding(src)), lengths, batch_first=True,
                                      enforce_sorted=longest_first)  # fmt: skip
        x, _ = pad_packed_sequence(self.bidirectional(packed)[0], batch_first=True, total_length=src.size(1))
        for i, lstm in enumerate(self.layers):
            y, _ = lstm(self.dropout(x))
            x = y + x if i > 0 else y  # the first unidirectional layer changes width: no residual
        return x


class Decoder(nn.Module):
    """Attention LSTM, then LSTMs fed ``[x, context]`` with residuals from the third layer on, then logits."""

    def __init__(self, embedding: nn.Embedding, vocab_size: int, hidden_size: int, num_layers: int, dropout: float):
        super().__init__()
        self.embedding = embedding
        self.attention_lstm = LSTM(hidden_size, hidden_size, batch_first=True)
        self.attention = BahdanauAttention(hidden_size, hidden_size, hidden_size)
        self.layers = nn.ModuleList(
            LSTM(2 * hidden_size, hidden_size, batch_first=True) for _ in range(num_layers - 1)
        )
        self.classifier = nn.Linear(hidden_size, vocab_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt_in: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,
                state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits ``[B, T, V]`` for target inputs ``[B, T]``, continuing from ``state`` (None: zeros)."""
        states = state or [None] * (1 + len(self.layers))
        x, first = self.attention_lstm(self.dropout(self.embedding(tgt_in)), states[0])
        context = self.attention(x, memory, mask)
        new_state = [first]
        for i, lstm in enumerate(self.layers):
            y, layer_state = lstm(torch.cat([self.dropout(x), context], dim=-1), states[i + 1])
            x = y + x if i > 0 else y  # residuals from the decoder's third layer on, as in the encoder
            new_state.append(layer_state)
        return self.classifier(self.dropout(x)), new_state


def length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT's ``lp(Y) = ((5 + |Y|) / 6) ** alpha``; alpha = 0 ranks by raw log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


class GNMT(nn.Module):
    """GNMT-v2 encoder-decoder: ``forward(src, src_len, tgt_in) -> logits [B, T, V]`` (teacher forcing)."""

    def __init__(self, vocab_size: int, hidden_size: int = 1024, encoder_layers: int = 4, decoder_layers: int = 4,
                 dropout: float = 0.2, share_embedding: bool = True, init_range: float = 0.1, pad_id: int = 0):
        super().__init__()
        for name, value, least in (("vocab_size", vocab_size, 1), ("hidden_size", hidden_size, 1),
                                   ("encoder_layers", encoder_layers, 2), ("decoder_layers", decoder_layers, 2)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"GNMT {name} must be an integer >= {least}, got {value!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"GNMT dropout must be in [0, 1), got {dropout!r}")
        self.pad_id = pad_id
        src_embedding = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_id)
        tgt_embedding = src_embedding if share_embedding else nn.Embedding(vocab_size, hidden_size, padding_idx=pad_id)
        self.encoder = Encoder(src_embedding, hidden_size, encoder_layers, dropout)
        self.decoder = Decoder(tgt_embedding, vocab_size, hidden_size, decoder_layers, dropout)
        for p in self.parameters():
            nn.init.uniform_(p, -init_range, init_range)
        self.decoder.attention.reset_normalisation()

    def encode(self, src: torch.Tensor, src_len: Lengths) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder outputs ``[B, S, H]`` and the source mask ``[B, S]`` (True = real token, i.e. not padding)."""
        return self.encoder(src, src_len), src != self.pad_id

    def forward(self, src: torch.Tensor, src_len: Lengths, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, mask = self.encode(src, src_len)
        return self.decoder(tgt_in, memory, mask)[0]

    def _next_log_probs(self, logits: torch.Tensor, bos_id: int) -> torch.Tensor:
        """Log-probabilities of the next token ``[N, V]``, with padding and BOS made impossible."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        log_probs[:, [self.pad_id, bos_id]] = float("-inf")
        return log_probs

    def _strip(self, tokens: torch.Tensor, eos_id: int) -> list[list[int]]:
        """Each row up to (not including) its first EOS, as a list of ids."""
        hypotheses = []
        for row in tokens.tolist():
            hypotheses.append(row[: row.index(eos_id)] if eos_id in row else row)
        return hypotheses

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, src_len: Lengths, bos_id: int, eos_id: int,
               max_len: int) -> list[list[int]]:
        """The most likely next token at every step, up to EOS or ``max_len`` tokens; ids without BOS/EOS."""
        memory, mask = self.encode(src, src_len)
        token = torch.full((src.size(0), 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
        state, output = None, []
        for t in range(max_len):
            logits, state = self.decoder(token, memory, mask, state)
            token = self._next_log_probs(logits[:, -1], bos_id).argmax(-1, keepdim=True)
            token = token.masked_fill(done.unsqueeze(1), self.pad_id)  # finished rows only pad
            output.append(token)
            done |= token.squeeze(1) == eos_id
            if (t + 1) % DONE_CHECK_EVERY == 0 and done.all():
                break
        return self._strip(torch.cat(output, dim=1), eos_id)

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, src_len: Lengths, bos_id: int, eos_id: int, max_len: int,
                    beam_size: int, alpha: float) -> tuple[list[list[int]], torch.Tensor]:
        """The best of ``beam_size`` hypotheses per sentence under ``log P / lp(alpha)``, and that score ``[B]``.

        Each sentence keeps ``beam_size`` hypotheses. At every step each one is
        extended by every token, and the ``beam_size`` best extensions by
        normalised score survive; a finished hypothesis (it emitted EOS) can
        only be "extended" by padding, at no cost, so it keeps its score and
        competes with longer ones until the end.
        """
        batch, k = src.size(0), beam_size
        memory, mask = self.encode(src, src_len)
        memory, mask = memory.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)
        tokens = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=src.device)
        log_p = torch.zeros(batch, k, device=src.device)
        log_p[:, 1:] = float("-inf")  # all beams start identical: expand the first only
        length = torch.zeros(batch, k, dtype=torch.long, device=src.device)
        done = torch.zeros(batch, k, dtype=torch.bool, device=src.device)
        first_row = (torch.arange(batch, device=src.device) * k).unsqueeze(1)
        state, score = None, log_p
        for t in range(max_len):
            logits, state = self.decoder(tokens[:, -1:], memory, mask, state)
            step = self._next_log_probs(logits[:, -1], bos_id).view(batch, k, -1)
            pad_only = torch.full_like(step[0, 0], float("-inf"))
            pad_only[self.pad_id] = 0.0
            step = torch.where(done.unsqueeze(-1), pad_only, step)
            candidate_log_p = log_p.unsqueeze(-1) + step  # [B, K, V]
            candidate_length = (length + (~done).long()).unsqueeze(-1)  # [B, K, 1]
            candidate_score = candidate_log_p / length_penalty(candidate_length, alpha)
            score, flat = candidate_score.view(batch, -1).topk(k, dim=1)
            parent, token = flat // step.size(-1), flat % step.size(-1)
            log_p = candidate_log_p.view(batch, -1).gather(1, flat)
            length = candidate_length.squeeze(-1).gather(1, parent)
            done = done.gather(1, parent) | (token == eos_id)
            rows = (first_row + parent).view(-1)
            tokens = torch.cat([tokens[rows], token.view(-1, 1)], dim=1)
            state = [(h[:, rows], c[:, rows]) for h, c in state]
            if (t + 1) % DONE_CHECK_EVERY == 0 and done.all():  # a finished beam only pads, at no cost
                break
        best = tokens.view(batch, k, -1)[:, 0, 1:]  # topk sorts, so beam 0 holds the best score
        return self._strip(best, eos_id), score[:, 0]

"""Machine translation: label-smoothed cross entropy to train, sacreBLEU to compare.

A batch is a dict of padded sentence pairs (xgrad/data/wmt16.py): ``src``,
``src_len``, ``tgt`` (BOS + pieces + EOS) and, on valid/test, ``index`` (the
row of each sentence's raw reference in ``data.references``). The decoder reads
``tgt[:, :-1]`` and is trained to predict ``tgt[:, 1:]`` (teacher forcing).

Training loss: per-token cross entropy with label smoothing (GNMT-v2 uses
0.1), padding ignored. Evaluation reports

- ``loss``: per-token cross entropy without smoothing, so it is comparable
  across smoothing settings;
- ``bleu`` (the primary metric, higher is better): sacreBLEU's corpus BLEU
  (its default 13a tokenisation) of the detokenised translations against the
  raw reference sentences, as the WMT protocol asks. Translations come from
  greedy or beam search (model task node: ``decoding``, ``beam_size``,
  ``length_alpha``); ``max_eval_sentences`` bounds how many sentences of a
  split are translated (whole batches, in file order), since decoding costs
  far more than the loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sacrebleu
import torch
import torch.nn.functional as F
from torch import nn

DECODINGS = ("greedy", "beam")


class TranslationTask:
    """Sequence-to-sequence training and BLEU evaluation for a model like :class:`xgrad.models.gnmt.GNMT`."""

    metric = "bleu"
    mode = "max"

    def __init__(self, data: Any, label_smoothing: float = 0.1, decoding: str = "beam", beam_size: int = 5,
                 length_alpha: float = 0.6, max_decode_len: int = 150, max_eval_sentences: int | None = None):
        if decoding not in DECODINGS:
            raise ValueError(f"model.task.decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"model.task.label_smoothing must be in [0, 1), got {label_smoothing!r}")
        for name, value in (("beam_size", beam_size), ("max_decode_len", max_decode_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.task.{name} must be a positive integer, got {value!r}")
        if max_eval_sentences is not None and (not isinstance(max_eval_sentences, int) or max_eval_sentences < 1):
            raise ValueError("model.task.max_eval_sentences must be a positive integer or null, "
                             f"got {max_eval_sentences!r}")
        if length_alpha < 0:
            raise ValueError(f"model.task.length_alpha must be >= 0, got {length_alpha!r}")
        self.data = data
        self.label_smoothing = label_smoothing
        self.decoding, self.beam_size, self.length_alpha = decoding, beam_size, length_alpha
        self.max_decode_len, self.max_eval_sentences = max_decode_len, max_eval_sentences

    def start_epoch(self, model: nn.Module, training: bool) -> None:
        """Nothing carries over between batches of sentence pairs."""

    def _logits_and_targets(self, model: nn.Module, batch: dict[str, torch.Tensor]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: logits for every target position ``[N, V]`` and the tokens to predict ``[N]``."""
        tgt = batch["tgt"]
        logits = model(batch["src"], batch["src_len"], tgt[:, :-1])
        return logits.flatten(0, 1), tgt[:, 1:].flatten()

    def train_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean label-smoothed cross entropy per target token, and the number of target tokens.

        The count stays a tensor on the batch's device: reading it would make
        the host wait for the device at every step.
        """
        logits, targets = self._logits_and_targets(model, batch)
        loss = F.cross_entropy(logits, targets, ignore_index=self.data.pad_id, label_smoothing=self.label_smoothing)
        return loss, (targets != self.data.pad_id).sum()

    def translate(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> list[list[int]]:
        """Piece ids of each source sentence's translation (no BOS/EOS), by the configured decoding.

        Translations stop at ``max_decode_len`` tokens, or earlier at twice
        the batch's longest source plus 10, which no real translation exceeds.
        """
        src, src_len = batch["src"], batch["src_len"]
        max_len = min(self.max_decode_len, 2 * max(int(n) for n in src_len) + 10)
        ids = dict(bos_id=self.data.bos_id, eos_id=self.data.eos_id, max_len=max_len)
        if self.decoding == "greedy":
            return model.greedy(src, src_len, **ids)
        return model.beam_search(src, src_len, **ids, beam_size=self.beam_size, alpha=self.length_alpha)[0]

    def bleu(self, hypotheses: list[str], references: list[str]) -> float:
        """sacreBLEU corpus BLEU (0-100) of detokenised hypotheses against one raw reference each."""
        return sacrebleu.corpus_bleu(hypotheses, [references]).score

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Per-token loss over every batch; BLEU over the first ``max_eval_sentences`` sentences (all if null)."""
        total = tokens = 0  # tensors on the device once added to: read once, at the end
        hypotheses, references, pairs = [], [], 0
        for batch in batches:
            pairs += len(batch["index"])
            logits, targets = self._logits_and_targets(model, batch)
            total = total + F.cross_entropy(logits.float(), targets, ignore_index=self.data.pad_id, reduction="sum")
            tokens = tokens + (targets != self.data.pad_id).sum()
            if self.max_eval_sentences is None or len(hypotheses) < self.max_eval_sentences:
                hypotheses += [self.data.decode(ids) for ids in self.translate(model, batch)]
                references += [self.data.references[int(i)] for i in batch["index"]]
        return {"loss": float(total) / int(tokens), "bleu": self.bleu(hypotheses, references), "size": pairs}

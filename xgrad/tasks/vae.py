"""Variational auto-encoding: the negative ELBO, its two parts, and a grid of samples.

The loss of one image is the reconstruction term — binary cross entropy of
the decoded pixel logits against the image, summed over pixels — plus the KL
divergence of the encoder's Gaussian from the prior N(0, I), in closed form
``-½ Σ (1 + log σ² − μ² − σ²)``. A batch's loss is the mean over its images
(Kingma & Welling 2014; PyTorch's VAE example sums over the batch instead,
which only rescales the learning rate).

The image data modules hand out normalised pixels; BCE needs targets in
[0, 1], so the task undoes the normalisation with the data module's own
``mean`` and ``std``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import save_image


def vae_loss(
    logits: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (reconstruction BCE, KL) over a batch; divide by its size for per-image values."""
    recon = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum")
    mu, logvar = mu.float(), logvar.float()
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return recon, kl


class VAETask:
    """Batches are ``(images, labels)`` (labels unused); the model is :class:`xgrad.models.vae.VAE`.

    ``evaluate`` returns ``loss`` (= ``recon`` + ``kl``, per image), the
    metric, lower is better. It draws the reparameterisation noise from a
    generator on the batches' device, seeded with ``seed`` afresh at every
    evaluation, so the validation loss of two epochs (or two runs on one kind
    of device) differs only by the weights.

    Args:
        data: the run's image data module; its ``mean`` and ``std`` undo the normalisation.
        num_samples: images in the sample grid written after each evaluation.
        seed: seeds the evaluation noise and the grid's latent codes, the same
            for every run, so grids of a baseline and an XGrad run are comparable.
    """

    metric = "loss"
    mode = "min"

    def __init__(self, data: Any, num_samples: int = 64, seed: int = 0):
        if not (hasattr(data, "mean") and hasattr(data, "std")):
            raise TypeError(f"the VAE needs image data with per-channel mean and std; got {type(data).__name__}")
        self.mean = torch.tensor(data.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.num_samples, self.seed = num_samples, seed

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images back to pixel intensities in [0, 1] (the BCE targets)."""
        if self.mean.device != images.device:  # once: a copy per step would make the host wait for the device
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() * self.std + self.mean).clamp_(0, 1)

    def start_epoch(self, model: nn.Module, training: bool) -> None:
        """Nothing carries over between batches."""

    def train_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        images, _ = batch
        logits, mu, logvar = model(images)
        recon, kl = vae_loss(logits, self.pixels(images), mu, logvar)
        return (recon + kl) / len(images), len(images)

    def evaluate(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        generator = None  # on the batches' device, seeded afresh: the noise is drawn where it is used
        recon_sum = kl_sum = 0  # tensors on the device once added to: read once, at the end
        count = 0
        for images, _ in batches:
            if generator is None:
                generator = torch.Generator(images.device).manual_seed(self.seed)
            noise = torch.randn(len(images), model.latent, generator=generator, device=images.device)
            logits, mu, logvar = model(images, noise)
            recon, kl = vae_loss(logits, self.pixels(images), mu, logvar)
            recon_sum, kl_sum = recon_sum + recon.double(), kl_sum + kl.double()
            count += len(images)
        if count == 0:
            raise ValueError("evaluation got no batches")
        recon_sum, kl_sum = torch.stack([recon_sum, kl_sum]).tolist()  # the one read
        return {"loss": (recon_sum + kl_sum) / count, "recon": recon_sum / count, "kl": kl_sum / count, "size": count}

    def on_evaluated(self, model: nn.Module, run_dir: str, epoch: int) -> dict[str, str]:
        """Decode fixed codes z ~ N(0, I) into ``<run_dir>/samples/epoch_<epoch>.png``."""
        z = torch.randn(self.num_samples, model.latent, generator=torch.Generator().manual_seed(self.seed))
        with torch.no_grad():
            images = torch.sigmoid(model.decode(z.to(next(model.parameters()).device)).float())
        path = Path(run_dir) / "samples" / f"epoch_{epoch}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images.cpu(), path, nrow=max(1, math.isqrt(self.num_samples)))  # a square grid
        return {"samples": str(path)}

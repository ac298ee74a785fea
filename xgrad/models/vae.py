"""The variational auto-encoder of the paper's generative experiment (Kingma & Welling 2014).

The classic MLP VAE of PyTorch's examples: 784-400-20 on 28×28 digits. Here
the input width follows the data (``in_channels · image_size²``) so the same
network runs on any image dataset; ``hidden`` and ``latent`` keep the classic
400 and 20 by default.
"""

from __future__ import annotations

import torch
from torch import nn


class VAE(nn.Module):
    """Encoder ``x → (μ, log σ²)``, reparameterised sample ``z = μ + σ·ε``, decoder ``z → logits``.

    The decoder returns pixel logits, not probabilities: the task scores them with
    ``binary_cross_entropy_with_logits``, which is numerically stable and allowed
    under autocast (plain ``binary_cross_entropy`` on a sigmoid is neither).

    Args:
        in_channels, image_size: the data's image shape (from the data config).
        hidden: width of the one hidden layer of the encoder and of the decoder.
        latent: dimension of z.
    """

    def __init__(self, in_channels: int, image_size: int, hidden: int = 400, latent: int = 20):
        super().__init__()
        self.image_shape = (in_channels, image_size, image_size)
        self.latent = latent
        pixels = in_channels * image_size * image_size
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU())
        self.to_mu = nn.Linear(hidden, latent)
        self.to_logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, pixels))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, log σ²)``, each ``[B, latent]``, of images ``[B, C, H, W]``."""
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel logits ``[B, C, H, W]`` of latent codes ``[B, latent]``."""
        return self.decoder(z).view(-1, *self.image_shape)

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, μ, log σ²)``; ``noise`` is ε (drawn from the global generator when None).

        Passing ``noise`` lets evaluation use the same ε every epoch, so the
        validation loss changes only because the weights did.
        """
        mu, logvar = self.encode(x)
        if noise is None:
            noise = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * noise
        return self.decode(z), mu, logvar

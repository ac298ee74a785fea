"""LeNet-5: the small convolutional network of the paper's image experiments."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """Two 5×5 convolutions with max-pooling, then three fully connected layers.

    The classic layout (6 and 16 feature maps; 120, 84 hidden units) with ReLU.
    The first linear layer's width follows from ``image_size`` (16·5·5 for
    32×32 CIFAR, 16·4·4 for 28×28 MNIST), measured by passing an empty image
    through the convolutions once.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(flat, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

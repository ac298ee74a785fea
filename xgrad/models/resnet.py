"""CIFAR-style ResNet (He et al. 2016) as used by the AdaBelief/AdaM3 CIFAR protocol.

Unlike torchvision's ImageNet ResNets, the stem is one 3×3 convolution with
stride 1 and no max-pool, so 32×32 images keep their resolution into the
first stage; ResNet-34 (BasicBlock [3, 4, 6, 3]) then has 21.28M parameters
for 10 classes. torchvision's ``BasicBlock`` is reused for the blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


class ResNet(nn.Module):
    """Four stages of BasicBlocks (stride 1, 2, 2, 2), global average pooling, a linear head.

    ``blocks`` is the number of blocks per stage ([2, 2, 2, 2]: ResNet-18,
    [3, 4, 6, 3]: ResNet-34); ``width`` the channels of the first stage,
    doubled at each later stage. ``image_size`` is accepted for the common
    image-model interface; global pooling makes the network size-agnostic.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: int = 64,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages, channels = [], width
        for i, n in enumerate(blocks):
            out, stride = width * 2**i, 1 if i == 0 else 2
            stages.append(self._stage(channels, out, n, stride))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    @staticmethod
    def _stage(in_ch: int, out_ch: int, n: int, stride: int) -> nn.Sequential:
        """``n`` blocks; the first changes width/resolution through a 1×1 projection shortcut."""
        downsample = None
        if stride != 1 or in_ch != out_ch:
            downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        layers = [BasicBlock(in_ch, out_ch, stride, downsample)]
        layers += [BasicBlock(out_ch, out_ch) for _ in range(n - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

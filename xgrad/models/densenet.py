"""DenseNet-121 in its CIFAR form (growth 32, blocks [6, 12, 24, 16]).

The ImageNet DenseNet opens with a 7×7 stride-2 convolution and a max-pool,
which would shrink a 32×32 image to 8×8 before the first dense block. The
CIFAR form used by the optimizer papers (kuangliu/pytorch-cifar's
``DenseNet121``, the AdaBelief code) instead opens with one 3×3 stride-1
convolution to 2×growth channels and no normalisation, pooling or activation
before the first dense block. Everything after the stem is torchvision's
DenseNet-BC unchanged: bottleneck layers (1×1 to 4×growth, then 3×3 to
growth), transitions with compression 0.5 and 2×2 average pooling, a final
batch norm, global average pooling and one linear layer. For 10 classes that
is 6,956,298 parameters, the same count as the kuangliu model.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import DenseNet


class CifarDenseNet121(DenseNet):
    """torchvision's DenseNet-121 with the 3×3 stride-1 stem of the CIFAR papers."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, growth_rate: int = 32):
        # Three 2×2 average-pooling transitions must leave at least one pixel.
        if image_size < 8:
            raise ValueError(f"DenseNet-121 needs images of at least 8×8 pixels, got image_size={image_size}")
        super().__init__(growth_rate=growth_rate, block_config=(6, 12, 24, 16),
                         num_init_features=2 * growth_rate, bn_size=4, num_classes=num_classes)
        stem = nn.Conv2d(in_channels, 2 * growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(stem.weight)  # torchvision's init for every other convolution
        self.features.conv0 = stem
        del self.features.norm0, self.features.relu0, self.features.pool0

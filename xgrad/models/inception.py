"""Inception-V3 for small images (32×32 CIFAR, 28×28 MNIST).

torchvision's Inception-V3 expects 299×299 inputs: its stem (two unpadded
stride-2 steps, a stride-2 3×3 convolution and two 3×3 stride-2 max-pools)
shrinks the image 8-fold to 35×35 before the first Inception block. On a
32×32 image that stem would leave nothing for the two grid reductions that
follow (Mixed_6a, Mixed_7a). The adaptation, as in the common CIFAR
re-implementations, keeps every layer and width of torchvision's model and
changes only the stem:

* ``Conv2d_1a_3x3``: stride 2, no padding → stride 1, padding 1 (and it reads
  ``in_channels`` channels, so grey-scale images work);
* ``Conv2d_2a_3x3`` and ``Conv2d_4a_3x3``: no padding → padding 1;
* ``maxpool1`` and ``maxpool2``: replaced by identities (no pooling).

The Inception blocks thus start at the full input resolution, and the two
grid reductions give 32 → 15 → 7 (28 → 13 → 6) before global average pooling.
The auxiliary classifier is off (``aux_logits=False``): on small images the
papers train the main head only, and the engine expects one logits tensor.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.inception import BasicConv2d, Inception3


class SmallInputInceptionV3(Inception3):
    """torchvision's Inception-V3 with a resolution-preserving stem (see module docstring)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, dropout: float = 0.5):
        # The two unpadded stride-2 reductions (Mixed_6a, Mixed_7a) need at least 7×7 inputs.
        if image_size < 7:
            raise ValueError(f"Inception-V3 needs images of at least 7×7 pixels, got image_size={image_size}")
        super().__init__(num_classes=num_classes, aux_logits=False, transform_input=False,
                         init_weights=True, dropout=dropout)
        self.Conv2d_1a_3x3 = BasicConv2d(in_channels, 32, kernel_size=3, stride=1, padding=1)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3, padding=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3, padding=1)
        self.maxpool1 = nn.Identity()
        self.maxpool2 = nn.Identity()
        # Same init as torchvision gives every other convolution (init_weights=True).
        for stem_block in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_4a_3x3):
            nn.init.trunc_normal_(stem_block.conv.weight, mean=0.0, std=0.1, a=-2, b=2)

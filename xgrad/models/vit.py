"""A Vision Transformer for small images (timm's ``VisionTransformer``, patch 4).

ImageNet ViTs cut 224×224 images into 16×16 patches; on a 32×32 CIFAR image
that would leave four tokens. The small-image ViTs of the CIFAR literature
keep timm's model as it is (learned position embeddings, a class token read
by the head, pre-norm blocks with MLP ratio 4) and use 4×4 patches, so a
32×32 image gives 64 tokens and a 28×28 one 49. Width, depth and heads are
the DeiT "tiny" (192/12/3) and "small" (384/12/6) settings, chosen in
``conf/model/vit_*.yaml``.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer


class SmallImageViT(VisionTransformer):
    """timm's VisionTransformer with the image model arguments every config passes."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int,
                 embed_dim: int, depth: int, num_heads: int, patch_size: int = 4):
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        super().__init__(img_size=image_size, patch_size=patch_size, in_chans=in_channels,
                         num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads)

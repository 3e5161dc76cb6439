"""The Vision Transformers of MoCo v3 (Chen, Xie, He 2021, Sec. 4 and 5).

timm's ``VisionTransformer`` with a fixed 2-D sin-cos position embedding (timm's ``build_sincos2d_pos_embed``), the
official initialisation and an optional frozen patch projection; ``vit_conv_small`` / ``vit_conv_base`` replace the
patch projection by a small convolutional stem (:class:`ConvStem`, Xiao et al. 2021, "Early Convolutions Help
Transformers See Better") and drop one block, as the official ``vits.py``.

Without a classifier (``num_classes=0``) the forward pass returns the class token after the last LayerNorm,
``(N, D)``, and the state dict is a DeiT one minus ``head.*``. The convolutional stem keeps the official names
(``patch_embed.proj`` an ``nn.Sequential``), so official ``vit_conv_*`` checkpoints load without renaming.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

#: ViT sizes of MoCo v3 (official ``vits.py``): ViT-Small with 12 heads (DeiT-S has 6), ViT-Base, and both with the
#: convolutional stem and one block less (11), so that stem + blocks cost about what the 12 plain blocks cost.
VIT_SIZES: dict[str, dict[str, Any]] = {
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 12},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_conv_small": {"embed_dim": 384, "depth": 11, "num_heads": 12, "conv_stem": True},
    "vit_conv_base": {"embed_dim": 768, "depth": 11, "num_heads": 12, "conv_stem": True},
}
#: The patch side of the convolutional stem: four stride-2 convolutions.
CONV_STEM_PATCH = 16


class ConvStem(nn.Module):
    """The convolutional stem of MoCo v3's ``vit_conv_*``: four 3x3 stride-2 convolutions and a 1x1 projection.

    Widths ``D/8 → D/4 → D/2 → D`` (conv, BatchNorm, ReLU), then a 1x1 conv with bias: a 16x16 patch becomes one
    token. PyTorch's default initialisation, as the official code.

    Args:
        img_size: side of the square input images in pixels (a multiple of 16).
        patch_size: must be 16 (:data:`CONV_STEM_PATCH`).
        in_chans: input channels (3).
        embed_dim: token width D (a multiple of 8).
        **unused: other ``PatchEmbed`` keywords of timm, ignored.

    """

    def __init__(self, img_size: int = 224, patch_size: int = CONV_STEM_PATCH, in_chans: int = 3,
                 embed_dim: int = 768, **unused: Any) -> None:
        super().__init__()
        if patch_size != CONV_STEM_PATCH:
            raise ValueError(f"the convolutional stem of vit_conv_* makes {CONV_STEM_PATCH} px patches, got "
                             f"patch_size={patch_size}; set patch_size={CONV_STEM_PATCH}")
        if embed_dim % 8 != 0:
            raise ValueError(f"the convolutional stem needs a width divisible by 8, got embed_dim={embed_dim}")
        size = int(img_size[0] if isinstance(img_size, tuple | list) else img_size)
        self.img_size = (size, size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (size // patch_size, size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        width_in, width = in_chans, embed_dim // 8
        for _ in range(4):
            layers += [nn.Conv2d(width_in, width, kernel_size=3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        """Pixels per token side (timm's ``PatchEmbed`` API)."""
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` to tokens ``(N, H/16 · W/16, D)``, row-major."""
        return self.proj(x).flatten(2).transpose(1, 2)


class MoCoViT(VisionTransformer):
    """timm's ``VisionTransformer`` as MoCo v3 trains it.

    * Position embedding: the official fixed 2-D sin-cos table (timm's ``build_sincos2d_pos_embed`` with
      ``interleave_sin_cos=True``), a buffer under timm's name ``pos_embed``, so no optimizer or EMA touches it.
    * Initialisation of the official ``vits.py``: Xavier-uniform linears (Q, K and V as three matrices), zero
      biases, class token N(0, 1e-6), patch projection Xavier-uniform over its ``3·p·p`` inputs.
    * ``freeze_patch_embed`` (official ``--stop-grad-conv1``, Sec. 5.1): the linear patch projection never trains;
      a conv stem trains, as in the official code.

    Args:
        embed_dim: token width D (384 ViT-S, 768 ViT-B).
        depth: number of blocks (12).
        num_heads: attention heads (12 for both in MoCo v3).
        image_size: side of the square input images, in pixels (224; 32 for CIFAR).
        patch_size: side of a patch (16; 4 for 32 px images).
        freeze_patch_embed: keep the linear patch projection at its random initialisation.
        conv_stem: a :class:`ConvStem` instead of the linear patch projection (``patch_size`` must be 16).

    """

    def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 12, image_size: int = 224,
                 patch_size: int = 16, freeze_patch_embed: bool = False, conv_stem: bool = False) -> None:
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}; choose a "
                             "patch size that divides the image size (16 at 224 px, 4 at 32 px)")
        if embed_dim % 4 != 0:
            raise ValueError(f"embed_dim={embed_dim}: the 2-D sin-cos position embedding needs a multiple of 4")
        stem = {"embed_layer": ConvStem} if conv_stem else {}
        super().__init__(img_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="token",
                         norm_layer=partial(nn.LayerNorm, eps=1e-6), **stem)
        self.conv_stem = conv_stem
        del self.pos_embed  # timm's learned parameter, replaced by the fixed table
        patches = build_sincos2d_pos_embed(list(self.patch_embed.grid_size), embed_dim, interleave_sin_cos=True)
        self.register_buffer("pos_embed", torch.cat([patches.new_zeros(1, embed_dim), patches]).unsqueeze(0))
        self._init_as_moco_v3()
        if not conv_stem:
            self.patch_embed.proj.requires_grad_(not freeze_patch_embed)

    @torch.no_grad()
    def _init_as_moco_v3(self) -> None:
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if "qkv" in name:  # Q, K, V initialised as three (D, D) matrices
                    bound = math.sqrt(6.0 / (module.weight.shape[0] // 3 + module.weight.shape[1]))
                    nn.init.uniform_(module.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.conv_stem:
            return  # the convolutional stem keeps PyTorch's initialisation
        proj = self.patch_embed.proj
        bound = math.sqrt(6.0 / (3 * proj.kernel_size[0] * proj.kernel_size[1] + self.embed_dim))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)


def build_vit(name: str, image_size: int = 224, patch_size: int = 16, freeze_patch_embed: bool = False) -> MoCoViT:
    """A MoCo v3 ViT by name (:data:`VIT_SIZES`): ``vit_small``, ``vit_base``, ``vit_conv_small``, ``vit_conv_base``."""
    if name not in VIT_SIZES:
        raise ValueError(f"unknown ViT {name!r}; choose one of {sorted(VIT_SIZES)}")
    return MoCoViT(**VIT_SIZES[name], image_size=image_size, patch_size=patch_size,
                   freeze_patch_embed=freeze_patch_embed)

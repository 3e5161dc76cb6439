"""The Vision Transformers of MoCo v3 (Chen, Xie, He 2021, Sec. 4 and 5).

timm's ``VisionTransformer`` with a fixed 2-D sin-cos position embedding (timm's ``build_sincos2d_pos_embed``), the
official initialisation and an optional frozen patch projection.

Built on ``timm.models.vision_transformer.VisionTransformer`` (the official ``vits.py`` subclasses it too), without
a classifier (``num_classes=0``): the forward pass returns the class token after the last LayerNorm, ``(N, D)``.
The state dict is timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.*``, ``norm.*``), i.e. a
DeiT state dict minus ``head.*``: what the official ``convert_to_deit.py`` produces.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

#: ViT sizes of MoCo v3 (official ``vits.py``): ViT-Small with 12 heads (DeiT-S has 6), ViT-Base.
VIT_SIZES: dict[str, dict[str, int]] = {
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 12},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}


class MoCoViT(VisionTransformer):
    """timm's ``VisionTransformer`` as MoCo v3 trains it.

    * The position embedding is the fixed 2-D sin-cos table of the official ``build_2d_sincos_position_embedding``:
      patch ``(row i, column j)`` gets ``[sin(i·ω), cos(i·ω), sin(j·ω), cos(j·ω)]``, ``ω_d = 10000^(−d / (D/4))``,
      and the class token a zero row. timm's ``build_sincos2d_pos_embed`` with ``interleave_sin_cos=True`` is that
      layout (its default puts both sines first). It is a buffer (saved in the state dict under timm's name
      ``pos_embed``, never a parameter, so no optimizer or EMA touches it).
    * Initialisation of the official ``vits.py``: Xavier-uniform linears (Q, K and V as three separate matrices),
      zero biases, class token N(0, 1e-6), patch projection Xavier-uniform over its ``3·p·p`` inputs.
    * ``freeze_patch_embed`` (official ``--stop-grad-conv1``, the v3 stability trick, Sec. 5.1): the random patch
      projection never trains (``requires_grad=False``).

    Args:
        embed_dim: token width D (384 ViT-S, 768 ViT-B).
        depth: number of blocks (12).
        num_heads: attention heads (12 for both in MoCo v3).
        image_size: side of the square input images, in pixels (224; 32 for CIFAR).
        patch_size: side of a patch (16; 4 for 32 px images).
        freeze_patch_embed: keep the patch projection at its random initialisation.

    """

    def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 12, image_size: int = 224,
                 patch_size: int = 16, freeze_patch_embed: bool = False) -> None:
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}; choose a "
                             "patch size that divides the image size (16 at 224 px, 4 at 32 px)")
        if embed_dim % 4 != 0:
            raise ValueError(f"embed_dim={embed_dim}: the 2-D sin-cos position embedding needs a multiple of 4")
        super().__init__(img_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="token",
                         norm_layer=partial(nn.LayerNorm, eps=1e-6))
        del self.pos_embed  # timm's learned parameter, replaced by the fixed table
        patches = build_sincos2d_pos_embed(list(self.patch_embed.grid_size), embed_dim, interleave_sin_cos=True)
        self.register_buffer("pos_embed", torch.cat([patches.new_zeros(1, embed_dim), patches]).unsqueeze(0))
        self._init_as_moco_v3()
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
        proj = self.patch_embed.proj
        bound = math.sqrt(6.0 / (3 * proj.kernel_size[0] * proj.kernel_size[1] + self.embed_dim))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)


def build_vit(name: str, image_size: int = 224, patch_size: int = 16, freeze_patch_embed: bool = False) -> MoCoViT:
    """A MoCo v3 ViT by name (:data:`VIT_SIZES`): ``vit_small`` or ``vit_base``."""
    if name not in VIT_SIZES:
        raise ValueError(f"unknown ViT {name!r}; choose one of {sorted(VIT_SIZES)}")
    return MoCoViT(**VIT_SIZES[name], image_size=image_size, patch_size=patch_size,
                   freeze_patch_embed=freeze_patch_embed)

"""The MoCo v3 Vision Transformer: fixed 2-D sin-cos position embedding, official init, frozen patch projection."""

import math
from functools import partial

import pytest
import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from moco_lightning.backbones import build_backbone
from moco_lightning.vit import VIT_SIZES, MoCoViT


def tiny(**kwargs) -> MoCoViT:
    defaults = dict(embed_dim=16, depth=2, num_heads=2, image_size=8, patch_size=4)
    defaults.update(kwargs)
    return MoCoViT(**defaults)


def official_sincos_table(rows: int, cols: int, dim: int) -> torch.Tensor:
    """MoCo v3's 2-D sin-cos table (vits.py), written out: ``[sin(i w), cos(i w), sin(j w), cos(j w)]`` per patch."""
    quarter = dim // 4
    omegas = [10000.0 ** (-d / quarter) for d in range(quarter)]
    table = [[0.0] * dim]  # the class token gets no position
    for row in range(rows):  # patches are laid out row by row
        for col in range(cols):
            token = []
            for pos in (row, col):
                token += [math.sin(pos * w) for w in omegas] + [math.cos(pos * w) for w in omegas]
            table.append(token)
    return torch.tensor(table, dtype=torch.float64)[None]


@pytest.mark.parametrize(("grid", "dim"), [((2, 2), 16), ((3, 2), 8), ((14, 14), 384)])
def test_timm_sincos_table_with_the_layout_used_is_the_official_one(grid, dim):
    table = build_sincos2d_pos_embed(list(grid), dim, interleave_sin_cos=True).double()
    torch.testing.assert_close(table, official_sincos_table(*grid, dim)[0, 1:], atol=1e-6, rtol=0)


def test_position_embedding_is_the_official_table_behind_a_zero_class_token():
    vit = tiny()
    assert vit.pos_embed.shape == (1, 1 + 2 * 2, 16)
    torch.testing.assert_close(vit.pos_embed.double(), official_sincos_table(2, 2, 16), atol=1e-6, rtol=0)


def test_position_embedding_is_a_fixed_buffer_not_a_parameter():
    vit = tiny()
    assert "pos_embed" not in dict(vit.named_parameters())
    assert "pos_embed" in dict(vit.named_buffers()) and "pos_embed" in vit.state_dict()


def test_forward_and_backward_at_a_tiny_size_with_the_patch_projection_frozen():
    vit = tiny(freeze_patch_embed=True)
    out = vit(torch.randn(3, 3, 8, 8))
    assert out.shape == (3, 16)
    out.square().sum().backward()
    assert vit.patch_embed.proj.weight.grad is None and vit.patch_embed.proj.bias.grad is None
    assert not vit.patch_embed.proj.weight.requires_grad
    assert vit.blocks[0].attn.qkv.weight.grad is not None and vit.cls_token.grad is not None


def test_patch_projection_trains_when_not_frozen():
    vit = tiny(freeze_patch_embed=False)
    vit(torch.randn(2, 3, 8, 8)).sum().backward()
    assert vit.patch_embed.proj.weight.grad is not None


def test_initialisation_is_the_official_one():
    vit = tiny(embed_dim=32, num_heads=4)
    qkv = vit.blocks[0].attn.qkv.weight  # (3·D, D): Q, K and V initialised as separate D x D matrices
    assert qkv.abs().max() <= math.sqrt(6.0 / (32 + 32)) and qkv.abs().max() > 0.8 * math.sqrt(6.0 / 64)
    fc1 = vit.blocks[0].mlp.fc1.weight  # Xavier-uniform (128, 32)
    assert fc1.abs().max() <= math.sqrt(6.0 / (128 + 32))
    assert all(torch.all(m.bias == 0) for m in vit.modules() if isinstance(m, nn.Linear))
    proj = vit.patch_embed.proj
    assert proj.weight.abs().max() <= math.sqrt(6.0 / (3 * 4 * 4 + 32)) and torch.all(proj.bias == 0)
    assert vit.cls_token.abs().max() < 1e-4


def test_state_dict_is_timms_vision_transformer_without_head():
    vit = tiny()
    timm_vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=10,
                                 norm_layer=partial(nn.LayerNorm, eps=1e-6))
    result = timm_vit.load_state_dict(vit.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    timm_vit.reset_classifier(0)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(timm_vit.eval()(x), vit.eval()(x))


def test_vit_small_has_twelve_heads_as_in_moco_v3_and_cifar_sizes_work():
    assert VIT_SIZES["vit_small"] == {"embed_dim": 384, "depth": 12, "num_heads": 12}
    assert VIT_SIZES["vit_base"] == {"embed_dim": 768, "depth": 12, "num_heads": 12}
    vit, dim = build_backbone("vit_small", image_size=32, patch_size=4, freeze_patch_embed=True)
    assert dim == 384 and vit.blocks[0].attn.num_heads == 12 and vit.patch_embed.grid_size == (8, 8)
    assert not vit.patch_embed.proj.weight.requires_grad
    with torch.no_grad():
        assert vit.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 384)


def test_image_size_not_a_multiple_of_the_patch_is_an_error():
    with pytest.raises(ValueError, match="patch_size"):
        tiny(image_size=10, patch_size=4)


def test_cifar_stem_is_refused_for_a_vit():
    with pytest.raises(ValueError, match="cifar_stem"):
        build_backbone("vit_small", cifar_stem=True)


def test_conv_stem_makes_16_px_tokens_and_trains():
    from moco_lightning.vit import ConvStem

    vit = MoCoViT(embed_dim=16, depth=1, num_heads=2, image_size=32, patch_size=16, freeze_patch_embed=True,
                  conv_stem=True)
    assert isinstance(vit.patch_embed, ConvStem) and vit.patch_embed.grid_size == (2, 2)
    convs = [m for m in vit.patch_embed.proj if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (3, 2, (2, 2)), (2, 4, (2, 2)), (4, 8, (2, 2)), (8, 16, (2, 2)), (16, 16, (1, 1))]
    assert tuple(vit.pos_embed.shape) == (1, 5, 16)  # class token + 2 x 2 tokens
    assert all(p.requires_grad for p in vit.patch_embed.parameters())  # --stop-grad-conv1 leaves a stem alone
    tokens = vit.patch_embed(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 4, 16)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_conv_stem_needs_16_px_patches():
    with pytest.raises(ValueError, match="patch_size=4"):
        MoCoViT(embed_dim=16, depth=1, num_heads=2, image_size=32, patch_size=4, conv_stem=True)

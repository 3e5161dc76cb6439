"""Backbones: the networks that map images to feature vectors.

A backbone is any ``nn.Module`` taking images ``(N, 3, H, W)`` to features ``(N, D)``. By name: torchvision ResNets
with ``fc = nn.Identity()`` (torchvision's state dict minus ``fc.*``), MoCo v3's ViTs (:mod:`moco_lightning.vit`)
and any timm model as ``"timm:<model name>"`` (:func:`build_timm`, never with pretrained weights).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial

import timm
import torch
from torch import nn
from torchvision import models

from moco_lightning.vit import VIT_SIZES, MoCoViT, build_vit

#: torchvision ResNets accepted by :func:`build_backbone`, by name.
RESNETS: dict[str, Callable[..., models.ResNet]] = {name: getattr(models, name) for name in ("resnet18", "resnet34",
                                                                                             "resnet50")}
#: MoCo v3 Vision Transformers accepted by :func:`build_backbone`, by name.
VITS: dict[str, Callable[..., MoCoViT]] = {name: partial(build_vit, name) for name in VIT_SIZES}
#: Every backbone name accepted by :func:`build_backbone`, mapped to its constructor (and any ``timm:<name>``).
BACKBONES: dict[str, Callable[..., nn.Module]] = {**RESNETS, **VITS}
#: The prefix of a timm backbone's name: ``"timm:resnet10t"`` is ``timm.create_model("resnet10t", num_classes=0)``.
TIMM_PREFIX = "timm:"


def timm_model_name(backbone: str | nn.Module | None) -> str | None:
    """The timm model name of a backbone named ``"timm:<name>"``; ``None`` for any other backbone."""
    if isinstance(backbone, str) and backbone.startswith(TIMM_PREFIX):
        return backbone[len(TIMM_PREFIX) :]
    return None


def check_timm_name(name: str) -> None:
    """Raise a ``ValueError`` (``backbone=timm:<name> is not a timm model; ...``) unless timm knows ``name``."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {' or '.join(TIMM_PREFIX + c for c in close)}? " if close else ""
        raise ValueError(f"backbone={TIMM_PREFIX}{name} is not a timm model; {hint}timm.list_models() lists the names")


def build_timm(name: str) -> tuple[nn.Module, int]:
    """A timm model by name without its classifier, randomly initialised (nothing downloads), and its width.

    ``timm.create_model(name, pretrained=False, num_classes=0)``: the forward pass returns the pooled features
    ``(N, D)``. ``D`` is the model's ``head_hidden_size`` where timm has one (MobileNetV3's 1x1 ``conv_head``
    widens ``num_features`` 288 to 1024), else its ``num_features``.

    Raises:
        ValueError: if timm has no model of that name.

    """
    check_timm_name(name)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    width = getattr(model, "head_hidden_size", None) or model.num_features
    return model, int(width)


def timm_architecture(module: nn.Module) -> tuple[str, str] | None:
    """``(timm model name, its classifier's state dict prefix)`` of a timm model (``("resnet10t", "fc")``), else None.

    The prefix is where ``timm.create_model(name, num_classes=N)`` keeps its classifier (``pretrained_cfg
    ["classifier"]``: ``fc``, ``head``, ``head.fc``, ``classifier``).
    """
    cfg = getattr(module, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or not cfg.get("architecture") or not cfg.get("classifier"):
        return None
    classifier = cfg["classifier"]
    return str(cfg["architecture"]), str(classifier[0] if isinstance(classifier, (list, tuple)) else classifier)


def use_cifar_stem(resnet: models.ResNet) -> models.ResNet:
    """Swap a ResNet's ImageNet stem for the small-image stem: a 3x3 stride-1 conv and no max-pool.

    The stem of the official CIFAR-10 MoCo demo (and of He et al.'s CIFAR ResNets), with ``nn.Conv2d``'s default
    initialisation as in the demo: on 32 px inputs the ImageNet stem would shrink the image 4x before the first block.
    """
    resnet.conv1 = nn.Conv2d(3, resnet.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    resnet.maxpool = nn.Identity()
    return resnet


@torch.no_grad()
def infer_feature_dim(module: nn.Module, image_size: int = 32) -> int:
    """Find the width D of a backbone's output by one forward pass of two blank images.

    Raises:
        ValueError: if the output is not a 2-D ``(N, D)`` tensor.

    """
    was_training = module.training
    module.eval()
    try:
        out = module(torch.zeros(2, 3, image_size, image_size))
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"backbone must map images (N, 3, H, W) to features (N, D), but it returned {shape}; "
            "wrap it so that it flattens/pools its output, or pass feature_dim=... explicitly"
        )
    return int(out.shape[1])


def check_backbone_name(backbone: str | nn.Module) -> None:
    """Raise a ``ValueError`` (``backbone=<name> is not a known backbone; choose one of ...``) for an unknown name."""
    name = timm_model_name(backbone)
    if name is not None:
        check_timm_name(name)
    elif isinstance(backbone, str) and backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone} is not a known backbone; choose one of {', '.join(sorted(BACKBONES))}, "
                         f"{TIMM_PREFIX}<a timm model> (e.g. {TIMM_PREFIX}resnet10t), or pass an nn.Module")


def build_backbone(
    backbone: str | nn.Module,
    cifar_stem: bool = False,
    feature_dim: int | None = None,
    *,
    zero_init_residual: bool = False,
    image_size: int = 224,
    patch_size: int = 16,
    freeze_patch_embed: bool = False,
) -> tuple[nn.Module, int]:
    """Build a backbone; returns ``(module, D)``, D the width of its features.

    The ResNet-only options are ignored for a ViT and the ViT-only ones for a ResNet (both for a timm model, which
    keeps its own stem, initialisation and input size): one set of settings serves every backbone name.

    Args:
        backbone: a name from :data:`BACKBONES` or ``"timm:<timm model name>"`` (randomly initialised; nothing is
            downloaded), or any module.
            A torchvision ``ResNet`` module has its ``fc`` replaced by ``nn.Identity`` and its width read from
            ``fc.in_features``; any other module must already map images to ``(N, D)`` features.
        cifar_stem: replace the ResNet stem by a 3x3 stride-1 conv without max-pool (for 32 px images or smaller).
        feature_dim: width D of a custom module's output; found by one dry forward pass when not given.
        zero_init_residual: ResNets by name only: zero the weight of the last BN of every residual block, so each
            block starts as the identity (torchvision's option; MoCo v3 turns it on, Goyal et al. 2017).
        image_size: ViTs only: side of the input images in pixels (the position-embedding grid).
        patch_size: ViTs only: side of a patch in pixels (16 at 224 px, 4 at 32 px).
        freeze_patch_embed: ViTs only: keep the random patch projection frozen (MoCo v3's ``--stop-grad-conv1``).

    """
    if isinstance(backbone, str):
        check_backbone_name(backbone)
        timm_name = timm_model_name(backbone)
        if timm_name is not None:
            if cifar_stem:
                raise ValueError(f"cifar_stem=True only applies to torchvision ResNets, not to {backbone}; set "
                                 "cifar_stem=False (a timm model keeps its own stem)")
            return build_timm(timm_name)
        if backbone in VITS:
            if cifar_stem:
                raise ValueError(f"cifar_stem=True only applies to ResNets, not to {backbone}; set cifar_stem=False "
                                 "(a ViT on small images uses a small patch_size instead)")
            vit = VITS[backbone](image_size=image_size, patch_size=patch_size, freeze_patch_embed=freeze_patch_embed)
            return vit, vit.embed_dim
        backbone = RESNETS[backbone](zero_init_residual=zero_init_residual)
    elif not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")

    if isinstance(backbone, models.ResNet):
        if not isinstance(backbone.fc, nn.Identity):
            feature_dim = backbone.fc.in_features
            backbone.fc = nn.Identity()
        if cifar_stem:
            use_cifar_stem(backbone)
        if feature_dim is None:
            feature_dim = backbone.inplanes  # width after layer4; unchanged by fc removal
        return backbone, int(feature_dim)

    if cifar_stem:
        raise ValueError("cifar_stem=True only applies to torchvision ResNets; set cifar_stem=False")
    if isinstance(backbone, MoCoViT) and feature_dim is None:
        return backbone, backbone.embed_dim
    if feature_dim is None:
        feature_dim = infer_feature_dim(backbone)
    return backbone, int(feature_dim)

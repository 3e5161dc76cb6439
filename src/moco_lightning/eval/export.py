"""Export the pretrained query backbone for use elsewhere: torchvision and detectron2 (ResNets), DeiT / timm (ViTs).

* torchvision: the backbone of a moco-lightning ResNet *is* a torchvision ResNet with ``fc = nn.Identity()``.
* detectron2: the key renaming of the official ``moco/detection/convert-pretrain-to-detectron2.py``
  (:func:`detectron2_key`), saved as the pickle ``{"model": {name: numpy array}, "__author__": "MOCO",
  "matching_heuristics": True}`` without ``num_batches_tracked`` (detectron2's frozen BN has none).
* DeiT: a ViT backbone is timm's ``VisionTransformer`` without its head, saved as ``{"model": state_dict}`` as the
  official MoCo v3 ``convert_to_deit.py`` writes it (MoCo v3's ViT-S has 12 heads, where DeiT-S has 6).
* timm: a timm backbone (``backbone=timm:<name>``) is the timm model built with ``num_classes=0``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torchvision import models

from moco_lightning.backbones import timm_model_name, use_cifar_stem
from moco_lightning.eval.checkpoint import BackboneCheckpoint, CheckpointError, load_backbone, read_backbone_checkpoint
from moco_lightning.vit import MoCoViT

#: torchvision ResNet constructors by name; export targets.
TORCHVISION_RESNETS = {name: getattr(models, name) for name in ("resnet18", "resnet34", "resnet50", "resnet101",
                                                                  "resnet152")}


def torchvision_state_dict(
    checkpoint: str | Path | Mapping[str, Any] | BackboneCheckpoint,
) -> tuple[dict[str, torch.Tensor], BackboneCheckpoint]:
    """The query backbone of a pretraining checkpoint as a torchvision ResNet state dict (no ``fc.*``).

    Loaded into a fresh backbone first, so weights that do not fit the architecture fail here, not at the user's
    load; ``CheckpointError`` for a checkpoint that is not MoCo's or a backbone that is not a ResNet.
    """
    module, _, ckpt = load_backbone(checkpoint)
    if not isinstance(module, models.ResNet):
        hint = "export it with format deit" if isinstance(module, MoCoViT) else \
            "export it with format timm" if timm_model_name(ckpt.backbone) else \
            "save module.encoder_q.backbone.state_dict() yourself instead"
        raise CheckpointError(
            f"checkpoint {ckpt.path} has a {type(module).__name__} backbone; torchvision/detectron2 export "
            f"supports ResNet backbones only ({hint})"
        )
    return _cloned_state(module), ckpt


def deit_state_dict(
    checkpoint: str | Path | Mapping[str, Any] | BackboneCheckpoint,
) -> tuple[dict[str, torch.Tensor], BackboneCheckpoint]:
    """The ViT backbone of a pretraining checkpoint as a DeiT / timm state dict (no ``head.*``), or CheckpointError."""
    module, _, ckpt = load_backbone(checkpoint)
    if not isinstance(module, MoCoViT):
        raise CheckpointError(
            f"checkpoint {ckpt.path} has a {type(module).__name__} backbone; the DeiT export is for ViT backbones "
            "(export a ResNet with format torchvision or detectron2)"
        )
    return _cloned_state(module), ckpt


def timm_state_dict(
    checkpoint: str | Path | Mapping[str, Any] | BackboneCheckpoint,
) -> tuple[dict[str, torch.Tensor], BackboneCheckpoint]:
    """A timm backbone of a pretraining checkpoint as the timm model's state dict (no head), or CheckpointError."""
    ckpt = checkpoint if isinstance(checkpoint, BackboneCheckpoint) else read_backbone_checkpoint(checkpoint)
    if timm_model_name(ckpt.backbone) is None:
        raise CheckpointError(
            f"checkpoint {ckpt.path} has the backbone {ckpt.backbone or 'of a custom module'}; the timm export is for "
            "timm backbones (backbone=timm:<name>): export a ResNet with format torchvision, a ViT with format deit"
        )
    module, _, ckpt = load_backbone(ckpt)
    return _cloned_state(module), ckpt


def torchvision_model(arch: str, cifar_stem: bool = False, num_classes: int = 1000) -> models.ResNet:
    """Build an untrained torchvision ResNet ready to receive an exported state dict.

    With ``cifar_stem=True`` the stem is replaced the same way as in pretraining (3x3 stride-1 conv, no
    max-pool); a stock torchvision ResNet cannot load such weights (its ``conv1`` is 7x7).
    """
    if arch not in TORCHVISION_RESNETS:
        raise ValueError(f"unknown ResNet {arch!r}; choose one of {sorted(TORCHVISION_RESNETS)}")
    model = TORCHVISION_RESNETS[arch](num_classes=num_classes)
    return use_cifar_stem(model) if cifar_stem else model


def detectron2_key(key: str) -> str:
    """Rename one torchvision ResNet key to detectron2's ResNet naming (see the module docstring).

    >>> detectron2_key("layer1.0.downsample.1.running_mean")
    'res2.0.shortcut.norm.running_mean'
    """
    key = re.sub(r"^conv1\.", "stem.conv1.", key)
    key = re.sub(r"^bn1\.", "stem.conv1.norm.", key)
    key = re.sub(r"^layer([1-4])\.", lambda m: f"res{int(m.group(1)) + 1}.", key)
    key = re.sub(r"\.bn([1-3])\.", lambda m: f".conv{m.group(1)}.norm.", key)
    key = key.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
    return key


def detectron2_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Convert a torchvision ResNet state dict into a detectron2 checkpoint dict (``model`` of numpy arrays).

    ``fc.*`` and ``num_batches_tracked`` entries are dropped.
    """
    model = {
        detectron2_key(k): v.detach().cpu().numpy()
        for k, v in state_dict.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def export_torchvision(checkpoint: str | Path | Mapping[str, Any] | BackboneCheckpoint, output: str | Path) -> Path:
    """Write the query backbone as a torchvision ResNet state dict (``torch.save``) and return the path.

    Load it with ``model = torchvision.models.resnet50(); model.load_state_dict(torch.load(path),
    strict=False)`` (only ``fc.*`` missing). For a CIFAR-stem checkpoint build the model with
    :func:`torchvision_model` ``(arch, cifar_stem=True)`` first.
    """
    return _save(torchvision_state_dict(checkpoint)[0], output)


def export_detectron2(checkpoint: str | Path | Mapping[str, Any] | BackboneCheckpoint, output: str | Path) -> Path:
    """Write the backbone as a detectron2 pickle (``MODEL.WEIGHTS``); CheckpointError for a CIFAR stem (not 7x7)."""
    state, ckpt = torchvision_state_dict(checkpoint)
    if state["conv1.weight"].shape[-1] != 7:
        raise CheckpointError(
            f"checkpoint {ckpt.path} uses the CIFAR stem (3x3 conv1, cifar_stem=True), which detectron2's "
            "ResNet stem cannot load; export a backbone pretrained with cifar_stem=false for detection"
        )
    return _save(detectron2_checkpoint(state), output, pickle.dump)


def export_deit(checkpoint: str | Path | Mapping[str, Any] | BackboneCheckpoint, output: str | Path) -> Path:
    """Write a ViT backbone as the official MoCo v3 ``convert_to_deit.py`` does, ``{"model": state_dict}``.

    Fine-tune it in the DeiT repository (``--resume``, loading with ``strict=False``; for MoCo v3's ViT-S set 12
    heads) or load it into timm: ``VisionTransformer(...).load_state_dict(torch.load(path)["model"],
    strict=False)`` misses only ``head.*``.
    """
    return _save({"model": deit_state_dict(checkpoint)[0]}, output)


def export_timm(checkpoint: str | Path | Mapping[str, Any] | BackboneCheckpoint, output: str | Path) -> Path:
    """Write a timm backbone as the timm model's state dict (``torch.save``) and return the path.

    Load it with ``timm.create_model(name, num_classes=0).load_state_dict(torch.load(path))`` (strict), or into
    ``timm.create_model(name, num_classes=N)`` with ``strict=False``: only the new classifier is missing.
    """
    return _save(timm_state_dict(checkpoint)[0], output)


def _cloned_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _save(obj: Any, output: str | Path, save: Callable[[Any, Any], None] = torch.save) -> Path:
    """Write ``obj`` to ``output`` (parent folders created) with ``save(obj, file)``; returns the path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("wb") as f:
        save(obj, f)
    return output

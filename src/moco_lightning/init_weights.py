"""Start pretraining from existing weights: find a backbone's weights in a file, whatever wrote it.

``MoCo(init_from=<file>)`` / ``MoCoV3(init_from=<file>)`` starts the query backbone from the file and the key /
momentum encoder as its copy; heads and predictor stay random. The file is read with
``torch.load(weights_only=True)``; the backbone's weights are found as a MoCo checkpoint's query backbone
(:data:`moco_lightning.eval.checkpoint.BACKBONE_PREFIXES`), else under the backbone's own names, as a plain state
dict or inside ``state_dict`` / ``model`` (torchvision, timm, DeiT, this project's exports), the classifier dropped.

Every tensor of the backbone must be in the file with its shape, and nothing else may be: a mismatch is one
:class:`InitWeightsError` line naming the keys. Missing BatchNorm ``num_batches_tracked`` counters (older PyTorch)
are the only exception: the backbone keeps its own.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models import ResNet

from moco_lightning.backbones import build_backbone
from moco_lightning.eval.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    find_moco_backbone,
    load_checkpoint_file,
)

__all__ = ["InitWeights", "InitWeightsError", "check_init_from", "find_backbone_weights", "init_backbone",
           "read_init_weights"]

log = logging.getLogger(__name__)

#: Keys of a file named in a message, at most; the rest are counted.
SHOWN_KEYS = 5
#: Containers of a state dict in a checkpoint file, tried in order (Lightning, official MoCo and timm: state_dict;
#: DeiT and this project's DeiT export: model).
_CONTAINERS = ("state_dict", "model")


class InitWeightsError(CheckpointError):
    """A file that ``init_from`` cannot start the backbone from; the message is one line naming what does not fit."""


@dataclass
class InitWeights:
    """The backbone weights found in an ``init_from`` file.

    Attributes:
        path: the file.
        state_dict: the backbone's tensors under the backbone's own names.
        source: the format they were found in (``"torchvision ResNet state dict"``...).

    """

    path: str
    state_dict: dict[str, torch.Tensor]
    source: str


def _shown(keys: list[str]) -> str:
    """The first :data:`SHOWN_KEYS` keys and how many there are."""
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} ({', '.join(keys[:SHOWN_KEYS])}{more})"


def _classifiers(backbone: nn.Module) -> tuple[str, ...]:
    """Names of the classifier a state dict of this kind of backbone may hold: timm's own, else ``fc`` and ``head``."""
    classifier = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier")
    if classifier:
        return (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return ("fc", "head")


def _kind(backbone: nn.Module) -> str:
    """What a plain state dict of this backbone is called in messages."""
    if getattr(backbone, "pretrained_cfg", None):
        return f"timm {type(backbone).__name__} state dict"
    if isinstance(backbone, ResNet):
        return "torchvision ResNet state dict"
    if isinstance(backbone, VisionTransformer):
        return "DeiT / timm ViT state dict"
    return "state dict"


def _state_dict_of(checkpoint: Any, path: str) -> tuple[Mapping[str, Any], str]:
    """The state dict of a loaded file and where it was in it (``""``: the file is one)."""
    if isinstance(checkpoint, Mapping):
        for container in _CONTAINERS:
            if isinstance(checkpoint.get(container), Mapping):
                return checkpoint[container], container
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint, ""
    what = f"top-level keys: {sorted(map(str, checkpoint))[:SHOWN_KEYS]}" if isinstance(checkpoint, Mapping) else \
        f"a {type(checkpoint).__name__}"
    raise InitWeightsError(f"init_from={path} holds no state dict ({what}); pass a file of weights: a state dict, "
                           "or a checkpoint with 'state_dict' or 'model'")


def find_backbone_weights(checkpoint: Any, backbone: nn.Module, path: str = "<memory>") -> InitWeights:
    """Find the tensors of ``backbone`` in a loaded file (formats: the module docstring), without loading them.

    Args:
        checkpoint: what ``torch.load`` returned.
        backbone: the backbone to start; only its names and shapes are read (``meta`` device will do).
        path: the file, for the messages.

    Raises:
        InitWeightsError: the file holds no state dict, or its weights do not fit ``backbone``.

    """
    state, container = _state_dict_of(checkpoint, path)
    own = backbone.state_dict()
    found = find_moco_backbone(state)
    if found is not None:
        weights, _, source = found
    else:  # the backbone's own names; the file's classifier dropped
        classifiers = tuple(f"{name}." for name in _classifiers(backbone))
        weights = {k: v for k, v in state.items() if k in own or not k.startswith(classifiers)}
        source = _kind(backbone) + (f" (in '{container}')" if container else "")
    _check_fits(weights, own, path, source)
    return InitWeights(path=path, state_dict=weights, source=source)


def _check_fits(weights: Mapping[str, Any], own: Mapping[str, torch.Tensor], path: str, source: str) -> None:
    """Raise :class:`InitWeightsError` unless ``weights`` has every key of ``own``, with its shape, and no other."""
    missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        found = "; ".join(([f"missing from the file: {_shown(missing)}"] if missing else [])
                          + ([f"unexpected in the file: {_shown(unexpected)}"] if unexpected else []))
        raise InitWeightsError(f"init_from={path} ({source}) does not fit the backbone: {found}; pass weights of "
                               "the same architecture as the backbone")
    shapes = [k for k, v in own.items() if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if "conv1.weight" in shapes and {tuple(weights["conv1.weight"].shape[-2:]), tuple(own["conv1.weight"].shape[-2:])} \
            == {(3, 3), (7, 7)}:
        file_shape, own_shape = tuple(weights["conv1.weight"].shape), tuple(own["conv1.weight"].shape)
        cifar = own_shape[-1] == 3
        raise InitWeightsError(
            f"cifar_stem={cifar} builds conv1 {own_shape} but init_from={path} ({source}) has conv1 {file_shape}, "
            + ("the 7x7 ImageNet stem; set cifar_stem=false to start from these weights" if cifar else
               "the 3x3 CIFAR stem; set cifar_stem=true to start from these weights"))
    if shapes:
        listed = ", ".join(f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in shapes[:SHOWN_KEYS])
        more = f" and {len(shapes) - SHOWN_KEYS} more" if len(shapes) > SHOWN_KEYS else ""
        raise InitWeightsError(f"init_from={path} ({source}) does not fit the backbone: {len(shapes)} tensors of "
                               f"another shape (file vs backbone: {listed}{more}); pass weights of the same "
                               "architecture and input size as the backbone")


def read_init_weights(path: str | Path, backbone: nn.Module, *, mmap: bool = False) -> InitWeights:
    """Read an ``init_from`` file with ``torch.load(weights_only=True)`` and find ``backbone``'s weights in it.

    Args:
        path: the file.
        backbone: the backbone to start (its names and shapes only).
        mmap: memory-map the tensors (read when used), as a check that reads no weights.

    Raises:
        InitWeightsError: the file is missing, needs a full pickle, holds no state dict or does not fit.

    """
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise InitWeightsError(f"init_from={path} {what}; pass a weights file (a torchvision or timm state dict, an "
                               "official MoCo checkpoint, a checkpoint or export of this project), or init_from=null "
                               "where a checkpoint brings the weights (a resumed run, load_from_checkpoint)")
    try:
        checkpoint = load_checkpoint_file(file, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - whatever torch.load raises on a file that is not a weights file
        pickled = re.search(r"such as ([\w.]+)", str(err)) if isinstance(err, UnsafeCheckpointError) else None
        if pickled:
            raise InitWeightsError(f"init_from={path} holds pickled Python objects (such as {pickled.group(1)}), "
                                   "which torch.load(weights_only=True) refuses: unpickling them would run code from "
                                   "the file; re-save its state dict with torch.save(state_dict, file) where you "
                                   "trust it") from err
        cause = err.__cause__ if isinstance(err, UnsafeCheckpointError) and err.__cause__ else err
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise InitWeightsError(f"init_from={path} is not a PyTorch weights file that torch.load(weights_only=True) "
                               f"reads ({type(cause).__name__}: {first[:200]})") from err
    return find_backbone_weights(checkpoint, backbone, str(file))


@torch.no_grad()
def init_backbone(backbone: nn.Module, path: str | Path) -> InitWeights:
    """Load ``backbone``'s weights strictly from an ``init_from`` file (:func:`read_init_weights`); log one line."""
    found = read_init_weights(path, backbone, mmap=True)
    own = backbone.state_dict()
    state = {k: found.state_dict.get(k, v) for k, v in own.items()}  # a missing num_batches_tracked: the backbone's
    backbone.load_state_dict(state, strict=True)
    log.info("init_from: started the backbone from %s (%s): %d tensors loaded; the heads start random",
             found.path, found.source, len(found.state_dict))
    return found


def check_init_from(init_from: str | None = None, backbone: str | nn.Module = "resnet18", cifar_stem: bool = False,
                    image_size: int = 224, patch_size: int = 16) -> None:
    """Check that ``init_from`` fits the backbone these settings build, reading names and shapes only.

    The backbone is built on the ``meta`` device and the file memory-mapped: the check costs almost nothing.
    ``None`` checks nothing.

    Raises:
        InitWeightsError: see :func:`read_init_weights`.

    """
    if init_from is None or isinstance(backbone, nn.Module):
        return
    options = dict(cifar_stem=cifar_stem, image_size=image_size, patch_size=patch_size)
    try:
        with torch.device("meta"):
            module, _ = build_backbone(backbone, **options)
    except (RuntimeError, NotImplementedError):  # a model whose constructor reads tensor values: build it for real
        module, _ = build_backbone(backbone, **options)
    read_init_weights(init_from, module, mmap=True)

"""Read the query backbone out of a pretraining checkpoint, for evaluation and export.

Understood: Lightning checkpoints of :class:`moco_lightning.MoCo` / :class:`moco_lightning.MoCoV3` (the backbone
named by their ``hyper_parameters``) and official facebookresearch/moco and moco-v3 checkpoints (named by ``arch``;
their projector is dropped as the official ``main_lincls.py`` does): :data:`BACKBONE_PREFIXES`. Only the query
backbone is kept, with its projection head for :func:`load_query_encoder`; a ViT's image and patch size are read
from the shapes of its weights.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from moco_lightning.backbones import VITS, build_backbone
from moco_lightning.heads import ProjectionHead, build_mlp
from moco_lightning.vit import CONV_STEM_PATCH

#: State-dict prefixes of the query backbone, tried in order: (prefix, keys to drop after stripping it, the format).
BACKBONE_PREFIXES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("encoder_q.backbone.", (), "moco-lightning MoCo checkpoint"),
    ("base_encoder.backbone.", (), "moco-lightning MoCo v3 checkpoint"),
    ("module.encoder_q.", ("fc.",), "official MoCo v1/v2 checkpoint"),  # facebookresearch/moco main_moco.py (DDP)
    ("encoder_q.", ("fc.",), "MoCo v1/v2 checkpoint"),  # official code saved without the DDP wrapper
    ("module.base_encoder.", ("fc.", "head."), "official MoCo v3 checkpoint"),  # facebookresearch/moco-v3 (DDP)
    ("base_encoder.", ("fc.", "head."), "MoCo v3 checkpoint"),  # official v3 code saved without the DDP wrapper
)
#: State-dict prefixes of the query encoder's projection head (v1/v2 linear or MLP, v3 MLP with BN), in order.
_HEAD_PREFIXES: tuple[str, ...] = ("encoder_q.head.", "base_encoder.head.", "module.encoder_q.fc.", "encoder_q.fc.",
                                   "module.base_encoder.fc.", "module.base_encoder.head.", "base_encoder.fc.")
#: Classes a checkpoint may hold besides tensors and plain containers, loaded with ``weights_only=True``.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]
#: The prefixes of this project's own modules (their checkpoints carry hyper-parameters).
_OWN_PREFIXES = ("encoder_q.backbone.", "base_encoder.backbone.")


class CheckpointError(ValueError):
    """A checkpoint that is not a MoCo checkpoint, or whose backbone does not match the one asked for."""


@dataclass
class BackboneCheckpoint:
    """The query backbone of a pretraining checkpoint.

    Attributes:
        path: the file it was read from (``"<memory>"`` for an in-memory checkpoint).
        state_dict: backbone weights and buffers with the prefix stripped (torchvision names for ResNets).
        backbone: backbone name (``"resnet50"``...) or ``None`` when the run used a custom module.
        cifar_stem: whether the ResNet uses the 3x3 small-image stem.
        feature_dim: feature width recorded in the hyper-parameters (``None`` if not recorded).
        source: ``"moco_lightning"`` or ``"official"``.
        hyper_parameters: all hyper-parameters found in the checkpoint.
        backbone_options: extra :func:`~moco_lightning.backbones.build_backbone` arguments (a ViT's geometry).
        head_state_dict: the query encoder's projection head, may be empty.

    """

    path: str
    state_dict: dict[str, torch.Tensor]
    backbone: str | None
    cifar_stem: bool = False
    feature_dim: int | None = None
    source: str = "moco_lightning"
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    backbone_options: dict[str, int] = field(default_factory=dict)
    head_state_dict: dict[str, torch.Tensor] = field(default_factory=dict)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that holds pickled Python objects beyond tensors and plain containers, loaded without opt-in."""


def load_checkpoint_file(path: Path, allow_pickle: bool = False, *, mmap: bool = False) -> Any:
    """Load a checkpoint on the CPU with ``weights_only=True``; a full pickle only when ``allow_pickle``.

    ``mmap`` memory-maps a zip-format file. Beyond tensors, only an ``argparse.Namespace`` is let through
    (:data:`SAFE_GLOBALS`), which scripts derived from the official ``main_moco.py`` often add.

    Raises:
        UnsafeCheckpointError: the file needs a full pickle and ``allow_pickle`` is false.

    """
    mmap = mmap and zipfile.is_zipfile(path)
    if allow_pickle:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"such as {found.group(1)}" if found else "that torch.load(weights_only=True) refuses"
        raise UnsafeCheckpointError(
            f"{path} holds pickled Python objects ({what}); unpickling them runs code "
            "from the file. Only if you trust where it came from, opt in with allow_pickle=true (moco-eval-knn, "
            "moco-eval-linear) or --trust-checkpoint (moco-export)") from err


def read_backbone_checkpoint(checkpoint: str | Path | Mapping[str, Any], *,
                             allow_pickle: bool = False) -> BackboneCheckpoint:
    """Extract the query backbone's state dict and description from a checkpoint file (or loaded dict).

    Args:
        checkpoint: the file, or a checkpoint already loaded.
        allow_pickle: load a file that holds arbitrary pickled objects (runs their code: trusted files only).

    Raises:
        FileNotFoundError: if the file does not exist.
        UnsafeCheckpointError: if the file needs a full pickle and ``allow_pickle`` is false.
        CheckpointError: if it holds no MoCo query backbone.

    """
    if isinstance(checkpoint, Mapping):
        path, ckpt = "<memory>", checkpoint
    else:
        file = Path(checkpoint).expanduser().resolve()
        if not file.is_file():
            raise FileNotFoundError(
                f"checkpoint {str(file)!r} does not exist; pass checkpoint=<path to a .ckpt written by moco-train>"
            )
        path, ckpt = str(file), load_checkpoint_file(file, allow_pickle)

    state = ckpt.get("state_dict") if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        keys = sorted(ckpt)[:5] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a MoCo checkpoint: it has no 'state_dict' (top-level keys: {keys}); "
            "pass the .ckpt file that moco-train saved (e.g. outputs/.../checkpoints/last.ckpt), "
            "not an exported backbone"
        )
    found = find_moco_backbone(state)
    if found is None:
        raise CheckpointError(
            f"{path} is not a MoCo checkpoint: no 'encoder_q.backbone.*' / 'base_encoder.backbone.*' "
            f"(moco-lightning) or 'module.encoder_q.*' / 'module.base_encoder.*' (official MoCo, MoCo v3) keys in "
            f"its state_dict (first keys: {sorted(state)[:5]}); pass a checkpoint written by moco-train or by the "
            "official main_moco.py"
        )
    backbone_state, prefix, _ = found
    options = vit_geometry(backbone_state)
    head_prefix = next((h for h in _HEAD_PREFIXES if any(k.startswith(h) for k in state)), None)
    head_state = {} if head_prefix is None else {k[len(head_prefix):]: v for k, v in state.items()
                                                  if k.startswith(head_prefix)}
    common = {"path": path, "state_dict": backbone_state, "backbone_options": options, "head_state_dict": head_state}
    if prefix in _OWN_PREFIXES:
        hparams = dict(ckpt.get("hyper_parameters") or {})
        name = hparams.get("backbone")
        return BackboneCheckpoint(backbone=name if isinstance(name, str) else None,
                                  cifar_stem=bool(hparams.get("cifar_stem", False)),
                                  feature_dim=hparams.get("feature_dim"), hyper_parameters=hparams, **common)
    conv1 = backbone_state.get("conv1.weight")
    return BackboneCheckpoint(backbone=ckpt.get("arch"), cifar_stem=conv1 is not None and conv1.shape[-2:] == (3, 3),
                              source="official", hyper_parameters={"arch": ckpt.get("arch")}, **common)


def find_moco_backbone(state: Mapping[str, Any]) -> tuple[dict[str, Any], str, str] | None:
    """``(backbone weights, prefix, format)`` of the first :data:`BACKBONE_PREFIXES` entry in ``state``, or ``None``."""
    for prefix, dropped, source in BACKBONE_PREFIXES:
        weights = {k[len(prefix):]: v for k, v in state.items()
                   if k.startswith(prefix) and not k[len(prefix):].startswith(dropped)}
        if weights:
            return weights, prefix, source
    return None


def vit_geometry(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{"image_size", "patch_size"}`` of a ViT state dict (from its patch and position embeddings); else ``{}``."""
    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    if proj is None and "patch_embed.proj.0.weight" in state:  # vit_conv_*: the convolutional stem
        proj = torch.empty(0, 0, CONV_STEM_PATCH, CONV_STEM_PATCH)
    if proj is None or pos is None or proj.dim() != 4 or pos.dim() != 3:
        return {}
    patch = int(proj.shape[-1])
    grid = math.isqrt(int(pos.shape[1]) - 1)
    return {"image_size": grid * patch, "patch_size": patch}


def _feature_width(state: Mapping[str, torch.Tensor]) -> int | None:
    """Width of the last 1-D weight (the last BN of a ResNet), i.e. the feature width; ``None`` if none."""
    widths = [v.shape[0] for k, v in state.items() if k.endswith(".weight") and v.dim() == 1]
    return int(widths[-1]) if widths else None


def load_backbone_state(module: nn.Module, ckpt: BackboneCheckpoint, what: str = "the backbone") -> None:
    """Load ``ckpt.state_dict`` into ``module`` strictly; a mismatch raises a readable :class:`CheckpointError`."""
    own = module.state_dict()
    missing = [k for k in own if k not in ckpt.state_dict]
    unexpected = [k for k in ckpt.state_dict if k not in own]
    shapes = [
        (k, tuple(ckpt.state_dict[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in ckpt.state_dict and ckpt.state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        have, want = _feature_width(ckpt.state_dict), _feature_width(own)
        details = []
        if shapes:
            k, a, b = shapes[0]
            details.append(f"{len(shapes)} shape mismatches, first {k}: {a} in the checkpoint vs {b}")
        if missing:
            details.append(f"{len(missing)} keys missing from the checkpoint, first {missing[0]!r}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys in the checkpoint, first {unexpected[0]!r}")
        raise CheckpointError(
            f"backbone does not match: checkpoint {ckpt.path} has {ckpt.backbone or 'a custom'} backbone "
            f"features of width {have} (cifar_stem={ckpt.cifar_stem}) but {what} has width {want} "
            f"({'; '.join(details)}); build the same backbone as in pretraining, or leave backbone unset "
            "so it is read from the checkpoint"
        )
    module.load_state_dict(ckpt.state_dict, strict=True)


def load_backbone(
    checkpoint: str | Path | Mapping[str, Any] | BackboneCheckpoint,
    backbone: str | nn.Module | None = None,
    cifar_stem: bool | None = None,
) -> tuple[nn.Module, int, BackboneCheckpoint]:
    """Rebuild the query backbone of a pretraining checkpoint with its trained weights.

    Args:
        checkpoint: a checkpoint path, a loaded checkpoint dict, or a :func:`read_backbone_checkpoint` result.
        backbone: override the recorded backbone: a name of :data:`moco_lightning.backbones.BACKBONES` or a module.
        cifar_stem: override the recorded stem.

    Returns:
        ``(backbone, feature_dim, ckpt)``, the backbone in eval mode on the CPU.

    Raises:
        CheckpointError: if the file is not a MoCo checkpoint or the backbone does not match its weights.

    """
    ckpt = checkpoint if isinstance(checkpoint, BackboneCheckpoint) else read_backbone_checkpoint(checkpoint)
    spec = backbone if backbone is not None else ckpt.backbone
    if spec is None:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was pretrained with a custom backbone module (no backbone name in its "
            "hyper-parameters); pass backbone=<the same nn.Module architecture> to load it"
        )
    stem = ckpt.cifar_stem if cifar_stem is None else cifar_stem
    feature_dim = ckpt.feature_dim if isinstance(spec, nn.Module) else None
    options = ckpt.backbone_options if isinstance(spec, str) and spec in VITS else {}
    module, dim = build_backbone(spec, cifar_stem=stem, feature_dim=feature_dim, **options)
    name = spec if isinstance(spec, str) else type(spec).__name__
    load_backbone_state(module, ckpt, what=f"the requested {name} backbone (cifar_stem={stem})")
    module.eval()
    return module, dim, ckpt


class EmbeddingEncoder(nn.Module):
    """A backbone, its projection head and L2 normalisation: images to the unit embeddings the MoCo loss compares."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images ``(N, 3, H, W)`` into unit vectors ``(N, dim)``."""
        return F.normalize(self.head(self.backbone(x)), dim=1)


def load_query_encoder(
    checkpoint: str | Path | Mapping[str, Any] | BackboneCheckpoint,
) -> tuple[EmbeddingEncoder, int, BackboneCheckpoint]:
    """Rebuild the whole query encoder of a checkpoint (backbone + head), normalised, in eval mode.

    Returns ``(encoder, embedding width, ckpt)``; raises :class:`CheckpointError` when there is no projection head.
    """
    ckpt = checkpoint if isinstance(checkpoint, BackboneCheckpoint) else read_backbone_checkpoint(checkpoint)
    backbone, feature_dim, ckpt = load_backbone(ckpt)
    head_state = ckpt.head_state_dict
    if "weight" in head_state:  # the official v1 head: the ResNet's own fc
        head_state = {f"0.{k}": v for k, v in head_state.items()}
    linears = [k for k, v in head_state.items() if k.endswith("weight") and v.dim() == 2]
    if not linears:
        raise CheckpointError(
            f"checkpoint {ckpt.path} has no projection head of the query encoder (keys {sorted(head_state)[:4]}); "
            "use features=backbone, which needs only the backbone"
        )
    out_dim = int(head_state[linears[-1]].shape[0])
    candidates: list[nn.Module]
    if any(k.endswith("running_mean") for k in head_state):  # MoCo v3: Linear-BN-ReLU ... Linear(-BN)
        mlp_dim = int(head_state[linears[0]].shape[0])
        candidates = [build_mlp(len(linears), feature_dim, mlp_dim, out_dim, last_bn=b) for b in (True, False)]
    else:  # v1: Linear; v2: Linear-ReLU-Linear
        hidden = int(head_state[linears[0]].shape[0]) if len(linears) > 1 else None
        candidates = [ProjectionHead(feature_dim, out_dim, hidden_dim=hidden, mlp=hidden is not None)]
    errors = []
    for head in candidates:
        try:
            head.load_state_dict(head_state, strict=True)
        except RuntimeError as err:
            errors.append(str(err).splitlines()[0])
            continue
        return EmbeddingEncoder(backbone, head).eval(), out_dim, ckpt
    raise CheckpointError(f"the projection head of {ckpt.path} does not load: {errors[0]}")

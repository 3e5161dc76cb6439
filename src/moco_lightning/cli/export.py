"""``python export.py CHECKPOINT`` / ``moco-export``: the pretrained backbone for torchvision, detectron2 and DeiT.

    moco-export outputs/.../checkpoints/last.ckpt                  # every format that fits, next to the checkpoint
    moco-export run.ckpt --format torchvision --output r50.pth
    moco-export run.ckpt --format detectron2 --output r50_d2.pkl   # MODEL.WEIGHTS of the detection recipes
    moco-export vit.ckpt --format deit --output vit_s_deit.pth     # as MoCo v3's convert_to_deit.py
    moco-export timm.ckpt --format timm --output r10t.pth          # backbone=timm:<name>: timm's own state dict
    moco-export other.pth.tar --trust-checkpoint                   # a file with pickled objects: trusted sources only

torchvision: ``torchvision.models.resnet50().load_state_dict(torch.load("r50.pth"), strict=False)`` loads it
with only ``fc.*`` missing. detectron2: the official MoCo key renaming (stem, res2-res5, norms, shortcuts).
DeiT (ViT backbones of MoCo v3): ``{"model": state_dict}`` with timm's names, only ``head.*`` missing. timm
(``backbone=timm:<name>``): ``timm.create_model(name, num_classes=0).load_state_dict(torch.load("r10t.pth"))``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from moco_lightning.backbones import timm_model_name
from moco_lightning.eval.checkpoint import BackboneCheckpoint, CheckpointError, read_backbone_checkpoint
from moco_lightning.eval.export import export_deit, export_detectron2, export_timm, export_torchvision

__all__ = ["main", "output_name"]

SUFFIXES = {"torchvision": "_torchvision.pth", "detectron2": "_detectron2.pkl", "deit": "_deit.pth",
            "timm": "_timm.pth"}
WRITERS = {"torchvision": export_torchvision, "detectron2": export_detectron2, "deit": export_deit,
           "timm": export_timm}
#: Endings of checkpoint files, longest first: the default output name drops one before adding the format's suffix.
CHECKPOINT_SUFFIXES = (".pth.tar", ".ckpt", ".pth", ".pt", ".tar")


def output_name(checkpoint: Path, fmt: str) -> str:
    """The default file name of ``fmt`` exported from ``checkpoint``: ``x.pth.tar`` -> ``x_torchvision.pth``.

    A known checkpoint ending (:data:`CHECKPOINT_SUFFIXES`, ``.pth.tar`` as one) is dropped whole; any other name
    loses its last suffix only.
    """
    name = checkpoint.name
    known = next((s for s in CHECKPOINT_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)
    stem = name[: -len(known)] if known else checkpoint.stem
    return stem + SUFFIXES[fmt]


def _formats(choice: str, ckpt: BackboneCheckpoint) -> list[str]:
    """The formats a ``--format`` choice means for this checkpoint (``auto``: every one its backbone fits)."""
    if choice == "auto":
        if timm_model_name(ckpt.backbone):
            return ["timm"]
        return ["deit"] if ckpt.backbone_options else ["torchvision", "detectron2"]
    return ["torchvision", "detectron2"] if choice == "both" else [choice]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco-export",
        description="Export the query backbone of a MoCo checkpoint as a torchvision state dict and/or a "
        "detectron2 checkpoint (ResNets), a DeiT state dict (ViTs), or a timm state dict (timm backbones).",
    )
    parser.add_argument("checkpoint", type=Path, help="a moco-train .ckpt or an official MoCo checkpoint")
    parser.add_argument(
        "--format",
        choices=["auto", "torchvision", "detectron2", "deit", "timm", "both"],
        default="auto",
        help="what to write: auto (default) = torchvision and detectron2 for a ResNet, deit for a ViT, timm for a "
        "timm backbone; both = torchvision and detectron2",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="output file (one format) or folder (both); default: next to the checkpoint, named "
        "<checkpoint>_torchvision.pth / <checkpoint>_detectron2.pkl (x.pth.tar or x.ckpt -> x_torchvision.pth)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="also load a checkpoint that holds arbitrary pickled objects; unpickling runs their code, so only for "
        "files from a source you trust",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``moco-export``; exits with status 2 and a message on a bad checkpoint."""
    args = _parser().parse_args(argv)
    try:
        ckpt = read_backbone_checkpoint(args.checkpoint, allow_pickle=args.trust_checkpoint)
        formats = _formats(args.format, ckpt)
        for fmt in formats:
            if args.output is None:
                out = args.checkpoint.with_name(output_name(args.checkpoint, fmt))
            elif len(formats) > 1:
                out = args.output / output_name(args.checkpoint, fmt)
            else:
                out = args.output
            if fmt == "detectron2" and ckpt.cifar_stem and len(formats) > 1:
                print(
                    "skipped detectron2: the backbone uses the CIFAR stem (cifar_stem=True), which detectron2's "
                    "ResNet cannot load",
                    file=sys.stderr,
                )
                continue
            print(f"{fmt}: {WRITERS[fmt](ckpt, out)}")
    except (CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if ckpt.cifar_stem and "torchvision" in formats:
        print(
            f"note: the backbone uses the CIFAR stem; load the weights into "
            f"moco_lightning.eval.torchvision_model({ckpt.backbone!r}, cifar_stem=True)"
        )


if __name__ == "__main__":
    main()

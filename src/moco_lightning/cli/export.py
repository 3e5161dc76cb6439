"""``python export.py CHECKPOINT`` / ``moco-export``: the pretrained backbone for torchvision and detectron2.

    moco-export outputs/.../checkpoints/last.ckpt                  # both formats next to the checkpoint
    moco-export run.ckpt --format torchvision --output r50.pth
    moco-export run.ckpt --format detectron2 --output r50_d2.pkl   # MODEL.WEIGHTS of the detection recipes

torchvision: ``torchvision.models.resnet50().load_state_dict(torch.load("r50.pth"), strict=False)`` loads it
with only ``fc.*`` missing. detectron2: the official MoCo key renaming (stem, res2-res5, norms, shortcuts).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from moco_lightning.eval.checkpoint import CheckpointError, read_backbone_checkpoint
from moco_lightning.eval.export import export_detectron2, export_torchvision

__all__ = ["main"]

SUFFIXES = {"torchvision": "_torchvision.pth", "detectron2": "_detectron2.pkl"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco-export",
        description="Export the query backbone of a MoCo checkpoint as a torchvision state dict and/or a "
        "detectron2 checkpoint.",
    )
    parser.add_argument("checkpoint", type=Path, help="a moco-train .ckpt or an official MoCo checkpoint")
    parser.add_argument(
        "--format",
        choices=["torchvision", "detectron2", "both"],
        default="both",
        help="what to write (default: both)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="output file (one format) or folder (both); default: next to the checkpoint, named "
        "<checkpoint>_torchvision.pth / <checkpoint>_detectron2.pkl",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``moco-export``; exits with status 2 and a message on a bad checkpoint."""
    args = _parser().parse_args(argv)
    formats = ["torchvision", "detectron2"] if args.format == "both" else [args.format]
    try:
        ckpt = read_backbone_checkpoint(args.checkpoint)
        for fmt in formats:
            if args.output is None:
                out = args.checkpoint.with_name(args.checkpoint.stem + SUFFIXES[fmt])
            elif len(formats) > 1:
                out = args.output / (args.checkpoint.stem + SUFFIXES[fmt])
            else:
                out = args.output
            if fmt == "detectron2" and ckpt.cifar_stem and len(formats) > 1:
                print(
                    "skipped detectron2: the backbone uses the CIFAR stem (cifar_stem=True), which detectron2's "
                    "ResNet cannot load",
                    file=sys.stderr,
                )
                continue
            writer = export_torchvision if fmt == "torchvision" else export_detectron2
            print(f"{fmt}: {writer(ckpt, out)}")
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

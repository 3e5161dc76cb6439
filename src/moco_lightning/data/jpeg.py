"""Random resized crops taken while decoding: the boxes come from the file's header, the decode at the scale they need.

The exact path decodes the whole image at full size and crops afterwards. Here (:class:`CropDecoder`, a folder
datamodule's ``decode="draft"``):

1. the file is opened lazily (PIL reads only the header) and each view's ``RandomResizedCrop`` draws its box for an
   image of the header's size, with torchvision's own ``make_params`` on a stand-in tensor of that size: the same
   calls to torch's random generator, so the boxes have exactly torchvision's distribution (and, for the same
   generator state, are the very boxes the exact path draws);
2. a JPEG is decoded at the largest DCT reduction (1/8, 1/4, 1/2: PIL's ``Image.draft``) that leaves every box at
   least the output size in both dimensions, so nothing is upsampled that the exact path downsamples;
3. each box, mapped to the reduced image, is resized to the output size (PIL's resize with a fractional box).

Without a reduction (a box smaller than twice the output size) PIL crops are the exact path's, pixel for pixel. With
one, they differ by resampling only: the DCT reduction averages blocks of pixels, then the bilinear resize finishes
(tests/data/test_jpeg.py bounds the difference on a real photograph). Files that are not plain JPEGs (PNG, CMYK, an
EXIF orientation other than upright) are decoded whole (:func:`~moco_lightning.data.decode.decode_image`) and
cropped exactly as before. At ImageNet's own size (about 500 x 375) and a 224-pixel output no box is 448 pixels
tall, so nothing is reduced there; the reduction pays for larger photographs (a camera's) and smaller outputs.

Where the crops leave the loader as uint8 tensors (batch augmentation, the configs' default: ``output="tensor"``)
and nothing is reduced, the file is decoded by libjpeg-turbo straight into a tensor (``torchvision.io.decode_jpeg``:
the same pixels as PIL's decode) and each box is resized by torch's uint8 antialiased bilinear kernel, which differs
from PIL's by at most 1 in a few pixels' rounding and costs a third of it. Measured in benchmarks/RESULTS.md
("ImageNet loader with decoding").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_modes_mapping
from torchvision.transforms.v2 import functional as F

from moco_lightning.data.decode import decode_image, to_rgb

__all__ = ["CROP_OUTPUTS", "DECODE_MODES", "REDUCTIONS", "CropDecoder", "CroppedViews", "check_decode", "decode_crops",
           "largest_reduction", "split_crop"]

#: How the pretraining loader of a folder datamodule decodes: ``"exact"`` (whole image, then crop) or ``"draft"``.
DECODE_MODES: tuple[str, ...] = ("exact", "draft")
#: What :class:`CropDecoder` returns: RGB PIL images, or ``(3, H, W)`` uint8 tensors (the batch augmentation's input).
CROP_OUTPUTS: tuple[str, ...] = ("pil", "tensor")
#: The DCT reductions of a JPEG decoder (PIL's ``draft``), largest first.
REDUCTIONS: tuple[int, ...] = (8, 4, 2, 1)
_ORIENTATION = 0x0112  # the EXIF tag
Box = dict[str, int]  # RandomResizedCrop's parameters: top, left, height, width


def check_decode(decode: str) -> str:
    """``decode`` when it is one of :data:`DECODE_MODES`; a ``ValueError`` naming them otherwise."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r} is not a decode mode: use 'draft' (choose the random crops from the "
                         "file's header, decode a JPEG at the scale they need) or 'exact' (decode whole, then crop)")
    return decode


def largest_reduction(boxes: Sequence[Box], sizes: Sequence[Sequence[int]]) -> int:
    """The largest of :data:`REDUCTIONS` that keeps every box at least its output ``(height, width)`` in size."""
    for reduction in REDUCTIONS:
        if all(box["height"] >= reduction * size[0] and box["width"] >= reduction * size[1]
               for box, size in zip(boxes, sizes, strict=True)):
            return reduction
    return 1


def _stand_in(width: int, height: int) -> torch.Tensor:
    """A ``(3, height, width)`` tensor that allocates nothing: what ``make_params`` reads the size from."""
    return torch.empty(()).expand(3, height, width)


def _upright_jpeg(image: Image.Image) -> bool:
    return (image.format == "JPEG" and image.mode in ("RGB", "L")
            and image.getexif().get(_ORIENTATION, 1) == 1)


def decode_crops(path: str | os.PathLike[str], crops: Sequence[v2.RandomResizedCrop],
                 boxes: Sequence[Box] | None = None, draft: bool = True,
                 output: str = "pil") -> tuple[list[Image.Image] | list[torch.Tensor], int]:
    """Decode ``path`` and take one random resized crop per entry of ``crops``: ``(crops, reduction used)``.

    Args:
        path: the image file.
        crops: the views' ``RandomResizedCrop`` steps (output size, scale, ratio, interpolation).
        boxes: one ``(top, left, height, width)`` per crop; ``None`` draws them with each crop's ``make_params``.
        draft: decode a plain JPEG at the largest DCT reduction the boxes allow; ``False`` decodes at full size.
        output: ``"pil"`` (RGB PIL images) or ``"tensor"`` (``(3, H, W)`` uint8 tensors; an unreduced plain JPEG is
            decoded and cropped in torch).

    """
    if output not in CROP_OUTPUTS:
        raise ValueError(f"output={output!r}: use one of {CROP_OUTPUTS}")

    def draw(width: int, height: int) -> list[Box]:
        if boxes is not None:
            return list(boxes)
        return [crop.make_params([_stand_in(width, height)]) for crop in crops]

    with open(path, "rb") as handle:
        image = Image.open(handle)  # the header only
        if not _upright_jpeg(image):  # PNG, CMYK, a turned photo: the exact path
            image.close()
            whole = decode_image(path)
            out = [_exact_crop(whole, box, crop) for box, crop in zip(draw(*whole.size), crops, strict=True)]
            return _as(out, output), 1
        width, height = image.size
        chosen = draw(width, height)
        reduction = largest_reduction(chosen, [crop.size for crop in crops]) if draft else 1
        if reduction == 1 and output == "tensor":  # libjpeg-turbo into a tensor, torch's crops (module doc)
            handle.seek(0)
            decoded = _decode_jpeg(torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8),
                                   mode=ImageReadMode.RGB)
            return [_exact_crop(decoded, box, crop).contiguous() for box, crop in zip(chosen, crops, strict=True)], 1
        if reduction > 1:
            drafted = image.draft(None, (width // reduction, height // reduction))
            reduction = round(width / drafted[1][2]) if drafted is not None else 1
        image.load()  # the whole (reduced) decode: a truncated file fails here
        image = to_rgb(image)
    if reduction == 1:
        return _as([_exact_crop(image, box, crop) for box, crop in zip(chosen, crops, strict=True)], output), 1
    out = []
    for box, crop in zip(chosen, crops, strict=True):
        region = (box["left"] / reduction, box["top"] / reduction, (box["left"] + box["width"]) / reduction,
                  (box["top"] + box["height"]) / reduction)
        resample = pil_modes_mapping[v2.InterpolationMode(crop.interpolation)]
        out.append(image.resize((crop.size[1], crop.size[0]), resample, box=region))
    return _as(out, output), reduction


def _as(images: list[Image.Image], output: str) -> list[Image.Image] | list[torch.Tensor]:
    return [F.pil_to_tensor(image) for image in images] if output == "tensor" else images


def _exact_crop(image: Any, box: Box, crop: v2.RandomResizedCrop) -> Any:
    """What ``crop`` does to ``image`` with the parameters ``box`` (torchvision's kernel)."""
    return F.resized_crop(image, **box, size=list(crop.size), interpolation=crop.interpolation,
                          antialias=crop.antialias)


class CropDecoder:
    """``path -> [crop_1, crop_2, ...]``: one random resized crop per view, taken while decoding (module doc).

    ``crops`` are the views' ``RandomResizedCrop`` steps (boxes drawn in that order); ``draft=False`` decodes at
    full size, for comparison; ``output`` is ``"pil"`` or ``"tensor"`` (uint8). ``last_reduction`` is the last
    decode's reduction (1 = full size).
    """

    def __init__(self, crops: Sequence[v2.RandomResizedCrop], draft: bool = True, output: str = "pil") -> None:
        if not crops or not all(isinstance(crop, v2.RandomResizedCrop) for crop in crops):
            raise TypeError("CropDecoder needs one torchvision.transforms.v2.RandomResizedCrop per view")
        if output not in CROP_OUTPUTS:
            raise ValueError(f"CropDecoder: output={output!r}, use one of {CROP_OUTPUTS}")
        self.crops = list(crops)
        self.draft = bool(draft)
        self.output = output
        self.last_reduction = 1

    def __call__(self, path: str | os.PathLike[str]) -> list[Image.Image] | list[torch.Tensor]:
        """The crops of ``path``, one per view, of the crops' output sizes."""
        out, self.last_reduction = decode_crops(path, self.crops, draft=self.draft, output=self.output)
        return out

    def __repr__(self) -> str:
        return f"CropDecoder(crops={self.crops}, draft={self.draft}, output={self.output!r})"


class CroppedViews:
    """``[crop_1, crop_2, ...] -> [view_1(crop_1), ...]``: ``views`` (what follows each ``RandomResizedCrop``)."""

    def __init__(self, views: Sequence[Callable[[Any], Any]]) -> None:
        self.views = list(views)

    def __call__(self, crops: Sequence[Any]) -> list[Any]:
        """Apply view ``i`` to crop ``i``."""
        if len(crops) != len(self.views):
            raise ValueError(f"CroppedViews: {len(crops)} crops for {len(self.views)} views")
        return [view(crop) for view, crop in zip(self.views, crops, strict=True)]

    def __repr__(self) -> str:
        return f"CroppedViews({self.views})"


def split_crop(view: Any) -> tuple[v2.RandomResizedCrop, v2.Compose] | None:
    """``(its RandomResizedCrop, the rest)`` of a view that starts with one (the recipes' views); else ``None``."""
    steps = list(getattr(view, "transforms", ())) if isinstance(view, v2.Compose) else []
    if steps and isinstance(steps[0], v2.RandomResizedCrop):
        return steps[0], v2.Compose(steps[1:])
    return None

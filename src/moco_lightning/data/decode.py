"""Decode an image file to the 8-bit RGB picture a person sees in an image viewer.

PIL's ``Image.convert("RGB")`` alone, what most loaders do, gets several kinds of files wrong:

* 16-bit and 32-bit single-channel images (``I;16``, ``I``, ``F``: scientific cameras, depth maps, 16-bit PNGs) are
  clipped at 255, so they come out nearly white: here they are scaled to 0-255 by their own range (min to max);
* the EXIF orientation of camera photos is ignored, so portrait photos lie on their side: here they are turned;
* transparency (``RGBA``, ``LA``, palette images with a transparent colour) is dropped, showing whatever colour the
  transparent pixels happen to store: here the image is composited over white;
* CMYK images with an ICC profile are converted without it: here through the profile to sRGB (without a profile,
  PIL's conversion).

:func:`decode_image` decodes the whole file, so a truncated or corrupt file raises here, not later.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["HIGH_BIT_DEPTH_MODES", "decode_image", "to_rgb"]

#: PIL modes of single-channel images with more than 8 bits per pixel.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
#: Modes with an alpha channel (composited over white).
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255, 255)
_ORIENTATION = 0x0112  # the EXIF tag


def decode_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read ``path`` fully and return it as an 8-bit RGB image, upright (EXIF orientation applied)."""
    with open(path, "rb") as handle:
        image = Image.open(handle)
        image.load()  # the whole decode: a truncated file fails here
        if image.getexif().get(_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB version of ``image`` (see the module doc for what differs from ``image.convert("RGB")``)."""
    mode = image.mode
    if mode in HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        scaled = np.zeros_like(values) if high <= low else (np.nan_to_num(values, nan=low) - low) * (255 / (high - low))
        return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if converted is not None:
                return converted
        except Exception:  # noqa: BLE001, S110 - a broken profile: PIL's plain conversion below
            pass
    return image.convert("RGB")

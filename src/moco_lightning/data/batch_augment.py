"""The MoCo augmentations on whole batches on the training device, with random parameters drawn per image.

The datamodule calls :class:`BatchTwoViewAugmentation` from Lightning's ``on_after_batch_transfer`` hook; the loader
only decodes, crops to a fixed size and collates (docs/data.md describes the layout). Each operation is translated
from the torchvision pipeline of :func:`~moco_lightning.transforms.build_view_transforms`
(:func:`batch_view_from_transform`), so both paths read their numbers from one place. Parameters are drawn on the
host with torchvision's distributions, so an operation with probability p computes only on the images that drew it
and no device value is read back; they travel with ``non_blocking`` copies. Photometric kernels are kornia's
batched functions; the geometry is one ``grid_sample`` per batch.

Differences to the per-image path, each checked against torchvision / PIL in tests/data/test_batch_augment.py:

* Random resized crop: torchvision's sampling and central fallback. Bilinear without antialiasing: identical
  whenever the crop is not larger than the output. kornia's ``RandomResizedCrop`` is not used: it loops over the
  batch, aligns corners, and places the fallback crop at random instead of the centre.
* Colour jitter: torchvision's formulas in a random order drawn per image (kornia's ``ColorJitter`` draws one per
  batch). Contrast and saturation use kornia's grey weights (0.299 for red where torchvision has 0.2989): at most
  1e-4 apart, below one uint8 step. Grayscale uses torchvision's weights.
* Gaussian blur: sigma ``U(0.1, 2.0)`` per image, one kernel of ``2 ceil(3 sigma_max) + 1`` taps for the batch,
  reflect padding; the extra taps weigh below 1e-3 (max difference 2e-4 to a per-image kernel). The per-image
  PIL path keeps the official code's ``ImageFilter.GaussianBlur``.
* Solarize: pixels at or above 0.5 inverted, as PIL's ``solarize(128)``. kornia's ``RandomSolarize`` draws from
  the global generator, not the datamodule's.
* Affine (digits): torchvision's inverse matrix and sampled fill mask: identical on float tensors.
* Arithmetic: float32 throughout, where the per-image path on PIL / uint8 images rounds after every operation (a
  few uint8 steps apart).
* Randomness: a generator seeded per batch from ``(seed, rank, batch index)``
  (:func:`moco_lightning.data.base.batch_seed`): the same views whatever the number of workers, and on resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)
from kornia.filters import filter2d_separable, gaussian_blur2d, get_gaussian_kernel1d
from torch.nn import functional as F
from torchvision.transforms import v2

from moco_lightning.transforms import GaussianBlur as PerImageGaussianBlur
from moco_lightning.transforms import RandomSolarize as PerImageSolarize
from moco_lightning.transforms import build_view_transforms

__all__ = [
    "GRAY_WEIGHTS",
    "BatchOp",
    "BatchTwoViewAugmentation",
    "BatchView",
    "RandomAffine",
    "RandomColorJitter",
    "RandomGaussianBlur",
    "RandomGrayscale",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "RandomSolarize",
    "batch_view_from_transform",
    "build_batch_augmentation",
]

#: torchvision's (and PIL's) grey weights of R, G, B (ITU-R 601-2 luma).
GRAY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)

Params = dict[str, torch.Tensor]
Size = tuple[int, int]


# ---------------------------------------------------------------------------------------------- host -> device
def to_device(values: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Send host parameters to ``device`` without waiting for it: pinned memory and ``non_blocking`` on CUDA."""
    if dtype is not None:
        values = values.to(dtype)
    if device.type == "cpu":
        return values
    if device.type == "cuda":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)


class _DeviceConstants:
    """Constant tensors (mean, std, grey weights) created once per device and dtype, not at every batch."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values = torch.tensor(list(values), dtype=torch.float64)
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = to_device(self.values, device, dtype)
        return self._cache[key]


def _uniform(shape: int | tuple[int, ...], low: float, high: float,
             generator: torch.Generator | None) -> torch.Tensor:
    """``U(low, high)`` samples (float64, on the host), as torchvision's ``torch.empty(1).uniform_(low, high)``."""
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low


def _bernoulli(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` host booleans, each true with probability ``p``: torchvision's ``torch.rand(1) < p`` per image."""
    return torch.rand(n, generator=generator, dtype=torch.float64) < p


def on_selected(images: torch.Tensor, selected: torch.Tensor, fn: Callable[..., torch.Tensor],
                *per_image: torch.Tensor, params_on_host: bool = False) -> torch.Tensor:
    """``fn(images, *per_image)`` for the images where the host mask ``selected`` is true; the others unchanged.

    ``per_image`` rows (host tensors) go to the images' device unless ``params_on_host``.
    """
    count = int(selected.sum())
    if count == 0:
        return images
    device, dtype = images.device, images.dtype

    def rows(values: torch.Tensor) -> torch.Tensor:
        return values if params_on_host else to_device(values, device, dtype)

    if count == selected.numel():
        return fn(images, *(rows(p) for p in per_image))
    index = selected.nonzero().squeeze(1)
    index_on_device = to_device(index, device)
    changed = fn(images.index_select(0, index_on_device), *(rows(p[index]) for p in per_image))
    return images.index_copy(0, index_on_device, changed)


# ---------------------------------------------------------------------------------------------- operations
class BatchOp:
    """One random operation on float images ``(N, C, H, W)``: :meth:`sample` on the host, :meth:`apply` on device."""

    def sample(self, n: int, size: Size, generator: torch.Generator | None = None) -> Params:
        """Draw the parameters of ``n`` images of ``size = (height, width)``."""
        raise NotImplementedError

    def apply(self, images: torch.Tensor, params: Params) -> torch.Tensor:
        """Apply drawn parameters to the images."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw parameters for every image of the batch and apply them."""
        return self.apply(images, self.sample(images.shape[0], tuple(images.shape[-2:]), generator))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class RandomResizedCrop(BatchOp):
    """torchvision's ``RandomResizedCrop(size, scale, ratio)`` on a batch, bilinear without antialiasing."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)) -> None:
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def sample(self, n: int, size: Size, generator: torch.Generator | None = None) -> Params:
        """Draw the parameters of ``n`` images (host tensors, one row per image)."""
        height, width = size
        target_area = height * width * _uniform((n, 10), *self.scale, generator)
        aspect = torch.exp(_uniform((n, 10), math.log(self.ratio[0]), math.log(self.ratio[1]), generator))
        w = torch.sqrt(target_area * aspect).round()
        h = torch.sqrt(target_area / aspect).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.to(torch.int8).argmax(1, keepdim=True)  # the first attempt that fits (argmax: first maximum)
        found = fits.any(1)
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fallback_w, fallback_h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            fallback_w, fallback_h = round(height * max(self.ratio)), height
        else:
            fallback_w, fallback_h = width, height
        w = torch.where(found, w, float(fallback_w))
        h = torch.where(found, h, float(fallback_h))
        top = torch.where(found, (torch.rand(n, generator=generator, dtype=torch.float64) * (height - h + 1)).floor(),
                          float((height - fallback_h) // 2))
        left = torch.where(found, (torch.rand(n, generator=generator, dtype=torch.float64) * (width - w + 1)).floor(),
                           float((width - fallback_w) // 2))
        return {"top": top, "left": left, "height": h, "width": w}

    def apply(self, images: torch.Tensor, params: Params) -> torch.Tensor:
        """Apply drawn parameters to a batch on its device."""
        n, channels, height, width = images.shape
        top, left, h, w = params["top"], params["left"], params["height"], params["width"]
        # grid_sample(align_corners=False) puts pixel p of a side L at (2p + 1) / L - 1; clamping to the box's
        # first and last pixel centres repeats its edge, as torchvision's resize of the cropped image does.
        rows = torch.stack([
            w / width, (2 * left + w) / width - 1, h / height, (2 * top + h) / height - 1,
            (2 * left + 1) / width - 1, (2 * (left + w - 1) + 1) / width - 1,
            (2 * top + 1) / height - 1, (2 * (top + h - 1) + 1) / height - 1,
        ], dim=1)
        rows = to_device(rows, images.device, images.dtype)
        zeros = torch.zeros_like(rows[:, 0])
        theta = torch.stack([rows[:, 0], zeros, rows[:, 1], zeros, rows[:, 2], rows[:, 3]], dim=1).view(n, 2, 3)
        grid = F.affine_grid(theta, [n, channels, self.size, self.size], align_corners=False)
        low = rows[:, 4:7:2].view(n, 1, 1, 2)  # columns 4 and 6 (x, y): a view, where a list index would copy
        high = rows[:, 5:8:2].view(n, 1, 1, 2)  # columns 5 and 7
        grid = torch.maximum(torch.minimum(grid, high), low)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class RandomAffine(BatchOp):
    """torchvision's ``RandomAffine(degrees, translate, scale, shear, bilinear, fill)`` on a batch.

    Per image: angle ``U(degrees)``, translation ``round(U(+-translate x size))`` pixels, scale ``U(scale)``, shear
    ``U(shear[0:2])`` along x (and ``U(shear[2:4])`` along y when four values are given), about the image centre.
    """

    def __init__(self, degrees: Sequence[float], translate: Sequence[float] | None = None,
                 scale: Sequence[float] | None = None, shear: Sequence[float] | None = None,
                 fill: float = 0.0) -> None:
        self.degrees = (float(degrees[0]), float(degrees[1]))
        self.translate = None if translate is None else (float(translate[0]), float(translate[1]))
        self.scale = None if scale is None else (float(scale[0]), float(scale[1]))
        self.shear = None if shear is None else tuple(float(s) for s in shear)
        self.fill = float(fill)

    def sample(self, n: int, size: Size, generator: torch.Generator | None = None) -> Params:
        """Draw the parameters of ``n`` images (host tensors, one row per image)."""
        height, width = size
        angle = _uniform(n, *self.degrees, generator)
        if self.translate is not None:
            max_dx, max_dy = self.translate[0] * width, self.translate[1] * height
            tx = _uniform(n, -max_dx, max_dx, generator).round()
            ty = _uniform(n, -max_dy, max_dy, generator).round()
        else:
            tx = ty = torch.zeros(n, dtype=torch.float64)
        scale = _uniform(n, *self.scale, generator) if self.scale is not None else torch.ones(n, dtype=torch.float64)
        shear_x = shear_y = torch.zeros(n, dtype=torch.float64)
        if self.shear is not None:
            shear_x = _uniform(n, self.shear[0], self.shear[1], generator)
            if len(self.shear) == 4:
                shear_y = _uniform(n, self.shear[2], self.shear[3], generator)
        return {"angle": angle, "tx": tx, "ty": ty, "scale": scale, "shear_x": shear_x, "shear_y": shear_y}

    @staticmethod
    def inverse_matrix(params: Params) -> torch.Tensor:
        """``(N, 2, 3)`` inverse affine matrices on centred pixel coordinates (torchvision's formula, centre 0)."""
        rot, sx, sy = (torch.deg2rad(params[k]) for k in ("angle", "shear_x", "shear_y"))
        scale, tx, ty = params["scale"], params["tx"], params["ty"]
        # rotation x shear without scale: [[a, b], [c, d]], determinant 1
        a = torch.cos(rot - sy) / torch.cos(sy)
        b = -(a * torch.tan(sx) + torch.sin(rot))
        c = torch.sin(rot - sy) / torch.cos(sy)
        d = torch.cos(rot) - c * torch.tan(sx)
        m00, m01, m10, m11 = d / scale, -b / scale, -c / scale, a / scale
        m02 = -m00 * tx - m01 * ty
        m12 = -m10 * tx - m11 * ty
        return torch.stack([m00, m01, m02, m10, m11, m12], dim=1).view(-1, 2, 3)

    def apply(self, images: torch.Tensor, params: Params) -> torch.Tensor:
        """Apply drawn parameters to a batch on its device."""
        n, channels, height, width = images.shape
        # grid of output pixel centres relative to the image centre, mapped by the inverse matrix, then normalised
        # by half the size (grid_sample, align_corners=False): torchvision's _affine_grid with one matrix per image.
        rescaled = self.inverse_matrix(params).transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height],
                                                                               dtype=torch.float64)
        rescaled = to_device(rescaled, images.device, images.dtype)
        xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=images.device,
                            dtype=images.dtype)
        ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=images.device,
                            dtype=images.dtype)
        base = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width),
                            torch.ones(height, width, device=images.device, dtype=images.dtype)], dim=-1)
        grid = base.view(1, height * width, 3).expand(n, -1, -1).bmm(rescaled).view(n, height, width, 2)
        # one more channel of ones, sampled alike, tells how much of each output pixel came from inside the image
        ones = torch.ones(n, 1, height, width, device=images.device, dtype=images.dtype)
        sampled = F.grid_sample(torch.cat([images, ones], dim=1), grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
        out, mask = sampled[:, :channels], sampled[:, channels:]
        return (out - self.fill) * mask + self.fill


def _hue_in_turns(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Hue shift as torchvision's (a fraction of a full turn) with kornia's kernel (radians)."""
    return adjust_hue(images, factor * (2 * math.pi))


class RandomColorJitter(BatchOp):
    """torchvision's ``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`` on a batch.

    Per image: applied with probability ``p``; factors ``U(range)`` for the adjustments that are set; the four
    adjustments in a random order drawn per image (torchvision's ``randperm(4)``).
    """

    #: the adjustments in torchvision's numbering (the order indices refer to them).
    KERNELS: tuple[tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], ...] = (
        ("brightness", adjust_brightness_accumulative),
        ("contrast", adjust_contrast_with_mean_subtraction),
        ("saturation", adjust_saturation_with_gray_subtraction),
        ("hue", _hue_in_turns),
    )

    def __init__(self, brightness: Sequence[float] | None = None, contrast: Sequence[float] | None = None,
                 saturation: Sequence[float] | None = None, hue: Sequence[float] | None = None,
                 p: float = 1.0) -> None:
        def pair(value: Sequence[float] | None) -> tuple[float, float] | None:
            return None if value is None else (float(value[0]), float(value[1]))

        self.ranges = {"brightness": pair(brightness), "contrast": pair(contrast), "saturation": pair(saturation),
                       "hue": pair(hue)}
        self.p = float(p)

    def sample(self, n: int, size: Size, generator: torch.Generator | None = None) -> Params:
        """Draw the parameters of ``n`` images (host tensors, one row per image)."""
        params = {"applied": _bernoulli(n, self.p, generator),
                  "order": torch.rand(n, 4, generator=generator).argsort(dim=1)}  # a uniform permutation per image
        for name, bounds in self.ranges.items():
            if bounds is not None:
                params[name] = _uniform(n, *bounds, generator)
        return params

    def apply(self, images: torch.Tensor, params: Params) -> torch.Tensor:
        """Apply drawn parameters to a batch on its device."""
        for position in range(4):
            for index, (name, kernel) in enumerate(self.KERNELS):
                if name in params:
                    selected = params["applied"] & (params["order"][:, position] == index)
                    images = on_selected(images, selected, kernel, params[name])
        return images


class RandomGrayscale(BatchOp):
    """torchvision's ``RandomGrayscale(p)``: grey (torchvision's weights) replicated to the three channels."""

    def __init__(self, p: float = 0.1) -> None:
        self.p = float(p)
        self._weights = _DeviceConstants(GRAY_WEIGHTS)

    def sample(self, n: int, size: Size, generator: torch.Generator | None = None) -> Params:
        """Draw the parameters of ``n`` images (host tensors, one row per image)."""
        return {"applied": _bernoulli(n, self.p, generator)}

    def apply(self, images: torch.Tensor, params: Params) -> torch.Tensor:
        """Apply drawn parameters to a batch on its device."""
        weights = self._weights.on(images.device, images.dtype)

        def grey(x: torch.Tensor) -> torch.Tensor:
            return rgb_to_grayscale(x, rgb_weights=weights).expand_as(x)

        return on_selected(images, params["applied"], grey)


class RandomGaussianBlur(BatchOp):
    """``RandomApply([GaussianBlur(sigma)], p)`` on a batch: sigma ``U(sigma)`` per image, reflect padding."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5) -> None:
        self.sigma = (float(sigma[0]), float(sigma[1]))
        if not 0 < self.sigma[0] <= self.sigma[1]:
            raise ValueError(f"sigma={sigma} must be a range 0 < low <= high of Gaussian standard deviations")
        self.p = float(p)

    def kernel_size(self, size: Size) -> int:
        """Taps of the kernel for images of ``size``."""
        largest = min(size)
        largest = largest if largest % 2 == 1 else largest - 1
        return max(1, min(2 * math.ceil(3.0 * self.sigma[1]) + 1, largest))

    def sample(self, n: int, size: Size, generator: torch.Generator | None = None) -> Params:
        """Draw the parameters of ``n`` images (host tensors, one row per image)."""
        return {"applied": _bernoulli(n, self.p, generator), "sigma": _uniform(n, *self.sigma, generator)}

    def apply(self, images: torch.Tensor, params: Params) -> torch.Tensor:
        """Apply drawn parameters to a batch on its device."""
        taps = self.kernel_size(tuple(images.shape[-2:]))
        sigma = params["sigma"][:, None].expand(-1, 2).contiguous()  # (N, 2): the same sigma along y and x
        on_cpu = images.device.type == "cpu"

        def blur(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            if on_cpu:  # kornia's own CPU kernel
                return gaussian_blur2d(x, (taps, taps), s.to(x.dtype), border_type="reflect")
            # gaussian_blur2d would read a device sigma back to check it is positive (checked at init here)
            kernel_x = get_gaussian_kernel1d(taps, s[:, 1:2])
            kernel_y = get_gaussian_kernel1d(taps, s[:, 0:1])
            return filter2d_separable(x, kernel_x, kernel_y, "reflect")

        return on_selected(images, params["applied"], blur, sigma, params_on_host=on_cpu)


class RandomSolarize(BatchOp):
    """``RandomSolarize(p, threshold)``: pixels at or above ``threshold`` become ``1 - value``, with probability p."""

    def __init__(self, p: float = 0.2, threshold: float = 0.5) -> None:
        self.p = float(p)
        self.threshold = float(threshold)

    def sample(self, n: int, size: Size, generator: torch.Generator | None = None) -> Params:
        """Draw the parameters of ``n`` images (host tensors, one row per image)."""
        return {"applied": _bernoulli(n, self.p, generator)}

    def apply(self, images: torch.Tensor, params: Params) -> torch.Tensor:
        """Apply drawn parameters to a batch on its device."""
        # kornia's formula, the threshold a kernel argument: kornia copies it to the device at every call
        return on_selected(images, params["applied"], lambda x: torch.where(x < self.threshold, x, 1.0 - x))


class RandomHorizontalFlip(BatchOp):
    """``RandomHorizontalFlip(p)``: the images that draw it are mirrored left-right."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def sample(self, n: int, size: Size, generator: torch.Generator | None = None) -> Params:
        """Draw the parameters of ``n`` images (host tensors, one row per image)."""
        return {"applied": _bernoulli(n, self.p, generator)}

    def apply(self, images: torch.Tensor, params: Params) -> torch.Tensor:
        """Apply drawn parameters to a batch on its device."""
        return on_selected(images, params["applied"], lambda x: x.flip(-1))


# ---------------------------------------------------------------------------------------------- views
def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """A batch as float32 in ``[0, 1]``: uint8 images are divided by 255, float images are taken as they are."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"batch augmentation takes uint8 or float images, got {images.dtype}")
    return images.to(torch.float32)


class BatchView:
    """The random operations of one view, in the per-image pipeline's order, then the normalisation.

    Args:
        ops: the operations, applied in order.
        mean: normalisation mean per channel.
        std: normalisation standard deviation per channel.

    """

    def __init__(self, ops: Sequence[BatchOp], mean: Sequence[float], std: Sequence[float]) -> None:
        self.ops = list(ops)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = _DeviceConstants(self.mean)
        self._std = _DeviceConstants(self.std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One view of every image: ``(N, C, H, W)`` uint8 or float in [0, 1] -> normalised float32."""
        x = to_unit_float(images)
        for op in self.ops:
            x = op(x, generator)
        mean = self._mean.on(x.device, x.dtype).view(1, -1, 1, 1)
        std = self._std.on(x.device, x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def __repr__(self) -> str:
        ops = ", ".join(repr(op) for op in self.ops)
        return f"BatchView([{ops}], mean={self.mean}, std={self.std})"


def batch_view_from_transform(transform: Any, crop: bool = True) -> BatchView:
    """Translate a per-image view of :mod:`moco_lightning.transforms` into its batched counterpart.

    Args:
        transform: a ``torchvision.transforms.v2.Compose`` as built by the builders of :mod:`~moco_lightning.
            transforms` (random resized crop, colour jitter, grayscale, blur, solarize, flip, affine, normalise).
        crop: translate the random resized crop too; ``False`` when the loader crops (images of varying size).

    Raises:
        ValueError: for a step without batched counterpart (a custom transform).

    """
    steps = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
    ops: list[BatchOp] = []
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    for step in steps:
        p = 1.0
        if isinstance(step, v2.RandomApply):
            if len(step.transforms) != 1:
                raise ValueError(f"batch augmentation: RandomApply of {len(step.transforms)} transforms is not "
                                 "supported; set batch_augmentation=False")
            p, step = float(step.p), step.transforms[0]
        if isinstance(step, v2.RandomResizedCrop):
            if crop:
                ops.append(RandomResizedCrop(step.size[0], step.scale, step.ratio))
        elif isinstance(step, v2.ColorJitter):
            ops.append(RandomColorJitter(step.brightness, step.contrast, step.saturation, step.hue, p=p))
        elif isinstance(step, v2.RandomGrayscale):
            ops.append(RandomGrayscale(step.p * p))
        elif isinstance(step, PerImageGaussianBlur):
            if p > 0:
                ops.append(RandomGaussianBlur(step.sigma, p=p))
        elif isinstance(step, PerImageSolarize):
            if step.p * p > 0:
                ops.append(RandomSolarize(step.p * p, step.threshold))
        elif isinstance(step, v2.RandomHorizontalFlip):
            ops.append(RandomHorizontalFlip(step.p * p))
        elif isinstance(step, v2.RandomAffine):
            fill = step._fill[next(iter(step._fill))] if isinstance(step._fill, dict) else step._fill
            ops.append(RandomAffine(step.degrees, step.translate, step.scale, step.shear,
                                    fill=0.0 if fill is None else float(fill)))
        elif isinstance(step, v2.Normalize):
            mean, std = step.mean, step.std
        elif isinstance(step, (v2.ToImage, v2.ToDtype, v2.ToPureTensor)):
            continue
        else:
            raise ValueError(f"batch augmentation: no batched counterpart of {type(step).__name__}; set "
                             "batch_augmentation=False to augment per image in the loader")
    if mean is None or std is None:
        raise ValueError("batch augmentation: the view has no Normalize step")
    return BatchView(ops, mean, std)


class BatchTwoViewAugmentation:
    """The two views of a MoCo recipe on whole batches, and the per-image work left to the loader.

    With ``crop_on_device`` (images of one size) the batch ``(N, C, H, W)`` is cropped here; otherwise the loader
    takes both random resized crops and the batch is ``[crops_1, crops_2]``.

    Args:
        view_1: the first (query) view.
        view_2: the second (key) view.
        loader_crops: the per-image random resized crops of both views, for ``crop_on_device=False``.

    """

    def __init__(self, view_1: BatchView, view_2: BatchView,
                 loader_crops: tuple[v2.Transform, v2.Transform] | None = None) -> None:
        self.view_1 = view_1
        self.view_2 = view_2
        self.loader_crops = loader_crops

    @property
    def crop_on_device(self) -> bool:
        """Whether the random resized crop runs here (on the batch) rather than in the loader."""
        return self.loader_crops is None

    @property
    def loader_transform(self) -> Callable[[Any], Any]:
        """What the loader does to each image: to a tensor, or the two random resized crops as uint8 tensors."""
        to_tensor = [v2.ToImage(), v2.ToPureTensor()]
        if self.loader_crops is None:
            return v2.Compose(to_tensor)
        crop_1, crop_2 = (v2.Compose([crop, *to_tensor]) for crop in self.loader_crops)

        def two_crops(image: Any) -> list[torch.Tensor]:
            return [crop_1(image), crop_2(image)]

        return two_crops

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor],
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """``[view_1, view_2]`` of a batch on its device: normalised float32 ``(N, C, size, size)`` each."""
        if self.crop_on_device:
            if not isinstance(images, torch.Tensor):
                raise TypeError("batch augmentation expected a batch tensor (N, C, H, W) from the loader")
            return [self.view_1(images, generator), self.view_2(images, generator)]
        if isinstance(images, torch.Tensor) or len(images) != 2:
            raise TypeError("batch augmentation expected the loader's two crops [crops_1, crops_2]")
        return [self.view_1(images[0], generator), self.view_2(images[1], generator)]

    def __repr__(self) -> str:
        where = "on the device" if self.crop_on_device else "in the loader"
        return f"BatchTwoViewAugmentation(crop {where}, view_1={self.view_1!r}, view_2={self.view_2!r})"


def build_batch_augmentation(name: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                             crop_on_device: bool = True, **kwargs: Any) -> BatchTwoViewAugmentation:
    """The batched counterpart of :func:`~moco_lightning.transforms.build_view_transforms`.

    Args:
        name: one of :data:`~moco_lightning.transforms.AUGMENTATIONS` ("v1", "v2", "v3", "digits").
        image_size: output size in pixels.
        mean: normalisation mean per channel.
        std: normalisation standard deviation per channel.
        crop_on_device: crop on the batch (images of one size) or in the loader (images of any size).
        **kwargs: the recipe's keywords, as for ``build_view_transforms`` (``crop_scale``, ``blur_prob``, ...).

    """
    view_1, view_2 = build_view_transforms(name, image_size, mean, std, **kwargs)
    batch_1 = batch_view_from_transform(view_1, crop=crop_on_device)
    batch_2 = batch_view_from_transform(view_2, crop=crop_on_device)
    loader_crops = None
    if not crop_on_device:
        loader_crops = tuple(_first_crop(view) for view in (view_1, view_2))
    return BatchTwoViewAugmentation(batch_1, batch_2, loader_crops)  # type: ignore[arg-type]


def _first_crop(transform: Any) -> v2.Transform:
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, v2.RandomResizedCrop):
            return step
    raise ValueError("batch augmentation with the crop in the loader needs a view with a RandomResizedCrop")

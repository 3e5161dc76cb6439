"""MoCo augmentations (v1, v2 "aug+", v3's pair, digits, small grey images) and per-dataset evaluation transforms.

Every pipeline takes a PIL image or an image tensor (uint8, or float in ``[0, 1]``) and returns a normalised
``float32`` tensor ``(3, size, size)``; the random resized crop runs first, the photometric operations on the input's
own type (PIL's blur and solarize for PIL images, as in the official code).

Parameters follow the papers and the official code (facebookresearch/moco ``main_moco.py``,
facebookresearch/moco-v3 ``main_moco.py``); each builder says where its numbers come from.

>>> view = build_view_transforms("v2", image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
>>> pair = TwoViewTransform(*view)          # pair(img) -> [view_1, view_2]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import v2

__all__ = [
    "AUGMENTATIONS", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "DATASET_STATS",
    "DEFAULT_IMAGE_SIZE", "DIGITS_MEAN", "DIGITS_STD", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "KMNIST_MEAN",
    "KMNIST_STD", "MNIST_MEAN", "MNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD", "STL10_MEAN", "STL10_STD",
    "GaussianBlur", "RandomSolarize", "TwoViewTransform", "build_view_transforms", "digits_transform",
    "eval_transform", "grey_transform", "linear_train_transform", "moco_v1_transform", "moco_v2_transform",
    "moco_v3_transforms",
]

Stats = tuple[float, float, float]

# ImageNet: the constants used by torchvision and by the official MoCo code.
IMAGENET_MEAN: Stats = (0.485, 0.456, 0.406)
IMAGENET_STD: Stats = (0.229, 0.224, 0.225)
# CIFAR-10: the constants of the official MoCo CIFAR-10 demo (facebookresearch/moco, colab notebook).
CIFAR10_MEAN: Stats = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Stats = (0.2023, 0.1994, 0.2010)
# CIFAR-100: per-channel mean / std of the 50,000 training images.
CIFAR100_MEAN: Stats = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: Stats = (0.2673, 0.2564, 0.2762)
# STL-10: per-channel mean / std of the 5,000 labelled training images (the usual published values).
STL10_MEAN: Stats = (0.4467, 0.4398, 0.4066)
STL10_STD: Stats = (0.2603, 0.2566, 0.2713)
# scikit-learn digits: pixel values 0..16 scaled to 0..1, mean / std over all pixels of the 1,437 training images of
# the fixed stratified 80/20 split (random_state 0), measured on the original 8x8 images (0.30538, 0.37612). The
# image is grey, replicated to 3 channels, so the three channels share one value. tests/test_transforms.py checks it.
DIGITS_MEAN: Stats = (0.3054, 0.3054, 0.3054)
DIGITS_STD: Stats = (0.3761, 0.3761, 0.3761)
# Fashion-MNIST: mean / std over all pixels of the 60,000 training images (0.28604, 0.35302), grey replicated to RGB.
# MNIST and KMNIST: the same statistic of their training images as commonly published (their files are not on this
# machine to check). tests/data/test_idx.py checks Fashion-MNIST's against the installed files.
FASHION_MNIST_MEAN: Stats = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD: Stats = (0.3530, 0.3530, 0.3530)
MNIST_MEAN: Stats = (0.1307, 0.1307, 0.1307)
MNIST_STD: Stats = (0.3081, 0.3081, 0.3081)
KMNIST_MEAN: Stats = (0.1918, 0.1918, 0.1918)
KMNIST_STD: Stats = (0.3483, 0.3483, 0.3483)

#: ``dataset name -> (mean, std)``. "folder" (any image folder) uses ImageNet statistics.
DATASET_STATS: dict[str, tuple[Stats, Stats]] = {
    "digits": (DIGITS_MEAN, DIGITS_STD),
    "fashion_mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
    "kmnist": (KMNIST_MEAN, KMNIST_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "stl10": (STL10_MEAN, STL10_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "folder": (IMAGENET_MEAN, IMAGENET_STD),
}

#: Default crop size per dataset: the native size for CIFAR (32) and STL-10 (96), 224 for ImageNet-like data,
#: and 16 for digits (the 8x8 digits upscaled twice; benchmarks/RESULTS.md compares the image sizes).
DEFAULT_IMAGE_SIZE: dict[str, int] = {"digits": 16, "fashion_mnist": 28, "mnist": 28, "kmnist": 28, "cifar10": 32,
                                      "cifar100": 32, "stl10": 96, "imagenet": 224, "folder": 224}

#: Names accepted by :func:`build_view_transforms` (and by the datamodules' ``augmentation`` keyword).
AUGMENTATIONS: tuple[str, ...] = ("v1", "v2", "v3", "digits", "grey")

# Datasets whose evaluation transform is "resize to size / 0.875, centre crop" (the ImageNet protocol: 256 -> 224).
_RESIZE_CENTER_CROP = ("imagenet", "folder")


class GaussianBlur(torch.nn.Module):
    """Gaussian blur with ``sigma ~ U[sigma_min, sigma_max]``, drawn per call.

    PIL images: PIL's ``ImageFilter.GaussianBlur`` as the official MoCo v2 / v3 code (about 5x faster than a
    tensor convolution at 224 px); tensors: torchvision's ``gaussian_blur`` over ``±3 sigma``.

    Args:
        sigma: ``(min, max)`` of the uniform distribution of sigma, in pixels. MoCo v2 / v3: ``(0.1, 2.0)``.

    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        super().__init__()
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"GaussianBlur: sigma must be (min, max) with 0 < min <= max, got {sigma}")
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def forward(self, img: Any) -> Any:
        """Blur a PIL image or a ``(..., C, H, W)`` tensor image with a freshly drawn sigma."""
        sigma = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        if isinstance(img, Image.Image):
            return img.filter(ImageFilter.GaussianBlur(radius=sigma))
        kernel = 2 * math.ceil(3.0 * sigma) + 1
        largest = min(img.shape[-2:])
        largest = largest if largest % 2 == 1 else largest - 1
        kernel = max(1, min(kernel, largest))
        if img.is_floating_point():
            return v2.functional.gaussian_blur(img, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
        blurred = v2.functional.gaussian_blur(img.float(), kernel_size=[kernel, kernel], sigma=[sigma, sigma])
        return blurred.round_().clamp_(0, torch.iinfo(img.dtype).max).to(img.dtype)

    def extra_repr(self) -> str:
        """Shown in ``repr``."""
        return f"sigma={self.sigma}"


class RandomSolarize(torch.nn.Module):
    """Solarisation (invert pixels at or above a threshold) with probability ``p``, whatever the image type.

    Args:
        p: probability of solarising.
        threshold: fraction of the value range (0.5: 128 for uint8, as the official MoCo v3 code).

    """

    def __init__(self, p: float = 0.2, threshold: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)
        self.threshold = float(threshold)

    def forward(self, img: Any) -> Any:
        """Solarise ``img`` with probability ``p``."""
        if self.p <= 0.0 or float(torch.rand(1)) >= self.p:
            return img
        if isinstance(img, Image.Image):
            return ImageOps.solarize(img, threshold=round(self.threshold * 256))
        if img.is_floating_point():
            return v2.functional.solarize(img, threshold=self.threshold)
        return v2.functional.solarize(img, threshold=round(self.threshold * (torch.iinfo(img.dtype).max + 1)))

    def extra_repr(self) -> str:
        """Shown in ``repr``."""
        return f"p={self.p}, threshold={self.threshold}"


class TwoViewTransform:
    """Apply two (independently random) transforms to the same image: ``img -> [view_1, view_2]``.

    Args:
        transform_1: transform of the first (query) view.
        transform_2: transform of the second (key) view; defaults to ``transform_1``.

    """

    def __init__(self, transform_1: Callable[[Any], torch.Tensor],
                 transform_2: Callable[[Any], torch.Tensor] | None = None) -> None:
        self.transform_1 = transform_1
        self.transform_2 = transform_2 if transform_2 is not None else transform_1

    def __call__(self, img: Any) -> list[torch.Tensor]:
        """Return ``[transform_1(img), transform_2(img)]``."""
        return [self.transform_1(img), self.transform_2(img)]

    def __repr__(self) -> str:
        if self.transform_2 is self.transform_1:
            return f"TwoViewTransform(both={self.transform_1!r})"
        return f"TwoViewTransform(view_1={self.transform_1!r}, view_2={self.transform_2!r})"


def _finish(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """To a float tensor in [0, 1] (if not yet), normalise, plain ``torch.Tensor`` out."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor()]


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer (pixels), got {image_size!r}")


def _dataset_view(what: str, dataset: str, image_size: int | None, mean: Sequence[float] | None,
                  std: Sequence[float] | None) -> tuple[int, Sequence[float], Sequence[float]]:
    """``(size, mean, std)`` of a dataset's view, each ``None`` replaced by the dataset's default."""
    if dataset not in DATASET_STATS:
        raise ValueError(f"Unknown dataset {dataset!r} for {what}: use one of {sorted(DATASET_STATS)}")
    size = DEFAULT_IMAGE_SIZE[dataset] if image_size is None else image_size
    _check_size(size)
    return size, DATASET_STATS[dataset][0] if mean is None else mean, DATASET_STATS[dataset][1] if std is None else std


def moco_v1_transform(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD,
                      crop_scale: tuple[float, float] = (0.2, 1.0)) -> v2.Compose:
    """MoCo v1 view (He et al. 2020, Sec. 4; official ``main_moco.py`` without ``--aug-plus``)."""
    _check_size(image_size)
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
        v2.RandomGrayscale(p=0.2),
        v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
        v2.RandomHorizontalFlip(),
        *_finish(mean, std),
    ])


def moco_v2_transform(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD, crop_scale: tuple[float, float] = (0.2, 1.0),
                      blur_prob: float = 0.5) -> v2.Compose:
    """MoCo v2 "aug+" view (Chen et al. 2020, Sec. 2; official ``main_moco.py --aug-plus``).

    ``blur_prob=0`` gives the official CIFAR-10 demo's blur-free variant.
    """
    _check_size(image_size)
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([GaussianBlur((0.1, 2.0))], p=blur_prob),
        v2.RandomHorizontalFlip(),
        *_finish(mean, std),
    ])


def moco_v3_transforms(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD,
                       crop_scale: tuple[float, float] = (0.08, 1.0),
                       flip_prob: float = 0.5) -> tuple[v2.Compose, v2.Compose]:
    """MoCo v3's asymmetric pair (Chen, Xie, He 2021, Sec. 3 / Appendix; official ``main_moco.py``, BYOL's recipe).

    ``crop_scale`` defaults to the official ``--crop-min`` (0.08, kept by the ViT runs; ResNet-50 runs pass 0.2).
    ``flip_prob=0`` leaves out the flip, for data where a mirror image is another class (MNIST, KMNIST).

    Returns:
        ``(view_1_transform, view_2_transform)``.

    """
    _check_size(image_size)

    def view(blur_prob: float, solarize_prob: float) -> v2.Compose:
        return v2.Compose([
            v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([GaussianBlur((0.1, 2.0))], p=blur_prob),
            RandomSolarize(p=solarize_prob, threshold=0.5),
            v2.RandomHorizontalFlip(p=flip_prob),
            *_finish(mean, std),
        ])

    return view(1.0, 0.0), view(0.1, 0.2)


def digits_transform(image_size: int = 16, mean: Sequence[float] = DIGITS_MEAN,
                     std: Sequence[float] = DIGITS_STD,
                     crop_scale: tuple[float, float] = (0.7, 1.0), degrees: float = 10.0,
                     translate: float = 0.1, jitter: float = 0.4) -> v2.Compose:
    """A view for handwritten digits that keeps a digit a digit.

    No flip (a flipped 2, 3, 5, 7 or 9 is no longer that digit), no grayscale or hue (grey images), no blur (at
    8x8 source resolution it erases the stroke); a mild crop and a small affine instead.
    """
    _check_size(image_size)
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=crop_scale, ratio=(0.85, 1.0 / 0.85), antialias=True),
        v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=(0.9, 1.1), shear=5.0,
                        interpolation=v2.InterpolationMode.BILINEAR),
        v2.RandomApply([v2.ColorJitter(brightness=jitter, contrast=jitter)], p=0.8),
        *_finish(mean, std),
    ])


def grey_transform(image_size: int = 28, mean: Sequence[float] = FASHION_MNIST_MEAN,
                   std: Sequence[float] = FASHION_MNIST_STD, crop_scale: tuple[float, float] = (0.2, 1.0),
                   jitter: float = 0.4, jitter_prob: float = 0.8, flip_prob: float = 0.5,
                   blur_prob: float = 0.0) -> v2.Compose:
    """A view for small grey images (Fashion-MNIST, MNIST, KMNIST): MoCo v2's aug+ less what does nothing on grey.

    ``flip_prob`` 0 for digits and characters; ``blur_prob`` 0 was measured best on Fashion-MNIST
    (benchmarks/RESULTS.md, "MoCo v2 on Fashion-MNIST: T below 0.1, and blur").
    """
    _check_size(image_size)
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
        v2.RandomApply([v2.ColorJitter(brightness=jitter, contrast=jitter)], p=jitter_prob),
        v2.RandomApply([GaussianBlur((0.1, 2.0))], p=blur_prob),
        v2.RandomHorizontalFlip(p=flip_prob),
        *_finish(mean, std),
    ])


def build_view_transforms(name: str, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD,
                          **kwargs: Any) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """Build the two view transforms of a named augmentation.

    Args:
        name: one of :data:`AUGMENTATIONS`: "v1", "v2" (aug+), "v3" (asymmetric pair), "digits" or "grey".
        image_size: output crop size in pixels.
        mean: normalisation mean per channel.
        std: normalisation standard deviation per channel.
        **kwargs: passed to the builder (e.g. ``crop_scale=(0.08, 1.0)``, ``blur_prob=0.0`` for "v2").

    Returns:
        ``(view_1, view_2)``; for the symmetric augmentations both are the same object (independent draws).

    """
    builders: dict[str, Callable[..., Any]] = {
        "v1": moco_v1_transform,
        "v2": moco_v2_transform,
        "v3": moco_v3_transforms,
        "digits": digits_transform,
        "grey": grey_transform,
    }
    if name not in builders:
        raise ValueError(f"augmentation={name!r} is not known: set augmentation= one of {list(AUGMENTATIONS)}")
    try:
        built = builders[name](image_size, mean, std, **kwargs)
    except TypeError as err:
        raise TypeError(f"augmentation {name!r} does not accept these augmentation_kwargs {sorted(kwargs)}: {err}"
                        ) from err
    if isinstance(built, tuple):
        return built
    return built, built


def eval_transform(dataset: str, image_size: int | None = None, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> v2.Compose:
    """The deterministic evaluation view of a dataset (kNN memory bank / queries, linear-probe validation).

    ImageNet-like data: resize to ``size / 0.875`` and centre crop (the official protocol); others: resize.

    Args:
        dataset: a key of :data:`DATASET_STATS`.
        image_size: output size; ``None`` = :data:`DEFAULT_IMAGE_SIZE` of the dataset.
        mean: normalisation mean; ``None`` = the dataset's.
        std: normalisation std; ``None`` = the dataset's.

    """
    size, mean, std = _dataset_view("eval_transform", dataset, image_size, mean, std)
    if dataset in _RESIZE_CENTER_CROP:
        geometry: list[v2.Transform] = [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)]
    else:
        # Resize((s, s)) is a no-op when the image already has that size.
        geometry = [v2.Resize((size, size), antialias=True)]
    return v2.Compose([*geometry, *_finish(mean, std)])


def linear_train_transform(dataset: str, image_size: int | None = None, mean: Sequence[float] | None = None,
                           std: Sequence[float] | None = None) -> v2.Compose:
    """The training view of the linear protocol (official ``main_lincls.py``); characters get no flip.

    Args:
        dataset: a key of :data:`DATASET_STATS`.
        image_size: output size; ``None`` = the dataset's default.
        mean: normalisation mean; ``None`` = the dataset's.
        std: normalisation std; ``None`` = the dataset's.

    """
    size, mean, std = _dataset_view("linear_train_transform", dataset, image_size, mean, std)
    if dataset in ("digits", "mnist", "kmnist"):  # characters: a flip changes the class
        geometry: list[v2.Transform] = [
            v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.0 / 0.85), antialias=True)]
    else:
        geometry = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    return v2.Compose([*geometry, *_finish(mean, std)])

"""The embedded default dataset: scikit-learn's handwritten digits, as RGB image tensors.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey-scale digits (values 0..16) inside the scikit-learn
wheel: no download, no network. They are scaled to ``[0, 1]``, resized once to ``image_size`` (bilinear) and
replicated to 3 channels, and kept in memory as one float tensor, so the augmentations run on tensors without
any PIL round-trip.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moco_lightning.data.base import MoCoDataModule, TensorImageDataset

__all__ = ["DIGITS_SPLIT_SEED", "DIGITS_VAL_FRACTION", "DigitsDataModule", "digits_split",
           "load_digits_images"]

#: random_state of the train/validation split. Fixed on purpose: it does NOT follow the run seed, so every run
#: (and every seed of a sweep) is evaluated on the same 360 validation digits.
DIGITS_SPLIT_SEED = 0
#: fraction of the 1,797 digits held out for validation (stratified): 1,437 train / 360 val.
DIGITS_VAL_FRACTION = 0.2


def load_digits_images(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(images (N, 3, S, S) float32 in [0, 1], labels (N,) int64)``, S = ``image_size``.

    8 keeps the original resolution; larger sizes are bilinear upsamplings of it.
    """
    from sklearn.datasets import load_digits

    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"DigitsDataModule: image_size={image_size!r} must be a positive integer")
    digits = load_digits()
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                               antialias=image_size < images.shape[-1]).clamp_(0.0, 1.0)
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    return images, labels


def digits_split(labels: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified 80/20 split of the digits: ``(train_indices, val_indices)``, each sorted.

    Uses ``sklearn.model_selection.train_test_split(stratify=labels, random_state=DIGITS_SPLIT_SEED)``.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=DIGITS_VAL_FRACTION,
                                          stratify=labels, random_state=DIGITS_SPLIT_SEED)
    return np.sort(train_idx), np.sort(val_idx)


class DigitsDataModule(MoCoDataModule):
    """scikit-learn digits (1,797 real handwritten digits), the default dataset: no download, no network.

    Pretraining and the evaluation "train" set are the 1,437 training digits of a fixed stratified 80/20 split
    (:func:`digits_split`); the evaluation "val" set is the other 360. Images are 8x8 upscaled to ``image_size``
    (default 16), grey replicated to RGB, normalised with :data:`~moco_lightning.transforms.DIGITS_MEAN` /
    ``DIGITS_STD`` (computed from the training digits). The default augmentation is "digits"
    (:func:`~moco_lightning.transforms.digits_transform`: mild crop, small affine, brightness / contrast, no flip).

    ``num_workers`` defaults to 0 (the data is one small tensor: no worker start-up); ``**kwargs`` go to
    :class:`~moco_lightning.data.MoCoDataModule`.
    """

    dataset_name = "digits"
    default_augmentation = "digits"
    num_classes = 10

    def __init__(self, batch_size: int = 64, num_workers: int = 0, **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)
        self._split: tuple[TensorImageDataset, TensorImageDataset] | None = None

    def _datasets(self) -> tuple[TensorImageDataset, TensorImageDataset]:
        if self._split is None:
            images, labels = load_digits_images(self.image_size)
            train_idx, val_idx = digits_split(labels)
            train_t, val_t = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
            self._split = (TensorImageDataset(images[train_t], labels[train_t]),
                           TensorImageDataset(images[val_t], labels[val_t]))
        return self._split

    def _build_pretrain_dataset(self) -> TensorImageDataset:
        return self._datasets()[0]

    def _build_eval_dataset(self, split: str) -> TensorImageDataset:
        return self._datasets()[0 if split == "train" else 1]

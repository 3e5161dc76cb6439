"""Datamodules for MoCo pretraining and evaluation.

Training batches are ``([x_q, x_k], y)`` (two independently augmented views, ``drop_last=True``): made on the
training device from the loader's ``(images, y)`` by ``on_after_batch_transfer`` with ``batch_augmentation=True``
(the default; outside a Trainer call ``augment_batch``), or by ``train_dataloader()`` itself with ``False``;
``eval_train_dataloader()`` / ``eval_val_dataloader()`` yield labelled ``(x, y)`` with one deterministic view.

| datamodule | data | default crop |
|---|---|---|
| :class:`DigitsDataModule` | scikit-learn digits, embedded (the default; no download) | 16 |
| :class:`FashionMNISTDataModule` | Fashion-MNIST idx files (Debian's ``dataset-fashion-mnist``, or download) | 28 |
| :class:`MNISTDataModule`, :class:`KMNISTDataModule` | the same format (download) | 28 |
| :class:`CIFAR10DataModule`, :class:`CIFAR100DataModule` | torchvision CIFAR (download) | 32 |
| :class:`STL10DataModule` | torchvision STL-10, unlabeled + train / test (download) | 96 |
| :class:`ImageNetDataModule` | ``data_dir/train``, ``data_dir/val`` class folders | 224 |
| :class:`ImageFolderDataModule` | any folder: class sub-folders, or none (unlabelled) | 224 |

Add :class:`SkippedImagesReport` to the trainer callbacks to get a per-epoch count of unreadable images skipped
by the folder datamodules.
"""

from moco_lightning.data.base import DatasetError, MoCoDataModule, TensorImageDataset, TransformedDataset, seed_worker
from moco_lightning.data.digits import DigitsDataModule, digits_split, load_digits_images
from moco_lightning.data.download import DatasetNotAvailableError
from moco_lightning.data.folder import (
    CorruptImageWarning,
    ImageFolderDataModule,
    ImageFolderDataset,
    ImageNetDataModule,
    SkippedImagesReport,
    scan_image_folder,
)
from moco_lightning.data.idx import (
    FashionMNISTDataModule,
    IdxDataModule,
    KMNISTDataModule,
    MNISTDataModule,
    read_idx,
)
from moco_lightning.data.torchvision_sets import CIFAR10DataModule, CIFAR100DataModule, STL10DataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CorruptImageWarning",
    "DatasetError",
    "DatasetNotAvailableError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "ImageNetDataModule",
    "IdxDataModule",
    "KMNISTDataModule",
    "MNISTDataModule",
    "MoCoDataModule",
    "STL10DataModule",
    "TensorImageDataset",
    "SkippedImagesReport",
    "TransformedDataset",
    "digits_split",
    "load_digits_images",
    "read_idx",
    "scan_image_folder",
    "seed_worker",
]

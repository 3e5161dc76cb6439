"""CIFAR-10, CIFAR-100 and STL-10 through torchvision's dataset classes (their on-disk formats and downloads)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar

from torch.utils.data import Dataset
from torchvision import datasets

from moco_lightning.data.base import MoCoDataModule
from moco_lightning.data.download import DatasetNotAvailableError, ensure_dataset_files

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "STL10DataModule"]


class _TorchvisionDataModule(MoCoDataModule):
    """Shared logic: check / download the files, then construct torchvision's class with ``download=False``."""

    #: human name for messages.
    display_name: ClassVar[str] = ""
    #: the torchvision dataset class.
    torchvision_class: ClassVar[type] = datasets.VisionDataset
    #: files (inside ``<data_dir>/<torchvision_class.base_folder>``) that torchvision reads.
    required_files: ClassVar[tuple[str, ...]] = ()
    #: what the user must place into that folder.
    what_to_place: ClassVar[str] = ""

    def __init__(self, data_dir: str = "data", download: bool = True, download_timeout: float = 10.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_dir = os.path.expanduser(str(data_dir))
        self.download = bool(download)
        self.download_timeout = float(download_timeout)
        self._files_ok = False

    @property
    def dataset_folder(self) -> str:
        """The folder holding the extracted files, e.g. ``<data_dir>/cifar-10-batches-py``."""
        return os.path.join(self.data_dir, self.torchvision_class.base_folder)  # type: ignore[attr-defined]

    @classmethod
    def check_files(cls, data_dir: str = "data", download: bool = True) -> None:
        """Before any compute: without ``download``, the files must be in ``<data_dir>/<base folder>``."""
        if not download:
            cls._ensure(os.path.join(os.path.expanduser(str(data_dir)), cls.torchvision_class.base_folder), False,
                        lambda: None)

    @classmethod
    def _ensure(cls, folder: str, download: bool, download_fn: Callable[[], object], timeout: float = 10.0) -> None:
        ensure_dataset_files(cls.display_name, folder, cls.required_files, download=download,
                             url=cls.torchvision_class.url,  # type: ignore[attr-defined]
                             download_fn=download_fn, what_to_place=cls.what_to_place, timeout=timeout)

    def _download_split(self) -> dict[str, Any]:
        """Constructor keywords for the (cheapest) split used to trigger torchvision's download."""
        raise NotImplementedError

    def _ensure_files(self) -> None:
        if self._files_ok:
            return
        cls = self.torchvision_class
        self._ensure(self.dataset_folder, self.download,
                     lambda: cls(self.data_dir, download=True, **self._download_split()), self.download_timeout)
        self._files_ok = True

    def prepare_data(self) -> None:
        """Download the dataset when ``download=True`` and it is not on disk (called on one process only)."""
        self._ensure_files()

    def _construct(self, **kwargs: Any) -> Dataset:
        """Construct torchvision's class with ``download=False``; explain integrity failures."""
        self._ensure_files()
        try:
            return self.torchvision_class(self.data_dir, download=False, **kwargs)
        except RuntimeError as err:
            raise DatasetNotAvailableError(
                f"{self.display_name}: the files in {self.dataset_folder} are present but torchvision rejected "
                f"them ({err}); they are probably truncated or not the original release. Delete the folder and "
                f"set download=True, or place {self.what_to_place} there.") from err


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10: pretraining and evaluation "train" on the 50,000 training images, evaluation "val" on the test set.

    Args:
        data_dir: root folder (the one that contains ``cifar-10-batches-py``, the python version).
        download: download with torchvision when the files are missing (fails fast when offline).
        download_timeout: seconds for the DNS lookup and each socket operation of the download.
        **kwargs: the :class:`~moco_lightning.data.MoCoDataModule` keywords.

    """

    dataset_name = "cifar10"
    display_name = "CIFAR-10"
    num_classes = 10
    torchvision_class = datasets.CIFAR10
    required_files = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                      "test_batch", "batches.meta")
    what_to_place = ("the extracted contents of cifar-10-python.tar.gz (data_batch_1..5, test_batch, "
                     "batches.meta)")

    def _download_split(self) -> dict[str, Any]:
        return {"train": False}

    def _build_pretrain_dataset(self) -> Dataset:
        return self._construct(train=True)

    def _build_eval_dataset(self, split: str) -> Dataset:
        if split == "train" and self._pretrain_dataset is not None:
            return self._pretrain_dataset.base  # type: ignore[attr-defined]
        return self._construct(train=split == "train")


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (100 fine classes); same layout as :class:`CIFAR10DataModule`, folder ``cifar-100-python``."""

    dataset_name = "cifar100"
    display_name = "CIFAR-100"
    num_classes = 100
    torchvision_class = datasets.CIFAR100
    required_files = ("train", "test", "meta")
    what_to_place = "the extracted contents of cifar-100-python.tar.gz (train, test, meta)"


class STL10DataModule(_TorchvisionDataModule):
    """STL-10: pretraining on "train+unlabeled" (105,000 images, unlabelled: -1), evaluation on "train" / "test".

    Args:
        data_dir: root folder (the one that contains ``stl10_binary``).
        download: download with torchvision when the files are missing (fails fast when offline).
        download_timeout: seconds for the DNS lookup and each socket operation of the download.
        pretrain_split: torchvision split used for pretraining: "train+unlabeled", "unlabeled" or "train".
        **kwargs: the :class:`~moco_lightning.data.MoCoDataModule` keywords.

    """

    dataset_name = "stl10"
    display_name = "STL-10"
    num_classes = 10
    torchvision_class = datasets.STL10
    required_files = ("train_X.bin", "train_y.bin", "unlabeled_X.bin", "test_X.bin", "test_y.bin")
    what_to_place = ("the extracted contents of stl10_binary.tar.gz (train_X.bin, train_y.bin, unlabeled_X.bin, "
                     "test_X.bin, test_y.bin)")

    def __init__(self, data_dir: str = "data", download: bool = True, download_timeout: float = 10.0,
                 pretrain_split: str = "train+unlabeled", **kwargs: Any) -> None:
        if pretrain_split not in ("train+unlabeled", "unlabeled", "train"):
            raise ValueError(f"STL10DataModule: pretrain_split={pretrain_split!r} must be 'train+unlabeled', "
                             "'unlabeled' or 'train'")
        super().__init__(data_dir=data_dir, download=download, download_timeout=download_timeout, **kwargs)
        self.pretrain_split = pretrain_split

    def _download_split(self) -> dict[str, Any]:
        return {"split": "test"}

    def _build_pretrain_dataset(self) -> Dataset:
        return self._construct(split=self.pretrain_split)

    def _build_eval_dataset(self, split: str) -> Dataset:
        return self._construct(split="train" if split == "train" else "test")

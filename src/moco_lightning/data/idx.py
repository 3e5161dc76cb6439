"""Datasets in the MNIST file format: Fashion-MNIST (the real benchmark that runs on a CPU), MNIST and KMNIST.

The four idx files (gzipped or not) are read into memory as one uint8 tensor per split, looked for in ``data_dir``
and ``<data_dir>/<Name>/raw`` (torchvision's layout), or without ``data_dir`` in the Debian package's folder
(Fashion-MNIST) and ``data/<Name>/raw``; when they are nowhere, torchvision downloads them (``download=True``).
The 60,000 training images are the pretraining set and the kNN bank / probe training set, the 10,000 test images
the evaluation set, as the benchmarks are reported.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import datasets

from moco_lightning.data.base import MoCoDataModule, TensorImageDataset
from moco_lightning.data.download import DatasetNotAvailableError, ensure_dataset_files

__all__ = ["FashionMNISTDataModule", "IdxDataModule", "KMNISTDataModule", "MNISTDataModule", "read_idx"]

#: idx type codes (the third byte of the magic number) and the numpy types they stand for (big-endian)
_IDX_TYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

#: the two splits and their files, without the optional ``.gz``
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: all four, in that order
IDX_STEMS: tuple[str, ...] = (*IDX_FILES["train"], *IDX_FILES["val"])


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one idx file (gzipped or not, told by its first two bytes) into an array of the shape it declares.

    Not torchvision's ``read_sn3_pascalvincent_tensor``: it reads no gzip (the Debian package's files are gzipped)
    and checks a file with ``assert``, where a broken download must be one line naming the file.

    Raises:
        DatasetNotAvailableError: the file is not a complete idx file (truncated, a broken gzip stream, a wrong
            magic number); the one-line message names the file.

    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetNotAvailableError(f"{path}: cannot be read as an idx file ({err}); delete it and install or "
                                       "download it again") from err
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DatasetNotAvailableError(f"{path}: not an idx file (its first bytes are {raw[:4].hex() or 'missing'}, "
                                       "not 0000 <type> <dims>); delete it and install or download it again")
    ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetNotAvailableError(f"{path}: truncated inside its header; delete it and install or download it "
                                       "again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        state = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise DatasetNotAvailableError(
            f"{path}: {state} ({len(raw) - header:,} bytes of data where its header {shape} says {expected:,}); "
            "delete it and install or download it again")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


class IdxDataModule(MoCoDataModule):
    """Base of the datamodules of MNIST-format data: locate, check and read the four idx files.

    Args:
        data_dir: the folder holding the idx files (or ``<data_dir>/<Name>/raw``); ``None`` = the system folders
            of :attr:`system_dirs`, then ``data/<Name>/raw``.
        download: download with torchvision (into ``data_dir``, or ``data``) when the files are nowhere.
        download_timeout: seconds for the DNS lookup and each socket operation of the download.
        channels: 3 (grey replicated to RGB) or 1.
        **kwargs: the :class:`~moco_lightning.data.MoCoDataModule` keywords.

    """

    display_name: ClassVar[str] = ""
    torchvision_class: ClassVar[type] = datasets.MNIST
    #: folders a system package installs the files to, looked at when ``data_dir`` is ``None``
    system_dirs: ClassVar[tuple[str, ...]] = ()
    #: how to get the files without a network, for the message when they are missing
    offline_hint: ClassVar[str] = ""
    num_classes = 10
    default_augmentation = "grey"

    def __init__(self, data_dir: str | None = None, download: bool = True, download_timeout: float = 10.0,
                 channels: int = 3, **kwargs: Any) -> None:
        if channels not in (1, 3):
            raise ValueError(f"{type(self).__name__}: channels={channels!r} must be 1 or 3")
        super().__init__(**kwargs)
        self.data_dir = None if data_dir is None else os.path.expanduser(str(data_dir))
        self.download = bool(download)
        self.download_timeout = float(download_timeout)
        self.channels = channels
        if channels == 1:
            self.mean, self.std = self.mean[:1], self.std[:1]
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ files
    @classmethod
    def search_dirs(cls, data_dir: str | None) -> list[str]:
        """The folders looked in, in order."""
        raw = os.path.join(cls.torchvision_class.__name__, "raw")
        if data_dir is not None:
            data_dir = os.path.expanduser(str(data_dir))
            return [data_dir, os.path.join(data_dir, raw)]
        return [*cls.system_dirs, os.path.join("data", raw)]

    @staticmethod
    def _find(folder: str, stem: str) -> str | None:
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        return None

    @classmethod
    def locate_files(cls, data_dir: str | None) -> dict[str, str] | None:
        """``{file stem: path}`` of the four files in the first folder that has all of them, or ``None``."""
        for folder in cls.search_dirs(data_dir):
            found = {stem: cls._find(folder, stem) for stem in IDX_STEMS}
            if all(found.values()):
                return found  # type: ignore[return-value]
        return None

    @classmethod
    def missing_message(cls, data_dir: str | None) -> str:
        """One line: the files are in none of the folders looked in, and how to get them."""
        looked = ", ".join(cls.search_dirs(data_dir))
        return (f"{cls.display_name}: the idx files ({', '.join(IDX_STEMS)}, gzipped "
                f"or not) are in none of {looked}; {cls.offline_hint}place them in a folder and set "
                "data_dir to it, or set download=True where there is a network")

    @classmethod
    def check_files(cls, data_dir: str | None = None, download: bool = True) -> None:
        """Before any compute: the files must be on disk unless a download will be tried (``download=true``)."""
        path = None if data_dir is None else os.path.expanduser(str(data_dir))
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            raise DatasetNotAvailableError(f"data_dir={data_dir!r} is a file; set it to the folder that holds "
                                           f"the {cls.display_name} idx files, or to null")
        if not download and cls.locate_files(data_dir) is None:
            raise DatasetNotAvailableError(cls.missing_message(data_dir))

    def _files(self) -> dict[str, str]:
        found = self.locate_files(self.data_dir)
        if found is not None:
            return found
        if not self.download:
            raise DatasetNotAvailableError(self.missing_message(self.data_dir))
        root = self.data_dir if self.data_dir is not None else "data"
        folder = os.path.join(root, self.torchvision_class.__name__, "raw")
        tv_class = self.torchvision_class
        try:
            ensure_dataset_files(
                self.display_name, folder, IDX_STEMS, download=True,
                url=tv_class.mirrors[0],  # type: ignore[attr-defined]
                download_fn=lambda: tv_class(root, train=False, download=True),
                what_to_place="the four idx files", timeout=self.download_timeout)
        except DatasetNotAvailableError as err:
            cause = err.__cause__ if err.__cause__ is not None else err
            raise DatasetNotAvailableError(f"{self.missing_message(self.data_dir)} (downloading them failed: "
                                           f"{type(cause).__name__}: {cause})") from err
        found = self.locate_files(root)
        assert found is not None  # ensure_dataset_files checked them
        return found

    def prepare_data(self) -> None:
        """Download the files when they are nowhere and ``download=true`` (called on one process only)."""
        self._files()

    # ------------------------------------------------------------------ data
    def split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images (N, 1, 28, 28) uint8, labels (N,) int64)`` of ``"train"`` or ``"val"`` (the test set)."""
        if split not in self._splits:
            files = self._files()
            images_file, labels_file = (files[stem] for stem in IDX_FILES[split])
            images, labels = read_idx(images_file), read_idx(labels_file)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DatasetNotAvailableError(
                    f"{images_file}: {images.shape} images do not go with the {labels.shape} labels of "
                    f"{labels_file}; delete both and install or download them again")
            if labels.size and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
                raise DatasetNotAvailableError(f"{labels_file}: labels outside 0..{self.num_classes - 1}; delete it "
                                               "and install or download it again")
            self._splits[split] = (torch.from_numpy(images.copy()).unsqueeze(1),
                                   torch.from_numpy(labels.astype(np.int64)))
        return self._splits[split]

    def _dataset(self, images: torch.Tensor, labels: torch.Tensor) -> TensorImageDataset:
        return TensorImageDataset(images.expand(-1, self.channels, -1, -1), labels)

    def _build_pretrain_dataset(self) -> Dataset:
        # the native 28 px: the random resized crop of the (batch) augmentation resizes to image_size
        return self._dataset(*self.split_tensors("train"))

    def _build_eval_dataset(self, split: str) -> Dataset:
        images, labels = self.split_tensors(split)
        if images.shape[-1] != self.image_size:  # resized once, in bulk: the evaluation view's Resize is then a no-op
            images = resize_uint8(images, self.image_size)
        return self._dataset(images, labels)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    """Resize a uint8 batch ``(N, C, H, W)`` to ``size`` x ``size`` as torchvision's per-image ``Resize`` does.

    Bilinear with antialiasing, in float, rounded back to uint8; in chunks so memory stays bounded.
    """
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].float()
        resized = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start:start + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


class FashionMNISTDataModule(IdxDataModule):
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60,000 training and 10,000 test images, 28x28 grey, 10 classes.

    Offline: ``apt-get install dataset-fashion-mnist`` puts the files where ``data_dir=None`` finds them.
    """

    dataset_name = "fashion_mnist"
    display_name = "Fashion-MNIST"
    torchvision_class = datasets.FashionMNIST
    system_dirs = ("/usr/share/datasets/fashion-mnist",)
    offline_hint = "offline, install them with `apt-get install dataset-fashion-mnist` (Debian / Ubuntu), or "
    #: the class names, in label order
    classes: ClassVar[Sequence[str]] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                        "Sneaker", "Bag", "Ankle boot")


class MNISTDataModule(IdxDataModule):
    """MNIST (LeCun et al. 1998): 60,000 training and 10,000 test handwritten digits, 28x28 grey.

    The "grey" augmentation flips images: set its ``flip_prob`` to 0 for digits.
    """

    dataset_name = "mnist"
    display_name = "MNIST"
    torchvision_class = datasets.MNIST
    classes: ClassVar[Sequence[str]] = tuple(str(d) for d in range(10))


class KMNISTDataModule(IdxDataModule):
    """Kuzushiji-MNIST (Clanuwat et al. 2018): 60,000 / 10,000 28x28 grey cursive Japanese characters, 10 classes.

    The same files and layout as :class:`FashionMNISTDataModule`; downloaded by torchvision into
    ``<data_dir>/KMNIST/raw``.
    """

    dataset_name = "kmnist"
    display_name = "KMNIST"
    torchvision_class = datasets.KMNIST
    classes: ClassVar[Sequence[str]] = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")

"""Image-folder datasets (any folder, ImageNet) that skip unreadable images instead of crashing mid-epoch.

Layouts: labelled ``root/<class>/<...>/<image>`` (two or more class folders, sorted names -> 0..C-1), or unlabelled
(images in ``root`` or one sub-folder, or anything below ``root`` with ``labels="none"``; label -1: what needs labels
steps aside).

A missing or empty folder is an error at ``setup()``; a corrupt file is only found when decoded, so it is replaced
by the next readable image, warned about once (:class:`CorruptImageWarning`) and counted in shared memory that the
loader workers inherit. :class:`SkippedImagesReport` reports and resets the count every training epoch; without it,
``teardown`` reports the total.

The files are held in numpy arrays (:class:`FileIndex`), not a list of tuples: a forked worker reading Python
objects writes their reference counts and copies their pages (217 MB per worker for ImageNet; benchmarks/RESULTS.md,
"The image-folder index in loader workers").
"""

from __future__ import annotations

import copy
import multiprocessing
import operator
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset

from moco_lightning.data.base import DatasetError, MoCoDataModule
from moco_lightning.data.decode import decode_image
from moco_lightning.data.jpeg import CropDecoder, CroppedViews, check_decode, split_crop
from moco_lightning.transforms import build_view_transforms

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABEL_MODES",
    "CorruptImageWarning",
    "FileIndex",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "ImageNetDataModule",
    "SkippedImagesReport",
    "check_decodable",
    "merge_skip_counts",
    "scan_image_folder",
]

#: How labels are read from the folder layout (the ``labels`` argument).
LABEL_MODES: tuple[str, ...] = ("auto", "none")

#: extensions (lower case) recognised as images: torchvision's ``IMG_EXTENSIONS``.
IMAGE_EXTENSIONS: tuple[str, ...] = IMG_EXTENSIONS

_LAYOUT_HELP = ("Arrange the images as <folder>/<class name>/<image>.jpg (labelled, two classes or more) or put "
                "them directly in <folder> (unlabelled)")


class CorruptImageWarning(UserWarning):
    """An image file could not be decoded and was replaced by another image of the dataset."""


def _visible_image(root: str) -> Callable[[str], bool]:
    """``is_valid_file`` of ``make_dataset``: a known image extension, and no hidden file or folder below ``root``."""
    start = len(os.path.join(root, ""))
    return lambda path: (has_file_allowed_extension(path, IMAGE_EXTENSIONS)
                         and not any(part.startswith(".") for part in path[start:].split(os.sep)))


def check_folder(root: str | os.PathLike[str], setting: str = "data_dir") -> str:
    """``root`` with ``~`` expanded, after checking that it is a folder; ``setting`` is named in the errors.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.

    """
    root = os.path.expanduser(os.fspath(root))
    if not os.path.exists(root):
        raise FileNotFoundError(f"{setting}={root!r} does not exist. Set {setting} to the folder of your images. "
                                f"{_LAYOUT_HELP}.")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{setting}={root!r} is a file, not a folder. Set {setting} to the folder of your "
                                 f"images. {_LAYOUT_HELP}.")
    return root


def scan_image_folder(root: str | os.PathLike[str], setting: str = "data_dir", labels: str = "auto"
                      ) -> tuple[list[tuple[str, int]], list[str]]:
    """The images of a folder: ``(samples [(path, label)], class names)``; labels -1 when unlabelled.

    Args:
        root: the folder.
        setting: the argument that holds ``root`` (``data_dir``, ``val_dir``), named in error messages.
        labels: ``"auto"`` (class folders when there are two or more) or ``"none"`` (ignore the folder names).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.
        DatasetError: ``root`` is empty or holds no file with a known image extension (a ``ValueError``).

    """
    root = check_folder(root, setting)
    if labels not in LABEL_MODES:
        raise ValueError(f"labels={labels!r}: choose one of {', '.join(LABEL_MODES)}")
    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    if not entries:
        raise DatasetError(f"{setting}={root!r} is an empty folder. {_LAYOUT_HELP}.")
    top_images = [e.path for e in entries if e.is_file() and has_file_allowed_extension(e.name, IMAGE_EXTENSIONS)]
    # the sub-folders, as torchvision's find_classes lists them but without hidden ones (.ipynb_checkpoints)
    folders = [e.name for e in entries if e.is_dir()]
    found = make_dataset(root, {name: i for i, name in enumerate(folders)}, is_valid_file=_visible_image(root),
                         allow_empty=True) if folders else []
    classes = sorted({folders[label] for _, label in found})  # the class folders that hold images
    index = {folders.index(name): i for i, name in enumerate(classes)}
    samples = [(path, index[label]) for path, label in found]
    empty_dirs = [name for name in folders if name not in classes]
    if len(classes) >= 2 and labels == "auto":
        if empty_dirs:
            warnings.warn(f"{setting}={root!r}: ignoring sub-folders without images: {empty_dirs[:10]}",
                          stacklevel=2)
        if top_images:
            warnings.warn(f"{setting}={root!r}: ignoring {len(top_images)} images lying next to the class "
                          "sub-folders (they have no class)", stacklevel=2)
        return samples, classes
    if samples or top_images:  # one class folder, images in root, or labels="none": every image, unlabelled
        return [(path, -1) for path in sorted([*top_images, *(path for path, _ in samples)])], []
    n_files = sum(len(files) for _, _, files in os.walk(root, followlinks=True))
    if n_files == 0:
        raise DatasetError(f"{setting}={root!r} contains no files (only empty sub-folders). {_LAYOUT_HELP}.")
    raise DatasetError(f"{setting}={root!r} holds {n_files} files but none with a known image extension "
                     f"({', '.join(IMAGE_EXTENSIONS)}). {_LAYOUT_HELP}.")


def check_decodable(samples: Sequence[tuple[str, int]], setting: str, root: str) -> None:
    """Decode the files in order until one is readable; raise :class:`DatasetError` when none is."""
    first_error: str | None = None
    for path, _ in samples:
        try:
            _load_rgb(path)
            return
        except Exception as err:  # noqa: BLE001 - any decoder error means "unreadable file"
            if first_error is None:
                first_error = f"{os.path.basename(path)}: {type(err).__name__}: {err}".splitlines()[0]
    raise DatasetError(f"{setting}={root!r}: none of its {len(samples)} image files can be decoded (first: "
                       f"{first_error}); check that they are images (not empty, truncated or renamed files)")


def _load_rgb(path: str) -> Image.Image:
    return decode_image(path)  # the full decode (truncated files fail here), upright, 8-bit RGB


class FileIndex:
    """The ``(path, label)`` pairs of a list of files, in three numpy arrays that forked workers read without copying.

    Args:
        paths: the file paths.
        labels: one label per path (-1: unlabelled).

    Attributes:
        prefix: the folder that all the paths start with (with its trailing separator; ``""`` when none).
        names: ``uint8``, the paths after ``prefix`` (``os.fsencode``), end to end.
        offsets: ``int64``, ``len + 1`` entries: path ``i`` is ``prefix + names[offsets[i]:offsets[i + 1]]``.
        labels: ``int64``, the labels.

    """

    __slots__ = ("labels", "names", "offsets", "prefix")

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | np.ndarray) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"FileIndex: {len(paths)} paths but {len(labels)} labels")
        common = os.path.commonprefix(paths) if len(paths) else ""  # compares only the min and max paths
        self.prefix = common[: common.rfind(os.sep) + 1]
        encoded = [os.fsencode(path[len(self.prefix):]) for path in paths]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        self._set(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), lengths, np.asarray(labels, np.int64))

    def _set(self, names: np.ndarray, lengths: np.ndarray, labels: np.ndarray) -> None:
        self.names, self.labels = names, labels
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        for array in (self.names, self.offsets, self.labels):
            array.flags.writeable = False

    @classmethod
    def from_samples(cls, samples: Sequence[tuple[str, int]]) -> FileIndex:
        """The index of a list of ``(path, label)`` pairs (:func:`scan_image_folder`'s)."""
        return cls([path for path, _ in samples], [label for _, label in samples])

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        """The path of entry ``index`` (negative counts from the end)."""
        i = operator.index(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"FileIndex: index {index} out of range for {len(self)} files")
        i %= len(self)
        return self.prefix + os.fsdecode(self.names[self.offsets.item(i):self.offsets.item(i + 1)].tobytes())

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.path(index), self.labels.item(index)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return (self[i] for i in range(len(self)))

    def subset(self, indices: Sequence[int] | np.ndarray) -> FileIndex:
        """The entries ``indices``, in that order, as a new index (same prefix)."""
        indices = np.asarray(indices, dtype=np.int64)
        starts = self.offsets[indices]
        lengths = self.offsets[indices + 1] - starts
        # byte j of the new buffer comes from starts[k] + (j - new start of entry k), for the entry k holding it
        new_starts = np.cumsum(lengths) - lengths
        positions = np.repeat(starts - new_starts, lengths) + np.arange(lengths.sum(), dtype=np.int64)
        out = object.__new__(FileIndex)
        out.prefix = self.prefix
        out._set(self.names[positions], lengths, self.labels[indices])
        return out


class ImageFolderDataset(Dataset):
    """``(PIL RGB image, label)`` pairs from a list of files; unreadable files are skipped, warned and counted.

    Args:
        samples: a :class:`FileIndex`, or ``[(path, label)]`` (e.g. from :func:`scan_image_folder`).
        classes: class names (empty for an unlabelled folder).
        decoder: path -> item (``None``: :func:`~moco_lightning.data.decode.decode_image`; ``decode="draft"``
            gives a :class:`~moco_lightning.data.jpeg.CropDecoder`); an error it raises marks the file unreadable.

    """

    def __init__(self, samples: FileIndex | Sequence[tuple[str, int]], classes: Sequence[str] = (),
                 decoder: Callable[[str], Any] | None = None) -> None:
        self.index = samples if isinstance(samples, FileIndex) else FileIndex.from_samples(samples)
        if not len(self.index):
            raise ValueError("ImageFolderDataset needs at least one image")
        self.classes = list(classes)
        self.decoder = decoder
        # Shared between loader workers (inherited by fork, pickled at spawn): 1 = known unreadable.
        self._bad = multiprocessing.Array("b", len(self.index))
        self._epoch_skips = multiprocessing.Value("q", 0)

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``[(path, label)]``, built from :attr:`index` at each access (a Python object per file: not in workers)."""
        return list(self.index)

    @property
    def targets(self) -> list[int]:
        """The labels, as a list (built at each access; ``index.labels`` is the array)."""
        return self.index.labels.tolist()

    def __len__(self) -> int:
        return len(self.index)

    def _mark_bad(self, index: int, err: BaseException) -> None:
        with self._bad.get_lock():
            first = self._bad[index] == 0
            self._bad[index] = 1
        if first:
            warnings.warn(f"Skipping unreadable image {self.index.path(index)} ({type(err).__name__}: {err}); "
                          "it is replaced by the next readable image of the dataset", CorruptImageWarning,
                          stacklevel=3)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        decoder = _load_rgb if self.decoder is None else self.decoder
        n = len(self.index)
        for step in range(n):
            i = (index + step) % n
            if self._bad[i]:
                if step == 0:
                    with self._epoch_skips.get_lock():
                        self._epoch_skips.value += 1
                continue
            path, label = self.index[i]
            try:
                return decoder(path), label
            except Exception as err:  # noqa: BLE001 - any decoder error means "unreadable file"
                self._mark_bad(i, err)
                if step == 0:
                    with self._epoch_skips.get_lock():
                        self._epoch_skips.value += 1
        raise DatasetError(f"none of the {n} images of this dataset can be decoded (first: {self.index.path(0)}); "
                           "check the image files (data_dir)")

    def counting_view(self) -> ImageFolderDataset:
        """The same files and unreadable-file flags, with a skip counter of its own (another pass over the data).

        The view decodes whole images (``decoder=None``) whatever this dataset's decoder.
        """
        view = copy.copy(self)
        view._epoch_skips = multiprocessing.Value("q", 0)
        view.decoder = None
        return view

    @property
    def bad_files(self) -> list[str]:
        """Files found unreadable so far (in any process)."""
        flags = np.frombuffer(self._bad.get_obj(), dtype=np.int8)
        return [self.index.path(i) for i in np.flatnonzero(flags)]

    def pop_epoch_skips(self) -> int:
        """Number of samples replaced since the last call (all processes), and reset it to zero."""
        with self._epoch_skips.get_lock():
            count = int(self._epoch_skips.value)
            self._epoch_skips.value = 0
        return count


class SkippedImagesReport(Callback):
    """At the end of each training epoch, warn with the unreadable images skipped in it, per pass, over all ranks.

    Uses the datamodule's ``pop_skipped_by_pass()`` when it has one; put it after the evaluation callbacks.
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Report and reset the skip counters of ``trainer.datamodule``."""
        datamodule = getattr(trainer, "datamodule", None)
        pop = getattr(datamodule, "pop_skipped_by_pass", None)
        if pop is None:
            return
        by_pass = merge_skip_counts(_all_gather(pop(), trainer))
        for name, (count, bad_files) in by_pass.items():
            if count:
                shown = ", ".join(bad_files[:5]) + (" ..." if len(bad_files) > 5 else "")
                rank_zero_warn(f"epoch {trainer.current_epoch}: skipped {count} unreadable images in the {name} "
                               f"pass ({len(bad_files)} distinct files so far: {shown})", category=CorruptImageWarning)


def merge_skip_counts(reports: Sequence[dict[str, tuple[int, list[str]]]]) -> dict[str, tuple[int, list[str]]]:
    """Sum the counts and join the files of the ``{pass: (count, files)}`` reports of several processes."""
    merged: dict[str, tuple[int, list[str]]] = {}
    for report in reports:
        for name, (count, files) in report.items():
            total, known = merged.get(name, (0, []))
            merged[name] = (total + int(count), sorted({*known, *files}))
    return merged


def _all_gather(report: dict[str, tuple[int, list[str]]], trainer: Trainer) -> list[dict[str, tuple[int, list[str]]]]:
    import torch.distributed as dist

    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, report)
        return gathered
    return [report]


class _FolderDataModule(MoCoDataModule):
    """Shared logic of the folder datamodules: datasets built from scans, skip counting, how pretraining decodes.

    Args:
        decode: how the pretraining loader decodes (:mod:`moco_lightning.data.jpeg`): ``"draft"`` (crop boxes from
            the header, reduced DCT decode) or ``"exact"`` (whole image); evaluation always decodes exactly.
        **kwargs: the :class:`~moco_lightning.data.MoCoDataModule` keywords.

    """

    #: images of any size: with batch augmentation the loader decodes and takes the random resized crops
    fixed_image_size = False

    def __init__(self, decode: str = "draft", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.decode = check_decode(decode)
        self._folder_datasets: list[tuple[str, ImageFolderDataset]] = []
        self.classes: list[str] = []
        self._crop_plan: tuple[CropDecoder, CroppedViews | None] | None = None

    def crop_plan(self) -> tuple[CropDecoder, CroppedViews | None] | None:
        """``(decoder, views)`` of ``decode="draft"``: the crops taken while decoding, and the rest of each view.

        ``views`` is ``None`` with batch augmentation: the decoder's uint8 tensors are the loader's items as they are.
        ``None`` when pretraining decodes whole images (``decode="exact"``, or a callable augmentation). Built once.
        """
        if self.decode != "draft" or callable(self.augmentation):
            return None
        if self._crop_plan is None:
            if self.batch_augmentation:  # the loader's part of the batch augmentation: the crops, as uint8 tensors
                crops = list(self.batch_augment.loader_crops or ())
                self._crop_plan = (CropDecoder(crops, output="tensor"), None)
            else:
                views = build_view_transforms(self.augmentation, self.image_size, self.mean, self.std,
                                              **self.augmentation_kwargs)
                split = [split_crop(view) for view in views]
                if any(part is None for part in split):  # a view that does not start with its crop
                    return None
                crops, rests = [part[0] for part in split], [part[1] for part in split]  # type: ignore[index]
                self._crop_plan = (CropDecoder(crops), CroppedViews(rests))
        return self._crop_plan

    def _pretrain_item_transform(self) -> Callable[[Any], Any] | None:
        """With ``decode="draft"`` the dataset's items are the crops taken while decoding: the views after them.

        ``pretrain_transform`` keeps its meaning (one image in, two views out) for everything else that uses it.
        """
        plan = self.crop_plan()
        return self.pretrain_transform if plan is None else plan[1]

    def _dataset(self, samples: FileIndex, classes: Sequence[str],
                 role: str = "evaluation") -> ImageFolderDataset:
        plan = self.crop_plan() if role == "pretraining" else None
        dataset = ImageFolderDataset(samples, classes, decoder=None if plan is None else plan[0])
        self._folder_datasets.append((role, dataset))
        return dataset

    def _evaluation_view(self, dataset: ImageFolderDataset) -> ImageFolderDataset:
        view = dataset.counting_view()  # the pretraining files, counted apart
        self._folder_datasets.append(("evaluation", view))
        return view

    def pop_skipped_by_pass(self) -> dict[str, tuple[int, list[str]]]:
        """Skips of this process per pass: ``{"pretraining" | "evaluation": (count, files)}``; resets the counts.

        ``count``: images replaced since the last call; ``files``: the files found unreadable so far.
        """
        report: dict[str, tuple[int, list[str]]] = {}
        for role in ("pretraining", "evaluation"):
            datasets = [ds for r, ds in self._folder_datasets if r == role]
            if datasets:
                report[role] = (sum(ds.pop_epoch_skips() for ds in datasets),
                                sorted({path for ds in datasets for path in ds.bad_files}))
        return report

    def pop_skipped_images(self) -> tuple[int, list[str]]:
        """``(images replaced since the last call, all files found unreadable so far)`` over all passes; resets."""
        merged = merge_skip_counts([self.pop_skipped_by_pass()]).values()
        return sum(count for count, _ in merged), sorted({path for _, files in merged for path in files})

    def teardown(self, stage: str) -> None:
        """Warn with the list of unreadable files met during the run, if any."""
        bad = sorted({path for _, ds in self._folder_datasets for path in ds.bad_files})
        if bad:
            rank_zero_warn(f"{type(self).__name__}: {len(bad)} unreadable image files were skipped during "
                           f"this run: {bad[:20]}", category=CorruptImageWarning)


class ImageFolderDataModule(_FolderDataModule):
    """Any folder of images: class sub-folders (labelled) or a folder without them (unlabelled).

    Evaluation "val" is ``val_dir`` (same classes) or a stratified ``val_fraction`` of ``data_dir``. Unlabelled,
    ``num_classes`` is 0 and what needs labels steps aside. Crop 224, ImageNet statistics by default.

    Args:
        data_dir: the image folder.
        val_dir: optional folder of validation images with the same class sub-folders.
        val_fraction: fraction held out for validation when ``val_dir`` is not given (0 = no validation set).
        split_seed: random_state of that split (fixed, independent of ``seed``).
        labels: ``"auto"`` (class sub-folders, when there are two or more, are the labels) or ``"none"`` (every
            image below ``data_dir``, unlabelled, whatever the folders are called).
        **kwargs: ``decode`` (``"draft"`` or ``"exact"``: how pretraining decodes, see :class:`_FolderDataModule`)
            and the :class:`~moco_lightning.data.MoCoDataModule` keywords.

    """

    dataset_name = "folder"

    def __init__(self, data_dir: str, val_dir: str | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                 labels: str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"ImageFolderDataModule: val_fraction={val_fraction!r} must be in [0, 1)")
        if labels not in LABEL_MODES:
            raise ValueError(f"ImageFolderDataModule: labels={labels!r} must be one of {', '.join(LABEL_MODES)}")
        self.data_dir = os.path.expanduser(str(data_dir))
        self.val_dir = os.path.expanduser(str(val_dir)) if val_dir is not None else None
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.labels = labels
        self._train_samples: FileIndex | None = None
        self._val_samples: FileIndex | None = None

    @staticmethod
    def check_files(data_dir: str, val_dir: str | None = None) -> None:
        """Before any compute: ``data_dir`` (and ``val_dir`` when given) are folders (:func:`check_folder`)."""
        check_folder(data_dir, "data_dir")
        if val_dir is not None:
            check_folder(val_dir, "val_dir")

    @property
    def has_labels(self) -> bool:
        """Whether the folder is labelled (two or more class sub-folders); scans the folder on first use."""
        self._scan()
        return self.num_classes > 0

    @property
    def num_pretraining_images(self) -> int:
        """Images of the pretraining set (the folder less the held-out validation images); scans on first use."""
        self._scan()
        assert self._train_samples is not None
        return len(self._train_samples)

    def _scan(self) -> None:
        if self._train_samples is not None:
            return
        found, classes = scan_image_folder(self.data_dir, "data_dir", self.labels)
        check_decodable(found, "data_dir", self.data_dir)
        samples = FileIndex.from_samples(found)
        self.classes, self.num_classes = classes, len(classes)
        if self.val_dir is not None:
            val_samples, val_classes = scan_image_folder(self.val_dir, "val_dir", self.labels)
            if val_classes != classes:
                raise DatasetError(f"val_dir={self.val_dir!r} has classes {val_classes[:5]}... but "
                                 f"data_dir={self.data_dir!r} has {classes[:5]}...: both need the same class "
                                 "sub-folders")
            self._train_samples, self._val_samples = samples, FileIndex.from_samples(val_samples)
        elif self.val_fraction > 0 and len(samples) >= 2:
            self._train_samples, self._val_samples = self._split(samples)
        else:
            self._train_samples = samples

    def _split(self, samples: FileIndex) -> tuple[FileIndex, FileIndex]:
        from sklearn.model_selection import train_test_split

        labels = samples.labels
        n_val = max(1, round(self.val_fraction * len(samples)))
        counts = np.bincount(np.maximum(labels, 0))
        # Stratify when every class can give one image to each side; otherwise fall back to a plain split.
        stratifiable = (self.num_classes > 0 and counts.min() >= 2 and n_val >= len(counts)
                        and len(samples) - n_val >= len(counts))
        stratify = labels if stratifiable else None
        train_idx, val_idx = train_test_split(np.arange(len(samples)), test_size=n_val, stratify=stratify,
                                              random_state=self.split_seed)
        return samples.subset(np.sort(train_idx)), samples.subset(np.sort(val_idx))

    def _build_pretrain_dataset(self) -> Dataset:
        self._scan()
        assert self._train_samples is not None
        return self._dataset(self._train_samples, self.classes, role="pretraining")

    def _build_eval_dataset(self, split: str) -> Dataset:
        self._scan()
        if split == "train":
            if self._pretrain_dataset is not None:
                return self._evaluation_view(self._pretrain_dataset.base)  # type: ignore[attr-defined]
            assert self._train_samples is not None
            return self._dataset(self._train_samples, self.classes)
        if not self._val_samples:
            raise DatasetError(f"ImageFolderDataModule: no validation images: set val_dir to a folder with the "
                             f"same class sub-folders as {self.data_dir!r}, or val_fraction > 0")
        return self._dataset(self._val_samples, self.classes)

    def setup(self, stage: str | None = None) -> None:
        """Scan the folder(s) (errors for missing / empty folders are raised here) and build the datasets."""
        self._scan()
        super().setup(stage)


class ImageNetDataModule(_FolderDataModule):
    """ImageNet (ILSVRC-2012) from its train / val folders: ``data_dir/train/<wnid>/*.JPEG``, ``data_dir/val/<wnid>``.

    ``val`` must be sorted into class folders (the usual ``valprep.sh``). Crop 224, evaluation resize 256.

    Args:
        data_dir: the folder that contains ``train`` and ``val``.
        **kwargs: ``decode`` (``"draft"`` or ``"exact"``: how pretraining decodes, see :class:`_FolderDataModule`)
            and the :class:`~moco_lightning.data.MoCoDataModule` keywords.

    """

    dataset_name = "imagenet"
    num_classes = 1000

    def __init__(self, data_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_dir = os.path.expanduser(str(data_dir))
        self._scanned: dict[str, tuple[FileIndex, list[str]]] = {}

    @staticmethod
    def check_files(data_dir: str) -> None:
        """Before any compute: ``data_dir`` holds the ``train/`` and ``val/`` folders."""
        for split in ("train", "val"):
            folder = os.path.join(os.path.expanduser(str(data_dir)), split)
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"ImageNetDataModule: {folder!r} does not exist. Set data_dir to the folder that contains "
                    "ImageNet's train/ and val/ folders (train/<wnid>/<image>.JPEG, val/<wnid>/<image>.JPEG).")

    def _scan_split(self, split: str) -> tuple[FileIndex, list[str]]:
        if split not in self._scanned:
            folder = os.path.join(self.data_dir, split)
            self.check_files(self.data_dir)
            samples, classes = scan_image_folder(folder, f"data_dir ({split} folder)")
            if not classes:
                raise DatasetError(f"ImageNetDataModule: {folder!r} holds images without class sub-folders. Sort "
                                 "them into <wnid>/ folders (for val: the usual valprep.sh script).")
            self._scanned[split] = (FileIndex.from_samples(samples), classes)
        return self._scanned[split]

    def setup(self, stage: str | None = None) -> None:
        """Scan ``train`` and ``val`` (missing / empty folders raise here, before training)."""
        samples, classes = self._scan_split("train")
        self.classes, self.num_classes = classes, len(classes)
        _, val_classes = self._scan_split("val")
        if val_classes != classes:
            raise DatasetError(f"ImageNetDataModule: {self.data_dir}/val has {len(val_classes)} class folders but "
                             f"train has {len(classes)}; they must match.")
        super().setup(stage)

    def _build_pretrain_dataset(self) -> Dataset:
        samples, classes = self._scan_split("train")
        return self._dataset(samples, classes, role="pretraining")

    def _build_eval_dataset(self, split: str) -> Dataset:
        if split == "train" and self._pretrain_dataset is not None:
            return self._evaluation_view(self._pretrain_dataset.base)  # type: ignore[attr-defined]
        samples, classes = self._scan_split(split)
        return self._dataset(samples, classes)

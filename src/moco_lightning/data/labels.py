"""A labelled subset of the training images: the few-label protocols (1 %, 10 % of the labels).

Semi-supervised evaluation trains (fine-tuning) or fits (kNN bank, linear probe) on a fraction of the training
labels. :func:`balanced_subset` draws one per class from a seed, as the SimCLR / BYOL 1 % and 10 % ImageNet
subsets are (about the same number of images per class); :func:`read_subset_file` reads a subset given as a file,
one index or one file name per line (the published ImageNet subsets list file names such as
``n01440764_10026.JPEG``). :meth:`MoCoDataModule.use_labelled_subset` then restricts the labelled training set
(``eval_train_dataloader``, augmented or not) to it; the validation set stays whole.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["balanced_subset", "choose_labelled_subset", "dataset_files", "dataset_labels", "read_subset_file",
           "write_subset_file"]


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The labels of a dataset of ``(image, label)`` pairs, without reading its images where it holds them apart.

    Read from ``labels`` / ``targets`` / ``index.labels`` (in-memory, torchvision and folder datasets), else item by
    item (every image is loaded once).
    """
    for source in (getattr(dataset, "labels", None), getattr(dataset, "targets", None),
                   getattr(getattr(dataset, "index", None), "labels", None)):
        if source is not None:
            return np.asarray(source.cpu() if isinstance(source, torch.Tensor) else source, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]


def dataset_files(dataset: Dataset) -> list[str] | None:
    """The file of every image of a folder dataset (its ``index``), in order; ``None`` for images held otherwise."""
    index = getattr(dataset, "index", None)
    if index is None or not hasattr(index, "path"):
        return None
    return [index.path(i) for i in range(len(index))]


def choose_labelled_subset(dataset: Dataset, fraction: float = 1.0, seed: int = 0,
                           subset_file: str | os.PathLike[str] | None = None) -> np.ndarray | None:
    """The indices of the labelled images to use; ``None`` for all of them (fraction 1, no file).

    The file's (:func:`read_subset_file`) when one is given, else a class-balanced ``fraction`` drawn from ``seed``
    (:func:`balanced_subset`).
    """
    if subset_file is not None:
        return read_subset_file(subset_file, dataset_files(dataset))
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1]: 0.01 for 1 % of the labels, 1.0 for all")
    if float(fraction) == 1.0:
        return None
    return balanced_subset(dataset_labels(dataset), fraction, seed)


def balanced_subset(labels: Sequence[int] | np.ndarray | torch.Tensor, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of about ``fraction`` of the images of every class, drawn at random from ``seed``.

    Each class keeps ``round(fraction x its size)`` images, at least one: 1 % of Fashion-MNIST's 60,000 training
    images is 60 of each of its 10 classes. ``fraction`` 1 gives every index.

    Raises:
        ValueError: ``fraction`` is not in (0, 1], or the labels hold none of a class (negative: unlabelled).

    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1]: 0.01 for 1 % of the labels, 1.0 for all")
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError("the training images have no labels (label -1): a labelled subset needs class folders")
    if fraction == 1.0:
        return np.arange(len(labels))
    generator = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(members)))
        chosen.append(generator.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(chosen))


def read_subset_file(path: str | os.PathLike[str], files: Sequence[str] | None = None) -> np.ndarray:
    """Sorted indices named by a file: one per line, as an index into the training set or a file name.

    Blank lines and lines starting with ``#`` are skipped. A line that is not a whole number is a file name,
    matched against the base names of ``files`` (the training set's files, in dataset order); the published ImageNet
    1 % / 10 % subsets are such lists. ``ValueError``: missing or empty file, index out of range, unknown name.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"subset_file={str(path)!r} does not exist; give a file of indices or file names, "
                         "one a line")
    entries = [line.strip() for line in path.read_text().splitlines()]
    entries = [entry for entry in entries if entry and not entry.startswith("#")]
    if not entries:
        raise ValueError(f"subset_file={str(path)!r} names no image (one index or file name a line)")
    if all(entry.isdigit() for entry in entries):
        indices = np.asarray([int(entry) for entry in entries], dtype=np.int64)
        size = len(files) if files is not None else None
        if size is not None and indices.max() >= size:
            raise ValueError(f"subset_file={str(path)!r}: index {int(indices.max())} is out of range for the "
                             f"{size} training images")
        return np.unique(indices)
    if files is None:
        raise ValueError(f"subset_file={str(path)!r} names files, but this dataset's images are not files; "
                         "give indices into the training set, one a line")
    position = {os.path.basename(name): i for i, name in enumerate(files)}
    missing = [entry for entry in entries if os.path.basename(entry) not in position]
    if missing:
        raise ValueError(f"subset_file={str(path)!r}: {len(missing)} of its {len(entries)} files are not in "
                         f"the training set (first: {missing[0]!r}); check data_dir")
    return np.unique([position[os.path.basename(entry)] for entry in entries])


def write_subset_file(indices: Sequence[int] | np.ndarray, path: str | os.PathLike[str], **about: Any) -> Path:
    """Write ``indices`` one a line (readable by :func:`read_subset_file`), after ``# key: value`` header lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {key}: {value}\n" for key, value in about.items())
    path.write_text(header + "".join(f"{int(i)}\n" for i in indices))
    return path

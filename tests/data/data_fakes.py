"""Tiny on-disk datasets in their real formats, written by the tests into temporary folders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def label_image(label: int, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 image whose constant value encodes its label: 20 * label + 10."""
    return np.full((size, size, 3), 20 * label + 10, dtype=np.uint8)


def write_cifar(root: Path, hundred: bool = False, n_train: int = 12, n_test: int = 6) -> Path:
    """CIFAR python-version pickles (the files torchvision's CIFAR10/CIFAR100 read) with label-coded images."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key = "fine_labels" if hundred else "labels"

    def batch(n: int, offset: int) -> dict:
        labels = [(i + offset) % 10 for i in range(n)]
        # CIFAR stores each image as 3072 bytes, channel-major (R plane, G plane, B plane).
        data = np.stack([label_image(lbl, 32).transpose(2, 0, 1).reshape(-1) for lbl in labels])
        return {"data": data, label_key: labels, "batch_label": "fake"}

    if hundred:
        files = {"train": batch(n_train, 0), "test": batch(n_test, 3),
                 "meta": {"fine_label_names": [f"class{i}" for i in range(100)]}}
    else:
        per = n_train // 5
        files = {f"data_batch_{k + 1}": batch(per, k) for k in range(5)}
        files["test_batch"] = batch(n_test, 3)
        files["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)]}
    for name, content in files.items():
        with open(folder / name, "wb") as handle:
            pickle.dump(content, handle, protocol=2)
    return root


def write_stl10(root: Path, n_train: int = 6, n_unlabeled: int = 4, n_test: int = 5) -> Path:
    """STL-10 binary files (stl10_binary/*.bin, images stored column-major, labels 1..10) with coded images."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)

    def images(labels: list[int]) -> bytes:
        arr = np.stack([label_image(lbl, 96).transpose(2, 0, 1) for lbl in labels])  # (N, 3, H, W)
        return np.ascontiguousarray(arr.transpose(0, 1, 3, 2)).tobytes()  # column-major per channel

    train_labels = [i % 10 for i in range(n_train)]
    test_labels = [(i + 5) % 10 for i in range(n_test)]
    (folder / "train_X.bin").write_bytes(images(train_labels))
    (folder / "train_y.bin").write_bytes(np.array(train_labels, dtype=np.uint8).__add__(1).tobytes())
    (folder / "test_X.bin").write_bytes(images(test_labels))
    (folder / "test_y.bin").write_bytes(np.array(test_labels, dtype=np.uint8).__add__(1).tobytes())
    (folder / "unlabeled_X.bin").write_bytes(images([9] * n_unlabeled))
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)))
    return root


def write_image_folder(root: Path, classes: int = 2, per_class: int = 4, size: int = 20) -> Path:
    """root/<classK>/imgJ.png with label-coded constant images (PNG, written with PIL)."""
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.fromarray(label_image(c, size)).save(root / f"class{c}" / f"img{j}.png")
    return root


def first_views(dm):
    """The first pretraining batch as the model sees it, ``((x_q, x_k), y)``: the loader's batch, then the batch
    augmentation (what the Trainer's ``on_after_batch_transfer`` does) when ``dm.batch_augmentation`` is on."""
    batch = next(iter(dm.train_dataloader()))
    return dm.augment_batch(batch) if dm.batch_augmentation else batch

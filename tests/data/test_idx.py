"""MNIST-format data (Fashion-MNIST, MNIST, KMNIST): the idx reader, where the files are found, clear failures."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from moco_lightning.data import (
    DatasetNotAvailableError,
    FashionMNISTDataModule,
    KMNISTDataModule,
    MNISTDataModule,
    read_idx,
)
from moco_lightning.data.idx import IDX_FILES, resize_uint8
from moco_lightning.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file of a uint8 array: magic 0x0000 0x08 <ndim>, big-endian dimensions, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_set(folder, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0) -> dict:
    """The four files of a tiny 28x28 MNIST-format set in ``folder``; returns the arrays written."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for stem, array in zip(IDX_FILES[split], (images, labels)):
            data = idx_bytes(array)
            path = os.path.join(folder, stem + (".gz" if gz else ""))
            with open(path, "wb") as handle:
                handle.write(gzip.compress(data) if gz else data)
            arrays[stem] = array
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_returns_the_array_written(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    for stem, array in arrays.items():
        read = read_idx(tmp_path / (stem + (".gz" if gz else "")))
        assert read.shape == array.shape and read.dtype == np.uint8
        np.testing.assert_array_equal(read, array)


def _one_line_error(path) -> str:
    with pytest.raises(DatasetNotAvailableError) as info:
        read_idx(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_truncated_file_is_one_line_naming_it(tmp_path):
    data = idx_bytes(np.zeros((10, 28, 28), dtype=np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(data[:-100])
    assert "truncated" in _one_line_error(path)


def test_a_truncated_gzip_stream_is_one_line_naming_it(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(2000, dtype=np.uint8).reshape(10, 200) % 251))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    assert "cannot be read" in _one_line_error(path)


def test_a_file_that_is_not_idx_is_one_line_naming_it(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"<html>not found</html>")
    assert "not an idx file" in _one_line_error(path)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_the_datamodule_finds_the_files_in_data_dir_or_its_torchvision_folder(tmp_path, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    arrays = write_idx_set(folder, gz=layout == "flat")
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=False, batch_size=8, image_size=16, num_workers=0)
    dm.setup("fit")
    pretrain = dm.pretrain_dataset.base
    assert len(pretrain) == 40 and pretrain[0][0].shape == (3, 28, 28)  # the native size: the crop resizes
    torch.testing.assert_close(pretrain[3][0][0], torch.from_numpy(arrays["train-images-idx3-ubyte"][3]))
    test_set = dm.eval_dataset("val").base
    assert len(test_set) == 20 and test_set[0][0].shape == (3, 16, 16)  # resized once to image_size
    assert [test_set[i][1] for i in range(12)] == [i % 10 for i in range(12)]


def test_pretraining_batches_become_two_normalised_views(tmp_path):
    write_idx_set(tmp_path)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=False, batch_size=8, image_size=16, num_workers=0)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 28, 28)
    (x_q, x_k), _ = dm.augment_batch((images, labels), index=0)
    assert x_q.shape == x_k.shape == (8, 3, 16, 16) and x_q.dtype == torch.float32
    assert not torch.equal(x_q, x_k)
    x, y = next(iter(dm.eval_val_dataloader()))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32  # eval_batch_size = batch_size


def test_one_channel(tmp_path):
    write_idx_set(tmp_path)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=False, batch_size=8, image_size=16, channels=1,
                                num_workers=0)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    (x_q, _), _ = dm.augment_batch((images, labels), index=0)
    assert x_q.shape == (8, 1, 16, 16)
    assert next(iter(dm.eval_val_dataloader()))[0].shape == (8, 1, 16, 16)


def test_bulk_resize_equals_torchvisions_per_image_resize():
    from torchvision.transforms import v2

    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    bulk = resize_uint8(images, 16, chunk=2)
    one_by_one = torch.stack([v2.Resize((16, 16), antialias=True)(image) for image in images])
    assert (bulk.int() - one_by_one.int()).abs().max() <= 1  # rounding of the same float result


@pytest.mark.parametrize("cls", [FashionMNISTDataModule, MNISTDataModule, KMNISTDataModule])
def test_missing_files_offline_is_one_line_naming_the_folders_and_the_fix(tmp_path, cls):
    with pytest.raises(DatasetNotAvailableError) as info:
        cls.check_files(str(tmp_path), download=False)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and "set data_dir to it" in message
    if cls is FashionMNISTDataModule:
        assert "apt-get install dataset-fashion-mnist" in message


def test_default_folders_include_the_debian_package_and_torchvisions_layout():
    dirs = FashionMNISTDataModule.search_dirs(None)
    assert dirs[0] == DEBIAN_DIR and dirs[-1] == os.path.join("data", "FashionMNIST", "raw")


def test_a_failed_download_is_one_line_with_the_install_command(tmp_path, no_network):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=True, download_timeout=1.0, batch_size=8)
    with pytest.raises(DatasetNotAvailableError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "\n" not in message and "apt-get install dataset-fashion-mnist" in message
    assert "downloading them failed" in message and no_network


def test_data_dir_pointing_at_a_file_is_one_line(tmp_path):
    path = tmp_path / "fashion.zip"
    path.write_bytes(b"x")
    with pytest.raises(DatasetNotAvailableError, match="is a file"):
        FashionMNISTDataModule.check_files(str(path), download=True)


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR),
                    reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
def test_the_real_fashion_mnist_files():
    dm = FashionMNISTDataModule(data_dir=None, download=False, batch_size=256)
    train_images, train_labels = dm.split_tensors("train")
    test_images, test_labels = dm.split_tensors("val")
    assert train_images.shape == (60000, 1, 28, 28) and test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train_labels).tolist() == [6000] * 10
    assert torch.bincount(test_labels).tolist() == [1000] * 10
    pixels = train_images.double() / 255
    assert abs(pixels.mean().item() - FASHION_MNIST_MEAN[0]) < 5e-4
    assert abs(pixels.std().item() - FASHION_MNIST_STD[0]) < 5e-4

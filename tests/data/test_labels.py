"""Few-label subsets: class-balanced draws, subset files, and the datamodule's labelled training set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moco_lightning.data import DigitsDataModule, TensorImageDataset
from moco_lightning.data.labels import (
    balanced_subset,
    choose_labelled_subset,
    dataset_labels,
    read_subset_file,
    write_subset_file,
)

LABELS = np.repeat(np.arange(10), [100, 100, 100, 100, 100, 50, 50, 50, 50, 1000])  # unbalanced classes


def test_a_fraction_of_every_class_drawn_by_the_seed():
    chosen = balanced_subset(LABELS, 0.1, seed=0)
    counts = np.bincount(LABELS[chosen], minlength=10)
    assert counts.tolist() == [10] * 5 + [5] * 4 + [100]  # round(0.1 x class size), per class
    assert np.array_equal(chosen, np.sort(chosen)) and len(np.unique(chosen)) == len(chosen)
    assert np.array_equal(chosen, balanced_subset(torch.from_numpy(LABELS), 0.1, seed=0))  # the seed decides
    assert not np.array_equal(chosen, balanced_subset(LABELS, 0.1, seed=1))


def test_every_class_keeps_one_image_and_fraction_one_is_everything():
    assert np.bincount(LABELS[balanced_subset(LABELS, 0.001)]).min() == 1
    assert np.array_equal(balanced_subset(LABELS, 1.0), np.arange(len(LABELS)))
    assert choose_labelled_subset(TensorImageDataset(torch.zeros(4, 1, 2, 2), torch.arange(4)), 1.0) is None


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_a_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match=rf"fraction={fraction} must be in \(0, 1\]"):
        balanced_subset(LABELS, fraction)


def test_unlabelled_images_have_no_labelled_subset():
    with pytest.raises(ValueError, match="no labels"):
        balanced_subset(np.full(10, -1), 0.5)


def test_a_subset_file_of_indices_round_trips(tmp_path):
    path = write_subset_file([7, 3, 11], tmp_path / "subset.txt", label_fraction=0.1)
    assert path.read_text().startswith("# label_fraction: 0.1\n")
    assert read_subset_file(path, files=None).tolist() == [3, 7, 11]
    with pytest.raises(ValueError, match="index 11 is out of range for the 5 training images"):
        read_subset_file(path, files=[f"{i}.png" for i in range(5)])


def test_a_subset_file_of_file_names_is_matched_by_base_name(tmp_path):
    files = [f"/data/train/n0{c}/n0{c}_{i}.JPEG" for c in range(3) for i in range(4)]
    (tmp_path / "1percent.txt").write_text("n01_2.JPEG\nn00_0.JPEG\n\n")
    assert read_subset_file(tmp_path / "1percent.txt", files).tolist() == [0, 6]
    (tmp_path / "bad.txt").write_text("n01_2.JPEG\nn09_9.JPEG\n")
    with pytest.raises(ValueError, match="1 of its 2 files are not in the training set .first: 'n09_9.JPEG'"):
        read_subset_file(tmp_path / "bad.txt", files)
    with pytest.raises(ValueError, match="give indices"):
        read_subset_file(tmp_path / "1percent.txt", files=None)
    with pytest.raises(ValueError, match="does not exist"):
        read_subset_file(tmp_path / "missing.txt", files)


def test_the_datamodule_restricts_its_labelled_training_images_only():
    datamodule = DigitsDataModule(image_size=8, batch_size=16, num_workers=0)
    datamodule.setup("fit")
    full = datamodule.labelled_train_dataset()
    labels = dataset_labels(full)
    chosen = balanced_subset(labels, 0.1, seed=0)
    datamodule.use_labelled_subset(chosen)
    for augment in (False, True):
        _, y = zip(*datamodule.eval_dataset("train", augment))
        assert sorted(y) == sorted(labels[chosen].tolist())
    assert len(datamodule.eval_dataset("val")) == 360  # the validation images stay whole
    x, y = datamodule.eval_dataset("train")[0]
    assert torch.equal(x, datamodule.eval_transform(full[int(chosen[0])][0])) and y == labels[chosen[0]]
    datamodule.use_labelled_subset(None)
    assert len(datamodule.eval_dataset("train")) == len(full)

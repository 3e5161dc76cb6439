import numpy as np
import pytest
import torch
from data_fakes import first_views

from moco_lightning.data import DigitsDataModule, digits_split, load_digits_images
from moco_lightning.transforms import DIGITS_MEAN, DIGITS_STD


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=32, seed=0)
    dm.setup("fit")
    return dm


def test_digits_are_real_images_scaled_to_unit_range_and_rgb():
    images, labels = load_digits_images(image_size=12)
    assert images.shape == (1797, 3, 12, 12) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.9
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_original_size_keeps_the_sklearn_pixels():
    from sklearn.datasets import load_digits

    images, _ = load_digits_images(image_size=8)
    expected = torch.from_numpy(load_digits().images / 16.0).float()
    assert torch.allclose(images[:, 0], expected)


def test_split_is_stratified_80_20_and_fixed():
    _, labels = load_digits_images(image_size=8)
    train_idx, val_idx = digits_split(labels)
    assert len(train_idx) == 1437 and len(val_idx) == 360
    assert not set(train_idx) & set(val_idx)
    all_counts = np.bincount(labels.numpy())
    val_counts = np.bincount(labels.numpy()[val_idx], minlength=10)
    assert np.all(np.abs(val_counts - 0.2 * all_counts) <= 1)
    again_train, again_val = digits_split(labels)
    assert np.array_equal(train_idx, again_train) and np.array_equal(val_idx, again_val)


def test_split_does_not_follow_the_run_seed():
    a, b = DigitsDataModule(seed=1), DigitsDataModule(seed=2)
    va = a.eval_dataset("val").base.labels
    vb = b.eval_dataset("val").base.labels
    assert torch.equal(a.eval_dataset("val").base.images, b.eval_dataset("val").base.images)
    assert torch.equal(va, vb)


def test_attributes_after_setup(digits):
    assert digits.num_classes == 10
    assert digits.image_size == 16
    assert digits.num_train_samples == 1437
    assert digits.augmentation == "digits"


@pytest.mark.parametrize("on_batches", [True, False], ids=["batch_augmentation", "per_image"])
def test_pretraining_batch_has_two_different_views_and_labels(on_batches):
    digits = DigitsDataModule(batch_size=32, seed=0, batch_augmentation=on_batches)
    torch.manual_seed(0)
    (x_q, x_k), y = first_views(digits)
    assert x_q.shape == x_k.shape == (32, 3, 16, 16)
    assert x_q.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == (32,)
    differ = (x_q - x_k).flatten(1).abs().amax(1) > 1e-3
    assert differ.float().mean() > 0.9


def test_pretraining_loader_drops_the_last_partial_batch(digits):
    loader = digits.train_dataloader()
    assert loader.drop_last and len(loader) == 1437 // 32


def test_eval_loaders_are_deterministic_labelled_and_complete(digits):
    val = digits.eval_val_dataloader()
    x1, y1 = next(iter(val))
    x2, y2 = next(iter(digits.eval_val_dataloader()))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert sum(len(y) for _, y in val) == 360
    assert sum(len(y) for _, y in digits.eval_train_dataloader()) == 1437
    # labels line up: the eval view is the normalised stored image of the same index
    base = digits.eval_dataset("val").base
    mean, std = torch.tensor(DIGITS_MEAN).view(3, 1, 1), torch.tensor(DIGITS_STD).view(3, 1, 1)
    assert torch.allclose(x1[0] * std + mean, base.images[0], atol=1e-5)
    assert torch.equal(y1, base.labels[: len(y1)])


def test_train_views_come_from_the_labelled_image():
    identity = lambda img: img  # noqa: E731 - a view transform that keeps the stored image
    dm = DigitsDataModule(batch_size=16, augmentation=identity, batch_augmentation=False)
    (x_q, x_k), y = next(iter(dm.train_dataloader()))
    base = dm.pretrain_dataset.base
    for img, label in zip(x_q, y, strict=True):
        match = (base.images - img).flatten(1).abs().amax(1) < 1e-6
        assert label in base.labels[match]
    assert torch.equal(x_q, x_k)


def test_batch_larger_than_dataset_is_a_clear_error():
    dm = DigitsDataModule(batch_size=5000)
    with pytest.raises(ValueError, match=r"fewer than batch_size=5000"):
        dm.train_dataloader()


def test_unknown_augmentation_names_the_setting():
    with pytest.raises(ValueError, match="augmentation=v9 is not a known augmentation"):
        DigitsDataModule(augmentation="v9")

import pytest
import torch
from data_fakes import first_views, write_cifar, write_stl10
from torchvision.transforms import v2

from moco_lightning.data import CIFAR10DataModule, CIFAR100DataModule, DatasetNotAvailableError, STL10DataModule
from moco_lightning.transforms import CIFAR10_MEAN, CIFAR10_STD

# a view transform that keeps the image as it is (float in [0, 1]): lets the tests read the label code back
AS_FLOAT = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def decoded_labels(x: torch.Tensor) -> torch.Tensor:
    """Invert the label code of conftest.label_image: value = 20 * label + 10 (x in [0, 1])."""
    return ((x.flatten(1).mean(1) * 255 - 10) / 20).round().long()


def test_cifar10_views_labels_and_shapes(tmp_path, skip_md5):
    dm = CIFAR10DataModule(data_dir=str(write_cifar(tmp_path)), download=False, batch_size=4, num_workers=0,
                           eval_batch_size=6)
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.image_size == 32 and dm.num_train_samples == 10
    torch.manual_seed(0)
    (x_q, x_k), y = first_views(dm)
    assert x_q.shape == x_k.shape == (4, 3, 32, 32) and x_q.dtype == torch.float32 and y.dtype == torch.int64
    assert not torch.equal(x_q, x_k)
    x, y = next(iter(dm.eval_val_dataloader()))
    assert x.shape == (6, 3, 32, 32)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.equal(decoded_labels(x * std + mean), y)
    assert y.tolist() == [(i + 3) % 10 for i in range(6)]


def test_cifar10_pretraining_pairs_keep_their_label(tmp_path, skip_md5):
    dm = CIFAR10DataModule(data_dir=str(write_cifar(tmp_path)), download=False, batch_size=5, num_workers=0,
                           augmentation=AS_FLOAT, batch_augmentation=False)
    (x_q, x_k), y = first_views(dm)
    assert torch.equal(decoded_labels(x_q), y) and torch.equal(decoded_labels(x_k), y)


def test_cifar100_reads_fine_labels_and_resizes_on_request(tmp_path, skip_md5):
    root = write_cifar(tmp_path, hundred=True)
    dm = CIFAR100DataModule(data_dir=str(root), download=False, batch_size=4, num_workers=0, image_size=16)
    dm.setup("fit")
    assert dm.num_classes == 100 and dm.num_train_samples == 12
    (x_q, _), _ = first_views(dm)
    assert x_q.shape == (4, 3, 16, 16)
    x, y = next(iter(dm.eval_train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 1, 2, 3]
    x_aug, _ = next(iter(dm.eval_train_dataloader(augment=True)))
    assert x_aug.shape == (4, 3, 16, 16)


def test_stl10_pretrains_on_train_plus_unlabeled_and_evaluates_on_test(tmp_path, skip_md5):
    dm = STL10DataModule(data_dir=str(write_stl10(tmp_path)), download=False, batch_size=5, num_workers=0,
                         image_size=24)
    dm.setup("fit")
    assert dm.num_train_samples == 6 + 4 and dm.num_classes == 10 and dm.image_size == 24
    (x_q, x_k), _ = first_views(dm)
    assert x_q.shape == x_k.shape == (5, 3, 24, 24)
    labels = sorted(int(label) for _, label in dm.pretrain_dataset.base)
    assert labels.count(-1) == 4
    x, y = next(iter(dm.eval_val_dataloader()))
    assert x.shape == (5, 3, 24, 24) and y.tolist() == [5, 6, 7, 8, 9]


def test_stl10_images_are_read_in_the_right_orientation(tmp_path, skip_md5):
    import numpy as np

    root = write_stl10(tmp_path)
    # overwrite the first test image with a left/right gradient: columns must stay columns
    img = np.tile(np.arange(96, dtype=np.uint8), (3, 96, 1))  # (3, H, W), value = column index
    data = bytearray((root / "stl10_binary" / "test_X.bin").read_bytes())
    data[: img.size] = np.ascontiguousarray(img.transpose(0, 2, 1)).tobytes()
    (root / "stl10_binary" / "test_X.bin").write_bytes(bytes(data))
    dm = STL10DataModule(data_dir=str(root), download=False, augmentation=AS_FLOAT, batch_augmentation=False)
    image, _ = dm.eval_dataset("val").base[0]
    assert np.asarray(image)[0, :5, 0].tolist() == [0, 1, 2, 3, 4]


def test_stl10_pretrain_split_is_validated():
    with pytest.raises(ValueError, match=r"pretrain_split='everything' must be"):
        STL10DataModule(pretrain_split="everything")


def test_files_that_fail_torchvisions_integrity_check_are_explained(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(write_cifar(tmp_path)), download=False, batch_size=2)
    with pytest.raises(DatasetNotAvailableError, match="CIFAR-10.*cifar-10-batches-py.*rejected"):
        dm.setup("fit")

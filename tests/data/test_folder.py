import io
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_fakes import first_views, label_image, write_image_folder
from PIL import Image
from torchvision.transforms import v2

from moco_lightning.data import (
    CorruptImageWarning,
    ImageFolderDataModule,
    ImageFolderDataset,
    ImageNetDataModule,
    SkippedImagesReport,
    scan_image_folder,
)
from moco_lightning.data.folder import FileIndex, merge_skip_counts

AS_FLOAT = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def decoded_labels(x):
    return ((x.flatten(1).mean(1) * 255 - 10) / 20).round().long()


def add_corrupt_files(folder):
    """A truncated PNG and a 'JPEG' that is not an image at all, inside class0."""
    buffer = io.BytesIO()
    Image.fromarray(label_image(0, 20)).save(buffer, format="PNG")
    truncated = folder / "class0" / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    garbage = folder / "class0" / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 10)
    return truncated, garbage


def test_class_subfolders_give_labels_and_two_views(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=4)
    dm = ImageFolderDataModule(data_dir=str(root), batch_size=4, num_workers=0, image_size=16, val_fraction=0.25)
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.classes == ["class0", "class1", "class2"]
    assert dm.num_train_samples == 9
    torch.manual_seed(0)
    (x_q, x_k), y = first_views(dm)
    assert x_q.shape == x_k.shape == (4, 3, 16, 16) and y.dtype == torch.int64
    assert not torch.equal(x_q, x_k)
    val_labels = [label for _, label in dm.eval_dataset("val").base.samples]
    assert sorted(val_labels) == [0, 1, 2]  # stratified hold-out: one of each class


def test_labels_line_up_with_the_images(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=2)
    dm = ImageFolderDataModule(data_dir=str(root), batch_size=6, num_workers=0, val_fraction=0.0,
                               augmentation=AS_FLOAT, batch_augmentation=False)
    (x_q, _), y = first_views(dm)
    assert torch.equal(decoded_labels(x_q), y)


def test_scan_skips_hidden_entries_and_folders_without_images(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=2)
    for hidden in (root / ".ipynb_checkpoints" / "a.png", root / "class0" / ".thumbs" / "b.png",
                   root / "class1" / ".c.png"):
        hidden.parent.mkdir(exist_ok=True)
        Image.fromarray(label_image(0, 8)).save(hidden)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("no images here")
    with pytest.warns(UserWarning, match=r"ignoring sub-folders without images: \['notes'\]"):
        samples, classes = scan_image_folder(root)
    assert classes == ["class0", "class1"] and len(samples) == 4
    assert [label for _, label in samples] == [0, 0, 1, 1]
    assert not any("/." in path for path, _ in samples)


def assert_array_index(dataset):
    """The dataset's files are three numpy arrays, not a Python object per file (copied into every worker)."""
    index = dataset.index
    assert isinstance(index, FileIndex)
    assert all(type(a) is np.ndarray for a in (index.names, index.offsets, index.labels))
    assert index.names.dtype == np.uint8 and index.offsets.dtype == index.labels.dtype == np.int64
    assert len(index.offsets) == len(index.labels) + 1 == len(dataset) + 1
    assert {name for name, value in vars(dataset).items() if isinstance(value, (list, tuple, dict))} == {"classes"}


def test_the_file_index_is_arrays_read_back_in_the_scan_order(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=4)
    scanned, _ = scan_image_folder(root)
    dm = ImageFolderDataModule(data_dir=str(root), batch_size=2, num_workers=0, val_fraction=0.25)
    dm.setup("fit")
    train, val = dm.eval_dataset("train").base, dm.eval_dataset("val").base
    for dataset in (train, val):
        assert_array_index(dataset)
        position = [scanned.index(pair) for pair in dataset.samples]  # every pair is a scanned one, in scan order
        assert position == sorted(position)
        assert dataset.targets == [label for _, label in dataset.samples] == dataset.index.labels.tolist()
        assert [dataset.index[i] for i in range(len(dataset))] == dataset.samples
    assert sorted(train.samples + val.samples) == sorted(scanned)
    assert train.index.prefix == str(root) + "/" and train.index.names.size < sum(len(p) for p, _ in train.samples)


def test_file_index_round_trips_any_path_and_takes_subsets():
    odd = "/data/b/" + os.fsdecode(b"caf\xe9.jpg")  # not UTF-8: kept through os.fsencode / os.fsdecode
    samples = [("/data/a/x.jpg", 0), ("/data/a/ü y.png", 1), (odd, 2), ("/data/top.jpg", -1)]
    index = FileIndex.from_samples(samples)
    assert index.prefix == "/data/" and list(index) == samples and index[-1] == samples[-1]
    assert list(index.subset([3, 0, 2])) == [samples[3], samples[0], samples[2]] and len(index.subset([])) == 0
    with pytest.raises(IndexError):
        index.path(4)
    dataset = ImageFolderDataset(samples)  # a list of pairs still works, and becomes arrays
    assert_array_index(dataset)
    assert dataset.samples == samples


def test_val_dir_and_eval_view_resize_then_centre_crop(tmp_path):
    train = write_image_folder(tmp_path / "train", classes=2, per_class=3, size=40)
    val = write_image_folder(tmp_path / "val", classes=2, per_class=2, size=30)
    dm = ImageFolderDataModule(data_dir=str(train), val_dir=str(val), batch_size=2, num_workers=0,
                               image_size=16, eval_batch_size=10)
    x, y = next(iter(dm.eval_val_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 1, 1]
    assert isinstance(dm.eval_transform.transforms[1], v2.CenterCrop)
    assert dm.eval_transform.transforms[0].size == [round(16 / 0.875)]


def test_flat_folder_pretrains_and_evaluates_without_labels(tmp_path):
    for j in range(6):
        Image.fromarray(label_image(j, 12)).save(tmp_path / f"{j}.jpg")
    dm = ImageFolderDataModule(data_dir=str(tmp_path), batch_size=4, num_workers=0, image_size=8, val_fraction=0.2)
    dm.setup("fit")
    assert dm.num_classes == 0 and not dm.has_labels and dm.num_train_samples == 5  # one image held out
    (x_q, _), y = first_views(dm)
    assert x_q.shape == (4, 3, 8, 8) and y.tolist() == [-1] * 4
    x, y = next(iter(dm.eval_val_dataloader()))  # the label-free diagnostics read these
    assert x.shape == (1, 3, 8, 8) and y.tolist() == [-1]
    with pytest.raises(ValueError, match="linear probe needs labelled images.*<class name>"):
        dm.require_labels("the linear probe")
    train, val = dm.eval_dataset("train").base, dm.eval_dataset("val").base
    assert_array_index(train)
    assert sorted(train.samples + val.samples) == [(str(tmp_path / f"{j}.jpg"), -1) for j in range(6)]


def test_one_sub_folder_or_labels_none_is_unlabelled(tmp_path):
    write_image_folder(tmp_path / "one", classes=1, per_class=3)
    samples, classes = scan_image_folder(tmp_path / "one")
    assert classes == [] and len(samples) == 3 and {label for _, label in samples} == {-1}
    root = write_image_folder(tmp_path / "two", classes=2, per_class=2)
    Image.fromarray(label_image(0, 12)).save(root / "loose.png")
    with pytest.warns(UserWarning, match="ignoring 1 images"):
        assert scan_image_folder(root)[1] == ["class0", "class1"]
    samples, classes = scan_image_folder(root, labels="none")  # every image below the folder, nested ones too
    assert classes == [] and len(samples) == 5
    with pytest.raises(ValueError, match=r"labels='folders' must be one of"):
        ImageFolderDataModule(data_dir=str(root), labels="folders")


def test_missing_folder_is_a_clear_error_at_setup(tmp_path):
    dm = ImageFolderDataModule(data_dir=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"^data_dir=.*nope.*does not exist.*<class name>"):
        dm.setup("fit")


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="empty folder.*<class name>"):
        ImageFolderDataModule(data_dir=str(tmp_path)).setup("fit")
    (tmp_path / "class0").mkdir()
    with pytest.raises(ValueError, match="no files"):
        scan_image_folder(tmp_path)


def test_folder_without_known_image_formats_is_a_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("hello")
    (tmp_path / "b.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"2 files but none with a known image extension \(.jpg"):
        ImageFolderDataModule(data_dir=str(tmp_path)).setup("fit")


def test_corrupt_images_are_skipped_warned_once_and_counted(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=3)
    truncated, garbage = add_corrupt_files(root)
    dm = ImageFolderDataModule(data_dir=str(root), batch_size=4, num_workers=0, image_size=8, val_fraction=0.0)
    with pytest.warns(CorruptImageWarning) as record:
        batches = list(dm.train_dataloader())
    assert all(y.shape == (4,) for _, y in batches) and len(batches) == 2  # 8 files, all batches full
    messages = [str(w.message) for w in record if w.category is CorruptImageWarning]
    assert len(messages) == 2
    assert any(str(truncated) in m for m in messages) and any(str(garbage) in m for m in messages)
    count, bad = dm.pop_skipped_images()
    assert count == 2 and bad == sorted([str(garbage), str(truncated)])
    assert dm.pop_skipped_images()[0] == 0  # reset after reading
    # second epoch: skipped again (counted) but not warned again
    import warnings

    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        list(dm.train_dataloader())
    assert not [w for w in again if w.category is CorruptImageWarning]
    assert dm.pop_skipped_images()[0] == 2


@pytest.mark.timeout(120)
def test_skips_in_worker_processes_are_counted(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=3)
    add_corrupt_files(root)
    dm = ImageFolderDataModule(data_dir=str(root), batch_size=4, num_workers=2, persistent_workers=False,
                               image_size=8, val_fraction=0.0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    count, bad = dm.pop_skipped_images()
    assert count == 2 and len(bad) == 2


def test_skipped_images_report_warns_at_epoch_end_per_pass(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=3)
    add_corrupt_files(root)
    dm = ImageFolderDataModule(data_dir=str(root), batch_size=8, num_workers=0, image_size=8, val_fraction=0.0)
    with pytest.warns(CorruptImageWarning):
        list(dm.train_dataloader())
    list(dm.eval_train_dataloader())  # the evaluation pass over the same files: skipped again, not warned again
    assert {name: count for name, (count, _) in dm.pop_skipped_by_pass().items()} == {"pretraining": 2,
                                                                                      "evaluation": 2}
    list(dm.train_dataloader())
    trainer = SimpleNamespace(datamodule=dm, current_epoch=3, world_size=1)
    with pytest.warns(CorruptImageWarning, match="epoch 3: skipped 2 unreadable images in the pretraining pass"):
        SkippedImagesReport().on_train_epoch_end(trainer, None)
    assert dm.pop_skipped_images()[0] == 0


def test_skip_counts_of_all_processes_are_summed(monkeypatch):
    reports = [{"pretraining": (1, ["/a.jpg"])}, {"pretraining": (1, ["/b.jpg"]), "evaluation": (2, ["/b.jpg"])},
               {"pretraining": (1, ["/c.jpg"])}]
    assert merge_skip_counts(reports) == {"pretraining": (3, ["/a.jpg", "/b.jpg", "/c.jpg"]),
                                          "evaluation": (2, ["/b.jpg"])}
    # the callback reports what the gather of the 3 processes (all_gather_object under DDP) brings together
    import moco_lightning.data.folder as folder_module

    monkeypatch.setattr(folder_module, "_all_gather", lambda report, trainer: reports)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(pop_skipped_by_pass=dict), current_epoch=0, world_size=3)
    with pytest.warns(CorruptImageWarning) as record:
        SkippedImagesReport().on_train_epoch_end(trainer, None)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert "skipped 2 unreadable images in the evaluation pass (1 distinct files" in messages[0]
    assert "skipped 3 unreadable images in the pretraining pass (3 distinct files" in messages[1]


def test_a_folder_of_only_corrupt_images_raises_instead_of_looping(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.png").write_bytes(b"nope")
    (tmp_path / "c" / "empty.jpg").write_bytes(b"")
    dm = ImageFolderDataModule(data_dir=str(tmp_path), batch_size=1, num_workers=0, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"none of its 2 image files can be decoded \(first: bad.png"):
        dm.setup("fit")  # refused before training, from the main process
    dataset = ImageFolderDataset([(str(tmp_path / "c" / "bad.png"), -1)])
    with pytest.warns(CorruptImageWarning), pytest.raises(ValueError, match="none of the 1 images"):
        dataset[0]  # a folder whose files all break later still ends, with a clear error


def test_imagenet_layout_train_and_val(tmp_path):
    write_image_folder(tmp_path / "train", classes=2, per_class=3, size=24)
    write_image_folder(tmp_path / "val", classes=2, per_class=1, size=24)
    dm = ImageNetDataModule(data_dir=str(tmp_path), batch_size=2, num_workers=0, image_size=16)
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.num_train_samples == 6
    (x_q, x_k), _ = first_views(dm)
    assert x_q.shape == (2, 3, 16, 16)
    x, y = next(iter(dm.eval_val_dataloader()))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1]
    mean = np.asarray(dm.mean)
    assert np.allclose(mean, (0.485, 0.456, 0.406))


def test_imagenet_flat_val_folder_explains_the_fix(tmp_path):
    write_image_folder(tmp_path / "train", classes=2, per_class=1)
    (tmp_path / "val").mkdir()
    Image.fromarray(label_image(0, 8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ValueError, match="valprep"):
        ImageNetDataModule(data_dir=str(tmp_path)).setup("fit")


def test_imagenet_missing_split_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train.*does not exist\. Set data_dir to"):
        ImageNetDataModule(data_dir=str(tmp_path)).setup("fit")

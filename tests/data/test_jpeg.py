"""Crops taken while decoding (decode="draft"): torchvision's boxes, the exact path's pixels up to resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from moco_lightning.data import ImageFolderDataModule
from moco_lightning.data.decode import decode_image
from moco_lightning.data.jpeg import CropDecoder, decode_crops, largest_reduction


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """scikit-learn's china.jpg (640x427), re-encoded at quality 90: a real photograph."""
    from sklearn.datasets import load_sample_image

    path = tmp_path_factory.mktemp("photo") / "china.jpg"
    Image.fromarray(load_sample_image("china.jpg")).save(path, quality=90)
    return path


def crops(size: int, n: int = 2) -> list[v2.RandomResizedCrop]:
    return [v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True) for _ in range(n)]


def exact(path, boxes, views) -> list[np.ndarray]:
    """The exact path: the whole image decoded, then torchvision's crop-and-resize kernel."""
    image = decode_image(path)
    return [np.asarray(F.resized_crop(image, **box, size=list(view.size), antialias=True), dtype=float)
            for box, view in zip(boxes, views, strict=True)]


def test_largest_reduction_keeps_every_box_at_least_the_output_size():
    out = (64, 64)
    assert largest_reduction([{"height": 300, "width": 260}], [out]) == 4
    assert largest_reduction([{"height": 128, "width": 500}], [out]) == 2
    assert largest_reduction([{"height": 127, "width": 500}], [out]) == 1
    assert largest_reduction([{"height": 520, "width": 520}, {"height": 130, "width": 200}], [out, out]) == 2


def test_without_a_reduction_the_crops_are_the_exact_paths_pixel_for_pixel(photo):
    views = crops(224)  # at 640x427 no box is 448 pixels tall: nothing can be reduced
    decoder = CropDecoder(views)
    image = decode_image(photo)
    for seed in range(5):
        torch.manual_seed(seed)
        drafted = decoder(photo)
        assert decoder.last_reduction == 1
        torch.manual_seed(seed)  # the same generator state draws the same boxes as torchvision's transform
        expected = [view(image) for view in views]
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(drafted, expected, strict=True))


def test_reduced_decodes_match_the_exact_crops_up_to_resampling(photo):
    views = crops(64)
    reductions = []
    for seed in range(12):
        torch.manual_seed(seed)
        boxes = [view.make_params([torch.empty(3, 427, 640)]) for view in views]
        drafted, reduction = decode_crops(photo, views, boxes=boxes)
        reductions.append(reduction)
        assert reduction == largest_reduction(boxes, [view.size for view in views])
        for got, want in zip(drafted, exact(photo, boxes, views), strict=True):
            assert got.size == (64, 64)
            diff = np.abs(np.asarray(got, dtype=float) - want)
            assert diff.mean() < 4.0, f"seed {seed}, reduction {reduction}: mean abs difference {diff.mean():.2f}"
    assert max(reductions) >= 4  # the comparison covered real reductions (boxes of 0.2-1 of 640x427 at 64 px)


def test_tensor_crops_are_the_exact_paths_up_to_rounding(photo):
    views = crops(224)  # nothing reduced: libjpeg-turbo into a tensor, torch's resize
    for seed in range(5):
        torch.manual_seed(seed)
        boxes = [view.make_params([torch.empty(3, 427, 640)]) for view in views]
        got, reduction = decode_crops(photo, views, boxes=boxes, output="tensor")
        assert reduction == 1
        for tensor, want in zip(got, exact(photo, boxes, views), strict=True):
            assert tensor.dtype == torch.uint8 and tensor.shape == (3, 224, 224) and tensor.is_contiguous()
            diff = np.abs(tensor.permute(1, 2, 0).numpy().astype(float) - want)
            assert diff.max() <= 1 and diff.mean() < 0.5, f"seed {seed}: {diff.max()}, {diff.mean():.3f}"


def test_tensor_output_of_reduced_grey_and_turned_files(tmp_path, photo):
    grey = tmp_path / "grey.jpg"
    Image.open(photo).convert("L").save(grey, quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = tmp_path / "turned.jpg"
    Image.open(photo).save(turned, quality=90, exif=exif)
    for path, size, shape in ((photo, 32, (3, 32, 32)), (grey, 224, (3, 224, 224)), (turned, 32, (3, 32, 32))):
        views = crops(size)
        torch.manual_seed(0)
        got, reduction = decode_crops(path, views, output="tensor")
        torch.manual_seed(0)
        pil, same = decode_crops(path, views, output="pil")
        assert reduction == same and all(t.shape == shape and t.dtype == torch.uint8 for t in got)
        if reduction > 1 or path == turned:  # decoded by PIL: the PIL crops as tensors
            assert all(torch.equal(t, F.pil_to_tensor(p)) for t, p in zip(got, pil, strict=True))
        else:
            assert all((t.int() - F.pil_to_tensor(p).int()).abs().max() <= 1 for t, p in zip(got, pil, strict=True))
    with pytest.raises(ValueError, match="output='numpy'"):
        CropDecoder(crops(32), output="numpy")


def test_a_turned_photo_is_cropped_upright_as_the_exact_path_does(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    turned = tmp_path / "turned.jpg"
    Image.open(photo).save(turned, quality=90, exif=exif)
    views = crops(32)
    torch.manual_seed(0)
    drafted, reduction = decode_crops(turned, views)
    torch.manual_seed(0)
    upright = decode_image(turned)
    assert upright.size == (427, 640) and reduction == 1
    assert all(np.array_equal(np.asarray(a), np.asarray(view(upright)))
               for a, view in zip(drafted, views, strict=True))


def write_jpegs(folder, photo, count: int = 3, size: tuple[int, int] = (100, 80)):
    folder.mkdir()
    source = Image.open(photo)
    for i in range(count):
        source.resize(size, box=(40 * i, 20 * i, 40 * i + 400, 20 * i + 320)).save(folder / f"{i}.jpg", quality=90)
    return folder


def test_draft_and_exact_datamodules_give_the_same_batched_crops(tmp_path, photo):
    root = write_jpegs(tmp_path / "imgs", photo)  # 100x80 at 48 px: no reduction, the same pixels up to rounding
    items = {}
    for decode in ("draft", "exact"):
        dm = ImageFolderDataModule(str(root), decode=decode, val_fraction=0.0, image_size=48, batch_size=2,
                                   num_workers=0)
        dm.setup("fit")
        torch.manual_seed(0)
        items[decode] = dm.pretrain_dataset[1][0]
    assert all(view.shape == (3, 48, 48) and view.dtype == torch.uint8 for view in items["draft"])
    assert all((a.int() - b.int()).abs().max() <= 1 for a, b in zip(items["draft"], items["exact"], strict=True))
    draft = ImageFolderDataModule(str(root), decode="draft", image_size=48)
    assert draft.crop_plan()[0].output == "tensor"  # torch's crops of libjpeg-turbo's decode


def test_draft_per_image_views_and_whole_image_evaluation(tmp_path, photo):
    root = write_jpegs(tmp_path / "imgs", photo, size=(200, 160))
    dm = ImageFolderDataModule(str(root), decode="draft", batch_augmentation=False, val_fraction=0.0, image_size=32,
                               batch_size=2, num_workers=0)
    dm.setup("fit")
    torch.manual_seed(0)
    views, _ = dm.pretrain_dataset[0]
    assert [view.shape for view in views] == [(3, 32, 32)] * 2 and views[0].dtype == torch.float32
    assert isinstance(dm.pretrain_dataset.base.decoder, CropDecoder)
    evaluation = dm.eval_dataset("train")
    assert evaluation.base.decoder is None  # the evaluation view decodes whole images
    assert evaluation[0][0].shape == (3, 32, 32)


def test_an_unknown_decode_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"decode='fast'.*'draft'.*'exact'"):
        ImageFolderDataModule(str(tmp_path), decode="fast")

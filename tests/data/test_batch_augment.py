"""The batched augmentation: same operations and same parameter distributions as the per-image pipelines."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from data_fakes import write_image_folder
from PIL import Image
from torchvision.transforms import v2

from moco_lightning.data import DigitsDataModule, ImageFolderDataModule
from moco_lightning.data.batch_augment import (
    RandomAffine,
    RandomColorJitter,
    RandomGaussianBlur,
    RandomGrayscale,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomSolarize,
    batch_view_from_transform,
    build_batch_augmentation,
)
from moco_lightning.transforms import build_view_transforms

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def images(n: int = 8, size: int = 12) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ each operation computes what torchvision computes
def test_crop_is_torchvisions_crop_then_resize():
    x = images(16)
    crop = RandomResizedCrop(12, scale=(0.08, 1.0))
    p = crop.sample(16, (12, 12))
    expected = torch.stack([TF.resized_crop(x[i], int(p["top"][i]), int(p["left"][i]), int(p["height"][i]),
                                            int(p["width"][i]), [12, 12], antialias=True) for i in range(16)])
    torch.testing.assert_close(crop.apply(x, p), expected, atol=1e-5, rtol=0)


def test_affine_is_torchvisions_affine():
    x = images(16)
    affine = RandomAffine((-10, 10), translate=(0.1, 0.1), scale=(0.9, 1.1), shear=(-5, 5, -3, 3))
    p = affine.sample(16, (12, 12))
    expected = torch.stack([
        TF.affine(x[i], angle=float(p["angle"][i]), translate=[int(p["tx"][i]), int(p["ty"][i])],
                  scale=float(p["scale"][i]), shear=[float(p["shear_x"][i]), float(p["shear_y"][i])],
                  interpolation=v2.InterpolationMode.BILINEAR, fill=0) for i in range(16)])
    torch.testing.assert_close(affine.apply(x, p), expected, atol=1e-5, rtol=0)


def test_colour_jitter_applies_torchvisions_adjustments_in_each_images_order():
    x = images(8)
    jitter = RandomColorJitter((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1), p=0.8)
    p = jitter.sample(8, (12, 12))
    kernels = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]
    expected = []
    for i in range(8):
        img = x[i]
        if p["applied"][i]:
            for op in p["order"][i].tolist():
                img = kernels[op](img, float(p[names[op]][i]))
        expected.append(img)
    assert 0 < int(p["applied"].sum()) < 8 and len({tuple(o) for o in p["order"].tolist()}) > 1
    torch.testing.assert_close(jitter.apply(x, p), torch.stack(expected), atol=2e-4, rtol=0)


def test_grayscale_solarize_and_flip_are_torchvisions():
    x = images(8)
    for op, kernel in [(RandomGrayscale(0.5), lambda im: TF.rgb_to_grayscale(im, num_output_channels=3)),
                       (RandomSolarize(0.5, 0.5), lambda im: TF.solarize(im, 0.5)),
                       (RandomHorizontalFlip(0.5), TF.horizontal_flip)]:
        p = op.sample(8, (12, 12))
        expected = torch.stack([kernel(x[i]) if p["applied"][i] else x[i] for i in range(8)])
        torch.testing.assert_close(op.apply(x, p), expected, atol=1e-6, rtol=0)


def test_blur_is_a_gaussian_of_the_drawn_sigma():
    x = images(8, size=16)
    blur = RandomGaussianBlur((0.1, 2.0), p=1.0)
    p = blur.sample(8, (16, 16))
    expected = torch.stack([TF.gaussian_blur(x[i], [2 * math.ceil(3 * s) + 1] * 2, [s, s])
                            for i, s in enumerate(p["sigma"].tolist())])
    # one 13-tap kernel for all images vs a kernel of 2 ceil(3 sigma) + 1 taps per image: the extra taps are tiny
    torch.testing.assert_close(blur.apply(x, p), expected, atol=5e-4, rtol=0)
    assert blur.kernel_size((16, 16)) == 13 and blur.kernel_size((8, 8)) == 7


# ------------------------------------------------------------------ same parameter distributions as the per-image path
class PerImageSpy:
    """Run a per-image pipeline and record what its random steps drew (crop boxes, factors, applied or not)."""

    def __init__(self, pipeline: v2.Compose, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pipeline = pipeline
        self.draws: dict[str, list[float]] = {}
        self.calls = 0
        self.crop: v2.RandomResizedCrop | None = None
        for step in pipeline.transforms:
            inner = step.transforms[0] if isinstance(step, v2.RandomApply) else step
            if isinstance(inner, (v2.RandomResizedCrop, v2.ColorJitter, v2.RandomGrayscale, v2.RandomHorizontalFlip,
                                  v2.RandomAffine)):
                inner.make_params = self._recording(type(inner).__name__, inner.make_params)
            if isinstance(inner, v2.RandomResizedCrop):
                self.crop = inner
        for name in ("gaussian_blur", "solarize"):
            monkeypatch.setattr(v2.functional, name, self._recording_kernel(name, getattr(v2.functional, name)))

    def _add(self, key: str, value: float) -> None:
        self.draws.setdefault(key, []).append(float(value))

    def _recording(self, name, make_params):
        def wrapped(flat_inputs):
            params = make_params(flat_inputs)
            if name != "RandomResizedCrop":  # always applied; more boxes are drawn by more_crops
                self._add(f"{name}.applied", 1)
            for key, value in params.items():
                if key == "fn_idx":
                    self._add(f"{name}.first_op", int(value[0]))
                elif key in ("translate", "shear"):
                    for axis, v in zip("xy", value):
                        self._add(f"{name}.{key}_{axis}", v)
                elif value is not None and key != "num_input_channels":
                    self._add(f"{name}.{key}", value)
            return params
        return wrapped

    def _recording_kernel(self, name, kernel):
        def wrapped(img, *args, **kwargs):
            self._add(f"{name}.applied", 1)
            if "sigma" in kwargs:
                self._add(f"{name}.sigma", kwargs["sigma"][0])
            return kernel(img, *args, **kwargs)
        return wrapped

    def run(self, image: torch.Tensor, n: int) -> None:
        for _ in range(n):
            self.pipeline(image)
        self.calls += n

    def more_crops(self, image: torch.Tensor, n: int) -> None:
        """Draw n more crop boxes from the pipeline's own crop (cheap: no image is transformed)."""
        if self.crop is not None:
            for _ in range(n):
                self.crop.make_params([image])


def batched_draws(view, n: int, size: int) -> dict[str, torch.Tensor]:
    """The same quantities as PerImageSpy records, drawn by the batched operations for n images at once."""
    g = torch.Generator().manual_seed(2)
    out: dict[str, torch.Tensor] = {}
    names = {RandomResizedCrop: "RandomResizedCrop", RandomColorJitter: "ColorJitter",
             RandomGrayscale: "RandomGrayscale", RandomHorizontalFlip: "RandomHorizontalFlip",
             RandomAffine: "RandomAffine", RandomGaussianBlur: "gaussian_blur", RandomSolarize: "solarize"}
    for op in view.ops:
        name, p = names[type(op)], op.sample(n, (size, size), g)
        if isinstance(op, RandomResizedCrop):
            out.update({f"{name}.{k}": p[k] for k in ("top", "left", "height", "width")})
        elif isinstance(op, RandomColorJitter):
            out[f"{name}.applied"] = p["applied"]
            out[f"{name}.first_op"] = p["order"][:, 0]
            for k in ("brightness", "contrast", "saturation", "hue"):
                if k in p:
                    out[f"{name}.{k}_factor"] = p[k]
        elif isinstance(op, RandomAffine):
            out.update({f"{name}.angle": p["angle"], f"{name}.scale": p["scale"], f"{name}.translate_x": p["tx"],
                        f"{name}.translate_y": p["ty"], f"{name}.shear_x": p["shear_x"],
                        f"{name}.shear_y": p["shear_y"], f"{name}.applied": torch.ones(n, dtype=torch.bool)})
        else:
            out[f"{name}.applied"] = p["applied"]
            if "sigma" in p:
                out[f"{name}.sigma"] = p["sigma"]
    return out


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance between the empirical distributions of a and b."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b, points, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


RECIPES = {  # name: (augmentation, keywords, view index)
    "v1": ("v1", {}, 0),
    "v2": ("v2", {}, 0),
    "v2 CIFAR (no blur, scale 0.08-1)": ("v2", {"blur_prob": 0.0, "crop_scale": (0.08, 1.0)}, 0),
    "v3 view 1": ("v3", {}, 0),
    "v3 view 2": ("v3", {}, 1),
    "digits": ("digits", {}, 0),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_batched_parameters_follow_the_per_image_distributions(recipe, monkeypatch):
    name, kwargs, view = RECIPES[recipe]
    size, n_cpu, n_batch = 12, 800, 20000
    torch.set_num_threads(1)  # tiny per-image tensors: one thread is several times faster on a busy machine
    pipeline = build_view_transforms(name, size, MEAN, STD, **kwargs)[view]
    batched = batched_draws(batch_view_from_transform(pipeline), n_batch, size)
    spy = PerImageSpy(pipeline, monkeypatch)
    spy.run(images(1, size)[0], n_cpu)
    spy.more_crops(images(1, size)[0], 4000)  # the crop law has the most shape: a finer comparison

    # crop scale and aspect ratio (from the boxes), jitter factors, blur sigma, affine parameters: same law
    derived_cpu, derived_batch = {}, {}
    for draws, derived in ((spy.draws, derived_cpu), (batched, derived_batch)):
        d = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in draws.items()}
        if "RandomResizedCrop.height" in d:
            derived["crop scale"] = d["RandomResizedCrop.height"] * d["RandomResizedCrop.width"] / size**2
            derived["crop log-ratio"] = (d["RandomResizedCrop.width"] / d["RandomResizedCrop.height"]).log()
            derived["crop offset"] = d["RandomResizedCrop.top"]
        derived.update({k: v for k, v in d.items() if not k.startswith("RandomResizedCrop")
                        and not k.endswith(".applied") and not k.endswith("first_op")})
    assert set(derived_cpu) == set(derived_batch), (sorted(derived_cpu), sorted(derived_batch))
    for key in derived_cpu:
        limit = 1.95 * math.sqrt(1 / len(derived_cpu[key]) + 1 / len(derived_batch[key]))  # KS test at 0.1 %
        assert ks_statistic(derived_cpu[key], derived_batch[key]) < limit, key

    # probability of each operation (jitter, grayscale, blur, solarize, flip) and of each jitter op coming first
    keys = {k for k in list(spy.draws) + list(batched) if k.endswith(".applied")}
    for key in keys:
        rate_cpu = len(spy.draws.get(key, [])) / spy.calls
        rate_batch = float(batched[key].double().mean()) if key in batched else 0.0
        spread = math.sqrt(max(rate_batch * (1 - rate_batch), 1e-4) * (1 / spy.calls + 1 / n_batch))
        assert abs(rate_cpu - rate_batch) < 4.5 * spread, (key, rate_cpu, rate_batch)
    if "ColorJitter.first_op" in batched:
        for op in range(4):
            cpu = torch.tensor(spy.draws["ColorJitter.first_op"]).eq(op).double().mean()
            assert abs(float(cpu) - float(batched["ColorJitter.first_op"].eq(op).double().mean())) < 0.06


# ------------------------------------------------------------------ the views and the datamodule
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_views_are_normalised_float32_of_the_output_size(dtype):
    aug = build_batch_augmentation("v2", 8, MEAN, STD)
    x = images(4, 12)
    x = (x * 255).to(torch.uint8) if dtype == torch.uint8 else x
    view_1, view_2 = aug(x, torch.Generator().manual_seed(0))
    assert view_1.shape == view_2.shape == (4, 3, 8, 8) and view_1.dtype == torch.float32
    assert not torch.equal(view_1, view_2)


def test_the_hook_augments_training_batches_only():
    dm = DigitsDataModule(batch_size=8, image_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (8, 3, 8, 8)  # the loader gives the stored images, once
    dm.trainer = SimpleNamespace(training=False)
    assert dm.on_after_batch_transfer(batch, 0) is batch
    progress = SimpleNamespace(total=SimpleNamespace(ready=5))  # 5 batches fetched before this one
    dm.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1,
                                 fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
    (x_q, x_k), y = dm.on_after_batch_transfer(batch, 0)
    assert x_q.shape == x_k.shape == (8, 3, 8, 8) and torch.equal(y, batch[1])
    (again_q, again_k), _ = dm.augment_batch(batch, index=5)
    assert torch.equal(again_q, x_q) and torch.equal(again_k, x_k)  # batch 5's draws depend on nothing else


def test_batch_augmentation_draws_depend_on_seed_rank_and_batch_index_only():
    dm = DigitsDataModule(batch_size=8, image_size=8, seed=3)
    batch = next(iter(dm.train_dataloader()))
    views = {index: dm.augment_batch(batch, index)[0][0] for index in (0, 1, 0)}
    other_seed = DigitsDataModule(batch_size=8, image_size=8, seed=4).augment_batch(batch, 0)[0][0]
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[0], other_seed)
    assert torch.equal(views[0], dm.augment_batch(batch, 0)[0][0])  # the same index again: the same views
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    assert not torch.equal(views[0], dm.augment_batch(batch, 0)[0][0])  # another process: other draws


def test_images_of_any_size_are_cropped_in_the_loader(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=2, size=20)
    Image.new("RGB", (30, 24), (90, 90, 90)).save(root / "class0" / "wide.png")
    dm = ImageFolderDataModule(data_dir=str(root), batch_size=5, num_workers=0, image_size=8, val_fraction=0.0)
    (crops_1, crops_2), y = next(iter(dm.train_dataloader()))
    assert crops_1.dtype == torch.uint8 and crops_1.shape == crops_2.shape == (5, 3, 8, 8)
    assert not dm.batch_augment.crop_on_device
    (x_q, x_k), _ = dm.augment_batch(((crops_1, crops_2), y))
    assert x_q.dtype == torch.float32 and x_q.shape == (5, 3, 8, 8)


def test_a_callable_augmentation_needs_the_per_image_path():
    with pytest.raises(ValueError, match="batch_augmentation"):
        DigitsDataModule(augmentation=lambda img: img)
    DigitsDataModule(augmentation=lambda img: img, batch_augmentation=False)

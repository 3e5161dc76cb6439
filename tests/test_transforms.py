import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from moco_lightning.transforms import (
    AUGMENTATIONS,
    DATASET_STATS,
    DEFAULT_IMAGE_SIZE,
    DIGITS_MEAN,
    DIGITS_STD,
    GaussianBlur,
    RandomSolarize,
    TwoViewTransform,
    build_view_transforms,
    digits_transform,
    eval_transform,
    linear_train_transform,
    moco_v1_transform,
    moco_v2_transform,
    moco_v3_transforms,
)


def flat(compose):
    """All transforms of a Compose, RandomApply unpacked as (inner, p)."""
    out = []
    for t in compose.transforms:
        if isinstance(t, v2.RandomApply):
            out.extend((inner, t.p) for inner in t.transforms)
        else:
            out.append((t, 1.0))
    return out


def find(compose, kind):
    return [(t, p) for t, p in flat(compose) if isinstance(t, kind)]


def photo(size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_v1_matches_the_paper():
    t = moco_v1_transform(32)
    (crop, _), = find(t, v2.RandomResizedCrop)
    assert crop.scale == (0.2, 1.0) and crop.size == (32, 32)
    (gray, _), = find(t, v2.RandomGrayscale)
    assert gray.p == 0.2
    (jitter, p), = find(t, v2.ColorJitter)
    assert p == 1.0 and jitter.brightness == (0.6, 1.4) and jitter.saturation == (0.6, 1.4)
    assert jitter.contrast == (0.6, 1.4) and jitter.hue == (-0.4, 0.4)
    assert find(t, v2.RandomHorizontalFlip) and not find(t, GaussianBlur)


def test_v2_aug_plus_matches_the_paper():
    t = moco_v2_transform(224)
    (jitter, p), = find(t, v2.ColorJitter)
    assert p == 0.8 and jitter.hue == (-0.1, 0.1) and jitter.brightness == (0.6, 1.4)
    (blur, p_blur), = find(t, GaussianBlur)
    assert p_blur == 0.5 and blur.sigma == (0.1, 2.0)
    assert find(t, v2.RandomGrayscale)[0][0].p == 0.2
    assert find(t, v2.RandomResizedCrop)[0][0].scale == (0.2, 1.0)
    assert find(t, v2.RandomHorizontalFlip)


def test_v3_pair_is_asymmetric():
    view_1, view_2 = moco_v3_transforms(96)
    assert find(view_1, GaussianBlur)[0][1] == 1.0 and find(view_2, GaussianBlur)[0][1] == 0.1
    assert find(view_1, RandomSolarize)[0][0].p == 0.0
    solarize = find(view_2, RandomSolarize)[0][0]
    assert solarize.p == 0.2 and solarize.threshold == 0.5
    for view in (view_1, view_2):
        (jitter, p), = find(view, v2.ColorJitter)
        assert p == 0.8 and jitter.saturation == (0.8, 1.2) and jitter.hue == (-0.1, 0.1)
        # the official --crop-min default (the ViT runs); the ResNet-50 runs pass 0.2
        assert tuple(find(view, v2.RandomResizedCrop)[0][0].scale) == (0.08, 1.0)


def test_digits_augmentation_never_flips_or_drops_colour():
    t = digits_transform(16)
    assert not find(t, v2.RandomHorizontalFlip) and not find(t, v2.RandomGrayscale)
    assert not find(t, GaussianBlur)
    assert find(t, v2.RandomResizedCrop)[0][0].scale == (0.7, 1.0)
    assert find(t, v2.RandomAffine)


@pytest.mark.parametrize("name", AUGMENTATIONS)
@pytest.mark.parametrize("make_input", [lambda: photo(), lambda: torch.rand(3, 20, 20),
                                        lambda: torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)])
def test_every_augmentation_gives_normalised_float_views_of_the_crop_size(name, make_input):
    torch.manual_seed(0)
    view_1, view_2 = build_view_transforms(name, 12)
    img = make_input()
    for view in (view_1, view_2):
        out = view(img)
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 12, 12)
        assert torch.isfinite(out).all()


def test_two_view_transform_draws_independent_views():
    torch.manual_seed(0)
    pair = TwoViewTransform(moco_v2_transform(16))
    first, second = pair(photo())
    assert first.shape == second.shape == (3, 16, 16)
    assert not torch.equal(first, second)


def test_two_view_transform_uses_both_transforms_in_order():
    pair = TwoViewTransform(lambda x: x + 1, lambda x: x * 10)
    assert pair(torch.tensor(2.0)) == [3.0, 20.0]


def test_gaussian_blur_smooths_and_adapts_its_kernel_to_small_images():
    torch.manual_seed(0)
    img = torch.zeros(3, 9, 9)
    img[:, 4, 4] = 1.0
    out = GaussianBlur((2.0, 2.0))(img)
    assert out.shape == img.shape and out[0, 4, 4] < 1.0 and out[0, 4, 6] > 0
    assert torch.allclose(out, out.flip(-1)) and out.max() == out[0, 4, 4]
    assert torch.allclose(GaussianBlur((0.1, 0.1))(img), img, atol=1e-4)  # tiny sigma: (almost) no blur
    with pytest.raises(ValueError, match="sigma"):
        GaussianBlur((0.0, 1.0))


def test_digits_normalisation_constants_are_the_training_split_statistics():
    from sklearn.datasets import load_digits

    from moco_lightning.data import digits_split

    digits = load_digits()
    train_idx, _ = digits_split(digits.target)
    pixels = digits.images[train_idx] / 16.0
    assert DIGITS_MEAN[0] == pytest.approx(pixels.mean(), abs=1e-4)
    assert DIGITS_STD[0] == pytest.approx(pixels.std(), abs=1e-4)


def test_dataset_defaults_follow_the_dataset():
    assert DEFAULT_IMAGE_SIZE["cifar10"] == 32 and DEFAULT_IMAGE_SIZE["stl10"] == 96
    assert DEFAULT_IMAGE_SIZE["imagenet"] == 224 and DEFAULT_IMAGE_SIZE["digits"] == 16
    assert DATASET_STATS["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_imagenet_eval_view_resizes_then_centre_crops_deterministically():
    t = eval_transform("imagenet")
    assert t.transforms[0].size == [256] and t.transforms[1].size == (224, 224)
    img = photo((300, 260))
    assert torch.equal(t(img), t(img)) and t(img).shape == (3, 224, 224)


def test_cifar_eval_view_only_normalises_at_native_size():
    img = photo((32, 32))
    out = eval_transform("cifar10")(img)
    mean, std = torch.tensor(DATASET_STATS["cifar10"][0]), torch.tensor(DATASET_STATS["cifar10"][1])
    expected = (torch.from_numpy(np.array(img)).permute(2, 0, 1) / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_linear_train_view_is_random_crop_and_flip():
    t = linear_train_transform("cifar10", 16)
    assert find(t, v2.RandomResizedCrop)[0][0].scale == (0.08, 1.0) and find(t, v2.RandomHorizontalFlip)
    assert not find(linear_train_transform("digits"), v2.RandomHorizontalFlip)


def test_overrides_and_errors():
    assert build_view_transforms("v2", 8, crop_scale=(0.5, 1.0))[0].transforms[0].scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="augmentation="):
        build_view_transforms("simclr", 32)
    with pytest.raises(TypeError, match="augmentation_kwargs"):
        build_view_transforms("v1", 32, blur_prob=0.3)
    with pytest.raises(ValueError, match="image_size"):
        moco_v2_transform(0)


@pytest.mark.parametrize("kind", ["pil", "uint8", "float"])
def test_solarize_threshold_is_half_the_range_for_every_image_type(kind):
    values = np.array([[0, 100, 127, 128, 200, 255]], dtype=np.uint8)
    rgb = np.repeat(values[..., None], 3, axis=2)
    img = {"pil": Image.fromarray(rgb), "uint8": torch.from_numpy(rgb).permute(2, 0, 1),
           "float": torch.from_numpy(rgb).permute(2, 0, 1) / 255.0}[kind]
    out = RandomSolarize(p=1.0)(img)
    out = np.array(out)[..., 0] if kind == "pil" else (out[0] * (255 if kind == "float" else 1)).round().numpy()
    assert out[0].tolist() == [0, 100, 127, 127, 55, 0]


@pytest.mark.parametrize("kind", ["pil", "uint8"])
def test_blur_keeps_the_image_type(kind):
    rgb = np.random.default_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    img = Image.fromarray(rgb) if kind == "pil" else torch.from_numpy(rgb).permute(2, 0, 1)
    out = GaussianBlur((1.0, 1.0))(img)
    assert type(out) is type(img)
    arr = np.asarray(out) if kind == "pil" else out.permute(1, 2, 0).numpy()
    assert arr.dtype == np.uint8 and arr.std() < rgb.std()

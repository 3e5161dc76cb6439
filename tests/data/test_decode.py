"""Each kind of image file decodes to what a viewer shows: 8-bit RGB, upright, transparency over white."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from moco_lightning.data.decode import decode_image


def _decoded(path) -> np.ndarray:
    image = decode_image(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_16_bit_png_is_scaled_by_its_range(tmp_path):
    ramp = np.linspace(1000, 41000, 64).round().astype(np.uint16).reshape(8, 8)  # far above 255
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    expected = np.round((ramp.astype(float) - 1000) * 255 / 40000)
    decoded = _decoded(tmp_path / "deep.png")
    assert np.abs(decoded[..., 0] - expected).max() <= 1 and (decoded[..., 0] == decoded[..., 2]).all()
    assert decoded.min() == 0 and decoded.max() == 255  # not clipped to white


def test_32_bit_float_tiff_is_scaled_by_its_range(tmp_path):
    depth = np.linspace(-2.0, 6.0, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(depth, mode="F").save(tmp_path / "depth.tif")
    decoded = _decoded(tmp_path / "depth.tif")
    assert np.abs(decoded[..., 1] - np.round((depth + 2.0) * 255 / 8.0)).max() <= 1


def test_exif_orientation_turns_the_photo_upright(tmp_path):
    upright = np.zeros((4, 6, 3), dtype=np.uint8)  # 4 rows x 6 columns, one red corner
    upright[0, 0] = (255, 0, 0)
    stored = np.rot90(upright, k=1)  # what a camera held on its side stores (6 x 4) ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with "rotate 90 degrees clockwise to view"
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "photo.png", exif=exif)
    assert np.array_equal(_decoded(tmp_path / "photo.png"), upright)


def test_palette_image_with_a_transparent_colour_is_composited_over_white(tmp_path):
    indices = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)  # colour 0 (black) is the transparent one
    image.save(tmp_path / "icon.png", transparency=0)
    assert np.array_equal(_decoded(tmp_path / "icon.png"),
                          np.array([[[255, 255, 255], [200, 30, 40]], [[200, 30, 40], [255, 255, 255]]]))


def test_cmyk_image_matches_its_rgb_original(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "print.tif")
    assert Image.open(tmp_path / "print.tif").mode == "CMYK"
    assert np.abs(_decoded(tmp_path / "print.tif") - rgb).max() <= 1


@pytest.mark.parametrize("alpha", [0, 128, 255])
def test_grey_with_alpha_is_composited_over_white(tmp_path, alpha):
    grey = np.full((3, 3), 40, dtype=np.uint8)
    la = np.stack([grey, np.full((3, 3), alpha, dtype=np.uint8)], axis=-1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    expected = round(40 * alpha / 255 + 255 * (1 - alpha / 255))
    assert np.abs(_decoded(tmp_path / "la.png") - expected).max() <= 1


def test_a_truncated_file_raises(tmp_path):
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError):
        decode_image(tmp_path / "cut.png")

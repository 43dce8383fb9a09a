"""read_image on the pixel modes real releases ship, and on broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from samples import sample

from cxr_lib.data.cache import prepare_cache
from cxr_lib.data.core import DataError, XrayDataset, read_image, read_image_row


def save(tmp_path: Path, array: np.ndarray, mode: str | None = None, name: str = "x.png") -> Path:
    path = tmp_path / name
    img = Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)
    img.save(path)
    return path


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma as PIL computes it (fixed point, rounded)."""
    r, g, b = (rgb[..., k].astype(np.int64) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def test_grayscale_is_unchanged(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5  # [6, 8]
    out = read_image(save(tmp_path, gray))
    assert out.dtype == np.uint8 and out.shape == (6, 8)
    np.testing.assert_array_equal(out, gray)


def test_rgb_by_luminance(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)  # [H, W, 3]
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[1] = (200, 200, 200)
    out = read_image(save(tmp_path, rgb))
    assert out.shape == (2, 3)
    assert out[0].tolist() == [76, 150, 29] and out[1].tolist() == [200, 200, 200]


def test_rgba_drops_alpha(tmp_path):
    """NIH ships a few RGBA PNGs: transparency must not darken or blank the image."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(5, 7, 4), dtype=np.uint8)  # [H, W, 4]
    rgba[..., 3] = 0  # fully transparent everywhere
    out = read_image(save(tmp_path, rgba, mode="RGBA"))
    assert out.shape == (5, 7)
    np.testing.assert_array_equal(out, luminance(rgba[..., :3]))


def test_sixteen_bit_is_scaled_by_its_bit_depth_not_its_range(tmp_path):
    """0..65535 maps onto 0..255 (round(v * 255 / 65535)) whatever the image holds: a
    stretch by each image's own range would give two exposures of one film other contrasts."""
    raw = np.array([[1000, 2000], [3000, 3000]], dtype=np.uint16)
    path = save(tmp_path, raw)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # really stored and read back as 16 bit
    out = read_image(path)
    assert out.dtype == np.uint8
    assert out.tolist() == [[4, 8], [12, 12]]
    ends = read_image(save(tmp_path, np.array([[0, 65535]], dtype=np.uint16), name="y.png"))
    assert ends.tolist() == [[0, 255]]


def test_constant_sixteen_bit_keeps_its_value(tmp_path):
    out = read_image(save(tmp_path, np.full((3, 3), 700, dtype=np.uint16)))
    assert out.tolist() == [[3] * 3] * 3  # 700 * 255 / 65535 = 2.72


def sixteen_bit_copy(source: Path, path: Path) -> Path:
    """`source` (8-bit) as a 16-bit grayscale PNG with the same brightness (value * 257)."""
    eight = read_image(source)
    Image.fromarray(eight.astype(np.uint16) * 257).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"
    return path


def test_a_sixteen_bit_copy_of_a_real_image_decodes_and_caches_as_the_original(tmp_path):
    """A 16-bit copy of a real X-ray cached with mean 183.1 where the original's is 174.8."""
    images = sorted((sample("nih-cxr14-sample") / "images").glob("*.png"))[:3]
    copies = [sixteen_bit_copy(p, tmp_path / f"16bit-{p.name}") for p in images]
    for original, copy in zip(images, copies, strict=True):
        np.testing.assert_array_equal(read_image(copy), read_image(original))
    caches = []
    for name, paths in (("eight", images), ("sixteen", copies)):
        meta = pd.DataFrame({"id": [p.name for p in images], "patient": ["a", "b", "c"],
                             "split": "train", "source": "png", "path": [str(p) for p in paths]})
        ds = XrayDataset(name, ["A"], np.zeros((3, 1)), meta, {"png": read_image_row})
        caches.append(prepare_cache(ds, tmp_path / name, size=64, workers=1, progress=False))
    assert caches[1].images.tobytes() == caches[0].images.tobytes()


def test_thirty_two_bit_integers_in_the_sixteen_bit_range_read_as_sixteen_bit(tmp_path):
    raw = np.array([[257, 25700]], dtype=np.int32)
    assert read_image(save(tmp_path, raw, name="x.tif")).tolist() == [[1, 100]]


@pytest.mark.parametrize(("array", "message"), [
    (np.array([[0, 70000]], dtype=np.int32), "32-bit integer pixels 0..70000"),
    (np.array([[0.0, 0.5]], dtype=np.float32), "32-bit float pixels"),
])
def test_pixels_without_a_bit_depth_to_scale_by_are_refused(tmp_path, array, message):
    path = save(tmp_path, array, name="x.tif")
    with pytest.raises(DataError, match=f"{path}: {message}"):
        read_image(path)


def test_truncated_png(tmp_path):
    path = save(tmp_path, np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=f"{path}: cannot decode image"):
        read_image(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a PNG")
    with pytest.raises(DataError, match=f"{path}: cannot decode image"):
        read_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="image file not found"):
        read_image(tmp_path / "absent.png")

"""read_image on the pixel modes real releases ship, and on broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_lib.data.core import DataError, read_image


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


def test_sixteen_bit_scaled_by_range(tmp_path):
    raw = np.array([[1000, 2000], [3000, 3000]], dtype=np.uint16)
    path = save(tmp_path, raw)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # really stored and read back as 16 bit
    out = read_image(path)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 128], [255, 255]]


def test_constant_sixteen_bit_is_black_not_nan(tmp_path):
    out = read_image(save(tmp_path, np.full((3, 3), 700, dtype=np.uint16)))
    assert out.tolist() == [[0] * 3] * 3


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

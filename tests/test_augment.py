"""Batched augmentation: crop distribution, determinism, flips, resizing, normalisation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr_lib.augment.crops import (
    FinetuneAugment,
    MaeAugment,
    center_resize,
    hflip,
    pixel_stats,
    random_resized_crop,
    sample_crop_boxes,
    to_float,
)
from cxr_lib.augment.randaugment import RandAugment
from cxr_lib.augment.views import MocoAugment


def batch(b: int = 4, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 1, h, w), dtype=torch.uint8, generator=g)


def test_shapes_dtypes_device():
    x = batch()
    assert random_resized_crop(x, 16).dtype == torch.uint8
    out = MaeAugment(16)(x)
    assert out.shape == (4, 1, 16, 16) and out.dtype == torch.float32
    assert out.device == x.device
    rgb = MaeAugment(24, channels=3, mean=(0.4, 0.5, 0.6), std=0.2)(x)
    assert rgb.shape == (4, 3, 24, 24)
    assert torch.allclose(rgb[:, 0] * 0.2 + 0.4, rgb[:, 2] * 0.2 + 0.6, atol=1e-6)  # one image


def test_crop_boxes_follow_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(2000, 48, 64, scale=(0.3, 0.6), ratio=(3 / 4, 4 / 3), generator=g)
    w = (boxes[:, 2] - boxes[:, 0]).double()
    h = (boxes[:, 3] - boxes[:, 1]).double()
    area = w * h / (48 * 64)
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= 64 and boxes[:, 3].max() <= 48
    assert area.min() >= 0.3 - 0.03 and area.max() <= 0.6 + 0.03  # rounding to whole pixels
    assert (w / h).min() >= 0.75 - 0.05 and (w / h).max() <= 4 / 3 + 0.05
    assert area.mean() == pytest.approx(0.45, abs=0.01)  # uniform in the area range
    assert len(set(boxes[:, 0].tolist())) > 10  # placed at random


def test_crop_falls_back_to_central_crop():
    # No box of the whole area fits with aspect 2..3 in a square, so torchvision's fallback:
    # full width, height width/2, centred.
    boxes = sample_crop_boxes(3, 32, 32, scale=(1.0, 1.0), ratio=(2.0, 3.0))
    assert torch.equal(boxes, torch.tensor([[0, 8, 32, 24]]).expand(3, 4))


def test_deterministic_with_generator():
    x = batch()
    aug = MaeAugment(16)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hflip():
    x = batch()
    assert torch.equal(hflip(x, p=1.0), x.flip(-1))
    assert torch.equal(hflip(x, p=0.0), x)
    mixed = hflip(batch(64), p=0.5, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(m, o.flip(-1)) for m, o in zip(mixed, batch(64), strict=True)]
    kept = [torch.equal(m, o) for m, o in zip(mixed, batch(64), strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48


def test_full_crop_is_a_plain_resize():
    x = batch(h=32, w=32)
    up = random_resized_crop(x, 48, scale=(1.0, 1.0), ratio=(1.0, 1.0)).float()
    expected_up = F.interpolate(x.float(), size=48, mode="bilinear", align_corners=False)
    assert (up - expected_up.round()).abs().max() <= 1  # bilinear, up to uint8 rounding
    same = random_resized_crop(x, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.equal(same, x)
    down = random_resized_crop(x, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0)).float()
    expected_down = F.interpolate(x.float(), size=8, mode="area")  # averaged: no aliasing
    assert (down - expected_down.round()).abs().max() <= 1
    assert torch.equal(MaeAugment(48, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False,
                                  mean=0.0, std=1.0)(x), up / 255)


def test_center_resize_takes_the_central_square():
    x = batch(h=32, w=48)
    assert torch.equal(center_resize(x, 32), x[:, :, :, 8:40])
    assert center_resize(x, 16).shape == (4, 1, 16, 16)


def test_normalisation_and_pixel_stats():
    x = batch(8)
    mean, std = pixel_stats(x)
    ref = x.double() / 255
    assert mean == pytest.approx(float(ref.mean()), abs=1e-9)
    assert std == pytest.approx(float(ref.std(unbiased=False)), abs=1e-9)
    assert pixel_stats(x.numpy()) == (mean, std)
    assert pixel_stats(x, max_images=2)[0] == pytest.approx(float(ref[[0, 7]].mean()))
    out = MaeAugment.from_images(x, 32).plain(x)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(out.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    gray = torch.full((1, 1, 2, 2), 51, dtype=torch.uint8)
    assert torch.allclose(to_float(gray, 0.2, 0.5), torch.zeros(1, 1, 2, 2), atol=1e-6)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\], got \(32, 32\)"):
        random_resized_crop(torch.zeros(32, 32, dtype=torch.uint8), 16)
    with pytest.raises(ValueError, match="uint8"):
        to_float(torch.zeros(1, 1, 4, 4), 0.5, 0.25)
    with pytest.raises(ValueError, match="1 or 3 normalisation values"):
        to_float(batch(), (0.1, 0.2), 0.25, channels=3)
    with pytest.raises(ValueError, match="uint8"):
        pixel_stats(np.zeros((2, 1, 4, 4), dtype=np.float32))


def test_crop_resampling_matches_torchvision_distribution():
    g = torch.Generator().manual_seed(1)
    boxes = sample_crop_boxes(4000, 256, 256, generator=g)
    side = (boxes[:, 2] - boxes[:, 0]).double() * (boxes[:, 3] - boxes[:, 1]).double()
    frac = side / 256**2
    # torchvision's RandomResizedCrop(scale=(0.5, 1)) on 256 px: mean ~0.693, sd ~0.118
    # (most large draws do not fit the square and are redrawn, shifting the mean below 0.75).
    assert frac.mean() == pytest.approx(0.693, abs=0.01)
    assert frac.std() == pytest.approx(0.118, abs=0.01)
    assert math.isclose(float(frac.min()), 0.5, abs_tol=0.01)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("augment", [
    MaeAugment(64, mean=0.45, std=0.22, channels=3),
    FinetuneAugment(64, (0.5, 1.0), 0.45, 0.22, RandAugment(9.0, prob=1.0), rotation=30.0),
    MocoAugment(64, mean=(0.4, 0.5, 0.6), std=0.25, channels=3),
], ids=["mae", "finetune-randaugment-rotation", "moco"])
def test_on_a_gpu_the_augmentations_queue_without_a_host_sync(augment):
    x = torch.randint(0, 256, (256, 1, 96, 96), dtype=torch.uint8, device="cuda")
    generator = torch.Generator().manual_seed(0)
    augment(x, generator)  # the first call loads kernels and fills the pinned-memory pool
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host sync now raises
    try:
        out = augment(x, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.is_cuda and out.shape[-2:] == (64, 64) and bool(torch.isfinite(out).all())


def test_the_three_recipes_views_live_in_augment_and_keep_their_random_streams():
    """MAE's, fine-tuning's and MoCo's augmentations are augment/'s classes (fine-tuning's was
    defined in methods/finetune.py); a seed gives the outputs it gave before the move (sums
    measured on the code before it, a2e6154)."""
    from cxr_lib.methods import finetune

    assert finetune.FinetuneAugment is FinetuneAugment
    assert {cls.__module__ for cls in (MaeAugment, FinetuneAugment, MocoAugment)} == {
        "cxr_lib.augment.crops", "cxr_lib.augment.views"}
    x = torch.randint(0, 256, (6, 1, 48, 48), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    for augment, total, size in (
            (MaeAugment(32, mean=0.45, std=0.22), 1405.0631230510771, 3700.6242340393364),
            (FinetuneAugment(32, (0.5, 1.0), 0.45, 0.22, RandAugment(9.0, prob=1.0),
                             rotation=30.0), 1213.0130884442478, 5524.750841369852),
            (MocoAugment(32, mean=0.45, std=0.22), 775.9839132218622, 8821.429620299954)):
        out = augment(x, torch.Generator().manual_seed(0)).double()
        assert float(out.sum()) == pytest.approx(total, rel=1e-9, abs=1e-6), type(augment)
        assert float(out.abs().sum()) == pytest.approx(size, rel=1e-9), type(augment)

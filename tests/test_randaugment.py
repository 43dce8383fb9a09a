"""Batched RandAugment against timm's PIL RandAugment: op set, arguments, pixels, sampling."""

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import torch
from PIL import Image

from cxr_lib.augment.randaugment import (
    AFFINE_OPS,
    OPS,
    LayerDraw,
    RandAugment,
    apply_op,
    fill_level,
    op_argument,
)
from cxr_lib.data.phantoms import render_phantom

FILL = 100
HPARAMS = timm_aa._HPARAMS_DEFAULT


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return render_phantom(3, 64)  # uint8 [64, 64], a synthetic chest X-ray


def timm_argument(name: str, magnitude: float, negate: bool, monkeypatch) -> tuple:
    """timm's argument for the op, with its random sign forced (it negates when > 0.5)."""
    monkeypatch.setattr(timm_aa.random, "random", lambda: 0.9 if negate else 0.1)
    level_fn = timm_aa.LEVEL_TO_ARG[name]
    return level_fn(magnitude, HPARAMS) if level_fn else ()


def one_op(name: str, x_u8: torch.Tensor, magnitude: float, sign: float) -> torch.Tensor:
    """Our op on a uint8 batch through the policy's own path (layer + PIL's truncation)."""
    ra = RandAugment(magnitude, ops=(name,), prob=1.0, magnitude_std=0.0, fill=FILL)
    n = x_u8.shape[0]
    draw = LayerDraw(torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool),
                     torch.full((n,), magnitude, dtype=torch.float64),
                     torch.full((n,), sign, dtype=torch.float64))
    return torch.floor(ra.layer(x_u8.float(), draw) + 1e-3)  # as RandAugment.__call__


def test_op_set_is_timms_increasing_set():
    assert list(OPS) == timm_aa._RAND_INCREASING_TRANSFORMS


@pytest.mark.parametrize("name", OPS)
def test_arguments_follow_timms_level_to_arg(name, monkeypatch):
    for magnitude in (0.0, 2.5, 6.0, 9.3, 10.0):
        for negate in (False, True):
            expected = timm_argument(name, magnitude, negate, monkeypatch)
            sign = torch.tensor([-1.0 if negate else 1.0])
            ours = op_argument(name, torch.tensor([magnitude], dtype=torch.float64), sign)
            if not expected:
                assert ours is None
            else:
                assert ours.item() == pytest.approx(expected[0], abs=1e-9), (magnitude, negate)


@pytest.mark.parametrize("name", OPS)
def test_each_op_matches_timms_pil_op(name, image, monkeypatch):
    for negate in (False, True):
        args = timm_argument(name, 7.0, negate, monkeypatch)
        ref = timm_aa.NAME_TO_OP[name](Image.fromarray(image), *args, fillcolor=FILL,
                                       resample=Image.BILINEAR)
        ours = one_op(name, torch.from_numpy(image)[None, None], 7.0, -1.0 if negate else 1.0)
        diff = np.abs(ours[0, 0].numpy() - np.asarray(ref, dtype=np.float32))
        # resampling ops differ from PIL's fixed-point arithmetic on a few pixels by one level
        limit = 0.05 if name in AFFINE_OPS else 0.01
        assert diff.mean() < limit and diff.max() <= 1, (name, negate, diff.mean(), diff.max())


def test_a_batch_groups_ops_with_per_image_parameters(image):
    """15 images, each its own op, magnitude and sign, in one layer: each equals that op
    applied to that image alone."""
    n = len(OPS)
    x = torch.from_numpy(image)[None, None].repeat(n, 1, 1, 1).float()  # [15, 1, 64, 64]
    gen = torch.Generator().manual_seed(0)
    draw = LayerDraw(torch.arange(n), torch.ones(n, dtype=torch.bool),
                     torch.rand(n, generator=gen, dtype=torch.float64) * 10,
                     torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double())
    out = RandAugment(fill=FILL).layer(x, draw)
    for i, name in enumerate(OPS):
        arg = op_argument(name, draw.magnitude[i:i + 1], draw.sign[i:i + 1])
        alone = apply_op(name, x[i:i + 1], arg, FILL)
        torch.testing.assert_close(out[i:i + 1], alone, atol=1e-3, rtol=0)
    skipped = draw.applied.clone()
    skipped[3] = False
    assert torch.equal(RandAugment(fill=FILL).layer(x, LayerDraw(
        draw.op, skipped, draw.magnitude, draw.sign))[3], x[3])


def test_colour_is_the_identity_on_grayscale(image):
    x = torch.from_numpy(image)[None, None]
    for sign in (-1.0, 1.0):
        assert torch.equal(one_op("ColorIncreasing", x, 9.0, sign), x.float())


def test_choices_are_uniform_applied_half_the_time_with_noisy_magnitude():
    n = 30_000
    draw = RandAugment(6.0).draw(n, torch.Generator().manual_seed(1))
    counts = torch.bincount(draw.op, minlength=len(OPS)).double()
    expected = n / len(OPS)
    sigma = (n * (1 / len(OPS)) * (1 - 1 / len(OPS))) ** 0.5
    assert (counts - expected).abs().max() < 5 * sigma
    assert abs(draw.applied.double().mean().item() - 0.5) < 0.02
    assert abs(draw.magnitude.mean().item() - 6.0) < 0.02
    assert abs(draw.magnitude.std().item() - 0.5) < 0.02
    assert set(draw.sign.tolist()) == {-1.0, 1.0}
    assert abs(draw.sign.mean().item()) < 0.03
    high = RandAugment(10.0).draw(2000, torch.Generator().manual_seed(2))
    assert high.magnitude.max().item() == 10.0  # clipped to timm's [0, 10]


def test_magnitude_zero_leaves_images_unchanged_for_the_magnitude_ops(image):
    """At M=0 (no noise) every op whose strength grows with M is the identity, except
    posterize, which at level 0 still keeps only 4 bits (timm's 'increasing' posterize)."""
    x = torch.from_numpy(image)[None, None].repeat(8, 1, 1, 1)  # [8, 1, 64, 64] uint8
    graded = tuple(name for name in OPS if op_argument(name, torch.zeros(1), torch.ones(1))
                   is not None and name != "PosterizeIncreasing")
    assert len(graded) == 11
    same = RandAugment(0.0, ops=graded, prob=1.0, magnitude_std=0.0)(x, torch.Generator())
    assert torch.equal(same, x)
    noisy = RandAugment(0.0, ops=graded, prob=1.0)(x, torch.Generator().manual_seed(0))
    assert (noisy.float() - x.float()).abs().mean() < 6  # N(0, 0.5) clipped: small changes
    kept = one_op("PosterizeIncreasing", x[:1], 0.0, 1.0)
    assert torch.equal(kept, (x[:1] // 16 * 16).float())


def test_a_seeded_generator_gives_the_same_batch_and_another_seed_another(image):
    x = torch.from_numpy(image)[None, None].repeat(16, 1, 1, 1)
    ra = RandAugment(9.0)
    a = ra(x, torch.Generator().manual_seed(5))
    b = ra(x, torch.Generator().manual_seed(5))
    c = ra(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == x.shape


def test_float_batches_in_0_1_keep_their_dtype_and_agree_with_uint8(image):
    x = torch.from_numpy(image)[None, None].repeat(4, 1, 1, 1)
    ra = RandAugment(6.0)
    as_float = ra(x.float() / 255, torch.Generator().manual_seed(3))
    as_u8 = ra(x, torch.Generator().manual_seed(3))
    assert as_float.dtype == torch.float32
    assert 0 <= as_float.min() and as_float.max() <= 1
    assert (as_float * 255 - as_u8.float()).abs().mean() < 1.5  # truncation only in uint8


def test_fill_is_timms_rounded_mean():
    assert fill_level(0.5056) == 129.0 and fill_level(1.0) == 255.0


def test_bad_settings_and_inputs_are_refused_with_clear_errors():
    with pytest.raises(ValueError, match="unknown ops"):
        RandAugment(ops=("Cutout",))
    with pytest.raises(ValueError, match="magnitude must lie in"):
        RandAugment(11.0)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        RandAugment()(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        op_argument("Cutout", torch.zeros(1), torch.ones(1))

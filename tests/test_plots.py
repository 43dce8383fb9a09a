import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from cxr_lib.chapters.plots import image_grid, mae_pictures


def test_image_grid_lays_out_titles_and_boxes():
    images = [np.full((8, 8), v, dtype=np.uint8) for v in (0, 80, 160, 240, 255)]
    fig = image_grid(images, titles=list("abcde"), ncols=3, boxes=[[(1, 1, 3, 3)], [], [], [], []])
    axes = fig.axes
    assert len(axes) == 6  # 2 rows x 3 columns, the last one left empty
    assert [ax.get_title() for ax in axes[:5]] == list("abcde")
    assert len(axes[0].patches) == 1 and axes[0].patches[0].get_width() == 3
    assert not axes[5].images  # the spare cell shows nothing


def test_image_grid_refuses_empty_input():
    with pytest.raises(ValueError, match="no images"):
        image_grid([])


def test_mae_pictures_darken_exactly_the_masked_patches():
    import torch

    from cxr_lib.models.mae import build_mae

    torch.manual_seed(0)
    mae = build_mae("vit_tiny_patch16", img_size=32, patch_size=8, decoder_dim=32,
                    decoder_depth=1, decoder_heads=2)
    x = torch.rand(2, 1, 32, 32) * 0.5 + 0.25  # normalised with mean 0, std 1 below
    original, masked, pasted = mae_pictures(mae, x, mean=0.0, std=1.0, mask_ratio=0.75, seed=3)
    assert original.shape == masked.shape == pasted.shape == (2, 32, 32)
    assert original.dtype == np.uint8
    changed = masked != original  # [2, 32, 32]
    # 16 patches of 8x8, 12 masked: 75% of the pixels darkened (bright pixels, so all change)
    assert changed.reshape(2, -1).mean(axis=1).tolist() == [0.75, 0.75]
    assert (pasted[~changed] == original[~changed]).all()  # visible patches pasted back
    assert mae.training  # the model comes back in the mode it was given in
    again = mae_pictures(mae, x, mean=0.0, std=1.0, mask_ratio=0.75, seed=3)[1]
    assert (again == masked).all()  # the seed fixes the mask

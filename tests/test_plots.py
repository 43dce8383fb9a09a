import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from cxr_lib.plots import image_grid


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

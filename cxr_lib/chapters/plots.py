"""Figures that more than one chapter draws."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cxr_lib.engine.inference import eval_mode

# A box as (x, y, width, height) in the pixel coordinates of the image it is drawn on.
Box = tuple[float, float, float, float]


def image_grid(
    images: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    ncols: int = 6,
    boxes: Sequence[Sequence[Box]] | None = None,
    suptitle: str | None = None,
    cell_inches: float = 1.9,
) -> Figure:
    """Show grayscale images [H, W] in a grid, with optional titles and boxes per image."""
    if len(images) == 0:
        raise ValueError("image_grid: no images to show")
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(cell_inches * ncols, cell_inches * nrows + 0.4), squeeze=False
    )
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(images):
            continue
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=255 if images[k].dtype == np.uint8 else None)
        if titles is not None:
            ax.set_title(titles[k], fontsize=8)
        for x, y, w, h in boxes[k] if boxes is not None else ():
            ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="#ff4d4d", linewidth=1.2))
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def mae_pictures(mae: torch.nn.Module, x: torch.Tensor, mean: float, std: float,
                 mask_ratio: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pictures of masked autoencoding on normalised images x [B, 1, H, W]: the input, the
    input with its masked patches darkened, and the reconstruction with the visible patches
    pasted back; each uint8 [B, H, W]. The same seed draws the same mask."""
    with torch.no_grad(), eval_mode(mae):
        torch.manual_seed(seed)
        _, _, mask = mae(x, mask_ratio)  # [B, L], 1 = masked
        torch.manual_seed(seed)
        _, _, pasted = mae.reconstruct(x, mask_ratio)  # [B, 1, H, W]
        per_pixel = mask[..., None].expand(-1, -1, mae.patchify(x).shape[-1])  # [B, L, p*p]
        hidden = mae.unpatchify(per_pixel)[:, 0].bool()  # [B, H, W]

    def to_u8(t: torch.Tensor) -> np.ndarray:
        return (t[:, 0] * std + mean).clamp(0, 1).mul(255).round().byte().cpu().numpy()

    original = to_u8(x)
    masked = original.copy()
    masked[hidden.cpu().numpy()] //= 5  # darkened, so the hidden part still shows as a shape
    return original, masked, to_u8(pasted)

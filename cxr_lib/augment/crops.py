"""Batched augmentation on the batch's own device: no per-image PIL work.

Batches come from the uint8 cache as [B, 1, H, W]. Geometric steps keep uint8 (a quarter of the
memory of float on a GPU-resident pipeline) and `to_float` normalises at the end. Crops are
resampled for the whole batch in one `torchvision.ops.roi_align` call: each output pixel
averages ceil(crop / out) bilinear samples per side, so shrinking a 256-px crop to 64 px does not
alias, and a crop that is not shrunk is plain bilinear interpolation (align_corners=False).
Random numbers are drawn on the CPU (optionally from a `generator`), so a seed gives the same
crops on CPU and GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align

from cxr_lib.augment.randaugment import RandAugment, affine_matrix, fill_level, warp
from cxr_lib.device import to_device

if TYPE_CHECKING:
    from cxr_lib.data.cache import Cache

Stat = float | Sequence[float]

# The X-ray MAE's crop range, area fractions (Xiao et al.; ImageNet's MAE crops 0.2 to 1): the
# library's one statement of it, which MaeAugment, MaeRecipe and `cxr pretrain mae` default to
PAPER_MAE_CROP_SCALE = (0.5, 1.0)


def check_crop_scale(scale: tuple[float, float]) -> None:
    """Refuse a crop range that torch would only reject at the first batch, or that crops
    nothing: (LOW, HIGH) area fractions with 0 < LOW <= HIGH <= 1."""
    low, high = (float(v) for v in scale)
    if not 0 < low <= high <= 1:
        raise ValueError(f"crop scale ({low:g}, {high:g}) must be two area fractions with "
                         "0 < LOW <= HIGH <= 1, e.g. 0.5 1.0")


def sample_crop_boxes(batch: int, height: int, width: int,
                      scale: tuple[float, float] = PAPER_MAE_CROP_SCALE,
                      ratio: tuple[float, float] = (3 / 4, 4 / 3),
                      generator: torch.Generator | None = None, tries: int = 10) -> Tensor:
    """Crop boxes with torchvision RandomResizedCrop's distribution, for a whole batch at once.

    Per image: up to `tries` draws of an area fraction (uniform in `scale`) and an aspect ratio
    (log-uniform in `ratio`); the first draw that fits is used, placed uniformly; if none fits,
    the central crop clamped to `ratio`. Returns int64 [B, 4] boxes (x0, y0, x1, y1), end-
    exclusive, on the CPU.
    """
    area = height * width * torch.empty(batch, tries).uniform_(*scale, generator=generator)
    log_r = torch.empty(batch, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                               generator=generator)  # [B, T]
    aspect = torch.exp(log_r)  # [B, T]
    w = torch.round(torch.sqrt(area * aspect))  # [B, T]
    h = torch.round(torch.sqrt(area / aspect))  # [B, T]
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [B, T]
    first = fits.float().argmax(dim=1, keepdim=True)  # [B, 1], index of the first fit
    found = fits.any(dim=1)  # [B]
    fw, fh = _center_fallback(height, width, ratio)
    w = torch.where(found, w.gather(1, first)[:, 0], torch.tensor(float(fw)))  # [B]
    h = torch.where(found, h.gather(1, first)[:, 0], torch.tensor(float(fh)))  # [B]
    u = torch.rand(batch, 2, generator=generator)  # [B, 2]
    x0 = torch.where(found, torch.floor(u[:, 0] * (width - w + 1)), (width - w) // 2)  # [B]
    y0 = torch.where(found, torch.floor(u[:, 1] * (height - h + 1)), (height - h) // 2)  # [B]
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1).long()  # [B, 4]


def _center_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback crop size: the whole image, clamped to the aspect range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return width, int(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(height * max(ratio))), height
    return width, height


def crop_resize(x: Tensor, boxes: Tensor, out_size: int) -> Tensor:
    """Cut box b out of image b and resize it to out_size², all images in one call.

    `boxes` [B, 4] are (x0, y0, x1, y1) in pixels, end-exclusive. The dtype is kept (uint8 is
    rounded back).
    """
    _check_batch(x)
    index = torch.arange(x.shape[0], device=x.device, dtype=torch.float32)[:, None]  # [B, 1]
    rois = torch.cat([index, to_device(boxes, x.device, torch.float32)], dim=1)  # [B, 5]
    out = roi_align(x.float(), rois, output_size=out_size, spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)  # [B, C, S, S]
    if x.dtype == torch.uint8:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out


def random_resized_crop(x: Tensor, out_size: int,
                        scale: tuple[float, float] = PAPER_MAE_CROP_SCALE,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> Tensor:
    """RandomResizedCrop for a batch [B, C, H, W] -> [B, C, S, S], a fresh box per image."""
    _check_batch(x)
    boxes = sample_crop_boxes(x.shape[0], x.shape[2], x.shape[3], scale, ratio, generator)
    return crop_resize(x, boxes, out_size)  # [B, C, S, S]


def center_resize(x: Tensor, out_size: int, crop: float = 1.0) -> Tensor:
    """The evaluation view: the central square, resized to out_size² (no randomness).

    `crop` < 1 keeps that share of the square's side: 224 / 256 is timm's and Xiao et al.'s
    Resize(256) then CenterCrop(224), written as one resampling of the central box.
    """
    _check_batch(x)
    if not 0 < crop <= 1:
        raise ValueError(f"crop must lie in (0, 1], got {crop}")
    h, w = x.shape[2], x.shape[3]
    side = round(min(h, w) * crop)
    x0, y0 = (w - side) // 2, (h - side) // 2
    boxes = torch.tensor([[x0, y0, x0 + side, y0 + side]]).expand(x.shape[0], 4)  # [B, 4]
    return crop_resize(x, boxes, out_size)  # [B, C, S, S]


def hflip(x: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image left-right with probability p."""
    _check_batch(x)
    flip = torch.rand(x.shape[0], generator=generator) < p  # [B]
    flip = to_device(flip, x.device)[:, None, None, None]  # [B, 1, 1, 1]
    return torch.where(flip, x.flip(-1), x)  # [B, C, H, W]


def random_rotate(x: Tensor, degrees: float, fill: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """Rotate each image about its centre by an angle uniform in [-degrees, degrees]
    (torchvision's RandomRotation), bilinear, `fill` outside; the dtype is kept."""
    _check_batch(x)
    angles = torch.empty(x.shape[0]).uniform_(-degrees, degrees, generator=generator)  # [B]
    matrices = affine_matrix("Rotate", angles, x.shape[2], x.shape[3])  # [B, 3, 3]
    out = warp(x.float(), matrices, fill)  # [B, C, H, W]
    if x.dtype == torch.uint8:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out


def to_float(x_u8: Tensor, mean: Stat, std: Stat, channels: int = 1) -> Tensor:
    """uint8 [B, 1, H, W] -> float [B, channels, H, W]: scale to 0..1, then (x - mean) / std.

    `mean` and `std` are in 0..1 units, one value or one per output channel; `channels=3`
    repeats the gray channel for backbones that expect RGB.
    """
    _check_batch(x_u8)
    if x_u8.dtype != torch.uint8:
        raise ValueError(f"to_float expects a uint8 batch, got {x_u8.dtype}")
    return normalise(x_u8.float().div_(255.0), mean, std, channels)


def normalise(x: Tensor, mean: Stat, std: Stat, channels: int = 1) -> Tensor:
    """float [B, 1 or channels, H, W] in 0..1 -> (x - mean) / std, [B, channels, H, W]."""
    if channels != x.shape[1]:
        x = x.expand(-1, channels, -1, -1)  # [B, channels, H, W]
    mean_t = _per_channel(mean, channels, x.device)  # [1, channels, 1, 1]
    std_t = _per_channel(std, channels, x.device)  # [1, channels, 1, 1]
    return (x - mean_t) / std_t  # [B, channels, H, W]


def _per_channel(value: Stat, channels: int, device: torch.device) -> Tensor:
    """The values as [1, C, 1, 1] on `device`: made on the CPU and queued there, because a
    tensor made from Python numbers directly on a GPU is a synchronising copy."""
    t = torch.as_tensor(value, dtype=torch.float32).flatten()  # [1 or C]
    if t.numel() not in (1, channels):
        raise ValueError(f"expected 1 or {channels} normalisation values, got {t.numel()}")
    return to_device(t, device).expand(channels).view(1, channels, 1, 1)  # [1, C, 1, 1]


def pixel_stats(images_u8: np.ndarray | Tensor, max_images: int = 1000) -> tuple[float, float]:
    """Mean and standard deviation of the pixels, in 0..1 units, over up to `max_images`
    evenly spaced images: the normalisation MedTransformer fits on its pre-training mix and
    reuses downstream. Counted through a 256-bin histogram, so memory stays one image."""
    n = len(images_u8)
    if n == 0:
        raise ValueError("pixel_stats needs at least one image")
    hist = np.zeros(256, dtype=np.int64)  # [256]
    for i in np.unique(np.linspace(0, n - 1, num=min(n, max_images)).round().astype(int)):
        image = images_u8[int(i)]
        image = np.asarray(image.cpu() if torch.is_tensor(image) else image)
        if image.dtype != np.uint8:
            raise ValueError(f"pixel_stats expects uint8 images, got {image.dtype}")
        hist += np.bincount(image.ravel(), minlength=256)
    levels = np.arange(256) / 255.0  # [256]
    mean = float((hist * levels).sum() / hist.sum())
    var = float((hist * (levels - mean) ** 2).sum() / hist.sum())
    return mean, var**0.5


def spread_rows(rows: np.ndarray, count: int) -> np.ndarray:
    """Up to `count` of `rows`, evenly spaced: statistics of a split that see every part of
    it (a merged cache holds its sources one after another), without reading all of it."""
    return rows[np.unique(np.linspace(0, len(rows) - 1, min(len(rows), count)).round()
                          .astype(int))]


def split_stats(cache: Cache, split: str = "train", images: int = 1000) -> tuple[float, float]:
    """The normalisation of a cache's split: mean and standard deviation of its pixels (0..1)
    over up to `images` evenly spread images, rounded to 4 places as the recipes store them."""
    mean, std = pixel_stats(cache.images[spread_rows(cache.split_indices(split), images)])
    return round(mean, 4), round(std, 4)


def _check_batch(x: Tensor) -> None:
    if not torch.is_tensor(x) or x.ndim != 4:
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise ValueError(f"expected an image batch tensor [B, C, H, W], got {shape}")


@dataclass(frozen=True)
class MaeAugment:
    """MAE pre-training augmentation: random resized crop, horizontal flip, normalisation.

    The X-ray MAE paper uses crop scale (0.5, 1.0) rather than ImageNet's (0.2, 1.0): small
    crops of a radiograph lose the anatomy that makes it one. `mean`/`std` default to neutral
    values; `from_images` fits them to the data.
    """

    size: int
    scale: tuple[float, float] = PAPER_MAE_CROP_SCALE
    flip: bool = True
    mean: Stat = 0.5
    std: Stat = 0.25
    channels: int = 1
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        check_crop_scale(self.scale)

    @classmethod
    def from_images(cls, images_u8: np.ndarray | Tensor, size: int, **kwargs) -> MaeAugment:
        """An augmentation normalised with the pixel statistics of `images_u8`."""
        mean, std = pixel_stats(images_u8)
        return cls(size, mean=mean, std=std, **kwargs)

    def __call__(self, x_u8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 [B, 1, H, W] -> float [B, channels, size, size], freshly augmented."""
        x = random_resized_crop(x_u8, self.size, self.scale, self.ratio, generator)  # uint8
        if self.flip:
            x = hflip(x, 0.5, generator)  # [B, 1, S, S]
        return to_float(x, self.mean, self.std, self.channels)  # [B, channels, S, S]

    def plain(self, x_u8: Tensor) -> Tensor:
        """The deterministic evaluation view with the same size and normalisation."""
        return to_float(center_resize(x_u8, self.size), self.mean, self.std, self.channels)


@dataclass(frozen=True)
class FinetuneAugment:
    """Training views: random-resized crop, flip, rotation, RandAugment on uint8 (batched),
    normalise."""

    size: int
    scale: tuple[float, float]
    mean: float
    std: float
    randaug: RandAugment | None = None
    rotation: float = 0.0
    channels: int = 1
    eval_crop: float = 1.0

    def __post_init__(self) -> None:
        check_crop_scale(self.scale)

    def __call__(self, x_u8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 [B, 1, H, W] -> float [B, channels, size, size], freshly augmented."""
        x = random_resized_crop(x_u8, self.size, self.scale, generator=generator)  # uint8
        x = hflip(x, 0.5, generator)  # [B, 1, S, S]
        if self.rotation:
            x = random_rotate(x, self.rotation, fill_level(self.mean), generator)
        if self.randaug is not None:
            x = self.randaug(x, generator)  # [B, 1, S, S] uint8
        return to_float(x, self.mean, self.std, self.channels)  # [B, channels, S, S]

    def plain(self, x_u8: Tensor) -> Tensor:
        """The evaluation view: the central `eval_crop` of the image (all of it by default)
        resized, normalised the same way."""
        view = center_resize(x_u8, self.size, self.eval_crop)  # [B, 1, S, S] uint8
        return to_float(view, self.mean, self.std, self.channels)

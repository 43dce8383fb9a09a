"""Two augmented views per image for contrastive learning (MoCo v2), batched on the device.

MoCo v2 augments with a random-resized crop of 20-100% of the image, colour jitter, random
grayscale, Gaussian blur and a horizontal flip. On a grayscale X-ray hue, saturation and the
grayscale step do nothing, so what remains is the crop, brightness and contrast jitter, blur and
the flip. The geometric steps reuse `cxr_lib.augment.crops` (uint8, one `roi_align` call per batch);
jitter and blur work on floats in 0..1 before normalisation. As in `cxr_lib.augment.crops`, random
numbers are drawn on the CPU (optionally from a `generator`) so a seed gives the same views on
CPU and GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cxr_lib.augment.crops import (
    Stat,
    center_resize,
    check_crop_scale,
    hflip,
    normalise,
    random_resized_crop,
    to_float,
)
from cxr_lib.device import to_device

BLUR_REFERENCE_SIZE = 224  # MoCo v2's blur sigmas are in pixels of a 224-px crop


def brightness_contrast(x: Tensor, brightness: float = 0.4, contrast: float = 0.4,
                        p: float = 0.8, generator: torch.Generator | None = None) -> Tensor:
    """torchvision ColorJitter's brightness then contrast, per image, with probability p.

    x: float [B, C, H, W] in 0..1. Brightness scales the pixels by a factor drawn from
    [1 - brightness, 1 + brightness]; contrast blends each image with its own mean by a factor
    from [1 - contrast, 1 + contrast]; both clip to 0..1. (ColorJitter applies its steps in a
    random order; here brightness always comes first.)
    """
    b = x.shape[0]
    u = to_device(torch.rand(b, 3, generator=generator), x.device)  # [B, 3]: apply?, factors
    applied = (u[:, 0] < p).view(b, 1, 1, 1)  # [B, 1, 1, 1]
    f_bright = (1 + brightness * (2 * u[:, 1] - 1)).view(b, 1, 1, 1)
    f_contr = (1 + contrast * (2 * u[:, 2] - 1)).view(b, 1, 1, 1)
    y = (x * f_bright).clamp(0, 1)  # [B, C, H, W]
    mean = y.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
    y = (mean + f_contr * (y - mean)).clamp(0, 1)  # [B, C, H, W]
    return torch.where(applied, y, x)


def gaussian_blur(x: Tensor, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5,
                  generator: torch.Generator | None = None) -> Tensor:
    """Blur each image with probability p, sigma drawn uniformly from `sigma` (pixels).

    One separable convolution for the whole batch (a kernel per image, grouped), reflect
    padding, kernel radius ceil(3 x largest sigma).
    """
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * sigma[1]))
    radius = min(radius, h - 1, w - 1)  # reflect padding needs fewer pixels than the side
    u = torch.rand(b, 2, generator=generator)  # [B, 2]: apply?, sigma
    s = sigma[0] + (sigma[1] - sigma[0]) * u[:, 1]  # [B]
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)  # [k]
    kernel = torch.exp(-t[None] ** 2 / (2 * s[:, None] ** 2))  # [B, k]
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (t == 0).float().expand(b, -1)  # [B, k]: leaves an image as it is
    kernel = torch.where((u[:, 0] < p)[:, None], kernel, identity)  # [B, k]
    kernel = to_device(kernel, x.device, x.dtype).repeat_interleave(c, dim=0)  # [B*C, k]
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)  # [1, B*C, H, W + 2r] vertical
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)  # [1, B*C, H, W] horizontal
    return y.reshape(b, c, h, w)


@dataclass(frozen=True)
class MocoAugment:
    """MoCo v2's augmentation for grayscale X-rays; calling it gives two views per image.

    `blur_sigma` is in pixels of a 224-px view (MoCo v2's 0.1-2.0) and scales with `size`, so
    a 64-px view is blurred as much, relative to its anatomy, as a 224-px one.
    """

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    jitter_p: float = 0.8
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: float = 0.5
    mean: Stat = 0.5
    std: Stat = 0.25
    channels: int = 1

    def __post_init__(self) -> None:
        check_crop_scale(self.scale)

    def view(self, x_u8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One fresh view: uint8 [B, 1, H, W] -> float [B, channels, size, size], normalised."""
        x = random_resized_crop(x_u8, self.size, self.scale, self.ratio, generator)  # uint8
        if self.flip:
            x = hflip(x, 0.5, generator)  # [B, 1, S, S]
        x = to_float(x, 0.0, 1.0)  # [B, 1, S, S] in 0..1
        x = brightness_contrast(x, self.brightness, self.contrast, self.jitter_p, generator)
        factor = self.size / BLUR_REFERENCE_SIZE
        sigma = (self.blur_sigma[0] * factor, self.blur_sigma[1] * factor)
        x = gaussian_blur(x, sigma, self.blur_p, generator)
        return normalise(x, self.mean, self.std, self.channels)  # [B, channels, S, S]

    def __call__(self, x_u8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 [B, 1, H, W] -> two independent views, float [2, B, channels, size, size]."""
        return torch.stack([self.view(x_u8, generator), self.view(x_u8, generator)])

    def plain(self, x_u8: Tensor) -> Tensor:
        """The deterministic evaluation view (central square) with the same normalisation."""
        return to_float(center_resize(x_u8, self.size), self.mean, self.std, self.channels)

"""RandAugment for whole batches on their own device: timm's `rand-m{M}-mstd0.5-inc1`, no PIL.

The X-ray MAE paper fine-tunes with timm's `rand-m6-mstd0.5-inc1` (Xiao et al.; Cubuk et al.'s
RandAugment). timm applies it per image with PIL, which starves a GPU; this module reproduces its
semantics on a batch tensor:

- every image gets `num_ops` (2) layers; each layer picks one of the 15 ops of timm's
  `_RAND_INCREASING_TRANSFORMS` uniformly (with replacement) and applies it with probability 0.5;
- the magnitude is drawn per application as N(M, 0.5) clipped to [0, 10], and mapped to the op's
  argument exactly as timm's `LEVEL_TO_ARG` does (signed ops flip their sign with probability 0.5);
- geometric ops (rotate, shear, translate) of a layer run as one batched `affine_grid` +
  `grid_sample` with PIL's pixel-centre convention, bilinear, and PIL's fill outside the image
  (timm fills with the normalisation mean in 0..255, `fill`); timm also draws bicubic at random,
  which differs from bilinear by a fraction of a grey level;
- colour ops are elementwise with per-image factors; Color (saturation) is the identity on a
  grayscale image, as PIL's is; posterize, solarize, equalize and autocontrast use per-image
  thresholds and histograms.

Random numbers are drawn on the CPU (optionally from a `generator`), so a seed gives the same
augmentation on CPU and GPU. Pixels are float grey levels 0..255 inside; a uint8 batch is
truncated to whole levels after every op, as PIL does, so single ops match timm's to within one
grey level on a few pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cxr_lib.device import to_device

# timm's `_RAND_INCREASING_TRANSFORMS`, in its order (tests check they agree).
OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
AFFINE_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes live in [0, 10]


def _enhance(level: Tensor, sign: Tensor) -> Tensor:
    return torch.clamp(1.0 + sign * 0.9 * level, min=0.1)  # 1 is "no change"


# timm's level -> argument maps (level = magnitude / 10); `sign` is +-1 per image.
_ARGUMENT: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Rotate": lambda level, sign: 30.0 * level * sign,  # degrees, counter-clockwise
    "PosterizeIncreasing": lambda level, sign: 4 - torch.floor(level * 4),  # bits kept
    "SolarizeIncreasing": lambda level, sign: 256 - torch.clamp(torch.floor(level * 256), max=256),
    "SolarizeAdd": lambda level, sign: torch.clamp(torch.floor(level * 110), max=128),
    "ColorIncreasing": _enhance,
    "ContrastIncreasing": _enhance,
    "BrightnessIncreasing": _enhance,
    "SharpnessIncreasing": _enhance,
    "ShearX": lambda level, sign: 0.3 * level * sign,
    "ShearY": lambda level, sign: 0.3 * level * sign,
    "TranslateXRel": lambda level, sign: 0.45 * level * sign,  # fraction of the width
    "TranslateYRel": lambda level, sign: 0.45 * level * sign,
}


def op_argument(name: str, magnitude: Tensor, sign: Tensor) -> Tensor | None:
    """The argument timm passes op `name` at `magnitude` [n] (0..10) with `sign` [n] (+-1);
    None for the ops that take none (AutoContrast, Equalize, Invert)."""
    if name not in OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; expected one of {OPS}")
    fn = _ARGUMENT.get(name)
    return None if fn is None else fn(magnitude.double() / MAX_LEVEL, sign.double())


# ----------------------------------------------------------------------------- geometric ops

def affine_matrix(name: str, arg: Tensor, height: int, width: int) -> Tensor:
    """[n, 3, 3] maps from output to input pixel coordinates (pixel i spans [i, i+1)), as PIL's
    `Image.transform(AFFINE)` and `Image.rotate` (about the centre (w/2, h/2)) use them."""
    n = arg.shape[0]
    m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)  # [n, 3, 3]
    a = arg.double().cpu()
    if name == "ShearX":
        m[:, 0, 1] = a
    elif name == "ShearY":
        m[:, 1, 0] = a
    elif name == "TranslateXRel":
        m[:, 0, 2] = a * width
    elif name == "TranslateYRel":
        m[:, 1, 2] = a * height
    elif name == "Rotate":
        t = torch.deg2rad(a)
        cx, cy = width / 2, height / 2
        m[:, 0, 0], m[:, 0, 1] = t.cos(), -t.sin()
        m[:, 1, 0], m[:, 1, 1] = t.sin(), t.cos()
        m[:, 0, 2] = cx - t.cos() * cx + t.sin() * cy
        m[:, 1, 2] = cy - t.sin() * cx - t.cos() * cy
    else:
        raise ValueError(f"{name!r} is not a geometric op ({sorted(AFFINE_OPS)})")
    return m


def warp(v: Tensor, matrices: Tensor, fill: float) -> Tensor:
    """Resample images v [n, C, H, W] through pixel-coordinate maps [n, 3, 3] in one call.

    As PIL: bilinear between pixel centres, edge pixels extended up to the image border, `fill`
    where the source point falls outside the image.
    """
    n, c, h, w = v.shape
    to_norm = torch.tensor([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]], dtype=torch.float64)
    theta = to_norm @ matrices @ torch.linalg.inv(to_norm)  # [n, 3, 3], normalised coordinates
    grid = F.affine_grid(to_device(theta[:, :2], v.device, v.dtype), [n, c, h, w],
                         align_corners=False)  # [n, H, W, 2], source points in [-1, 1]
    out = F.grid_sample(v, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = ((grid >= -1) & (grid < 1)).all(dim=-1)[:, None]  # [n, 1, H, W]
    return torch.where(inside, out, torch.full_like(out, fill))  # [n, C, H, W]


# ----------------------------------------------------------------------------- pixel ops

# Constant kernels live on the CPU and are queued to the device with `to_device`: made from
# Python numbers on a GPU (or written into there), they would cost a host sync each call.
_LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601
_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13  # PIL SMOOTH


def _per_image(t: Tensor, v: Tensor) -> Tensor:
    return to_device(t, v.device, v.dtype).view(-1, 1, 1, 1)  # [n, 1, 1, 1]


def _grey(v: Tensor) -> Tensor:
    """PIL's convert("L"): the image itself for one channel, ITU-R 601 luma for RGB."""
    if v.shape[1] == 1:
        return v
    weights = to_device(_LUMA, v.device, v.dtype)
    return (v * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)  # [n, 1, H, W]


def _blend(degenerate: Tensor, v: Tensor, factor: Tensor) -> Tensor:
    """PIL's `Image.blend(degenerate, image, factor)`, the core of every ImageEnhance op."""
    return (degenerate + _per_image(factor, v) * (v - degenerate)).clamp(0, 255)


def _smooth(v: Tensor) -> Tensor:
    """PIL's ImageFilter.SMOOTH (3x3, centre 5, others 1, /13), border pixels kept."""
    c = v.shape[1]
    kernel = to_device(_SMOOTH, v.device, v.dtype).expand(c, 1, 3, 3)  # [C, 1, 3, 3]
    inner = F.conv2d(v, kernel, groups=c).round()  # [n, C, H-2, W-2]
    out = v.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def _lut_per_image(v: Tensor, lut: Tensor) -> Tensor:
    """Map grey levels through one 256-entry table per image and channel, lut [n*C, 256]."""
    n, c, h, w = v.shape
    levels = v.floor().clamp(0, 255).long().view(n * c, h * w)  # [n*C, H*W]
    return lut.gather(1, levels).view(n, c, h, w).to(v.dtype)


def _histograms(v: Tensor) -> Tensor:
    """Counts of each grey level, per image and channel: [n*C, 256]."""
    n, c, h, w = v.shape
    levels = v.floor().clamp(0, 255).long().view(n * c, h * w)  # [n*C, H*W]
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=v.device)
    return hist.scatter_add_(1, levels, torch.ones_like(levels))  # [n*C, 256]


def _autocontrast(v: Tensor) -> Tensor:
    """PIL's autocontrast: stretch [darkest, lightest] to [0, 255] (int() of the linear map)."""
    n, c = v.shape[:2]
    flat = v.floor().clamp(0, 255).reshape(n * c, -1).double()  # [n*C, H*W]
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)  # [n*C, 1]
    scale = 255.0 / (hi - lo).clamp(min=1)  # [n*C, 1]
    levels = torch.arange(256, device=v.device, dtype=torch.float64)  # [256]
    lut = torch.trunc(levels * scale + (-lo * scale)).clamp(0, 255)  # [n*C, 256]
    lut = torch.where(hi > lo, lut, levels.expand_as(lut))  # flat image: left alone
    return _lut_per_image(v, lut.long())


def _equalize(v: Tensor) -> Tensor:
    """PIL's equalize: a level maps to (step // 2 + pixels below it) // step, where step is the
    pixel count without the top occupied level, over 255; left alone when step is 0."""
    hist = _histograms(v)  # [n*C, 256]
    top = (hist > 0).long().cumsum(dim=1).argmax(dim=1, keepdim=True)  # last occupied level
    step = (hist.sum(dim=1, keepdim=True) - hist.gather(1, top)) // 255  # [n*C, 1]
    below = hist.cumsum(dim=1) - hist  # [n*C, 256] pixels strictly below each level
    lut = (step // 2 + below) // step.clamp(min=1)  # [n*C, 256]
    identity = torch.arange(256, device=v.device).expand_as(lut)
    return _lut_per_image(v, torch.where(step > 0, lut.clamp(max=255), identity))


def _posterize(v: Tensor, bits: Tensor) -> Tensor:
    step = _per_image(2.0 ** (8 - bits), v)  # keep the top `bits` bits; 0 bits -> black
    return torch.floor(v.floor() / step) * step


def _solarize(v: Tensor, threshold: Tensor) -> Tensor:
    return torch.where(v < _per_image(threshold, v), v, 255 - v)


def _solarize_add(v: Tensor, add: Tensor) -> Tensor:
    return torch.where(v < 128, (v + _per_image(add, v)).clamp(max=255), v)


def _contrast(v: Tensor, factor: Tensor) -> Tensor:
    mean = torch.floor(_grey(v).mean(dim=(1, 2, 3), keepdim=True) + 0.5)  # [n, 1, 1, 1]
    return _blend(mean.expand_as(v), v, factor)


_PIXEL_OPS: dict[str, Callable[..., Tensor]] = {
    "AutoContrast": lambda v, arg: _autocontrast(v),
    "Equalize": lambda v, arg: _equalize(v),
    "Invert": lambda v, arg: 255 - v,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": lambda v, arg: _blend(_grey(v).expand_as(v), v, arg),
    "ContrastIncreasing": _contrast,
    "BrightnessIncreasing": lambda v, arg: _blend(torch.zeros_like(v), v, arg),
    "SharpnessIncreasing": lambda v, arg: _blend(_smooth(v), v, arg),
}


def apply_op(name: str, v: Tensor, arg: Tensor | None, fill: float = 128.0) -> Tensor:
    """Op `name` on grey levels v [n, C, H, W] (float, 0..255) with per-image `arg` [n]."""
    if name in AFFINE_OPS:
        return warp(v, affine_matrix(name, arg, v.shape[2], v.shape[3]), fill)
    if name not in _PIXEL_OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; expected one of {OPS}")
    return _PIXEL_OPS[name](v, arg)


# ----------------------------------------------------------------------------- the policy

@dataclass(frozen=True)
class LayerDraw:
    """The random choices of one layer for a batch (CPU): op index, applied, magnitude, sign."""

    op: Tensor  # [B] int64 index into the op set
    applied: Tensor  # [B] bool
    magnitude: Tensor  # [B] float64 in [0, 10]
    sign: Tensor  # [B] float64, +-1


@dataclass(frozen=True)
class RandAugment:
    """timm's `rand-m{magnitude}-mstd{magnitude_std}-inc1` (n = num_ops, p = prob) on batches.

    `fill` is the grey level (0..255) shown where a geometric op uncovers the image: timm uses
    the normalisation mean, round(255 x mean).
    """

    magnitude: float = 9.0
    num_ops: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.5
    fill: float = 128.0
    ops: tuple[str, ...] = OPS

    def __post_init__(self) -> None:
        unknown = [name for name in self.ops if name not in OPS]
        if unknown or not self.ops:
            raise ValueError(f"RandAugment: unknown ops {unknown}; expected some of {OPS}")
        if not 0 <= self.magnitude <= MAX_LEVEL or self.magnitude_std < 0:
            raise ValueError(f"RandAugment: magnitude must lie in [0, 10] and magnitude_std be "
                             f">= 0, got {self.magnitude} and {self.magnitude_std}")

    def draw(self, batch: int, generator: torch.Generator | None = None) -> LayerDraw:
        """One layer's choices for `batch` images."""
        op = torch.randint(len(self.ops), (batch,), generator=generator)
        applied = torch.rand(batch, generator=generator) < self.prob
        noise = torch.randn(batch, generator=generator, dtype=torch.float64)
        magnitude = (self.magnitude + self.magnitude_std * noise).clamp(0, MAX_LEVEL)
        sign = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0).double()
        return LayerDraw(op, applied, magnitude, sign)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment x [B, C, H, W]: uint8, or float in 0..1; the dtype is kept."""
        if not torch.is_tensor(x) or x.ndim != 4:
            raise ValueError(f"RandAugment expects an image batch [B, C, H, W], got "
                             f"{tuple(x.shape) if hasattr(x, 'shape') else type(x).__name__}")
        whole = x.dtype == torch.uint8
        v = x.float() if whole else x.float() * 255  # [B, C, H, W] grey levels 0..255
        for _ in range(self.num_ops):
            v = self.layer(v, self.draw(x.shape[0], generator))
            if whole:  # PIL truncates every op's result to a whole level; the 1e-3 absorbs
                v = torch.floor(v + 1e-3)  # grid_sample's float error on an exact level
        return v.to(torch.uint8) if whole else (v / 255).to(x.dtype)

    def layer(self, v: Tensor, draw: LayerDraw) -> Tensor:
        """Apply one layer's draw to grey levels v [B, C, H, W]: pixel ops grouped by op, all
        geometric ops of the layer in one resampling."""
        out = v.clone()
        warped, matrices = [], []
        for k, name in enumerate(self.ops):
            rows = torch.nonzero((draw.op == k) & draw.applied)[:, 0]  # [n] on the CPU
            if len(rows) == 0:
                continue
            arg = op_argument(name, draw.magnitude[rows], draw.sign[rows])
            if name in AFFINE_OPS:
                warped.append(rows)
                matrices.append(affine_matrix(name, arg, v.shape[2], v.shape[3]))
            else:
                at = to_device(rows, v.device)
                out[at] = apply_op(name, v[at], None if arg is None else to_device(arg, v.device))
        if warped:
            at = to_device(torch.cat(warped), v.device)
            out[at] = warp(v[at], torch.cat(matrices), self.fill)
        return out


def fill_level(mean: float) -> float:
    """timm's fill for a normalisation mean in 0..1: round(255 x mean), at most 255."""
    return float(min(255, round(255 * mean)))

"""Masked autoencoder over Hiera (Ryali et al., ICML 2023), for chapter 6's MedTransformer run.

`HieraMae` follows facebookresearch/hiera `MaskedAutoencoderHiera`: it *is* a timm `Hiera`
without the classification head, so the encoder keeps timm's names at the top level
(`patch_embed`, `pos_embed`, `blocks`) and `encoder_state_dict()` loads straight into
`timm.create_model("hiera_tiny_224", **hiera_kwargs(size), ...)`. The MAE side carries the
official names: `multi_scale_fusion_heads`, `encoder_norm`, `decoder_embed`, `mask_token`,
`decoder_pos_embed`, `decoder_blocks`, `decoder_norm`, `decoder_pred`.

Hiera masks whole mask units (the windows its early stages attend within), never single
patches, and the encoder runs on the visible units only. As in the official code, the MAE pools
one stage fewer than the classifier, so each unit reaches the decoder as 2x2 tokens (16 px each
at 224) rather than one coarse token; pooling has no weights, so the encoder loads into the
classifier unchanged. The interface is the ViT MAE's (`cxr_lib.models.mae`): `forward` returns
(loss, pred, mask with 1 = masked), `patchify`/`unpatchify` cut images into the prediction
tokens, so the training engine, the probe and the pictures take either model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import timm
import torch
from timm.models.hiera import Hiera, Reroll, Unroll, undo_windowing
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from cxr_lib.models.mae import MaskedAutoencoder, init_linear_and_norm, is_decoder_key

HIERA_PRESETS: Mapping[str, str] = {
    "hiera_tiny": "hiera_tiny_224",
    "hiera_small": "hiera_small_224",
    "hiera_base": "hiera_base_224",
}

# The stage layout of each timm variant (timm's `hiera_*_224` functions), which `Hiera` itself
# takes as arguments; a test checks the MAE's encoder against `timm.create_model`.
_ARCH: Mapping[str, dict] = {
    "hiera_tiny_224": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2)),
    "hiera_small_224": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2)),
    "hiera_base_224": dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3)),
}

PATCH_STRIDE = 4  # pixels per token side at the first stage (timm's `patch_stride`)
_UNROLLS = 3  # timm unrolls tokens by 2x2 three times (once per stage transition)


def hiera_kwargs(img_size: int) -> dict:
    """The timm kwargs that shape a Hiera for `img_size`, shared by MAE and classifier.

    Mask units of 8x8 tokens (q_pool 3, timm's default: 7x7 units at 224) when that leaves at
    least 4 units per side; below 128 px, 4x4 tokens (q_pool 2), so a 64 px image still has
    16 units to mask. timm's three 2x2 unrolls need tokens per side divisible by 8.
    """
    step = PATCH_STRIDE * 2**_UNROLLS
    if img_size <= 0 or img_size % step:
        raise ValueError(f"Hiera needs an img_size divisible by {step} (e.g. 64, 96, 128, 224, "
                         f"256): patch stride {PATCH_STRIDE} and three 2x2 poolings; got "
                         f"{img_size}")
    tokens = img_size // PATCH_STRIDE
    unit, q_pool = (8, 3) if tokens // 8 >= 4 else (4, 2)
    return {"img_size": (img_size, img_size), "mask_unit_size": (unit, unit), "q_pool": q_pool}


@dataclass(frozen=True)
class HieraMaeConfig:
    """Everything that fixes a HieraMae: the encoder preset and size, Hiera's MAE defaults
    (mask 60% of the units, per-patch normalised targets, an 8-block 512-wide decoder)."""

    model: str = "hiera_tiny"
    img_size: int = 224
    in_chans: int = 1
    mask_ratio: float = 0.6
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        if self.model not in HIERA_PRESETS:
            raise ValueError(f"unknown Hiera MAE model {self.model!r}: expected one of "
                             f"{sorted(HIERA_PRESETS)}")
        hiera_kwargs(self.img_size)
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    @property
    def timm_name(self) -> str:
        return HIERA_PRESETS[self.model]

    @property
    def encoder_kwargs(self) -> dict:
        """`hiera_kwargs` with one pooling fewer: the MAE encoder's shape (same weights)."""
        kwargs = hiera_kwargs(self.img_size)
        return {**kwargs, "q_pool": kwargs["q_pool"] - 1}


def apply_fusion_head(head: nn.Module, x: Tensor) -> Tensor:
    """Run a stage's fusion conv inside each mask unit: [B, K, h, w, C] -> [B, K, h', w', C']."""
    if isinstance(head, nn.Identity):
        return x
    b, k = x.shape[:2]
    y = head(x.flatten(0, 1).permute(0, 3, 1, 2))  # [B*K, C', h', w']
    return y.permute(0, 2, 3, 1).reshape(b, k, *y.shape[2:], y.shape[1])  # [B, K, h', w', C']


class HieraMae(Hiera):
    """MAE with a Hiera encoder: encode the visible mask units, fuse every stage's features
    at the last stage's resolution, reconstruct the pixels of the hidden units."""

    def __init__(self, config: HieraMaeConfig) -> None:
        kwargs = config.encoder_kwargs
        super().__init__(in_chans=config.in_chans, num_classes=0, patch_stride=(PATCH_STRIDE,) * 2,
                         **_ARCH[config.timm_name], **kwargs)
        del self.head  # the MAE has no classifier
        self.config = config
        # timm's names for the first conv and classifier, as on every timm model, so that
        # `classifier.load_start` can fit ImageNet weights into this MAE.
        self.pretrained_cfg = timm.models.get_pretrained_cfg(config.timm_name).to_dict()
        # timm drops token n with unit n % U, true only when the tokens are unrolled once per
        # halving of a unit side: timm's fixed three for 8x8 units, but two for 4x4 units
        # (with three, masking 4x4 units fails). Unroll and Reroll hold no weights.
        unrolls = [self.q_stride] * int(math.log2(self.mask_unit_size[0]))
        size = kwargs["img_size"]
        self.unroll = Unroll(size, self.patch_stride, unrolls)
        self.reroll = Reroll(size, self.patch_stride, unrolls, self.stage_ends, self.q_pool)

        shrink = 2**self.q_pool
        self.unit_final = [s // shrink for s in self.mask_unit_size]  # tokens per unit side
        self.grid_final = [s // shrink for s in self.tokens_spatial_shape]  # tokens per side
        self.pred_stride = PATCH_STRIDE * shrink  # pixels per prediction token side
        dim = self.blocks[-1].dim_out
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.encoder_norm = norm(dim)
        self.multi_scale_fusion_heads = nn.ModuleList()
        unit = self.mask_unit_size[0]
        for end in self.stage_ends[:self.q_pool]:  # stages at a finer resolution than the last
            k = unit // self.unit_final[0]
            self.multi_scale_fusion_heads.append(
                nn.Conv2d(self.blocks[end].dim_out, dim, kernel_size=k, stride=k))
            unit //= 2
        self.multi_scale_fusion_heads.append(nn.Identity())  # the last stage as it is

        ddim = config.decoder_dim
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))  # [1, 1, Dd]
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid_final), ddim))
        self.decoder_blocks = nn.Sequential(*[
            Block(ddim, config.decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
            for _ in range(config.decoder_depth)
        ])
        self.decoder_norm = norm(ddim)
        self.decoder_pred = nn.Linear(ddim, config.in_chans * self.pred_stride**2)
        self._init_mae_weights()

    @property
    def mask_ratio(self) -> float:
        return self.config.mask_ratio

    @property
    def num_units(self) -> int:
        return math.prod(self.mask_spatial_shape)

    def _init_mae_weights(self) -> None:
        """Hiera MAE's initialisation: mask token and decoder positions N(0, 0.02) truncated,
        every Linear and the patch projection xavier-uniform, LayerNorms identity."""
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        init_linear_and_norm(self)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def patchify(self, imgs: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, L, C*p*p]: one row per prediction token, tokens in raster order,
        pixels inside a token ordered (channel, row, col) as Hiera's MAE orders its targets, so
        a released `decoder_pred` predicts each pixel where this target has it (the ViT MAE
        orders (row, col, channel), as MAE's code does; with one channel both are the same)."""
        p, (h, w), c = self.pred_stride, self.grid_final, self.config.in_chans
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)  # [B, C, h, p, w, p]
        x = torch.einsum("nchpwq->nhwcpq", x)  # [B, h, w, C, p, p]
        return x.reshape(imgs.shape[0], h * w, c * p * p)  # [B, L, C*p*p]

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, L, C*p*p] -> [B, C, H, W]; the inverse of `patchify`."""
        p, (h, w), c = self.pred_stride, self.grid_final, self.config.in_chans
        x = x.reshape(x.shape[0], h, w, c, p, p)  # [B, h, w, C, p, p]
        x = torch.einsum("nhwcpq->nchpwq", x)  # [B, C, h, p, w, p]
        return x.reshape(x.shape[0], c, h * p, w * p)  # [B, C, H, W]

    def fit_pred_rows(self, value: Tensor) -> Tensor:
        """A file's `decoder_pred` weight [C'*p*p, Dd] or bias [C'*p*p] for this MAE's channels
        (rows ordered as `patchify`'s): to one channel, the C' rows of each pixel averaged; from
        one channel, its row repeated; any other shape unchanged (a mismatch for the caller).

        Averaging is exact for a grey image fed as RGB without per-patch normalisation (its
        three targets of a pixel are equal, and the mean of three predictions of one value is
        their least-squares best single one); with `norm_pix_loss` the 1-channel target is the
        3-channel one times sqrt(3(n-1)/(3n-1)) for n pixels a token (0.9987 at 16 px).
        """
        pixels, chans = self.pred_stride**2, self.config.in_chans
        if value.shape[0] % pixels:
            return value
        rows = value.reshape(value.shape[0] // pixels, pixels, *value.shape[1:])  # [C', p*p, ...]
        if chans == 1:
            rows = rows.mean(dim=0, keepdim=True)  # [1, p*p, ...]
        elif len(rows) == 1:
            rows = rows.expand(chans, *rows.shape[1:])  # [C, p*p, ...]
        return rows.reshape(-1, *value.shape[1:])  # [C*p*p, ...]

    def random_units(self, imgs: Tensor, mask_ratio: float) -> Tensor:
        """timm's unit mask [B, U] (True = visible), keeping int(U * (1 - mask_ratio)) units."""
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if int(self.num_units * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio {mask_ratio} leaves no visible unit out of "
                             f"{self.num_units}")
        return self.get_random_mask(imgs, mask_ratio)  # [B, U]

    def token_mask(self, keep: Tensor) -> Tensor:
        """Unit mask [B, U] (True = visible) -> per prediction token [B, L], 1 = masked."""
        (uy, ux), (fy, fx) = self.mask_spatial_shape, self.unit_final
        hidden = (~keep).float().view(-1, uy, ux)  # [B, Uy, Ux]
        return hidden.repeat_interleave(fy, 1).repeat_interleave(fx, 2).flatten(1)  # [B, L]

    def forward_encoder(self, imgs: Tensor, keep: Tensor) -> Tensor:
        """Encode the visible units and fuse the stages: [B, K, fy, fx, D] (K visible units)."""
        _, stages = super().forward_features(imgs, mask=keep, return_intermediates=True)
        stages = stages[:self.q_pool] + stages[-1:]  # later stages share the last resolution
        fused = sum(apply_fusion_head(head, x)
                    for head, x in zip(self.multi_scale_fusion_heads, stages, strict=True))
        return self.encoder_norm(fused)  # [B, K, fy, fx, D]

    def forward_features(self, imgs: Tensor) -> Tensor:
        """The unmasked encoder's last-stage tokens [B, 1+L', D], led by their average where a
        ViT has its class token, so `probe.MaePooledFeatures` (mean of tokens[:, 1:]) reads
        that average: what a Hiera classifier's head pools."""
        x = super().forward_features(imgs)  # [B, L', D]
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1+L', D]

    def forward_decoder(self, latent: Tensor, keep: Tensor) -> Tensor:
        """Put the visible units' tokens in place, mask tokens elsewhere, predict every pixel."""
        x = self.decoder_embed(latent)  # [B, K, fy, fx, Dd]
        grid = x.new_zeros(*keep.shape, *x.shape[2:])  # [B, U, fy, fx, Dd]
        grid[keep] = x.flatten(0, 1)
        grid = torch.where(keep[:, :, None, None, None], grid, self.mask_token)
        x = undo_windowing(grid, self.grid_final, self.unit_final)  # [B, H', W', Dd]
        x = x.flatten(1, 2) + self.decoder_pos_embed  # [B, L, Dd], raster order
        x = self.decoder_norm(self.decoder_blocks(x))  # [B, L, Dd]
        return self.decoder_pred(x)  # [B, L, C*p*p]

    # The ViT MAE's target, loss and pictures read only `patchify`, `unpatchify`, `forward`
    # and `config.norm_pix_loss`: shared, so both models compute them the same way.
    loss_target = MaskedAutoencoder.loss_target
    forward_loss = MaskedAutoencoder.forward_loss
    reconstruct = MaskedAutoencoder.reconstruct

    def forward(self, imgs: Tensor, mask_ratio: float | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (loss [], pred [B, L, C*p*p], mask [B, L] with 1 = masked, the reverse of
        timm's unit mask); `mask_ratio` overrides the config's."""
        keep = self.random_units(imgs, self.mask_ratio if mask_ratio is None else mask_ratio)
        pred = self.forward_decoder(self.forward_encoder(imgs, keep), keep)  # [B, L, C*p*p]
        mask = self.token_mask(keep)  # [B, L]
        return self.forward_loss(imgs, pred, mask), pred, mask

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights under timm's Hiera names (no fusion heads, decoder or head),
        ready for `timm.create_model(..., num_classes=n).load_state_dict(sd, strict=False)`."""
        return {k: v for k, v in self.state_dict().items() if not is_decoder_key(k)}


def build_hiera_mae(model: str = "hiera_tiny", *, img_size: int = 224,
                    patch_size: int | None = None, in_chans: int = 1, mask_ratio: float = 0.6,
                    decoder_dim: int | None = None, decoder_depth: int | None = None,
                    decoder_heads: int | None = None, norm_pix_loss: bool = True) -> HieraMae:
    """A HieraMae from a preset name, with `build_mae`'s keywords so a recipe can call either;
    None means Hiera's value (patch stride 4, decoder 512 wide, 8 blocks, 16 heads)."""
    if patch_size not in (None, PATCH_STRIDE):
        raise ValueError(f"Hiera's patch stride is {PATCH_STRIDE}; patch_size must be None or "
                         f"{PATCH_STRIDE}, got {patch_size}")
    defaults = HieraMaeConfig()
    return HieraMae(HieraMaeConfig(
        model=model, img_size=img_size, in_chans=in_chans, mask_ratio=mask_ratio,
        decoder_dim=defaults.decoder_dim if decoder_dim is None else decoder_dim,
        decoder_depth=defaults.decoder_depth if decoder_depth is None else decoder_depth,
        decoder_heads=defaults.decoder_heads if decoder_heads is None else decoder_heads,
        norm_pix_loss=norm_pix_loss,
    ))

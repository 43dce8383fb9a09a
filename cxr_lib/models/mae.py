"""Masked autoencoder (He et al., CVPR 2022) over a timm Vision Transformer.

The encoder is timm's own `VisionTransformer` pieces (`patch_embed`, `cls_token`, `blocks`,
`norm`) kept as top-level attributes under timm's names, so `encoder_state_dict(mae)` loads
straight into `timm.create_model(...)` for fine-tuning, and released MAE checkpoints (which use
the same names, plus `decoder_*` and `mask_token` for the decoder) load into this module.
Position embeddings are fixed 2-D sine-cosine tables, identical to the released models', so they
can be regenerated for any grid instead of interpolated.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

# The X-ray MAE's share of masked patches (Xiao et al.; the natural-image MAE masks 0.75): the
# library's one statement of it, which MaeConfig, MaeRecipe and `cxr pretrain mae` default to
PAPER_MASK_RATIO = 0.9


def visible_count(tokens: int, mask_ratio: float) -> int:
    """How many of `tokens` patches the encoder sees: int(L x (1 - mask_ratio)), as MAE's
    code (and Xiao et al.'s) computes it, so 19 of 196 at 0.9, not 20."""
    return int(tokens * (1.0 - mask_ratio))


@dataclass(frozen=True)
class MaePreset:
    """A named encoder with the decoder the X-ray MAE paper (Xiao et al., WACV 2023) pairs it
    with: a light 2-block decoder for the small ViTs, MAE's 8-block decoder for ViT-B."""

    timm_name: str
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int


PRESETS: Mapping[str, MaePreset] = {
    "vit_tiny_patch16": MaePreset("vit_tiny_patch16_224", 512, 2, 16),
    "vit_small_patch16": MaePreset("vit_small_patch16_224", 512, 2, 16),
    "vit_base_patch16": MaePreset("vit_base_patch16_224", 512, 8, 16),
}


@dataclass(frozen=True)
class MaeConfig:
    """Everything that fixes a MaskedAutoencoder's architecture and its default mask ratio."""

    model: str = "vit_small_patch16"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    mask_ratio: float = PAPER_MASK_RATIO
    decoder_dim: int = 512
    decoder_depth: int = 2
    decoder_heads: int = 16
    norm_pix_loss: bool = False

    def __post_init__(self) -> None:
        if self.model not in PRESETS:
            raise ValueError(f"unknown MAE model {self.model!r}: expected one of {sorted(PRESETS)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size "
                             f"{self.patch_size}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    @property
    def timm_name(self) -> str:
        return PRESETS[self.model].timm_name

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sine-cosine position embedding, [1, (1 +) grid*grid, dim].

    Same layout as facebookresearch/mae `get_2d_sincos_pos_embed`: the first half of the
    channels encodes a patch's column, the second half its row, each as [sin | cos] over
    `dim/4` frequencies; the class token gets zeros. Matching it exactly means a released
    encoder sees the positions it was trained with, on any grid.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )  # [G, G] each
    emb = torch.cat([_sincos_1d(dim // 2, cols.flatten()), _sincos_1d(dim // 2, rows.flatten())],
                    dim=1)  # [G*G, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)  # [1+G*G, D]
    return emb.float().unsqueeze(0)  # [1, (1+)G*G, D]


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # [D/2]
    angles = pos[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # [M, D]


def init_linear_and_norm(model: nn.Module) -> None:
    """MAE's initialisation of every Linear (xavier-uniform, zero bias) and LayerNorm
    (identity), in module order; the ViT and the Hiera MAE share it."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MaskedAutoencoder(nn.Module):
    """MAE: encode a random `1 - mask_ratio` of the patches, reconstruct the rest's pixels.

    Encoder attributes carry timm's ViT names; decoder attributes are prefixed `decoder_`
    (plus `mask_token`), the layout of the released MAE checkpoints.
    """

    def __init__(self, config: MaeConfig) -> None:
        super().__init__()
        self.config = config
        vit: VisionTransformer = timm.create_model(
            config.timm_name, pretrained=False, img_size=config.img_size,
            patch_size=config.patch_size, in_chans=config.in_chans, num_classes=0,
            drop_path_rate=0.0,
        )
        dim = vit.embed_dim
        # Encoder: timm's modules under timm's names.
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.blocks = vit.blocks
        self.norm = vit.norm
        # Fixed tables are buffers, so no optimiser (or an `unfreeze()`) ever trains them.
        self.register_buffer("pos_embed", sincos_pos_embed(dim, config.grid))  # [1, 1+L, D]

        # Decoder: a narrow transformer that sees every position, visible or masked.
        ddim = config.decoder_dim
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))  # [1, 1, Dd]
        dpos = sincos_pos_embed(ddim, config.grid)  # [1, 1+L, Dd]
        self.register_buffer("decoder_pos_embed", dpos)
        # MAE's LayerNorm eps (1e-6), stated: timm's Block default was 1e-5 before timm 1.0.16.
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.Sequential(*[
            Block(ddim, config.decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
            for _ in range(config.decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(ddim, eps=1e-6)
        self.decoder_pred = nn.Linear(ddim, config.patch_size**2 * config.in_chans)
        self._init_weights()

    @property
    def mask_ratio(self) -> float:
        return self.config.mask_ratio

    def _init_weights(self) -> None:
        """MAE's initialisation: the patch projection and every Linear xavier-uniform (as JAX
        ViT), tokens N(0, 0.02), LayerNorms identity."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        init_linear_and_norm(self)

    def patchify(self, imgs: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, L, p*p*C], pixels inside a patch ordered (row, col, channel)."""
        p, g, c = self.config.patch_size, self.config.grid, self.config.in_chans
        x = imgs.reshape(imgs.shape[0], c, g, p, g, p)  # [B, C, h, p, w, p]
        x = torch.einsum("nchpwq->nhwpqc", x)  # [B, h, w, p, p, C]
        return x.reshape(imgs.shape[0], g * g, p * p * c)  # [B, L, p*p*C]

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, L, p*p*C] -> [B, C, H, W]; the inverse of `patchify`."""
        p, g, c = self.config.patch_size, self.config.grid, self.config.in_chans
        x = x.reshape(x.shape[0], g, g, p, p, c)  # [B, h, w, p, p, C]
        x = torch.einsum("nhwpqc->nchpwq", x)  # [B, C, h, p, w, p]
        return x.reshape(x.shape[0], c, g * p, g * p)  # [B, C, H, W]

    def random_masking(self, x: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
        """Keep a random `visible_count(L, mask_ratio)` tokens per sample.

        Sorting uniform noise gives every sample its own random permutation; the first
        `keep` of it are visible. Returns the visible tokens [B, K, D], the mask [B, L] in
        the original order (1 = masked) and `ids_restore` [B, L], which undoes the shuffle.
        """
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        b, n, d = x.shape  # B, L, D
        keep = visible_count(n, mask_ratio)
        if keep < 1:
            raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {n}")
        noise = torch.rand(b, n, device=x.device)  # [B, L]
        ids_shuffle = torch.argsort(noise, dim=1)  # [B, L]; ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, L]
        ids_keep = ids_shuffle[:, :keep]  # [B, K]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [B, K, D]
        mask = torch.ones(b, n, device=x.device)  # [B, L] in shuffled order
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # [B, L] in patch order
        return x_masked, mask, ids_restore

    def _encode_tokens(self, x: Tensor) -> Tensor:
        """Prepend the class token to position-embedded patch tokens, run blocks and norm."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1)  # [B, 1+K, D]
        return self.norm(self.blocks(x))  # [B, 1+K, D]

    def forward_encoder(self, imgs: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
        """Encode only the visible patches: returns latent [B, 1+K, D], mask, ids_restore."""
        x = self.patch_embed(imgs)  # [B, L, D]
        x = x + self.pos_embed[:, 1:]  # [B, L, D]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)  # [B, K, D]
        return self._encode_tokens(x), mask, ids_restore  # [B, 1+K, D], [B, L], [B, L]

    def forward_features(self, imgs: Tensor) -> Tensor:
        """The unmasked encoder, tokens in patch order: equals timm's `forward_features`."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # [B, L, D]
        return self._encode_tokens(x)  # [B, 1+L, D]

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Fill the masked places with the mask token, unshuffle, predict every patch's pixels."""
        x = self.decoder_embed(latent)  # [B, 1+K, Dd]
        b, n = ids_restore.shape  # B, L
        masks = self.mask_token.expand(b, n + 1 - x.shape[1], -1)  # [B, L-K, Dd]
        tokens = torch.cat([x[:, 1:], masks], dim=1)  # [B, L, Dd], shuffled order
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2])  # [B, L, Dd]
        tokens = torch.gather(tokens, 1, index)  # [B, L, Dd], patch order
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed  # [B, 1+L, Dd]
        x = self.decoder_norm(self.decoder_blocks(x))  # [B, 1+L, Dd]
        return self.decoder_pred(x)[:, 1:]  # [B, L, p*p*C]

    def loss_target(self, imgs: Tensor) -> Tensor:
        """What the decoder must predict: the patches, or with `norm_pix_loss` each patch
        normalised by its own mean and variance (MAE's better-representation variant)."""
        target = self.patchify(imgs)  # [B, L, p*p*C]
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)  # [B, L, 1]
            var = target.var(dim=-1, keepdim=True)  # [B, L, 1]
            target = (target - mean) / (var + 1e-6) ** 0.5  # [B, L, p*p*C]
        return target

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over the masked patches only; visible ones cost nothing."""
        per_patch = ((pred - self.loss_target(imgs)) ** 2).mean(dim=-1)  # [B, L]
        return (per_patch * mask).sum() / mask.sum()  # []

    def forward(self, imgs: Tensor, mask_ratio: float | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (loss [], pred [B, L, p*p*C], mask [B, L]); `mask_ratio` overrides config."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio)  # [B, 1+K, D]
        pred = self.forward_decoder(latent, ids_restore)  # [B, L, p*p*C]
        return self.forward_loss(imgs, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, imgs: Tensor, mask_ratio: float | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """Pictures for the book: (masked input, prediction, prediction with the visible
        patches pasted back), each [B, C, H, W] in the input's units; masked pixels are 0.

        With `norm_pix_loss` the prediction is per-patch normalised, so it is mapped back with
        each true patch's mean and spread, as the MAE paper's figures do.
        """
        _, pred, mask = self(imgs, mask_ratio)  # [B, L, p*p*C], [B, L]
        patches = self.patchify(imgs)  # [B, L, p*p*C]
        if self.config.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)  # [B, L, 1]
            std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5  # [B, L, 1]
            pred = pred * std + mean  # [B, L, p*p*C]
        m = mask.unsqueeze(-1)  # [B, L, 1]
        masked = self.unpatchify(patches * (1 - m))  # [B, C, H, W]
        pasted = self.unpatchify(patches * (1 - m) + pred * m)  # [B, C, H, W]
        return masked, self.unpatchify(pred), pasted


def build_mae(model: str = "vit_small_patch16", *, img_size: int = 224,
              patch_size: int | None = None, in_chans: int = 1,
              mask_ratio: float = PAPER_MASK_RATIO,
              decoder_dim: int | None = None, decoder_depth: int | None = None,
              decoder_heads: int | None = None, norm_pix_loss: bool = False
              ) -> MaskedAutoencoder:
    """A MAE from a preset name; None means the preset's value (patch 16, its decoder)."""
    if model not in PRESETS:
        raise ValueError(f"unknown MAE model {model!r}: expected one of {sorted(PRESETS)}")
    preset = PRESETS[model]
    config = MaeConfig(
        model=model, img_size=img_size, patch_size=16 if patch_size is None else patch_size,
        in_chans=in_chans,
        mask_ratio=mask_ratio,
        decoder_dim=preset.decoder_dim if decoder_dim is None else decoder_dim,
        decoder_depth=preset.decoder_depth if decoder_depth is None else decoder_depth,
        decoder_heads=preset.decoder_heads if decoder_heads is None else decoder_heads,
        norm_pix_loss=norm_pix_loss,
    )
    return MaskedAutoencoder(config)


def is_decoder_key(key: str) -> bool:
    """Decoder-side tensors: MAE's `decoder_*` and `mask_token`, and the Hiera MAE's
    `multi_scale_fusion_heads` with their `encoder_norm`, which feed only its decoder."""
    return key.startswith(("decoder_", "mask_token", "multi_scale_fusion_heads.",
                           "encoder_norm."))


def encoder_state_dict(mae: MaskedAutoencoder) -> dict[str, Tensor]:
    """The encoder's weights under timm's ViT names (no decoder), ready for
    `timm.create_model(..., num_classes=n).load_state_dict(sd, strict=False)`."""
    return {k: v for k, v in mae.state_dict().items() if not is_decoder_key(k)}


def to_timm_vit(mae: MaskedAutoencoder, num_classes: int, **timm_kwargs) -> VisionTransformer:
    """A timm ViT of the MAE's shape initialised from its encoder (the head stays random):
    the starting point for fine-tuning. `timm_kwargs` go to `timm.create_model`."""
    c = mae.config
    vit = timm.create_model(c.timm_name, pretrained=False, img_size=c.img_size,
                            patch_size=c.patch_size, in_chans=c.in_chans,
                            num_classes=num_classes, **timm_kwargs)
    vit.load_state_dict(encoder_state_dict(mae), strict=False)
    return vit


@dataclass
class LoadReport:
    """What `load_mae_checkpoint` did with each tensor."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # the model's, absent from the file
    unexpected: list[str] = field(default_factory=list)  # the file's, unknown to the model
    regenerated: list[str] = field(default_factory=list)  # fixed sin-cos tables, other grid
    adapted: list[str] = field(default_factory=list)  # first conv / pixel predictor, channels
    mismatched: list[str] = field(default_factory=list)  # other shapes, left as initialised

    @property
    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "regenerated", "adapted", "mismatched"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
                parts.append(f"{name} {len(keys)} ({shown})")
        return "; ".join(parts)

    def __str__(self) -> str:
        return self.summary


def adapt_input_channels(weight: Tensor, in_chans: int) -> Tensor:
    """A first-layer kernel [O, C, k, k] for `in_chans` inputs that gives the same output on a
    gray image fed as C replicated channels: summed to 1 channel, or a 1-channel kernel split
    evenly over 3 (timm's `adapt_input_conv` rule, written here because its `base_chans`
    argument is absent from the timm releases this project allows)."""
    chans = weight.shape[1]
    if chans == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)  # [O, 1, k, k]
    if chans == 1:
        return weight.repeat(1, in_chans, 1, 1) / in_chans  # [O, C, k, k]
    raise ValueError(f"cannot adapt a {chans}-channel kernel to {in_chans} channels")


def adapt_output_channels(value: Tensor, pixels: int, chans: int) -> Tensor:
    """A pixel predictor's weight [P*c, D] or bias [P*c] (outputs ordered pixel, channel, as
    `patchify`) for `chans` channels instead of c: the mean of the c channel predictions (an RGB
    MAE trained on replicated gray X-rays predicts each pixel c times), or 1 copied to each."""
    have = value.shape[0] // pixels
    if have == chans:
        return value
    per_pixel = value.reshape(pixels, have, *value.shape[1:])  # [P, c, (D)]
    if chans == 1:
        return per_pixel.mean(dim=1).reshape(pixels, *value.shape[1:])  # [P, (D)]
    if have == 1:
        return per_pixel.expand(pixels, chans, *value.shape[1:]).reshape(
            pixels * chans, *value.shape[1:])  # [P*C, (D)]
    raise ValueError(f"cannot adapt a {have}-channel pixel predictor to {chans} channels")


def load_mae_checkpoint(mae: MaskedAutoencoder,
                        path_or_state: str | Path | Mapping[str, Tensor]) -> LoadReport:
    """Load MAE/ViT weights leniently and say what happened.

    Accepts a file or a dict: the released layout (`{"model": state_dict, ...}`) or a bare
    state dict, with or without a DDP `module.` prefix. Position tables on another grid are
    kept as regenerated (they are fixed sin-cos); a patch projection and a pixel predictor
    (`decoder_pred`) of another channel count are adapted (`adapt_input_channels`,
    `adapt_output_channels`), so continued pre-training of a released RGB MAE on 1-channel
    X-rays keeps its decoder; other shape mismatches are skipped; the rest loads with
    strict=False.
    """
    source = str(path_or_state) if isinstance(path_or_state, (str, Path)) else "state dict"
    state = _read_state(path_or_state, source)
    own = mae.state_dict()
    report = LoadReport()
    usable: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in own or value.shape == own[key].shape:
            usable[key] = value
        elif key in ("pos_embed", "decoder_pos_embed"):
            report.regenerated.append(key)
        elif key == "patch_embed.proj.weight" and value.shape[2:] == own[key].shape[2:]:
            usable[key] = adapt_input_channels(value, mae.config.in_chans)
            report.adapted.append(key)
        elif key.startswith("decoder_pred.") and value.shape[1:] == own[key].shape[1:]:
            usable[key] = adapt_output_channels(value, mae.config.patch_size**2,
                                                mae.config.in_chans)
            report.adapted.append(key)
        else:
            report.mismatched.append(key)
    result = mae.load_state_dict(usable, strict=False)
    skipped = set(report.regenerated) | set(report.mismatched)
    report.missing = [k for k in result.missing_keys if k not in skipped]
    report.unexpected = list(result.unexpected_keys)
    report.loaded = [k for k in usable if k in own]
    if not report.loaded:
        raise ValueError(f"{source}: no tensor matches the MAE's keys (is it a MAE/ViT "
                         f"checkpoint?); file keys start {list(state)[:5]}")
    return report


def _read_state(path_or_state: str | Path | Mapping[str, Tensor], source: str
                ) -> dict[str, Tensor]:
    if isinstance(path_or_state, (str, Path)):
        path = Path(path_or_state)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint file not found")
        # MAE's training script also saves its argparse `args`: allow that plain class only.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = path_or_state
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: expected a state dict or {{'model': state dict}}, "
                         f"got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}

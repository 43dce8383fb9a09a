"""Models: the masked autoencoders over timm's Vision Transformer and Hiera; `family` says
which of ViT, Hiera or CNN a model name is (models/families.py, the one registry)."""

from cxr_lib.models.families import FAMILIES, family, mae_family, timm_name
from cxr_lib.models.hiera_mae import (
    HIERA_PRESETS,
    HieraMae,
    HieraMaeConfig,
    build_hiera_mae,
    hiera_kwargs,
)
from cxr_lib.models.mae import (
    PRESETS,
    LoadReport,
    MaeConfig,
    MaskedAutoencoder,
    build_mae,
    encoder_state_dict,
    load_mae_checkpoint,
    sincos_pos_embed,
    to_timm_vit,
)

__all__ = [
    "FAMILIES",
    "HIERA_PRESETS",
    "PRESETS",
    "HieraMae",
    "HieraMaeConfig",
    "LoadReport",
    "MaeConfig",
    "MaskedAutoencoder",
    "build_hiera_mae",
    "build_mae",
    "encoder_state_dict",
    "family",
    "hiera_kwargs",
    "load_mae_checkpoint",
    "mae_family",
    "sincos_pos_embed",
    "timm_name",
    "to_timm_vit",
]

"""Models: the masked autoencoders over timm's Vision Transformer and Hiera."""

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
    "hiera_kwargs",
    "load_mae_checkpoint",
    "sincos_pos_embed",
    "to_timm_vit",
]

"""Models: the masked autoencoder over timm's Vision Transformer."""

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
    "PRESETS",
    "LoadReport",
    "MaeConfig",
    "MaskedAutoencoder",
    "build_mae",
    "encoder_state_dict",
    "load_mae_checkpoint",
    "sincos_pos_embed",
    "to_timm_vit",
]

"""The one registry of model families: which names the library knows, and whether each is a
ViT, a Hiera or a CNN. Fine-tuning, MAE pre-training, the cocktail and the command ask it.

A model is named by an MAE preset (`vit_small_patch16`, `hiera_tiny`: models/mae.py and
models/hiera_mae.py define their architectures) or by its timm name (`vit_small_patch16_224`,
`hiera_tiny_224`, `densenet121`).
"""

from __future__ import annotations

from typing import Literal

from cxr_lib.models.hiera_mae import HIERA_PRESETS
from cxr_lib.models.mae import PRESETS

Family = Literal["vit", "hiera", "cnn"]

CNNS = ("densenet121", "resnet50")
VITS = tuple(preset.timm_name for preset in PRESETS.values())
HIERAS = tuple(HIERA_PRESETS.values())
FAMILIES: dict[Family, tuple[str, ...]] = {"vit": VITS, "hiera": HIERAS, "cnn": CNNS}
MAE_FAMILIES: dict[Family, tuple[str, ...]] = {"vit": tuple(PRESETS),
                                               "hiera": tuple(HIERA_PRESETS)}


def timm_name(model: str) -> str:
    """timm's name for `model`: an MAE preset (vit_small_patch16, hiera_tiny) or a timm name."""
    name = PRESETS[model].timm_name if model in PRESETS else HIERA_PRESETS.get(model, model)
    if name not in VITS + HIERAS + CNNS:
        raise ValueError(f"unknown classifier {model!r}; expected one of "
                         f"{sorted(PRESETS) + sorted(HIERA_PRESETS) + list(VITS + HIERAS + CNNS)}")
    return name


def family(model: str) -> Family:
    """'vit', 'hiera' or 'cnn' for any model the library knows (an unknown one is an error)."""
    name = timm_name(model)
    return next(kind for kind, names in FAMILIES.items() if name in names)


def mae_family(model: str) -> Family:
    """'vit' or 'hiera' for an MAE preset (the names an MAE is built from)."""
    for kind, names in MAE_FAMILIES.items():
        if model in names:
            return kind
    raise ValueError(f"unknown MAE model {model!r}: expected one of "
                     f"{sorted(PRESETS) + sorted(HIERA_PRESETS)}")

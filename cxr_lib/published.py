"""Published results, shown beside ours and always labelled as theirs.

Mean ROC AUC (%) over the 14 findings on the official ChestX-ray14 test split, as the papers
report them; none of these numbers was computed by this project. MedTransformer's evaluation
script (github.com/GiilDe/med-hiera) averages 15 labels: the 14 findings and "No Finding".
"""

from __future__ import annotations

import pandas as pd

# Xiao et al., WACV 2023 (table of ChestX-ray14 results); MedTransformer's Hiera headline.
_ROWS = [
    ("Xiao et al. 2023", "ViT-S/16", "ImageNet, supervised", 79.6),
    ("Xiao et al. 2023", "ViT-S/16", "ImageNet, MAE", 78.6),
    ("Xiao et al. 2023", "ViT-S/16", "X-ray MAE", 82.3),
    ("Xiao et al. 2023", "ViT-B/16", "X-ray MAE", 83.0),
    ("Xiao et al. 2023", "DenseNet-121", "ImageNet, supervised", 82.2),
    ("Xiao et al. 2023", "DenseNet-121", "X-ray MoCo v2", 80.6),
    ("Xiao et al. 2023", "DenseNet-121", "X-ray MAE", 81.2),
    ("Deutch and Levin (MedTransformer)", "Hiera", "ImageNet, then cocktail MAE", 81.6),
]


def published_chestxray14() -> pd.DataFrame:
    """The published mean test AUCs on the full ChestX-ray14, one row per model and start."""
    return pd.DataFrame(_ROWS, columns=["source", "model", "pre-training", "mean AUC (%)"])

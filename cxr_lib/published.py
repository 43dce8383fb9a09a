"""Published results, shown beside ours and always labelled as theirs.

Mean ROC AUC (%) on the official ChestX-ray14 test split, as the papers report them; none of
these numbers was computed by this project. Xiao et al. average the 14 findings;
MedTransformer's evaluation script (github.com/GiilDe/med-hiera) averages 15 labels, the 14
findings and "No Finding", so its mean is not quite the same measure (the table says which).
"""

from __future__ import annotations

import pandas as pd

# Xiao et al., WACV 2023 (table of ChestX-ray14 results); MedTransformer's Hiera headline.
FINDINGS_14 = "the 14 findings"
WITH_NO_FINDING = "15 labels (the 14 findings and No Finding)"
_ROWS = [
    ("Xiao et al. 2023", "ViT-S/16", "ImageNet, supervised", 79.6, FINDINGS_14),
    ("Xiao et al. 2023", "ViT-S/16", "ImageNet, MAE", 78.6, FINDINGS_14),
    ("Xiao et al. 2023", "ViT-S/16", "X-ray MAE", 82.3, FINDINGS_14),
    ("Xiao et al. 2023", "ViT-B/16", "X-ray MAE", 83.0, FINDINGS_14),
    ("Xiao et al. 2023", "DenseNet-121", "ImageNet, supervised", 82.2, FINDINGS_14),
    ("Xiao et al. 2023", "DenseNet-121", "X-ray MoCo v2", 80.6, FINDINGS_14),
    ("Xiao et al. 2023", "DenseNet-121", "X-ray MAE", 81.2, FINDINGS_14),
    ("Deutch and Levin (MedTransformer)", "Hiera", "ImageNet, then cocktail MAE", 81.6,
     WITH_NO_FINDING),
]


def published_chestxray14() -> pd.DataFrame:
    """The published mean test AUCs on the full ChestX-ray14, one row per model and start,
    with what each mean is taken over."""
    return pd.DataFrame(_ROWS, columns=["source", "model", "pre-training", "mean AUC (%)",
                                        "averaged over"])

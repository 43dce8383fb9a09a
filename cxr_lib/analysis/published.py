"""Published results, shown beside ours and always labelled as theirs.

Mean ROC AUC (%) on ChestX-ray14 as the papers report them; none of these numbers was computed
by this project. The papers do not measure quite the same thing, and the table says how:
- Xiao et al. average the 14 findings over the official test split (25,596 images).
- MedTransformer's evaluation script (github.com/GiilDe/med-hiera) averages 15 labels, the 14
  findings and "No Finding", and its `datasets/separate_train_test.py` cuts the official test
  list into thirds: the first two are its validation sets, the last (8,532 images) its test set.
"""

from __future__ import annotations

import pandas as pd

# Xiao et al., WACV 2023 (table of ChestX-ray14 results); MedTransformer's Hiera headline.
FINDINGS_14 = "the 14 findings"
WITH_NO_FINDING = "15 labels (the 14 findings and No Finding)"
OFFICIAL_TEST = "the official test split (25,596 images)"
LAST_THIRD = "the last third of the official test list (8,532 images)"
_ROWS = [
    ("Xiao et al. 2023", "ViT-S/16", "ImageNet, supervised", 79.6, FINDINGS_14, OFFICIAL_TEST),
    ("Xiao et al. 2023", "ViT-S/16", "ImageNet, MAE", 78.6, FINDINGS_14, OFFICIAL_TEST),
    ("Xiao et al. 2023", "ViT-S/16", "X-ray MAE", 82.3, FINDINGS_14, OFFICIAL_TEST),
    ("Xiao et al. 2023", "ViT-B/16", "X-ray MAE", 83.0, FINDINGS_14, OFFICIAL_TEST),
    ("Xiao et al. 2023", "DenseNet-121", "ImageNet, supervised", 82.2, FINDINGS_14,
     OFFICIAL_TEST),
    ("Xiao et al. 2023", "DenseNet-121", "X-ray MoCo v2", 80.6, FINDINGS_14, OFFICIAL_TEST),
    ("Xiao et al. 2023", "DenseNet-121", "X-ray MAE", 81.2, FINDINGS_14, OFFICIAL_TEST),
    ("Deutch and Levin (MedTransformer)", "Hiera", "ImageNet, then cocktail MAE", 81.6,
     WITH_NO_FINDING, LAST_THIRD),
]


def published_chestxray14() -> pd.DataFrame:
    """The published mean test AUCs on ChestX-ray14, one row per model and start, with what
    each mean is taken over and on which test images."""
    return pd.DataFrame(_ROWS, columns=["source", "model", "pre-training", "mean AUC (%)",
                                        "averaged over", "tested on"])


# MedTransformer's per-label test AUCs (%), its report's table 2 (Hiera, its best fine-tuning).
_MEDTRANSFORMER_PER_LABEL = {
    "Atelectasis": 77.55, "Cardiomegaly": 85.03, "Consolidation": 77.28, "Edema": 87.24,
    "Effusion": 85.83, "Emphysema": 90.39, "Fibrosis": 81.83, "Hernia": 89.15,
    "Infiltration": 70.28, "Mass": 81.17, "No Finding": 79.14, "Nodule": 76.99,
    "Pleural_Thickening": 78.24, "Pneumonia": 79.86, "Pneumothorax": 85.24,
}


def medtransformer_per_label() -> pd.Series:
    """MedTransformer's published test AUC (%) per label, No Finding among them, scored its way
    (softmax then sigmoid): their mean is 81.68 (it reports 81.6); the 14 findings alone average
    81.86, which is as near as its report comes to our average over the findings."""
    return pd.Series(_MEDTRANSFORMER_PER_LABEL, name="AUC (%)")


# This project's model names as the papers' tables spell them.
PAPER_MODELS = {"vit_small_patch16": "ViT-S/16", "vit_base_patch16": "ViT-B/16",
                "densenet121": "DenseNet-121"}


def published_for(model: str) -> pd.DataFrame:
    """The published rows of `model` (a name of this project, e.g. vit_small_patch16): what a
    released checkpoint of it is to be compared with (this table holds the papers' mean AUCs,
    not their per-finding ones)."""
    table = published_chestxray14()
    return table[table["model"] == PAPER_MODELS.get(model, model)].reset_index(drop=True)

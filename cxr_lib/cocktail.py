"""The MedTransformer pipeline: a "cocktail" of data sets for MAE, and its recipes.

Deutch and Levin (MedTransformer / Medical Hiera) continue MAE pre-training of ImageNet weights
on a pool of medical images from several sources, normalise with pixel statistics computed on
that pool, and fine-tune a small Hiera on ChestX-ray14. Here a cocktail is one preprocessing
cache of merged sources (`cxr_lib.data.merge`) plus a share per source: each pre-training pass
draws its images so that source s makes up `weight_s / sum(weights)` of the draws, however many
images it holds. The normalisation of the mix follows from the sources' own statistics and the
same shares, so it describes what the encoder actually sees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cxr_lib.augment import pixel_stats, spread_rows
from cxr_lib.data.cache import Cache
from cxr_lib.data.chexpert import read_chexpert
from cxr_lib.data.core import XrayDataset
from cxr_lib.data.covid import read_covid_radiography
from cxr_lib.data.folder import read_class_folders
from cxr_lib.data.phantoms import SOURCE as PHANTOM
from cxr_lib.data.phantoms import phantom_dataset
from cxr_lib.finetune import FinetuneRecipe
from cxr_lib.train import TrainConfig

LOWRES = "phantom-lowres"


def cocktail_sources(chest: XrayDataset, *, pediatric_root: str | Path | None = None,
                     chexpert_root: str | Path | None = None,
                     covid_root: str | Path | None = None, n_phantoms: int = 1000,
                     phantom_size: int = 128, seed: int = 0) -> list[XrayDataset]:
    """The chest set first, then every other source given, then a synthetic other domain.

    Real sources: the pediatric pneumonia folders, CheXpert, the COVID-19 Radiography Database.
    The synthetic domain is phantoms when the chest set is real; when the chest set is itself
    phantoms, it is phantoms drawn at a quarter of the resolution and enlarged by the cache (a
    blurrier "scanner"), so the mix always holds a second domain.
    """
    sources = [chest]
    if pediatric_root:
        sources.append(read_class_folders(pediatric_root, seed=seed, name="pediatric"))
    if chexpert_root:
        sources.append(read_chexpert(chexpert_root, seed=seed))
    if covid_root:
        sources.append(read_covid_radiography(covid_root, seed=seed))
    if PHANTOM in chest.meta["source"].to_numpy():
        sources.append(phantom_dataset(n_phantoms, size=max(16, phantom_size // 4),
                                       seed=seed + 1, name=LOWRES))
    else:
        sources.append(phantom_dataset(n_phantoms, size=phantom_size, seed=seed))
    return sources


def chest_share_weights(sources: list[str], chest: str, chest_share: float
                        ) -> dict[str, float]:
    """Weights giving `chest` that share of the draws and the other sources equal parts of the
    rest (chest_share 1: the chest images alone)."""
    if not 0 < chest_share <= 1:
        raise ValueError(f"chest_share must lie in (0, 1], got {chest_share}")
    if chest not in sources:
        raise ValueError(f"chest source {chest!r} is not among {sources}")
    others = [s for s in sources if s != chest]
    rest = (1 - chest_share) / len(others) if others else 0.0
    return {s: chest_share if s == chest else rest for s in sources}


def source_shares(cache: Cache, weights: Mapping[str, float], split: str = "train"
                  ) -> dict[str, float]:
    """Each source's share of the draws (summing to 1), for the sources of `split`.

    Every source of the split needs a weight (0 leaves it out), and no weight may name a
    source the split lacks: a typo must not silently change the mix.
    """
    present = sorted(set(cache.index["source"].to_numpy()[cache.split_indices(split)]))
    unknown = sorted(set(weights) - set(present))
    missing = [s for s in present if s not in weights]
    if unknown or missing:
        raise ValueError(f"{cache.name}: weights must name exactly the sources of split "
                         f"{split!r} {present}; unknown {unknown}, missing {missing}")
    values = np.array([float(weights[s]) for s in present])
    if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise ValueError(f"source weights must be finite, non-negative and not all zero, "
                         f"got {dict(weights)}")
    return {s: float(v / values.sum()) for s, v in zip(present, values, strict=True)}


def row_weights(cache: Cache, weights: Mapping[str, float], split: str = "train"
                ) -> np.ndarray:
    """Per-row draw weights [N] for the rows of `split` (cache order): a source's share spread
    evenly over its images, for `CacheBatches(..., sample_weights=...)`."""
    shares = source_shares(cache, weights, split)
    sources = cache.index["source"].to_numpy()[cache.split_indices(split)]  # [N]
    counts = {s: int((sources == s).sum()) for s in shares}
    return np.array([shares[s] / counts[s] for s in sources])  # [N]


def mix_stats(cache: Cache, weights: Mapping[str, float], split: str = "train",
              max_images: int = 1000) -> tuple[float, float]:
    """Pixel mean and standard deviation (0..1 units) of the mix as drawn.

    Each source's statistics come from up to `max_images` of its images; the mix's follow by
    the law of total variance: mean = sum p_s m_s, var = sum p_s (v_s + m_s^2) - mean^2.
    """
    rows = cache.split_indices(split)
    sources = cache.index["source"].to_numpy()[rows]
    mean = second = 0.0
    for source, share in source_shares(cache, weights, split).items():
        if share == 0:
            continue
        m, s = pixel_stats(cache.images[spread_rows(rows[sources == source], max_images)])
        mean += share * m
        second += share * (s**2 + m**2)
    return mean, max(second - mean**2, 0.0) ** 0.5


# MedTransformer's recipes. Its MAE: Adam, one-cycle to a peak of 1e-4, batch 64, 60% of the
# mask units hidden. Its fine-tuning: Adam, one-cycle to 1e-4, batch 64, 10 epochs, weight decay
# 1e-8, random rotations of up to 30 degrees. Our learning rate is base_lr x batch / 256.
MEDTRANSFORMER_MASK_RATIO = 0.6


def medtransformer_pretrain_config(**changes) -> TrainConfig:
    """MedTransformer's MAE optimiser and schedule; `changes` override (e.g. epochs)."""
    base = TrainConfig(batch_size=64, base_lr=1e-4 * 256 / 64, optimizer="adam",
                       schedule="one_cycle", weight_decay=0.0)
    return dataclasses.replace(base, **changes)


def medtransformer_finetune_config(**changes) -> TrainConfig:
    """MedTransformer's fine-tuning optimiser and schedule; `changes` override."""
    base = TrainConfig(epochs=10, batch_size=64, base_lr=1e-4 * 256 / 64, optimizer="adam",
                       schedule="one_cycle", weight_decay=1e-8, keep_best="valid_auc")
    return dataclasses.replace(base, **changes)


def medtransformer_finetune_recipe(**changes) -> FinetuneRecipe:
    """MedTransformer's fine-tuning augmentation: the whole image, rotated by up to 30 degrees
    (with the horizontal flip our augmentation always adds); no RandAugment, layer decay or drop
    path. `changes` set the model, start and normalisation."""
    base = FinetuneRecipe(model="hiera_tiny", layer_decay=None, drop_path=0.0,
                          randaug_magnitude=None, crop_scale=(1.0, 1.0), rotation=30.0)
    return dataclasses.replace(base, **changes)

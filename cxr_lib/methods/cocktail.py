"""The MedTransformer pipeline: a "cocktail" of data sets for MAE, and its recipes.

Deutch and Levin (MedTransformer / Medical Hiera) continue MAE pre-training of ImageNet weights
on a pool of medical images from several sources, normalise with pixel statistics computed on
that pool, and fine-tune a small Hiera on ChestX-ray14. Here a cocktail is one preprocessing
cache of merged sources (`cxr_lib.data.merge`) plus a share per source: each pre-training pass
draws its images so that source s makes up `weight_s / sum(weights)` of the draws, however many
images it holds. The normalisation of the mix follows from the sources' own statistics and the
same shares, so it describes what the encoder actually sees.

Where MedTransformer's choices differ from ours, both are here under names a profile picks:
its views (the central 224 of 256, `center_cropped`), its fixed statistics (`normalisation`),
its 15 labels (`with_no_finding`) and its scoring (`medtransformer_scores`).

The tests behind the chapter's verdicts are here too (`told_apart`, `auc_separation`): whether
two painters' losses or two starts' AUCs differ by more than the noise. The sentences built on
them are chapter 6's (`cxr_lib.chapters.cocktail_hiera`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lib.analysis.stats import mean_auc, paired_comparison
from cxr_lib.augment.crops import pixel_stats, spread_rows
from cxr_lib.data.cache import Cache
from cxr_lib.data.core import XrayDataset
from cxr_lib.data.phantoms import SOURCE as PHANTOM
from cxr_lib.data.sources import read_source
from cxr_lib.engine.config import TrainConfig
from cxr_lib.methods.finetune import TEST_SCORES, FinetuneRecipe
from cxr_lib.models.classifier import imagenet_weights
from cxr_lib.models.families import family

LOWRES = "phantom-lowres"


def cocktail_sources(chest: XrayDataset, *, pediatric_root: str | Path | None = None,
                     chexpert_root: str | Path | None = None,
                     covid_root: str | Path | None = None, n_phantoms: int = 1000,
                     phantom_size: int = 128, seed: int = 0) -> list[XrayDataset]:
    """The chest set first, then every other source given; a synthetic other domain only when
    no other real source is given, so that the mix always holds a second domain.

    Real sources: the pediatric pneumonia folders, CheXpert, the COVID-19 Radiography Database.
    The synthetic domain is phantoms when the chest set is real; when the chest set is itself
    phantoms, it is phantoms drawn at a quarter of the resolution and enlarged by the cache (a
    blurrier "scanner").
    """
    sources = [chest]
    if pediatric_root:
        # its test patients (the official test/ folder, else a drawn share) stay out of the
        # mix's pre-training, which draws from the train split only
        sources.append(read_source("folder", pediatric_root, seed=seed, name="pediatric"))
    if chexpert_root:
        sources.append(read_source("chexpert", chexpert_root, seed=seed))
    if covid_root:
        sources.append(read_source("covid19_radiography", covid_root, seed=seed))
    if len(sources) > 1:
        return sources
    if PHANTOM in chest.meta["source"].to_numpy():
        sources.append(read_source("phantom", n=n_phantoms, size=max(16, phantom_size // 4),
                                   seed=seed + 1, name=LOWRES))
    else:
        sources.append(read_source("phantom", n=n_phantoms, size=phantom_size, seed=seed))
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
# 1e-8, random rotations of up to 30 degrees. Both one-cycles are torch's OneCycleLR with its
# defaults (`train.torch_one_cycle`). Our learning rate is base_lr x batch / 256.
MEDTRANSFORMER_MASK_RATIO = 0.6


# MedTransformer's scripts use torch's Adam as it comes: betas (0.9, 0.999), not the (0.9, 0.95)
# of MAE's AdamW that TrainConfig defaults to.
_ADAM_BETAS = (0.9, 0.999)
_ONE_CYCLE = {"schedule": "torch_one_cycle", "pct_start": 0.3}  # torch's OneCycleLR defaults


def medtransformer_pretrain_config(**changes) -> TrainConfig:
    """MedTransformer's MAE optimiser and schedule; `changes` override (e.g. epochs)."""
    base = TrainConfig(batch_size=64, base_lr=1e-4 * 256 / 64, optimizer="adam",
                       betas=_ADAM_BETAS, **_ONE_CYCLE, weight_decay=0.0)
    return dataclasses.replace(base, **changes)


def medtransformer_finetune_config(**changes) -> TrainConfig:
    """MedTransformer's fine-tuning optimiser and schedule; `changes` override."""
    base = TrainConfig(epochs=10, batch_size=64, base_lr=1e-4 * 256 / 64, optimizer="adam",
                       betas=_ADAM_BETAS, **_ONE_CYCLE, weight_decay=1e-8,
                       keep_best="valid_auc")
    return dataclasses.replace(base, **changes)


def medtransformer_start(model: str) -> Path:
    """The local weights MedTransformer's MAE continues from, or WeightsUnavailable: for a
    Hiera its ImageNet MAE pre-training alone (facebookresearch/hiera's `mae_in1k`, timm's tag
    `mae`), decoder side included where the file has it, not the classifier timm fine-tuned
    from it on ImageNet's labels; for a ViT, timm's default ImageNet weights."""
    return imagenet_weights(model, tag="mae" if family(model) == "hiera" else None)


def medtransformer_finetune_recipe(**changes) -> FinetuneRecipe:
    """MedTransformer's fine-tuning augmentation: the whole image, rotated by up to 30 degrees
    (with the horizontal flip our augmentation always adds); no RandAugment, layer decay or drop
    path. `changes` set the model, start and normalisation."""
    base = FinetuneRecipe(model="hiera_tiny", layer_decay=None, drop_path=0.0,
                          randaug_magnitude=None, crop_scale=(1.0, 1.0), rotation=30.0)
    return dataclasses.replace(base, **changes)


# MedTransformer's views: every image resized to 256 and its central 224 cropped, normalised
# with fixed per-channel statistics of its pre-training pool (its `utils.FolderDataset`), for
# pre-training and fine-tuning alike. Ours: the whole image, the statistics of the mix drawn.
MEDTRANSFORMER_CROP = 224 / 256
MEDTRANSFORMER_STATS = ((0.5163, 0.5011, 0.5025), (0.2222, 0.2245, 0.2256))  # (RGB means, stds)
NORMALISATIONS = ("mix", "medtransformer")


def center_cropped(cache: Cache, keep: float) -> Cache:
    """The cache with its images cut to their central `keep` share of a side (a view of the
    same pixels): MedTransformer's resize to 256 then crop of 224 is `keep` 0.875 of a 256 px
    cache. The name and size change, so the runs on it are other runs."""
    if not 0 < keep <= 1:
        raise ValueError(f"center_crop must lie in (0, 1], got {keep}")
    side = round(cache.size * keep)
    if side == cache.size:
        return cache
    lo = (cache.size - side) // 2
    return dataclasses.replace(cache, name=f"{cache.name}+center{side}", size=side,
                               images=cache.images[:, lo:lo + side, lo:lo + side])


def normalisation(name: str, cache: Cache, weights: Mapping[str, float]) -> tuple[float, float]:
    """Mean and std (0..1) to normalise with: "mix", ours (`mix_stats` of the mix as drawn), or
    "medtransformer", its fixed statistics, their three channels averaged for our one (its
    X-rays are grey images copied to RGB; the channels differ only through the colour images
    of its pool)."""
    if name not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {name!r}: expected one of {NORMALISATIONS}")
    if name == "mix":
        return mix_stats(cache, weights)
    return tuple(round(float(np.mean(v)), 4) for v in MEDTRANSFORMER_STATS)


# MedTransformer's label set and scoring, offered beside ours (its table's 81.6 is scored so).
NO_FINDING = "No Finding"
LABEL_SETS = ("findings", "medtransformer")  # the 14 findings; those and No Finding


def with_no_finding(cache: Cache) -> Cache:
    """The cache with MedTransformer's 15th label, "No Finding": 1 where every finding is
    stated absent, 0 where one is present, NaN otherwise. Its script trains and scores it with
    the 14 findings (its report's mean includes No Finding's AUC). The name changes too, so a
    run on these labels is another run."""
    present = np.nan_to_num(cache.labels, nan=0.0).max(axis=1)  # [N], 1 if any finding
    none = (cache.labels == 0).all(axis=1)  # [N], every finding stated absent
    no_finding = np.where(none, 1.0, np.where(present == 1, 0.0, np.nan)).astype(np.float32)
    return dataclasses.replace(cache, name=f"{cache.name}+no-finding",
                               findings=[*cache.findings, NO_FINDING],
                               labels=np.column_stack([cache.labels, no_finding]))


def label_set(cache: Cache, name: str) -> Cache:
    """The fine-tuning labels a profile names: "findings" (ours, the cache's as they are) or
    "medtransformer" (`with_no_finding`)."""
    if name not in LABEL_SETS:
        raise ValueError(f"unknown label set {name!r}: expected one of {LABEL_SETS}")
    return with_no_finding(cache) if name == "medtransformer" else cache


def medtransformer_scores(logits: np.ndarray) -> np.ndarray:
    """Scores [N, F] as MedTransformer's evaluation computes them from logits [N, F]: its
    Hiera's head (facebookresearch/hiera's) applies a softmax over the outputs in eval mode,
    and its script a sigmoid after that. Each label's score then depends on every other
    output, so its AUCs differ from those of one sigmoid per label (ours)."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))  # [N, F]
    return 1 / (1 + np.exp(-z / z.sum(axis=1, keepdims=True)))


def auc_both_ways(logits: np.ndarray, targets: np.ndarray, findings: Sequence[str]
                  ) -> tuple[float, float]:
    """Mean AUC as this study scores it (a sigmoid per label; the findings, No Finding left
    out) and as MedTransformer does (`medtransformer_scores`; every output, No Finding in)."""
    ours = [j for j, name in enumerate(findings) if name != NO_FINDING]
    return (mean_auc(logits[:, ours], targets[:, ours])[0],
            mean_auc(medtransformer_scores(logits), targets)[0])


def stored_test_aucs(run_dir: str | Path, cache: Cache) -> tuple[float, float]:
    """A finished fine-tuning run's test AUC scored both ways (`auc_both_ways`), from the test
    scores it stored, matched to the labels of `cache` (the run's labels) by image id."""
    scores = pd.read_parquet(Path(run_dir) / TEST_SCORES)
    row_of = pd.Series(np.arange(len(cache)), index=cache.index["id"].to_numpy())
    rows = row_of[scores["id"]].to_numpy()  # [N]
    return auc_both_ways(scores[cache.findings].to_numpy(), cache.labels[rows], cache.findings)


# ----------------------------------------------------------------------------- verdicts

def paired_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of b - a over paired values [N] (the same images scored twice) and its standard
    error; NaN error for fewer than two pairs."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)  # [N]
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else np.nan
    return float(d.mean()), se


def told_apart(a: np.ndarray, b: np.ndarray, n_se: float = 2.0) -> bool:
    """Whether the paired mean difference is more than `n_se` standard errors from 0 (about a
    95% interval that excludes 0 for the default 2)."""
    gap, se = paired_gap(a, b)
    return bool(abs(gap) > n_se * se)  # a NaN error cannot tell them apart


def auc_separation(scores: Mapping[str, np.ndarray], targets: np.ndarray,
                   patients: Sequence, findings: Sequence[str], tie: float, *,
                   n_boot: int = 1000, seed: int = 0) -> Callable[[str, str], bool]:
    """`apart(a, b)`: whether runs a and b, scored on the same images (`scores` by name, logits
    [N, F]), have mean AUCs that can be told apart. That takes both a gap of `tie` or more (what
    another seed could move, which one run per arm cannot measure) and a paired patient
    bootstrap whose 95% interval of the difference excludes 0 (what other images could move)."""
    @functools.cache
    def apart(a: str, b: str) -> bool:
        r = paired_comparison(scores[a], scores[b], targets, patients, findings,
                              n_boot=n_boot, seed=seed)
        return abs(r.diff) >= tie and not r.lower <= 0 <= r.upper
    return apart

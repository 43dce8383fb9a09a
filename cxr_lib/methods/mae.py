"""MAE pre-training on a preprocessing cache, and the probe that judges an encoder.

Chapter 2 and `cxr pretrain mae` both call `pretrain_mae`; the run goes through the one engine
(`cxr_lib.engine.fit`), so the same recipe twice loads the finished run instead of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastai.torch_core import default_device

from cxr_lib.augment.crops import PAPER_MAE_CROP_SCALE, MaeAugment, split_stats
from cxr_lib.data.cache import Cache
from cxr_lib.data.loaders import CacheBatches
from cxr_lib.engine import runs
from cxr_lib.engine.config import RunResult, TrainConfig
from cxr_lib.engine.fit import fit
from cxr_lib.engine.inference import eval_mode
from cxr_lib.engine.metrics import model_loss
from cxr_lib.methods.probe import MaePooledFeatures, ProbeResult, mae_features, probe_cache
from cxr_lib.models.classifier import load_start, read_state_dict
from cxr_lib.models.families import mae_family
from cxr_lib.models.hiera_mae import HieraMae, build_hiera_mae
from cxr_lib.models.mae import (
    PAPER_MASK_RATIO,
    MaskedAutoencoder,
    build_mae,
    encoder_state_dict,
    is_decoder_key,
    load_mae_checkpoint,
)


@dataclass(frozen=True)
class MaeRecipe:
    """The model and augmentation of one MAE pre-training run (the optimiser is a TrainConfig).

    Defaults are the X-ray recipe of Xiao et al.: mask 90% of the patches and crop between
    50% and 100% of the image; the natural-image MAE uses 75% and 20-100%. `in_chans=3` is
    their input too (the gray image replicated to RGB, three values predicted per pixel); the
    default 1 gives the same forward pass with a third of the summed stem's step size.
    """

    model: str = "vit_small_patch16"
    image_size: int = 224
    patch_size: int | None = None  # None: the model's own (16)
    mask_ratio: float = PAPER_MASK_RATIO
    crop_scale: tuple[float, float] = PAPER_MAE_CROP_SCALE
    norm_pix_loss: bool = False
    # None: the preset's decoder (512 wide; 2 blocks for ViT-T/S, 8 for ViT-B). A narrower one
    # keeps small CPU runs affordable: the decoder sees every patch, the encoder only 10%.
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    # A file of encoder weights in timm's layout (e.g. ImageNet) to start from: MedTransformer
    # continues MAE pre-training from ImageNet weights. None: random initialisation.
    init_weights: str | None = None
    in_chans: int = 1  # 3: the gray image replicated to RGB, as Xiao et al.'s code feeds it

    def identity(self) -> dict:
        """The recipe as the run hash sees it: the start file by its content, and no start
        field when there is none."""
        fields = dataclasses.asdict(self)
        start = fields.pop("init_weights")
        return fields if start is None else {**fields, "init_weights": runs.weights_digest(start)}

    def build(self) -> MaskedAutoencoder | HieraMae:
        """A ViT MAE for the ViT presets, a Hiera MAE for `hiera_*` (patch size None or 4)."""
        build = build_hiera_mae if mae_family(self.model) == "hiera" else build_mae
        return build(self.model, img_size=self.image_size, patch_size=self.patch_size,
                     in_chans=self.in_chans, mask_ratio=self.mask_ratio,
                     norm_pix_loss=self.norm_pix_loss, decoder_dim=self.decoder_dim,
                     decoder_depth=self.decoder_depth, decoder_heads=self.decoder_heads)


@dataclass
class PretrainedMae:
    """A pre-trained (or loaded) MAE with its run and the augmentation it was trained with."""

    mae: MaskedAutoencoder
    run: RunResult
    augment: MaeAugment
    recipe: MaeRecipe


def cache_identity(cache: Cache) -> dict:
    """What names a cache in a run hash: its content digest (pixels, ids, splits and labels,
    so a cache remade with other labels trains new runs), with its data set, size and rows
    per split for a reader of the run's config."""
    splits = cache.index["split"].value_counts().sort_index()
    return {"name": cache.name, "size": cache.size, "images": len(cache),
            "splits": {str(k): int(v) for k, v in splits.items()}, "content": cache.digest}


def mae_augment(cache: Cache, recipe: MaeRecipe, split: str = "train",
                normalise: tuple[float, float] | None = None) -> MaeAugment:
    """Crop/flip of the recipe, normalised with `normalise` (mean, std in 0..1) or else the
    pixel statistics of the training images."""
    if normalise is None:
        mean, std = split_stats(cache, split)
    else:
        mean, std = (round(v, 4) for v in normalise)
    return MaeAugment(recipe.image_size, scale=recipe.crop_scale, mean=mean, std=std,
                      channels=recipe.in_chans)


def pretrain_mae(cache: Cache, recipe: MaeRecipe, config: TrainConfig, run_root: str | Path,
                 *, split: str = "train", sample_weights: np.ndarray | None = None,
                 draws: int | None = None, normalise: tuple[float, float] | None = None,
                 resident: bool = False, force: bool = False,
                 progress: bool = True) -> PretrainedMae:
    """Pre-train an MAE on the `split` images of `cache` (or load the finished run).

    `sample_weights` (one per row of the split, cache order) draw each epoch's `draws` images
    (default: as many as the split holds) with replacement, as a data mix does
    (`cxr_lib.methods.cocktail`); `normalise` overrides the pixel statistics. All are part of the
    run's identity.
    """
    augment = mae_augment(cache, recipe, split, normalise=normalise)
    extra = {"recipe": recipe.identity(), "data": cache_identity(cache), "split": split,
             "normalise": [augment.mean, augment.std], **config.extra}
    if sample_weights is not None:
        weights = np.asarray(sample_weights, dtype=np.float64)
        extra["sample_weights"] = hashlib.sha256(weights.tobytes()).hexdigest()[:16]
        extra["draws"] = draws
    config = dataclasses.replace(config, extra=extra)
    torch.manual_seed(config.seed)  # the initial weights are part of the run
    mae = recipe.build()
    if recipe.init_weights is not None:  # Hiera: timm's fitting; ViT: MAE's lenient loader
        report = (load_start(mae, "imagenet", recipe.init_weights) if isinstance(mae, HieraMae)
                  else load_mae_checkpoint(mae, read_state_dict(recipe.init_weights)))
        print(f"encoder started from {recipe.init_weights}: {report}")
    per_epoch = draws or len(cache.split_indices(split))
    batches = CacheBatches(cache, split, config.batch_size, shuffle=True, seed=config.seed,
                           drop_last=per_epoch >= config.batch_size, device=default_device(),
                           resident=resident, sample_weights=sample_weights, draws=draws)
    result = fit(mae, batches, None, config, run_root, "mae", loss_func=model_loss,
                 batch_tfm=augment, force=force, progress=progress)
    return PretrainedMae(mae, result, augment, recipe)


def probe_encoder(mae: MaskedAutoencoder, cache: Cache, augment: MaeAugment, *,
                  train_split: str = "train", eval_split: str = "val", max_images: int = 20_000,
                  batch_size: int = 128) -> ProbeResult:
    """Linear probe: frozen encoder features -> logistic regression per finding -> mean AUC.

    `max_images` caps each split (the first rows), so the probe stays quick on full data.
    """
    return probe_cache(mae_features(mae), augment.plain, cache, cache.split_indices(train_split),
                       (eval_split,), max_images=max_images, batch_size=batch_size,
                       device=default_device())[eval_split]


def save_encoder(pretrained: PretrainedMae, path: str | Path) -> Path:
    """Write the encoder (timm ViT keys) with its recipe, for fine-tuning (chapter 4)."""
    return runs.save_weights(path, encoder_state_dict(pretrained.mae),
                             recipe=dataclasses.asdict(pretrained.recipe),
                             normalise=[pretrained.augment.mean, pretrained.augment.std],
                             run=pretrained.run.path.name)


def load_encoder(path: str | Path) -> tuple[MaePooledFeatures, MaeAugment]:
    """The encoder a `save_encoder` file holds, as pooled features (`mae_features`), with the
    evaluation view it was trained with: its recipe's size and channels, its normalisation."""
    state = read_state_dict(path)  # a missing or unreadable file is named first
    recipe, augment = _saved_recipe(path)
    mae = recipe.build()
    loaded = mae.load_state_dict(state, strict=False)
    if loaded.unexpected_keys or not all(is_decoder_key(k) for k in loaded.missing_keys):
        raise ValueError(f"{path}: its tensors do not fit the {recipe.model} MAE its recipe "
                         f"names (unexpected {loaded.unexpected_keys[:3]}, missing "
                         f"{[k for k in loaded.missing_keys if not is_decoder_key(k)][:3]})")
    return mae_features(mae), augment


def untrained_encoder(path: str | Path, seed: int) -> tuple[MaePooledFeatures, MaeAugment]:
    """The encoder of a `save_encoder` file's recipe with random weights drawn from `seed`
    (the floor a pre-trained encoder must clear), with the file's evaluation view."""
    recipe, augment = _saved_recipe(path)
    torch.manual_seed(seed)
    return mae_features(recipe.build()), augment


def _saved_recipe(path: str | Path) -> tuple[MaeRecipe, MaeAugment]:
    """The MAE recipe a `save_encoder` file names, and its evaluation view (the recipe's size
    and channels, the normalisation it was trained with)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved.get("recipe"), dict) or "normalise" not in saved:
        raise ValueError(f"{path}: not an encoder file of `save_encoder` (`cxr pretrain mae "
                         "--save`): it holds no MAE recipe and normalisation")
    recipe = MaeRecipe(**{**saved["recipe"], "init_weights": None,
                          "crop_scale": tuple(saved["recipe"]["crop_scale"])})
    mean, std = saved["normalise"]
    return recipe, MaeAugment(recipe.image_size, scale=recipe.crop_scale, mean=mean, std=std,
                              channels=recipe.in_chans)


@dataclass(frozen=True)
class HeldoutErrors:
    """Per-image mean squared errors [N] over the hidden patches of held-out images, in the
    loss's units: the model's painting and fills that show what it adds.

    `model`: the model's painting; `model_flat`: the same with each painted patch flattened to
    its own mean, which tells the patches' brightness from the detail painted inside them.
    Two fills that have learnt nothing about images: `mean_fill` paints every hidden patch at
    the target's mean, 0 (the training images' mean brightness; with `norm_pix_loss`, whose
    target is each patch normalised by its own mean and spread, each patch's own mean, which
    scores (n - 1) / n on a patch of n pixels that is not flat, a little under 1),
    `visible_fill` at the mean of the image's visible patches. `contrast`: the spread (standard
    deviation) of the painted patches' mean brightness over that of the true patches; NaN with
    `norm_pix_loss`, whose target has no patch brightness. Every image hides as many patches as
    any other, so the mean over images is the error over all of them.
    """

    model: np.ndarray
    model_flat: np.ndarray
    mean_fill: np.ndarray
    visible_fill: np.ndarray
    contrast: float

    def mean(self, name: str) -> float:
        """The error over all the images, of the field `name` (e.g. "model")."""
        return float(np.mean(getattr(self, name)))


def _masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each image's mean over its hidden patches: [B, L] -> [B]."""
    return (per_patch * mask).sum(dim=1) / mask.sum(dim=1)


def heldout_errors(pretrained: PretrainedMae, cache: Cache, rows: np.ndarray, *, seed: int = 0,
                   batch_size: int = 128) -> HeldoutErrors:
    """`HeldoutErrors` on cache `rows` (plain views) at the model's mask ratio, the masks drawn
    from `seed`: the same images with the same masks for every model of the same patch layout.

    Unlike the training loss, they are comparable across runs trained on different mixes,
    image by image; with `norm_pix_loss` they do not depend on the runs' normalisation either.
    """
    mae, plain = pretrained.mae, pretrained.augment.plain
    device = next(mae.parameters()).device
    errors, painted, true = [[], [], [], []], [], []
    with torch.no_grad(), eval_mode(mae):
        for i in range(0, len(rows), batch_size):
            x = plain(torch.from_numpy(np.asarray(cache.images[rows[i:i + batch_size]]))[:, None]
                      .to(device))  # [B, C, s, s]
            torch.manual_seed(seed + i)  # the same masks for every model
            _, pred, mask = mae(x)  # [B, L, P], [B, L] with 1 = masked
            target = mae.loss_target(x)  # [B, L, P]
            seen = (1 - mask)[..., None]  # [B, L, 1]
            visible_mean = (target * seen).sum((1, 2)) / (seen.sum((1, 2)) * target.shape[-1])
            fills = (pred, pred.mean(dim=-1, keepdim=True).expand_as(pred),
                     torch.zeros_like(target), visible_mean[:, None, None].expand_as(target))
            for kept, fill in zip(errors, fills, strict=True):
                kept.append(_masked_mean(((fill - target) ** 2).mean(dim=-1), mask))  # [B]
            painted.append(pred.mean(dim=-1)[mask.bool()])  # [masked patches]
            true.append(target.mean(dim=-1)[mask.bool()])
    contrast = (math.nan if mae.config.norm_pix_loss else
                float(torch.cat(painted).std() / torch.cat(true).std()))
    return HeldoutErrors(*(torch.cat(e).double().cpu().numpy() for e in errors), contrast)


def heldout_loss(pretrained: PretrainedMae, cache: Cache, rows: np.ndarray, *, seed: int = 0,
                 batch_size: int = 128) -> float:
    """The model's mean reconstruction loss on cache `rows` (`heldout_errors`' `model`)."""
    return heldout_errors(pretrained, cache, rows, seed=seed, batch_size=batch_size).mean("model")


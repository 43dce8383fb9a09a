"""Fine-tuning a classifier on the cache's labels from any starting point, through the one engine.

Chapter 4 and `cxr finetune` call `finetune`: a `FinetuneRecipe` (model, start, regularisation,
label fraction) and a `TrainConfig` (optimiser and schedule) make one run of `cxr_lib.engine.fit`
in a folder named by their hash, so a finished run loads instead of training. The recipe's
defaults and `paper_config()` are the ViT-S recipe of Xiao et al.'s released fine-tuning script:
AdamW (betas 0.9, 0.999; weight decay 0.05), base LR 2.5e-4 x batch / 256 with a batch of 1024,
5 warm-up epochs then a cosine to 1e-5 over 75 epochs, layer-wise LR decay 0.55, drop path 0.2,
timm's RandAugment `rand-m6-mstd0.5-inc1` after a random-resized crop (timm's default scale
0.08-1) and a flip, no mixup, cutmix or random erasing, BCE over the 14 findings.

Two settings of that script are options here, which the `paper` profile sets and the smaller
profiles leave at this project's values: `in_chans=3` feeds the gray X-ray replicated to RGB
into a 3-channel stem, as their code does (a 1-channel stem gives the same forward pass but,
after one AdamW or SGD step, a third of the summed stem's move), and `eval_crop=PAPER_EVAL_CROP`
is their evaluation view, Resize(256) then CenterCrop(224) (here the whole image is resized).
`evaluate_weights` scores a whole fine-tuned classifier (their released ones) on a split.

Model selection differs from that script on purpose: it reports the best test AUC seen during
training; here the epoch with the best validation AUC is kept (`keep_best="valid_auc"`) and the
test split is evaluated once, with those weights, at the end. The test numbers are written into
the run's `metrics.json` (and each image's scores into `test_scores.parquet`), so a finished run
reports them without touching the test split again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.torch_core import default_device
from timm.data import Mixup
from timm.optim import param_groups_layer_decay
from torch import nn

from cxr_lib.augment.crops import FinetuneAugment, split_stats
from cxr_lib.augment.randaugment import RandAugment, fill_level
from cxr_lib.data.cache import Cache
from cxr_lib.data.loaders import CacheBatches
from cxr_lib.data.splits import label_subset
from cxr_lib.device import is_main_process
from cxr_lib.engine import runs
from cxr_lib.engine.config import RunResult, TrainConfig
from cxr_lib.engine.fit import fit
from cxr_lib.engine.inference import eval_mode
from cxr_lib.engine.metrics import ValidAUC, masked_bce_loss, mean_auc
from cxr_lib.engine.order import ORDER
from cxr_lib.engine.resume import load_run_weights
from cxr_lib.methods.mae import cache_identity
from cxr_lib.models.classifier import (
    build_classifier,
    imagenet_weights,
    supports_layer_decay,
    timm_name,
)
from cxr_lib.models.mae import LoadReport

TEST_SCORES = "test_scores.parquet"  # in the run folder: id, patient, one logit per finding
PAPER_EVAL_CROP = 224 / 256  # Xiao et al.'s evaluation view: Resize(256), CenterCrop(224)
# Xiao et al.'s pixel mean and std of ChestX-ray14 (0..1), the same for each RGB channel
PAPER_NORMALISE = (0.5056, 0.252)


@dataclass(frozen=True)
class FinetuneRecipe:
    """What is fine-tuned, from where, and how it is regularised (the optimiser and schedule
    are a TrainConfig). Defaults: the paper's ViT-S recipe, from random weights."""

    model: str = "vit_small_patch16"  # a ViT or Hiera MAE preset, or densenet121 / resnet50
    init: str = "random"  # random, imagenet, mae, moco, torchvision
    weights: str | None = None  # the file for mae / moco / torchvision (imagenet: optional)
    image_size: int = 224
    patch_size: int | None = None  # ViT only; None: 16
    layer_decay: float | None = 0.55  # ViT only; None: one learning rate for every layer
    drop_path: float = 0.2
    randaug_magnitude: float | None = 6.0  # None: no RandAugment
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0: off
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0: off
    crop_scale: tuple[float, float] = (0.08, 1.0)
    rotation: float = 0.0  # random rotation of up to this many degrees (MedTransformer: 30)
    # Pixel mean and std (0..1) to normalise with; None: those of the fine-tuning images.
    # MedTransformer reuses the statistics of its pre-training mix.
    normalise: tuple[float, float] | None = None
    train_fraction: float = 1.0  # share of the training patients whose labels are used
    in_chans: int = 1  # 3: the gray image replicated to RGB, as the papers' code feeds it
    eval_crop: float = 1.0  # share of the side the evaluation view keeps (paper: 224 / 256)

    def __post_init__(self) -> None:
        """Numbers as floats, so 6 and 6.0 (a YAML int, a default float) name the same run."""
        for name in ("layer_decay", "drop_path", "randaug_magnitude", "mixup", "cutmix",
                     "rotation", "train_fraction", "eval_crop"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
        if self.normalise is not None:
            object.__setattr__(self, "normalise", tuple(float(v) for v in self.normalise))
        if self.weights is not None:
            object.__setattr__(self, "weights", str(self.weights))

    def check(self) -> None:
        """Refuse combinations that would fail late or train something else than asked."""
        timm_name(self.model)
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must lie in (0, 1], got {self.train_fraction}")
        if self.layer_decay is not None and not supports_layer_decay(self.model):
            raise ValueError(f"layer_decay groups the blocks of a ViT or Hiera; set it to None "
                             f"for {self.model}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must lie in (0, 1], got {self.layer_decay}")
        if min(self.mixup, self.cutmix, self.drop_path, self.rotation) < 0:
            raise ValueError("mixup, cutmix, drop_path and rotation must be >= 0")
        if self.normalise is not None and not (len(self.normalise) == 2
                                               and self.normalise[1] > 0):
            raise ValueError(f"normalise must be (mean, std > 0), got {self.normalise}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")
        if not 0 < self.eval_crop <= 1:
            raise ValueError(f"eval_crop must lie in (0, 1], got {self.eval_crop}")

    def identity(self, weights: str | None) -> dict:
        """The recipe as the run hash sees it: the start file (`weights`, resolved) by its
        content."""
        return {**dataclasses.asdict(self), "weights": runs.weights_digest(weights)}


def paper_config(**changes) -> TrainConfig:
    """The optimiser and schedule of the paper's fine-tuning script; `changes` override."""
    base = TrainConfig(epochs=75, batch_size=1024, base_lr=2.5e-4, warmup_epochs=5,
                       weight_decay=0.05, betas=(0.9, 0.999), min_lr=1e-5,
                       keep_best="valid_auc")
    return dataclasses.replace(base, **changes)


def finetune_augment(cache: Cache, recipe: FinetuneRecipe,
                     split: str = "train") -> FinetuneAugment:
    """The recipe's augmentation, normalised with the recipe's statistics or else the pixel
    statistics of the training images (all of them, whatever share of labels is used:
    statistics need no labels)."""
    mean, std = recipe.normalise if recipe.normalise is not None else split_stats(cache, split)
    randaug = (None if recipe.randaug_magnitude is None
               else RandAugment(magnitude=recipe.randaug_magnitude, fill=fill_level(mean)))
    return FinetuneAugment(recipe.image_size, tuple(recipe.crop_scale), mean, std, randaug,
                           recipe.rotation, recipe.in_chans, recipe.eval_crop)


class MultiLabelMixup(Callback):
    """Mixup / CutMix of a training batch and its multi-hot labels with the same lambda
    (timm's `Mixup` with multi_label=True and no smoothing). A label stays known only where
    both mixed images state it. An odd-sized batch is left unmixed (timm mixes pairs)."""

    order, run_valid = ORDER["mixup"], False

    def __init__(self, mixup: float, cutmix: float, num_classes: int) -> None:
        self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.0,
                         num_classes=num_classes, multi_label=True)

    def before_batch(self) -> None:
        x, y = self.learn.xb[0], self.learn.yb[0]  # [B, C, H, W], [B, F]
        if len(x) % 2:
            return
        unknown = y.isnan() | y.flip(0).isnan()  # [B, F]
        x, mixed = self.mix(x, torch.nan_to_num(y))
        self.learn.xb = (x, *self.learn.xb[1:])
        self.learn.yb = (mixed.masked_fill(unknown, float("nan")),)


@dataclass
class FinetuneResult:
    """A fine-tuned (or loaded) classifier with its best-validation weights, its run (whose
    metrics hold the test numbers), the config it ran with, and what its start loaded."""

    model: nn.Module
    run: RunResult
    recipe: FinetuneRecipe
    config: TrainConfig
    augment: FinetuneAugment
    load_report: LoadReport
    train_images: int
    findings: list[str]

    @property
    def valid_auc(self) -> float:
        return _number(self.run.metrics.get("best_valid_auc"))

    @property
    def test_auc(self) -> float:
        return _number(self.run.metrics.get("test_auc"))

    @property
    def test_per_finding(self) -> dict[str, float]:
        """Test AUC by finding, in the cache's order (NaN: one class only among its images)."""
        stored = self.run.metrics.get("test_auc_per_finding", {})
        return {name: _number(stored.get(name)) for name in self.findings}


def _number(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def finetune(cache: Cache, recipe: FinetuneRecipe, config: TrainConfig, run_root: str | Path,
             *, splits: tuple[str, str, str] = ("train", "val", "test"), resident: bool = False,
             force: bool = False, progress: bool = True, cbs: Sequence[Callback] = ()
             ) -> FinetuneResult:
    """Fine-tune on the labels of `splits[0]`, keep the epoch with the best AUC on `splits[1]`,
    score `splits[2]` once (or load all of it from a finished run).

    The learning rate follows config (lr = base_lr x batch / 256); a split smaller than one
    batch trains on one batch of all its images, with the rate scaled to that batch.

    A label share (train_fraction < 1) trains for as many steps as the whole split would: each
    epoch draws, with replacement, as many images from the share as the split holds. With the
    same epochs, a share of 10% would otherwise take a tenth of the steps, and a comparison of
    starts at small shares would compare models that had barely begun to learn.
    """
    recipe.check()
    weights = recipe.weights
    if recipe.init == "imagenet" and weights is None:
        weights = str(imagenet_weights(recipe.model))  # WeightsUnavailable: the arm is skipped
    train_split, valid_split, test_split = splits
    rows = label_subset(cache, recipe.train_fraction, config.seed, train_split)
    split_images = len(cache.split_indices(train_split))
    draws = split_images if len(rows) < split_images else None  # per epoch, for a share
    augment = finetune_augment(cache, recipe, train_split)
    extra = {"recipe": recipe.identity(weights),
             "data": cache_identity(cache), "splits": list(splits), "train_images": len(rows),
             "normalise": [augment.mean, augment.std], **config.extra}
    if draws is not None:
        extra["draws_per_epoch"] = draws
    config = dataclasses.replace(config, batch_size=min(config.batch_size, split_images),
                                 keep_best="valid_auc", extra=extra)
    torch.manual_seed(config.seed)  # the head's (and a random start's) weights are the run's
    model, report = build_classifier(
        recipe.model, num_classes=len(cache.findings), in_chans=recipe.in_chans,
        img_size=recipe.image_size, patch_size=recipe.patch_size, drop_path=recipe.drop_path,
        init=recipe.init, weights=weights)
    device = default_device()
    train = CacheBatches(cache, rows, config.batch_size, shuffle=True, seed=config.seed,
                         drop_last=True, device=device, resident=resident, draws=draws,
                         sample_weights=None if draws is None else np.ones(len(rows)))
    valid = CacheBatches(cache, valid_split, config.batch_size, device=device, resident=resident)
    extra_cbs = [ValidAUC(), *cbs]
    if recipe.mixup or recipe.cutmix:
        extra_cbs.append(MultiLabelMixup(recipe.mixup, recipe.cutmix, len(cache.findings)))
    run = fit(model, train, valid, config, run_root, "finetune", loss_func=masked_bce_loss,
              batch_tfm=augment, valid_tfm=augment.plain, cbs=extra_cbs,
              param_groups=layer_decay_groups(model, recipe, config.weight_decay),
              force=force, progress=progress)
    if "test_auc" not in run.metrics:
        run = _score_test(model, cache, test_split, augment, config, run)
    return FinetuneResult(model, run, recipe, config, augment, report, len(rows),
                          list(cache.findings))


def layer_decay_groups(model: nn.Module, recipe: FinetuneRecipe,
                       weight_decay: float) -> list[dict] | None:
    """timm's layer-wise LR decay groups (BEiT, ELECTRA): a ViT's layer i of depth L gets
    lr x decay^(L - i), embeddings i = 0 and the head i = L; None (one rate) without decay."""
    if recipe.layer_decay is None:
        return None
    return param_groups_layer_decay(model, weight_decay=weight_decay,
                                    no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=recipe.layer_decay)


def _score_test(model: nn.Module, cache: Cache, split: str, augment: FinetuneAugment,
                config: TrainConfig, run: RunResult) -> RunResult:
    """Score the test split once with the kept weights: AUCs into the run's metrics, each
    image's scores into `test_scores.parquet` (chapter 5's intervals and paired tests)."""
    scores, rows = evaluate_split(model, cache, split, augment, config)
    mean, per_class = (mean_auc(scores, cache.labels[rows]) if len(rows)
                       else (float("nan"), np.full(len(cache.findings), np.nan)))
    metrics = {**run.metrics, "test_auc": mean, "test_images": len(rows),
               "test_auc_per_finding": dict(zip(cache.findings, per_class.tolist(),
                                                strict=True))}
    if is_main_process():
        table = pd.DataFrame(scores, columns=cache.findings)  # [N, F] logits
        table.insert(0, "patient", cache.index["patient"].to_numpy()[rows])
        table.insert(0, "id", cache.index["id"].to_numpy()[rows])
        runs.atomic_write_parquet(table, run.path / TEST_SCORES)
        runs.write_metrics(metrics, run.path)
    return dataclasses.replace(run, metrics=metrics)


def evaluate_split(model: nn.Module, cache: Cache, split: str, augment: FinetuneAugment,
                   config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, F] of `model` on a split's plain views and their cache rows [N] (none for an
    empty split), in eval mode under the config's precision."""
    rows = cache.split_indices(split)
    if len(rows) == 0:
        return np.zeros((0, len(cache.findings)), dtype=np.float32), rows
    device = default_device()
    batches = CacheBatches(cache, rows, config.batch_size, device=device)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16}
    scores = []
    with torch.inference_mode(), eval_mode(model.to(device)), torch.autocast(
            device.type, dtype=half.get(config.precision),
            enabled=device.type == "cuda" and config.precision != "fp32"):
        for x, _ in batches:
            scores.append(model(augment.plain(x)).float().cpu())  # [b, F] logits
    return torch.cat(scores).numpy(), batches.indices


def evaluate_weights(cache: Cache, model: str, weights: str | Path, *, split: str = "test",
                     in_chans: int = 3, image_size: int = 224, patch_size: int | None = None,
                     eval_crop: float = PAPER_EVAL_CROP,
                     normalise: tuple[float, float] = PAPER_NORMALISE, batch_size: int = 128
                     ) -> tuple[pd.DataFrame, LoadReport]:
    """The test AUC (%) per finding, and their mean, of a whole fine-tuned classifier file (its
    head kept: `init="finetuned"`), e.g. one Xiao et al. released, and what loaded.

    Defaults are their evaluation: the gray image replicated to RGB, normalised with their
    statistics, Resize(256) then CenterCrop(224). The classifier's outputs are read in the
    cache's finding order, which is theirs (`cxr_lib.data.core.FINDINGS`).
    """
    net, report = build_classifier(model, num_classes=len(cache.findings), in_chans=in_chans,
                                   img_size=image_size, patch_size=patch_size, init="finetuned",
                                   weights=weights)
    augment = FinetuneAugment(image_size, (0.08, 1.0), *normalise, channels=in_chans,
                              eval_crop=eval_crop)
    scores, rows = evaluate_split(net, cache, split, augment, TrainConfig(batch_size=batch_size))
    if len(rows) == 0:
        raise ValueError(f"{cache.path}: the cache has no {split!r} images to score")
    mean, per_class = mean_auc(scores, cache.labels[rows])
    table = pd.DataFrame({"finding": [*cache.findings, "mean"],
                          "AUC (%)": [*(100 * per_class), 100 * mean]})
    table.attrs.update(images=len(rows), split=split)
    return table, report


def load_finetuned(run_dir: str | Path, cache: Cache) -> tuple[nn.Module, FinetuneAugment]:
    """A finished fine-tuning run's classifier with its best weights, in eval mode, and the
    augmentation whose `plain` view it was evaluated with; nothing is trained or downloaded
    (the start's weights are replaced by the run's own)."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / runs.CONFIG).read_text())
    recipe = FinetuneRecipe(**{**config["extra"]["recipe"], "init": "random", "weights": None})
    model, _ = build_classifier(recipe.model, num_classes=len(cache.findings),
                                in_chans=recipe.in_chans, img_size=recipe.image_size,
                                patch_size=recipe.patch_size, drop_path=recipe.drop_path)
    return load_run_weights(model, run_dir).eval(), finetune_augment(cache, recipe)


def split_scores(run_dir: str | Path, cache: Cache, split: str = "val", batch_size: int = 128
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, F] of a finished run's kept weights on a split, and their cache rows [N]. A
    run stores only its test scores; the validation scores that chose its best epoch are
    computed again here (e.g. for a paired bootstrap of two runs' validation AUCs)."""
    model, augment = load_finetuned(run_dir, cache)
    return evaluate_split(model, cache, split, augment, TrainConfig(batch_size=batch_size))

"""MoCo v2 pre-training on a preprocessing cache, and the k-nearest-neighbour monitor.

Chapter 3 and `cxr pretrain moco` both call `pretrain_moco`; the run goes through the one engine
(`cxr_lib.engine.fit`) with two callbacks: `MomentumQueue` (the key encoder's moving average and
the queue of negatives, after every step) and `KnnMonitor` (a `knn_auc` column in the history).
The same recipe twice loads the finished run instead of training it.

The kNN monitor judges a backbone without training anything on top of it: each validation image
is scored, per finding, by the labels of its k most similar training images (cosine similarity of
the pooled backbone features), and the scores give a mean ROC AUC. It is cheap enough to run
during pre-training, and it moves only if the features group images with the same findings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.torch_core import default_device
from timm.utils import unwrap_model
from torch import Tensor, nn

from cxr_lib.analysis.stats import holm_adjust
from cxr_lib.augment.crops import split_stats
from cxr_lib.augment.views import MocoAugment
from cxr_lib.data.cache import Cache
from cxr_lib.data.loaders import CacheBatches
from cxr_lib.engine import runs
from cxr_lib.engine.config import RunResult, TrainConfig
from cxr_lib.engine.fit import fit
from cxr_lib.engine.metrics import EpochMetric, mean_auc, model_loss
from cxr_lib.engine.order import ORDER
from cxr_lib.methods.mae import cache_identity
from cxr_lib.methods.probe import extract_features
from cxr_lib.models.classifier import read_state_dict
from cxr_lib.models.moco import MoCo, build_backbone, build_moco, gather_keys


@dataclass(frozen=True)
class MocoRecipe:
    """The model and augmentation of one MoCo v2 run (the optimiser is a TrainConfig, see
    `moco_config`). Defaults are MoCo v2's: a 65,536-key queue, key momentum 0.999,
    temperature 0.2, an MLP head as wide as the backbone's features (`hidden_dim=None`: 1024 for
    DenseNet-121, 2048 for ResNet-50, as MoCo's code builds it) to 128 dimensions, crops of
    20-100% of the image, and batch norm over sub-batches of 32 when the batch is MoCo's 256
    (8 GPUs x 32). `in_chans=3` feeds the gray image replicated to RGB, as Xiao et al. do."""

    model: str = "densenet121"
    image_size: int = 224
    dim: int = 128
    hidden_dim: int | None = None  # None: the backbone's feature width (MoCo's code)
    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float = 0.2
    bn_splits: int = 8
    # MoCo v2's views, as MocoAugment defines them (blur sigma in pixels at 224 px, scaled
    # with image_size)
    crop_scale: tuple[float, float] = MocoAugment.scale
    brightness: float = MocoAugment.brightness
    contrast: float = MocoAugment.contrast
    jitter_p: float = MocoAugment.jitter_p
    blur_sigma: tuple[float, float] = MocoAugment.blur_sigma
    blur_p: float = MocoAugment.blur_p
    in_chans: int = 1

    def identity(self) -> dict:
        """The recipe as the run hash sees it: every field."""
        return dataclasses.asdict(self)

    def build(self) -> MoCo:
        return build_moco(self.model, in_chans=self.in_chans, dim=self.dim,
                          hidden_dim=self.hidden_dim,
                          queue_size=self.queue_size, momentum=self.momentum,
                          temperature=self.temperature, bn_splits=self.bn_splits)


@dataclass(frozen=True)
class KnnSettings:
    """The kNN monitor: k neighbours from `train_split` for each image of `eval_split`, at most
    `max_images` of each (the first rows), every `every` epochs and after the last one."""

    k: int = 20
    every: int = 1
    max_images: int = 20_000
    batch_size: int = 128
    train_split: str = "train"
    eval_split: str = "val"


@dataclass
class PretrainedMoco:
    """A pre-trained (or loaded) MoCo with its run, augmentation and kNN AUC before training
    (the random initialisation of the same seed); `knn_end` is the history's last value."""

    moco: MoCo
    run: RunResult
    augment: MocoAugment
    recipe: MocoRecipe
    knn_start: float

    @property
    def knn_end(self) -> float:
        return float(self.run.history["knn_auc"].iloc[-1])


def moco_config(epochs: int, batch_size: int, *, base_lr: float = 0.03,
                warmup_epochs: float = 0.0, seed: int = 0, **changes) -> TrainConfig:
    """MoCo v2's optimisation: SGD with momentum 0.9, weight decay 1e-4, lr = base_lr x
    batch / 256 (0.03 at 256), cosine decay. `changes` override any other TrainConfig field.

    The cosine is the engine's, stepped every batch; MoCo's code steps it once an epoch, so the
    two rates differ within an epoch by at most pi / (2 x epochs) of the peak (0.8% at 200
    epochs), and agree at each epoch's start.
    """
    # floats as floats: a profile's `0` and the default 0.0 must name the same run
    return TrainConfig(epochs=epochs, batch_size=batch_size, base_lr=float(base_lr),
                       warmup_epochs=float(warmup_epochs), seed=seed, optimizer="sgd",
                       momentum=0.9, weight_decay=1e-4, schedule="cosine", **changes)


def moco_augment(cache: Cache, recipe: MocoRecipe, split: str = "train") -> MocoAugment:
    """The recipe's two-view augmentation, normalised with the training images' statistics."""
    mean, std = split_stats(cache, split)
    return MocoAugment(recipe.image_size, scale=recipe.crop_scale, brightness=recipe.brightness,
                       contrast=recipe.contrast, jitter_p=recipe.jitter_p,
                       blur_sigma=recipe.blur_sigma, blur_p=recipe.blur_p,
                       mean=mean, std=std, channels=recipe.in_chans)


# ----------------------------------------------------------------------------- kNN monitor

def knn_scores(train_feats: np.ndarray, train_labels: np.ndarray, query_feats: np.ndarray,
               k: int, chunk: int = 1024) -> np.ndarray:
    """Per-finding scores [M, F] of each query from its k most similar training images.

    Similarity is the cosine of the features; a finding's score is the similarity-weighted
    share of positives among the neighbours whose label for it is known (NaN labels are left
    out), with similarities below 0 counted as 0. A query with no usable neighbour scores 0.
    """
    device = default_device()
    bank = F.normalize(torch.as_tensor(train_feats, dtype=torch.float32, device=device), dim=1)
    labels = torch.as_tensor(train_labels, dtype=torch.float32, device=device)  # [N, F]
    known, positive = ~torch.isnan(labels), torch.nan_to_num(labels)  # [N, F]
    k = min(k, len(bank))
    out = []
    for start in range(0, len(query_feats), chunk):
        q = torch.as_tensor(query_feats[start:start + chunk], dtype=torch.float32, device=device)
        sims = F.normalize(q, dim=1) @ bank.T  # [m, N]
        top, idx = sims.topk(k, dim=1)  # [m, k]
        weight = top.clamp(min=0)[..., None]  # [m, k, 1]
        votes = (weight * positive[idx]).sum(dim=1)  # [m, F]
        total = (weight * known[idx]).sum(dim=1)  # [m, F]
        out.append((votes / total.clamp(min=1e-12)).cpu())
    return torch.cat(out).numpy()  # [M, F]


def knn_auc(train_feats: np.ndarray, train_labels: np.ndarray, val_feats: np.ndarray,
            val_labels: np.ndarray, k: int) -> float:
    """Mean ROC AUC over findings (those with both classes in validation) of `knn_scores`."""
    scores = knn_scores(train_feats, train_labels, val_feats, k)
    return mean_auc(scores, np.asarray(val_labels, dtype=np.float64))[0]


Transform = Callable[[Tensor], Tensor]  # uint8 [B, 1, S, S] -> float [B, C, s, s]


def backbone_features(encoder: nn.Module, cache: Cache, transform: Transform, split: str,
                      max_images: int = 20_000, batch_size: int = 128
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features [N, D] and labels [N, F] of the first `max_images` images of a split,
    through the evaluation view `transform` (e.g. `MocoAugment.plain`), encoder in eval mode."""
    rows = cache.split_indices(split)[:max_images]
    images = np.asarray(cache.images[rows])[:, None]  # [N, 1, S, S] uint8
    feats = extract_features(encoder, images, batch_size, transform, device=default_device())
    return feats, cache.labels[rows]


def knn_evaluate(encoder: nn.Module, cache: Cache, transform: Transform,
                 settings: KnnSettings) -> float:
    """The kNN monitor's mean AUC for `encoder` (see `knn_scores`)."""
    train = backbone_features(encoder, cache, transform, settings.train_split,
                              settings.max_images, settings.batch_size)
    val = backbone_features(encoder, cache, transform, settings.eval_split,
                            settings.max_images, settings.batch_size)
    return knn_auc(*train, *val, settings.k)


class KnnMonitor(EpochMetric):
    """The kNN AUC of the query backbone as the history column `knn_auc`, every `every`
    epochs and after the last (NaN in between). Epochs a resumed run skips are not scored."""

    order, run_valid, metric_name = ORDER["metrics"], False, "knn_auc"

    def __init__(self, cache: Cache, transform: Transform, settings: KnnSettings) -> None:
        self.cache, self.transform, self.settings = cache, transform, settings

    def before_fit(self) -> None:
        self.trained = False  # a skipped epoch is cancelled in before_epoch: never set here

    def before_train(self) -> None:
        self.trained = True

    def after_epoch(self) -> None:
        epoch, last = self.learn.epoch + 1, self.learn.epoch == self.learn.n_epoch - 1
        self.value = math.nan
        if self.trained and (last or epoch % self.settings.every == 0):
            encoder = unwrap_model(self.learn.model).encoder_q
            self.value = knn_evaluate(encoder, self.cache, self.transform, self.settings)
        self.trained = False


class MomentumQueue(Callback):
    """MoCo's two updates outside the gradient: after each optimizer step the key encoder
    moves towards the query encoder, after each training batch its keys (from every rank)
    enter the queue. Both happen before the recorder (order 80) may checkpoint the step."""

    order, run_valid = ORDER["momentum_queue"], False

    def after_step(self) -> None:
        unwrap_model(self.learn.model).momentum_update()

    def after_batch(self) -> None:
        _, _, keys = self.learn.pred  # [B, D] this rank's keys
        unwrap_model(self.learn.model).enqueue(gather_keys(keys.detach()))


# ----------------------------------------------------------------------------- pre-training

def pretrain_moco(cache: Cache, recipe: MocoRecipe, config: TrainConfig, run_root: str | Path,
                  *, split: str = "train", knn: KnnSettings | None = None,
                  monitor: Cache | None = None, resident: bool = False, force: bool = False,
                  progress: bool = True) -> PretrainedMoco:
    """Pre-train MoCo v2 on the `split` images of `cache` (or load the finished run).

    The kNN monitor reads the labels of `monitor` (default: `cache` itself), so a pool of
    sources whose labels differ can pre-train while one labelled source is monitored. The kNN
    settings and a separate monitor cache are part of the run's identity, as its history
    records their AUCs. SGD decays every trainable weight, biases and norms included, as MoCo's
    code does.
    """
    knn = knn or KnnSettings()
    monitor = cache if monitor is None else monitor
    _check_batch(cache, split, recipe, config.batch_size)
    augment = moco_augment(cache, recipe, split)
    extra = {"recipe": recipe.identity(), "data": cache_identity(cache), "split": split,
             "normalise": [augment.mean, augment.std], "knn": dataclasses.asdict(knn),
             **({} if monitor is cache else {"monitor": cache_identity(monitor)}),
             **config.extra}
    config = dataclasses.replace(config, extra=extra)
    torch.manual_seed(config.seed)  # the initial weights are part of the run
    moco = recipe.build().to(default_device())
    knn_start = knn_evaluate(moco.encoder_q, monitor, augment.plain, knn)
    batches = CacheBatches(cache, split, config.batch_size, shuffle=True, seed=config.seed,
                           drop_last=True, device=default_device(), resident=resident)
    trainable = [p for p in moco.parameters() if p.requires_grad]
    result = fit(moco, batches, None, config, run_root, "moco", loss_func=model_loss,
                 batch_tfm=augment, cbs=[MomentumQueue(), KnnMonitor(monitor, augment.plain, knn)],
                 param_groups=[{"params": trainable}], force=force, progress=progress)
    return PretrainedMoco(moco, result, augment, recipe, knn_start)


def _check_batch(cache: Cache, split: str, recipe: MocoRecipe, batch_size: int) -> None:
    """Refuse, before any training, what would fail at the first step."""
    images = len(cache.split_indices(split))
    if images < batch_size:
        raise ValueError(f"{cache.path}: split {split!r} has {images} images, fewer than one "
                         f"batch of {batch_size} (MoCo drops incomplete batches)")
    if recipe.queue_size < batch_size:
        raise ValueError(f"MocoRecipe.queue_size {recipe.queue_size} is smaller than the batch "
                         f"of {batch_size}: the queue must hold at least one batch of keys")


def save_backbone(pretrained: PretrainedMoco, path: str | Path) -> Path:
    """Write the query backbone (timm keys, no projection head) with its recipe, for
    fine-tuning (chapter 4): it loads into `timm.create_model(recipe.model, num_classes=n,
    in_chans=recipe.in_chans)` with only the classifier missing."""
    state = {k: v.detach().cpu() for k, v in pretrained.moco.encoder_q.state_dict().items()}
    return runs.save_weights(path, state, backbone=pretrained.recipe.model,
                             recipe=pretrained.recipe.identity(),
                             normalise=[pretrained.augment.mean, pretrained.augment.std],
                             run=pretrained.run.path.name)


def load_backbone(path: str | Path) -> tuple[nn.Module, MocoAugment]:
    """The backbone a `save_backbone` file holds (pooled features [B, D]), with the evaluation
    view it was trained with: its recipe's size and channels, its normalisation."""
    state = read_state_dict(path)  # a missing or unreadable file is named first
    backbone, encoder, view = _saved_backbone(path)
    try:
        encoder.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: its tensors do not fit {backbone}: {err}") from None
    return encoder, view


def untrained_backbone(path: str | Path, seed: int) -> tuple[nn.Module, MocoAugment]:
    """The backbone of a `save_backbone` file's recipe with random weights drawn from `seed`
    (the floor a pre-trained backbone must clear), with the file's evaluation view."""
    torch.manual_seed(seed)
    _, encoder, view = _saved_backbone(path)
    return encoder, view


def _saved_backbone(path: str | Path) -> tuple[str, nn.Module, MocoAugment]:
    """The backbone a `save_backbone` file names, built with fresh weights, and its evaluation
    view (the recipe's size and channels, the normalisation it was trained with)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if "backbone" not in saved or not isinstance(saved.get("recipe"), dict):
        raise ValueError(f"{path}: not a backbone file of `save_backbone` (`cxr pretrain moco "
                         "--save`): it names no backbone and recipe")
    recipe = saved["recipe"]
    encoder = build_backbone(saved["backbone"], in_chans=recipe["in_chans"])
    mean, std = saved["normalise"]
    return saved["backbone"], encoder, MocoAugment(recipe["image_size"], mean=mean, std=std,
                                                   channels=recipe["in_chans"])


# ----------------------------------------------------------------------------- embeddings

COLLAPSE_MARGIN = 0.1  # the queue's keys this close to the positives, on average: collapsed


@dataclass(frozen=True)
class KeySimilarity:
    """Mean cosine similarity of queries to their own image's key (the positive), to the keys of
    the other images of the batch and to keys from the queue."""

    positive: float
    other: float
    queue: float


def key_similarity(sims: np.ndarray) -> KeySimilarity:
    """The means of a similarity matrix [n, n + m]: n queries (rows) against the keys of the
    other view of the same n images (first n columns, positives on the diagonal), then m keys
    from the queue."""
    n = len(sims)
    if sims.ndim != 2 or n < 2 or sims.shape[1] <= n:
        raise ValueError(f"key_similarity: expected [n, n + m] with n >= 2 and m >= 1, got "
                         f"{sims.shape}")
    batch = sims[:, :n]  # [n, n]
    return KeySimilarity(float(np.diag(batch).mean()),
                         float(batch[~np.eye(n, dtype=bool)].mean()), float(sims[:, n:].mean()))


@dataclass(frozen=True)
class NeighbourShare:
    """How far the images with one finding gather among each other's nearest neighbours."""

    images: int  # images with the finding, among those whose label for it is known
    share: float  # mean share of their k nearest neighbours that have the finding too
    chance: float  # the expected share if the images were placed at random
    p_value: float  # the share of random relabellings that gather as much or more


def neighbour_share(feats: np.ndarray, labels: np.ndarray, k: int, *, shuffles: int = 1000,
                    seed: int = 0) -> NeighbourShare:
    """Do the images with a finding (labels [N]: 1, 0 or NaN for unknown) lie near each other
    in the feature space [N, D]? Neighbours by cosine similarity, an image not its own; chance
    is (images - 1) / (known - 1); the p-value counts the random relabellings (one-sided, the
    observed labelling among them). NaN where fewer than two images, or all, have the finding."""
    known = ~np.isnan(labels)
    y = labels[known] == 1  # [n]
    n, pos = len(y), int(y.sum())
    if pos < 2 or pos == n:
        return NeighbourShare(pos, math.nan, math.nan, math.nan)
    k = min(k, n - 1)
    x = feats[known] / np.linalg.norm(feats[known], axis=1, keepdims=True).clip(1e-12)  # [n, D]
    sims = x @ x.T  # [n, n]
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # [n, k]
    rng = np.random.default_rng(seed)
    ys = np.stack([y, *(rng.permutation(y) for _ in range(shuffles))])  # [1 + S, n]
    shares = (ys[:, nearest].mean(axis=2) * ys).sum(axis=1) / pos  # [1 + S]
    p = (1 + (shares[1:] >= shares[0]).sum()) / (1 + shuffles)
    return NeighbourShare(pos, float(shares[0]), (pos - 1) / (n - 1), float(p))


def gathering_table(results: Mapping[str, NeighbourShare]) -> pd.DataFrame:
    """One row a panel (`results` maps its name to its `neighbour_share`), with the p-values
    Holm-adjusted over the panels that could be measured."""
    table = pd.DataFrame([dataclasses.astuple(r) for r in results.values()],
                         index=pd.Index(list(results), name="panel"),
                         columns=["images", "neighbour share", "chance", "p"])
    table["p (Holm)"] = holm_adjust(table["p"].to_numpy())
    return table

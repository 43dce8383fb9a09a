"""Chapter 3, MoCo v2 baselines on convolutional networks: its runs, tables, figures and words.

The notebook (notebooks/03_moco_baselines.ipynb) keeps the prose, the parameters and a few calls:
`pretrain_backbones` trains (or loads) one MoCo v2 run per backbone through `cxr_lib.methods.moco`,
the `..._figure` functions draw its pictures, and the `..._words` functions return the Markdown
the prose quotes, name -> text, for `glue_all`. Every decision that turns numbers into words is
a sentence builder here (`knn_sentence`, `start_sentence`, `loss_sentence`,
`similarity_sentence`, `gathering_sentence`), tested on hand-made numbers in
tests/test_chapter_moco_baselines.py.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.manifold import TSNE

from cxr_lib.augment.crops import sample_crop_boxes
from cxr_lib.augment.views import MocoAugment
from cxr_lib.chapters.files import encoder_path
from cxr_lib.chapters.plots import image_grid
from cxr_lib.chapters.sentences import span
from cxr_lib.chapters.setup import image_noun, images_origin, source_counts
from cxr_lib.data.cache import Cache
from cxr_lib.engine.config import TrainConfig
from cxr_lib.methods.moco import (
    COLLAPSE_MARGIN,
    KeySimilarity,
    KnnSettings,
    MocoRecipe,
    NeighbourShare,
    PretrainedMoco,
    backbone_features,
    key_similarity,
    neighbour_share,
    pretrain_moco,
    save_backbone,
)
from cxr_lib.models.classifier import build_classifier

NAMES = {"densenet121": "DenseNet-121", "resnet50": "ResNet-50"}  # timm name -> prose name
RANDOM_START_CLEAR = 0.55  # random initialisations all at or above this kNN AUC: "well above"


def pretty(model: str) -> str:
    """A backbone as the prose names it ("DenseNet-121"); an unknown one by its timm name."""
    return NAMES.get(model, model)


def chance_loss(queue_size: int) -> float:
    """InfoNCE of a network that cannot tell its key from the queue's: log(1 + queue size)."""
    return float(np.log(1 + queue_size))


# ----------------------------------------------------------------------------- the images

def data_words(pooled: Cache, monitored: Cache, data_root: str | Path | None) -> dict[str, str]:
    """The edition's images: where the monitored ones come from, the training images of the
    pool by source, and the monitored validation images."""
    train = pooled.index.iloc[pooled.split_indices("train")]
    return {"images_origin": images_origin(data_root),
            "n_train": f"{len(train):,} training images ({source_counts(train)})",
            "n_val": f"{len(monitored.split_indices('val')):,}"}


def recipe_words(cache: Cache, recipe: MocoRecipe) -> dict[str, str]:
    """The queue, temperature and key momentum the prose quotes, and the queue's share of the
    training images."""
    return {"queue": f"{recipe.queue_size:,}", "temperature": f"{recipe.temperature:g}",
            "key_momentum": f"{recipe.momentum:g}",
            "queue_share": f"{recipe.queue_size / len(cache.split_indices('train')):.0%}"}


def to_u8(x: torch.Tensor, augment: MocoAugment) -> np.ndarray:
    """Normalised float [B, 1, s, s] -> uint8 pictures [B, s, s]."""
    return (x[:, 0] * augment.std + augment.mean).clamp(0, 1).mul(255).byte().numpy()


def views_figure(cache: Cache, augment: MocoAugment, rows: Sequence[int], seed: int,
                 n_views: int = 4) -> Figure:
    """Each image of `rows` (cache rows), plain, then `n_views` random views of it."""
    shown = torch.from_numpy(np.asarray(cache.images[rows]))[:, None]  # [n, 1, S, S] uint8
    generator = torch.Generator().manual_seed(seed)
    views = [augment.view(shown, generator) for _ in range(n_views)]  # n_views x [n, 1, s, s]
    plain = to_u8(augment.plain(shown), augment)
    cells, titles = [], []
    for i in range(len(shown)):
        cells += [plain[i], *[to_u8(v, augment)[i] for v in views]]
        titles += ["image", *[f"view {j + 1}" for j in range(len(views))]]
    return image_grid(cells, titles, ncols=1 + len(views),
                      suptitle=f"Random views of the same {image_noun(cache)}")


def crops_figure(image: np.ndarray, moco_scale: Sequence[float], mae_scale: Sequence[float],
                 seed: int, n: int = 8) -> Figure:
    """`n` crops of MoCo's range and `n` of the X-ray MAE's drawn as boxes on one image [S, S]."""
    side = image.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    boxes = [sample_crop_boxes(n, side, side, tuple(scale), generator=generator)
             for scale in (moco_scale, mae_scale)]
    as_xywh = [[(int(x0), int(y0), int(x1 - x0), int(y1 - y0)) for x0, y0, x1, y1 in b.tolist()]
               for b in boxes]
    return image_grid([np.asarray(image)] * 2,
                      ["MoCo v2: {}-{} of the area".format(*moco_scale),
                       "X-ray MAE: {}-{} of the area".format(*mae_scale)],
                      ncols=2, boxes=as_xywh, cell_inches=3.2)


def area_shares(side: int, scale: Sequence[float], seed: int, n: int = 10_000) -> np.ndarray:
    """Area fractions of `n` crops drawn like the training crops (aspect ratio 3/4 to 4/3)."""
    b = sample_crop_boxes(n, side, side, tuple(scale),
                          generator=torch.Generator().manual_seed(seed)).float()
    return ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / side**2).numpy()


def crop_words(side: int, moco_scale: Sequence[float], mae_scale: Sequence[float],
               seed: int) -> dict[str, str]:
    """The share of MoCo's crops under half the image, and the mean crop of both ranges."""
    moco, mae = area_shares(side, moco_scale, seed), area_shares(side, mae_scale, seed)
    return {"moco_small_crops": f"{(moco < 0.5).mean():.0%}",
            "moco_mean_crop": f"{moco.mean():.0%}", "mae_mean_crop": f"{mae.mean():.0%}"}


# ----------------------------------------------------------------------------- training

def pretrain_backbones(pooled: Cache, recipe: MocoRecipe, models: Sequence[str],
                       config: TrainConfig, run_root: str | Path, knn: KnnSettings,
                       monitored: Cache) -> dict[str, PretrainedMoco]:
    """One MoCo v2 run per backbone (the recipe with its model replaced) on the pool's
    training images, monitored on `monitored`'s labels, trained or loaded."""
    pretrained = {}
    for model in models:
        print(f"MoCo v2 on {pretty(model)}")
        pretrained[model] = pretrain_moco(pooled, dataclasses.replace(recipe, model=model),
                                          config, run_root, knn=knn, monitor=monitored)
    return pretrained


def backbone_table(pretrained: Mapping[str, PretrainedMoco]) -> pd.DataFrame:
    """One row a backbone: its size, final loss, kNN AUC before and after, and speed."""
    return pd.DataFrame([{
        "backbone": pretty(m),
        "parameters (M)": sum(p.numel() for p in pre.moco.encoder_q.parameters()) / 1e6,
        "features": pre.moco.encoder_q.num_features,
        "final loss": pre.run.history["train_loss"].iloc[-1],
        "kNN AUC before": pre.knn_start,
        "kNN AUC after": pre.knn_end,
        "images/s": pre.run.history["images_per_s"].iloc[-1],
        "loaded from an earlier run": pre.run.loaded_from_cache,
    } for m, pre in pretrained.items()]).round(3)


def training_words(pretrained: Mapping[str, PretrainedMoco], epochs: int, batch_size: int,
                   queue_size: int) -> dict[str, str]:
    """The length of the runs (epochs, steps of the first backbone, batch) and the chance loss."""
    first = next(iter(pretrained.values()))
    return {"epochs": f"{epochs}", "steps": f"{int(first.run.metrics['steps']):,}",
            "batch": f"{batch_size}", "chance_loss": f"{chance_loss(queue_size):.2f}"}


def curves_figure(pretrained: Mapping[str, PretrainedMoco], queue_size: int) -> Figure:
    """The InfoNCE loss by epoch against chance, and the kNN AUC from epoch 0 (the random
    initialisation) on."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for model, pre in pretrained.items():
        h = pre.run.history
        a.plot(h["epoch"] + 1, h["train_loss"], marker="o", label=pretty(model))
        scored = h.dropna(subset=["knn_auc"])
        b.plot([0, *(scored["epoch"] + 1)], [pre.knn_start, *scored["knn_auc"]], marker="o",
               label=pretty(model))
    a.axhline(chance_loss(queue_size), color="grey", linestyle="--", label="chance")
    a.set(xlabel="epoch", ylabel="InfoNCE loss", title="Contrastive loss")
    b.set(xlabel="epoch", ylabel="kNN mean AUC (validation)", title="kNN monitor")
    b.axhline(0.5, color="grey", linestyle=":", label="no signal (0.5)")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def knn_sentence(results: Mapping[str, tuple[float, float]], epochs: int) -> str:
    """One plain sentence on where each backbone's kNN AUC went, start to end, and which
    ended higher; `results` maps a name to (start, end). NaN (no finding with both classes
    among the validation images) is said, not compared."""
    if not results:
        raise ValueError("knn_sentence: no results")
    parts = []
    for name, (start, end) in results.items():
        if not (math.isfinite(start) and math.isfinite(end)):
            parts.append(f"{name}'s kNN AUC could not be computed (no finding has both "
                         "classes among the validation images)")
            continue
        change, after = end - start, f"after {epochs} epoch{'s' if epochs != 1 else ''}"
        if change == 0:
            parts.append(f"{name}'s kNN AUC stayed at {start:.3f} {after}")
            continue
        verb = "rose" if change > 0 else "fell"
        parts.append(f"{name}'s kNN AUC {verb} from {start:.3f} before pre-training to "
                     f"{end:.3f} {after} ({change:+.3f})")
    text = "; ".join(parts) + "."
    ends = {name: end for name, (_, end) in results.items() if math.isfinite(end)}
    if len(ends) > 1:
        ranked = sorted(ends.items(), key=lambda item: item[1], reverse=True)
        (top, best), (_, second) = ranked[0], ranked[1]
        text += (f" {top} ended highest, {best - second:.3f} above the next." if best > second
                 else " They ended level.")
    return text


def start_sentence(starts: Sequence[float], n_val: int) -> str:
    """What the random initialisations' kNN AUCs say: all at or above `RANDOM_START_CLEAR`
    is structure random features already carry; otherwise they are read against chance, with
    the noise `n_val` validation images allow."""
    if not len(starts):
        raise ValueError("start_sentence: no random initialisation to describe")
    listed = " and ".join(f"{s:.3f}" for s in starts)
    if not np.isfinite(starts).all():
        return "Not every random initialisation could be scored."
    if min(starts) >= RANDOM_START_CLEAR:
        return (f"Even the random initialisations score well above 0.5 ({listed}): random "
                "convolutional features already group images by their overall appearance.")
    return (f"The random initialisations score {listed}, against 0.5 for chance; on "
            f"{n_val} validation images, a few hundredths either way is noise.")


def loss_sentence(losses: Mapping[str, Sequence[float]], epochs: int) -> str:
    """Whether each backbone's loss (one value an epoch) ended below its first value; the
    backbones whose loss ended higher are named."""
    if epochs == 1:
        return "One epoch gives one loss value per backbone, not yet a curve."
    if not losses:
        raise ValueError("loss_sentence: no losses")
    ends = {name: np.asarray(h, dtype=float)[[0, -1]] for name, h in losses.items()}
    unknown = [name for name, (first, last) in ends.items()
               if not (math.isfinite(first) and math.isfinite(last))]
    if unknown:
        return (f"The loss of {' and '.join(unknown)} is not a number at the first or the last "
                "epoch, so whether it fell cannot be said.")
    rose = [name for name, (first, last) in ends.items() if last > first]
    if rose:
        return (f"The loss of {' and '.join(rose)} ended higher than after the first "
                "epoch: at this length the contrastive task has not been learnt (compare "
                "the chance level, dashed), and the similarity matrices below show how far "
                "the two views of an image stand out from the other keys.")
    return "The loss fell from the first epoch to the last for every backbone."


def knn_words(pretrained: Mapping[str, PretrainedMoco], epochs: int, n_val: int
              ) -> dict[str, str]:
    """The kNN monitor's and the loss curves' sentences."""
    return {"knn_sentence": knn_sentence(
                {pretty(m): (pre.knn_start, pre.knn_end) for m, pre in pretrained.items()},
                epochs),
            "start_sentence": start_sentence([pre.knn_start for pre in pretrained.values()],
                                             n_val),
            "loss_sentence": loss_sentence(
                {pretty(m): pre.run.history["train_loss"] for m, pre in pretrained.items()},
                epochs)}


# ----------------------------------------------------------------------------- what it matches

def similarities(moco: torch.nn.Module, view_q: torch.Tensor, view_k: torch.Tensor,
                 n_queue: int = 16) -> np.ndarray:
    """Cosine similarity of the queries of one view [n] to the keys of the other view [n] and
    to `n_queue` queue keys: [n, n + n_queue]."""
    moco.eval()
    with torch.no_grad():
        q = moco.embed_query(view_q)  # [n, D], unit length
        candidates = torch.cat([moco.embed_key(view_k), moco.queue[:n_queue]])  # [n + m, D]
        return (q @ candidates.T).cpu().numpy()  # [n, n + m]


def similarity_matrices(pretrained: PretrainedMoco, cache: Cache, rows: Sequence[int],
                        seed: int) -> dict[str, np.ndarray]:
    """The similarity matrices of two views of the images of `rows`, "before" pre-training
    (the same recipe built from the run's seed) and "after" it."""
    on = pretrained.moco.queue.device
    torch.manual_seed(seed)  # the same initial weights as the run
    untrained = pretrained.recipe.build().to(on)
    pair = torch.from_numpy(np.asarray(cache.images[rows]))[:, None]  # [n, 1, S, S] uint8
    pair_gen = torch.Generator().manual_seed(seed + 1)
    view_q = pretrained.augment.view(pair, pair_gen).to(on)  # [n, 1, s, s]
    view_k = pretrained.augment.view(pair, pair_gen).to(on)
    return {"before": similarities(untrained, view_q, view_k),
            "after": similarities(pretrained.moco, view_q, view_k)}


def similarity_figure(sims: Mapping[str, np.ndarray], name: str) -> Figure:
    """The similarity matrices side by side (`sims` maps "before"/"after" to [n, n + m])."""
    fig, axes = plt.subplots(1, len(sims), figsize=(13, 3.4))
    for ax, (label, matrix) in zip(axes, sims.items(), strict=True):
        n = len(matrix)
        im = ax.imshow(matrix, cmap="viridis", vmin=-1, vmax=1)
        ax.axvline(n - 0.5, color="white", linewidth=2)
        ax.set(xlabel=f"keys: other view of the {n} images | {matrix.shape[1] - n} from the queue",
               ylabel="queries", title=f"{name} {label} pre-training")
    fig.colorbar(im, ax=axes, fraction=0.02, label="cosine similarity")
    return fig


def similarity_sentence(before: KeySimilarity, after: KeySimilarity, final_loss: float,
                        chance_loss: float, margin: float = COLLAPSE_MARGIN) -> str:
    """The similarities before and after pre-training and a verdict on the trained network:
    collapsed when the queue's keys come within `margin` of the positives on average; telling
    its own key from the others when both the queue's and the other images' keys stay further
    off. Before pre-training the queue holds random vectors, so there only the other images'
    keys say how alike the network maps different images. Similarities that are not numbers
    (a run whose embeddings diverged) are said, not judged."""
    values = [*dataclasses.astuple(before), *dataclasses.astuple(after)]
    if not np.isfinite(values).all():
        return ("The similarities before or after pre-training are not numbers (the embeddings "
                "hold NaN or infinite values), so whether the network tells its own key from the "
                "others cannot be said.")
    text = (f"After pre-training, a query's mean cosine similarity is {after.positive:.2f} to "
            f"its own image's key, {after.other:.2f} to the keys of the other images and "
            f"{after.queue:.2f} to the queue's keys; before, {before.positive:.2f}, "
            f"{before.other:.2f} and {before.queue:.2f}, the last against the random vectors "
            "the queue starts with.")
    collapsed = after.queue >= after.positive - margin
    if collapsed:
        text += (f" The queue's keys are within {margin:g} of the positives: the embeddings have "
                 "collapsed, every key about as similar to a query as its own, so the candidates "
                 "get about the same probability and the loss stays near chance (final loss "
                 f"{final_loss:.2f}, chance {chance_loss:.2f}).")
    elif after.other >= after.positive - margin:
        text += (f" The positives stand out from the queue's keys by "
                 f"{after.positive - after.queue:.2f}, but the other images' keys are within "
                 f"{margin:g} of the positives: the network does not yet tell an image's own "
                 "key from those of the images beside it in the batch.")
    else:
        text += (f" The positives stand out from the queue's keys by "
                 f"{after.positive - after.queue:.2f} and from the other images' keys by "
                 f"{after.positive - after.other:.2f}, more than the {margin:g} of a collapse: "
                 "the network tells an image's own key from the others.")
    if before.other < before.positive - margin:
        return text + (" Before pre-training, the positives stood out from the other images' "
                       f"keys by {before.positive - before.other:.2f}.")
    text += (" The untrained network already mapped different images almost alike (their keys "
             f"at {before.other:.2f})")
    return text + (": the collapse was there before pre-training, which has not undone it."
                   if collapsed else ".")


def similarity_words(sims: Mapping[str, np.ndarray], final_loss: float, queue_size: int
                     ) -> dict[str, str]:
    """The collapse margin and the verdict on the matrices before and after pre-training."""
    return {"collapse_margin": f"{COLLAPSE_MARGIN:g}",
            "sim_sentence": similarity_sentence(key_similarity(sims["before"]),
                                                key_similarity(sims["after"]), final_loss,
                                                chance_loss(queue_size))}


# ----------------------------------------------------------------------------- the embedding

@dataclass(frozen=True)
class Embedding:
    """A backbone's features [N, D] of validation images, their labels [N, F] and t-SNE map
    [N, 2]."""

    feats: np.ndarray
    labels: np.ndarray
    xy: np.ndarray


def top_findings(labels: np.ndarray, n: int = 3) -> list[int]:
    """The columns of the `n` most frequent findings of labels [N, F] (NaN: unknown)."""
    with warnings.catch_warnings():  # a finding no image's label knows: NaN, ranked last
        warnings.simplefilter("ignore", RuntimeWarning)
        prevalence = np.nanmean(labels, axis=0)
    return [int(j) for j in np.argsort(-prevalence)[:n]]


def embedding_maps(pretrained: Mapping[str, PretrainedMoco], cache: Cache, max_images: int,
                   seed: int) -> dict[str, Embedding]:
    """Each backbone's features of the first `max_images` validation images and their t-SNE."""
    maps = {}
    for model, pre in pretrained.items():
        feats, labels = backbone_features(pre.moco.encoder_q, cache, pre.augment.plain, "val",
                                          max_images)
        perplexity = min(30.0, max(2.0, (len(feats) - 1) / 3))
        xy = TSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats)
        maps[model] = Embedding(feats, labels, xy)
    return maps


def panel_name(model: str, finding: str) -> str:
    """A panel of the embedding figure and a row of the gathering table."""
    return f"{pretty(model)}: {finding}"


def embedding_figure(maps: Mapping[str, Embedding], top: Sequence[int],
                     findings: Sequence[str]) -> Figure:
    """One row of t-SNE panels a backbone, one panel a finding of `top`, its images in red."""
    fig, axes = plt.subplots(len(maps), len(top), figsize=(3.4 * len(top), 3.2 * len(maps)),
                             squeeze=False)
    for row, (model, emb) in enumerate(maps.items()):
        for ax, j in zip(axes[row], top, strict=True):
            has = emb.labels[:, j] == 1
            ax.scatter(*emb.xy[~has].T, s=8, color="#c9c9c9", label="without the finding")
            ax.scatter(*emb.xy[has].T, s=12, color="#c44e52", label="with the finding")
            ax.set(xticks=[], yticks=[], title=panel_name(model, findings[j]))
        axes[row][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def neighbour_shares(maps: Mapping[str, Embedding], top: Sequence[int], findings: Sequence[str],
                     k: int, seed: int) -> dict[str, NeighbourShare]:
    """The `neighbour_share` of each panel of `embedding_figure`, by panel name."""
    return {panel_name(model, findings[j]): neighbour_share(emb.feats, emb.labels[:, j], k,
                                                            seed=seed)
            for model, emb in maps.items() for j in top}


def gathering_sentence(table: pd.DataFrame, k: int, level: float = 0.05) -> str:
    """What `gathering_table` says, in plain words: the range of the neighbour shares against
    chance, and the panels whose images gather more than random relabellings (Holm-adjusted p
    below `level`)."""
    measured = table.dropna(subset=["neighbour share"])
    if measured.empty:
        return ("Too few validation images carry these findings to measure whether they "
                "gather.")
    lo, hi = measured["neighbour share"].min(), measured["neighbour share"].max()
    c_lo, c_hi = measured["chance"].min(), measured["chance"].max()
    text = (f"Among the {k} nearest neighbours of a validation image with a finding (cosine "
            f"similarity of the backbone features), the share that has the finding too is "
            f"{span([lo, hi], '.0%')} over the {len(measured)} panels measured, against "
            f"{span([c_lo, c_hi], '.0%')} if the images were placed at random.")
    gathered = list(measured.index[measured["p (Holm)"] < level])
    test = f"by a test at the {level:.0%} level with Holm's correction over the panels"
    if not gathered:
        text += (" In no panel is that share higher than random relabellings of the images make "
                 f"it, {test}: the features show no grouping by these findings that chance "
                 "would not explain.")
    else:
        text += (f" In {len(gathered)} of them ({'; '.join(gathered)}) it is higher than random "
                 f"relabellings make it, {test}: there the features have begun to group the "
                 "images with the finding, though a grouping need not show as a cluster in a "
                 "t-SNE map.")
    if len(measured) < len(table):
        text += (f" {len(table) - len(measured)} panel(s) had too few images with the finding "
                 "to measure.")
    return text


def gathering_words(table: pd.DataFrame, k: int) -> dict[str, str]:
    """The gathering table in words."""
    return {"gathering_sentence": gathering_sentence(table, k)}


# ----------------------------------------------------------------------------- carried forward

def save_backbones(pretrained: Mapping[str, PretrainedMoco], work: str | Path, image_size: int
                   ) -> dict[str, Path]:
    """Save each query encoder where chapter 4 looks for it (`encoder_path`), and load it back
    as chapter 4 does, into a plain timm classifier, which must take every weight."""
    saved = {m: save_backbone(pre, encoder_path(work, "moco", m)) for m, pre in pretrained.items()}
    for model, path in saved.items():
        _, report = build_classifier(model, img_size=image_size, init="moco", weights=path)
        print(f"{path.name}: {report.summary}")
        if report.unexpected or report.mismatched:
            raise RuntimeError(f"{path.name} does not load into a {model} classifier: "
                               f"{report.summary}")
    return saved


def saved_words(saved: Mapping[str, Path]) -> dict[str, str]:
    """The saved files, named as code."""
    return {"saved_files": ", ".join(f"`{Path(p).name}`" for p in saved.values())}

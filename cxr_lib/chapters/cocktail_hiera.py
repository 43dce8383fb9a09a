"""Chapter 6, cocktail pre-training and Hiera: the tables, figures and words of the chapter.

The recipes and runs are `cxr_lib.methods.cocktail`'s and `cxr_lib.methods.mae`'s; here are the
chapter's arms (`share_arms`, `pretrain_arms`, `finetune_starts`), its tables and figures, and
its verdicts: they rank the starts only where the gaps exceed the noise (`ranking_sentence`),
and judge the encoders as painters only once they paint better than a blank prediction
(`painter_sentence`). Every `*_words` function returns name -> Markdown for `glue_all`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cxr_lib.chapters.files import encoder_path, runs_dir
from cxr_lib.chapters.plots import image_grid
from cxr_lib.chapters.sentences import names as listed
from cxr_lib.chapters.setup import DESCRIBED
from cxr_lib.data.cache import Cache
from cxr_lib.data.phantoms import SOURCE as PHANTOM
from cxr_lib.engine.config import TrainConfig
from cxr_lib.engine.runs import read_history
from cxr_lib.methods.cocktail import (
    MEDTRANSFORMER_MASK_RATIO,
    NO_FINDING,
    chest_share_weights,
    medtransformer_start,
    mix_stats,
    normalisation,
    row_weights,
    source_shares,
    stored_test_aucs,
    told_apart,
)
from cxr_lib.methods.finetune import FinetuneRecipe, split_scores
from cxr_lib.methods.mae import HeldoutErrors, MaeRecipe, PretrainedMae, pretrain_mae, save_encoder
from cxr_lib.models.classifier import WeightsUnavailable, imagenet_weights

STARTS_TABLE = "ch6_starts"  # the table of fine-tuned starts, runs/<this>.parquet
OURS, THEIRS = "test AUC, ours", "test AUC, MedTransformer's scoring"  # `scored_table` columns


# ----------------------------------------------------------------------------- the cocktail

def source_rows(cache: Cache, source: str, split: str = "train") -> np.ndarray:
    """The cache rows of `split` that come from `source`."""
    rows = cache.split_indices(split)
    return rows[cache.index["source"].to_numpy()[rows] == source]


def source_table(cache: Cache, sources: Sequence[str]) -> pd.DataFrame:
    """Each source: what it is, its training images and its pixel mean."""
    return pd.DataFrame([{
        "source": name, "what": DESCRIBED.get(name, name),
        "training images": len(source_rows(cache, name)),
        "pixel mean": mix_stats(cache, {n: float(n == name) for n in sources})[0],
    } for name in sources])


def sources_figure(cache: Cache, sources: Sequence[str], per_source: int = 3) -> Figure:
    """The first `per_source` training images of each source."""
    rows = [r for name in sources for r in source_rows(cache, name)[:per_source]]
    titles = [name for name in sources for _ in source_rows(cache, name)[:per_source]]
    return image_grid([cache.images[r] for r in rows], titles, ncols=6,
                      suptitle="Three training images of each source")


def cocktail_words(table: pd.DataFrame, chest: str) -> dict[str, str]:
    """The sources with their training images ("cocktail_sources") and what plays the other
    domain ("other_domain"): the real sources beside the chest set, else phantoms (a blurrier
    kind when the chest images are phantoms themselves)."""
    if not len(table):
        sources = "no source"
    else:
        sources = ", ".join(f"{r['what']} ({r['training images']:,} images)"
                            for _, r in table.iterrows())
    others = table[table["source"] != chest] if len(table) else table
    if chest == PHANTOM:
        other = ("The chest images of this edition are themselves phantoms, so the second "
                 "domain is a blurrier kind of phantom: drawn at a quarter of the resolution and "
                 "enlarged to the cache size, as if from another scanner.")
    elif PHANTOM in set(others.get("source", [])):
        other = "Phantoms play the part of a different domain: drawn, not X-rayed."
    elif len(others):
        other = (f"The second domain is real: {listed(list(others['what']))}, X-rays of other "
                 "patients from another hospital.")
    else:
        other = "This edition has no second domain: the chest images are its only source."
    return {"cocktail_sources": sources, "other_domain": other}


def share_arms(sources: Sequence[str], chest: str, shares: Sequence[float]
               ) -> dict[float, dict[str, float]]:
    """Each chest share -> the source weights of its mix."""
    return {share: chest_share_weights(list(sources), chest, share) for share in shares}


def norm_words(normalise: str, cache: Cache) -> dict[str, str]:
    """Which statistics normalise the arms ("norm_used")."""
    return {"norm_used": "This edition uses them so, arm by arm." if normalise == "mix" else
            "This edition uses MedTransformer's own instead, as it does, for every arm and "
            f"start: {normalisation(normalise, cache, {})}, the mean of its three channels' "
            "fixed values (our Hiera reads one grey channel; its X-rays are grey images copied "
            "to three)."}


def stats_table(cache: Cache, arms: Mapping[float, Mapping[str, float]]) -> pd.DataFrame:
    """Each arm's share of every source and its mix's pixel mean and std."""
    return pd.DataFrame([{
        "chest share": share, **{f"share of {n}": round(v, 3)
                                 for n, v in source_shares(cache, w).items()},
        "mean": round(mix_stats(cache, w)[0], 4), "std": round(mix_stats(cache, w)[1], 4),
    } for share, w in arms.items()])


# ----------------------------------------------------------------------------- starts, masks

def imagenet_starts(model: str, mae_file: str | None, classifier_file: str | None
                    ) -> tuple[dict[str, str], list[str]]:
    """The ImageNet files found ("mae": the MAE to continue, "classifier": a fine-tuning
    start), given ones first, and why each missing one is missing; nothing is downloaded."""
    found, missing = {}, []
    for kind, given, find in (("mae", mae_file, medtransformer_start),
                              ("classifier", classifier_file, imagenet_weights)):
        try:
            found[kind] = given or str(find(model))
        except WeightsUnavailable as err:
            missing.append(str(err))
    return found, missing


def mask_units(mae, x) -> int:
    """How many mask units an image holds: Hiera's units, or a ViT's patches."""
    return getattr(mae, "num_units", None) or mae.patchify(x).shape[1]


def plural(n: int, word: str) -> str:
    """"1 epoch", "10 epochs"."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def mask_words(units: int, hidden, center_crop: float, crop_scale: Sequence[float],
               pretrain_epochs: int, finetune_epochs: int) -> dict[str, str]:
    """The mask units and the visible ones (`hidden` [1, L], 1 = masked), the masks of the two
    papers, what the MAE views of this edition keep and the epochs of each stage."""
    views = ("this edition's MAE sees the whole image" if center_crop == 1 else
             f"this edition's MAE sees the central {center_crop:.1%} of each side, as there")
    views += (", with none of the random crop, only the horizontal flip of our engine"
              if tuple(crop_scale) == (1.0, 1.0) else
              f", through a random-resized crop of {crop_scale[0]:g} to {crop_scale[1]:g} of "
              "its area and a horizontal flip, which that run did without")
    return {"units": f"{units}", "visible_units": f"{round(float(1 - hidden.mean()) * units)}",
            "paper_mask": f"{MEDTRANSFORMER_MASK_RATIO:.0%}",
            "xray_mae_mask": f"{MaeRecipe().mask_ratio:.0%}",  # its defaults: Xiao et al.
            "mae_views": views, "pt_epochs": plural(pretrain_epochs, "epoch"),
            "ft_epochs": plural(finetune_epochs, "epoch")}


# ----------------------------------------------------------------------------- pre-training

def pretrain_arms(mix: Cache, chest: Cache, recipe: MaeRecipe, config: TrainConfig,
                  work: str | Path, arms: Mapping[float, Mapping[str, float]], normalise: str,
                  model: str) -> tuple[dict[float, PretrainedMae], dict[float, Path]]:
    """Pre-train (or load) the MAE of each arm on its mix, as many draws an epoch as the chest
    set has training images, and save each encoder as `cocktail<share>`."""
    pretrained, encoders = {}, {}
    for share, weights in arms.items():
        print(f"chest share {share}: {source_shares(mix, weights)}")
        pre = pretrain_mae(mix, recipe, config, runs_dir(work),
                           sample_weights=row_weights(mix, weights),
                           draws=len(chest.split_indices("train")),
                           normalise=normalisation(normalise, mix, weights))
        pretrained[share] = pre
        encoders[share] = save_encoder(pre, encoder_path(work, f"cocktail{share}", model))
    return pretrained, encoders


def loss_figure(pretrained: Mapping[float, PretrainedMae]) -> Figure:
    """Each arm's training loss by epoch."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for share, pre in pretrained.items():
        h = pre.run.history
        ax.plot(h["epoch"] + 1, h["train_loss"], marker=".", label=f"chest share {share}")
    ax.set(xlabel="epoch", ylabel="reconstruction loss (masked units)",
           title="Pre-training loss on each mix")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- fine-tuning

def fixed_stats(normalise: str, cache: Cache) -> tuple[float, float] | None:
    """The statistics every start is normalised with, or None where each uses its own mix's."""
    return None if normalise == "mix" else normalisation(normalise, cache, {})


def start_label(share: float, after_imagenet: bool) -> str:
    """An MAE start's name: "MAE, chest only" or "MAE, cocktail (50% chest)", after
    "ImageNet, then " where it continued ImageNet's MAE."""
    then = "ImageNet, then " if after_imagenet else ""
    return f"{then}MAE, chest only" if share == 1 else f"{then}MAE, cocktail ({share:.0%} chest)"


def finetune_starts(base: FinetuneRecipe, found: Mapping[str, str],
                    pretrained: Mapping[float, PretrainedMae], encoders: Mapping[float, Path],
                    fixed: tuple[float, float] | None) -> dict[str, FinetuneRecipe]:
    """Every start of the same fine-tuning: random, ImageNet's classifier where it was found,
    and each arm's MAE encoder (normalised as its mix unless `fixed`)."""
    starts = {"random": base}
    if "classifier" in found:
        starts["ImageNet"] = dataclasses.replace(base, init="imagenet",
                                                 weights=found["classifier"])
    for share, pre in pretrained.items():
        starts[start_label(share, bool(found.get("mae")))] = dataclasses.replace(
            base, init="mae", weights=str(encoders[share]),
            normalise=fixed or (pre.augment.mean, pre.augment.std))
    return starts


def label_words(findings: Sequence[str]) -> dict[str, str]:
    """What the fine-tuning trains ("ft_labels"): the findings, with No Finding or without."""
    if NO_FINDING in findings:
        said = (f"Like MedTransformer, this edition trains {len(findings)} outputs: the findings "
                f"and {NO_FINDING}.")
    else:
        said = (f"This edition trains the {len(findings)} findings alone; MedTransformer trains "
                f"{NO_FINDING} as a 15th output (the `paper` profile does too).")
    return {"ft_labels": said}


def finetune_figure(table: pd.DataFrame, work: str | Path, model: str) -> Figure:
    """Each start's validation AUC by epoch, and its validation and test AUC."""
    fig, (curves, ax) = plt.subplots(1, 2, figsize=(13, 4), width_ratios=[1, 1.4])
    for start, run_name in zip(table["start"], table["run"], strict=True):
        h = read_history(runs_dir(work) / run_name)
        curves.plot(h["epoch"] + 1, h["valid_auc"], marker=".", label=start)
    curves.set(xlabel="epoch", ylabel="validation mean AUC", title="Fine-tuning, epoch by epoch")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.legend(fontsize=7)
    x = np.arange(len(table))
    ax.bar(x - 0.2, table["valid_auc"], 0.4, color="#4c72b0", label="validation AUC")
    ax.bar(x + 0.2, table["test_auc"], 0.4, color="#dd8452", label="test AUC")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--", label="chance")
    shown = table[["valid_auc", "test_auc"]].to_numpy()
    ax.set(xticks=x, ylabel="mean AUC over findings", title=f"{model} fine-tuned from each start",
           ylim=(min(0.45, np.nanmin(shown) - 0.05), min(1.0, np.nanmax(shown) + 0.08)))
    ax.set_xticklabels(table["start"], fontsize=8, rotation=15)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def validation_scores(table: pd.DataFrame, work: str | Path, cache: Cache
                      ) -> dict[str, np.ndarray]:
    """Each start's validation logits [N, F]: runs store only test scores, so they are
    computed again, for the bootstrap."""
    return {start: split_scores(runs_dir(work) / run, cache)[0]
            for start, run in zip(table["start"], table["run"], strict=True)}


def ranking_sentence(scores: Mapping[str, float], apart: Callable[[str, str], bool]) -> str:
    """The names from highest score down, with `>` where every name above can be told apart
    (`apart`) from every name below, else `≈`; so every `>` holds for all pairs across it."""
    ranked = sorted((k for k in scores if not np.isnan(scores[k])), key=lambda k: -scores[k])
    if not ranked:
        return ("no start has a validation AUC (no finding has both classes among the "
                "validation images), so this edition cannot rank them")
    order = ranked[0]
    for k in range(1, len(ranked)):
        clear = all(apart(up, low) for up in ranked[:k] for low in ranked[k:])
        order += (" > " if clear else " ≈ ") + ranked[k]
    if " > " in order:
        return f"the order is {order}"
    if len(ranked) == 1:
        return f"only {order} has a validation AUC, so this edition cannot rank the starts"
    return (f"the validation AUCs cannot split the starts into a better and a worse group "
            f"({order}), so this edition cannot rank them")


def ranking_words(table: pd.DataFrame, apart: Callable[[str, str], bool], auc_tie: float,
                  after_imagenet: bool, missing: str) -> dict[str, str]:
    """The tie floor, the ranking of the starts by validation AUC (`ranking_sentence`), what the
    missing ImageNet weights changed (`missing`: why they are missing) and each start's AUCs."""
    return {"auc_tie": f"{auc_tie}",
            "ranking": ranking_sentence(dict(zip(table["start"], table["valid_auc"],
                                                 strict=True)), apart),
            "skipped": "The ImageNet weights were found on this machine: the ImageNet arm "
            "fine-tuned them, and every MAE arm continued pre-training from them, as "
            "MedTransformer does." if after_imagenet else
            "The ImageNet arm did not run, and every MAE arm here started from random weights "
            "instead of continuing from ImageNet's as MedTransformer does, so this edition "
            f"measures the effect of the MAE data alone. {missing}",
            "arm_aucs": "; ".join(f"{r['start']}: {r['valid_auc']:.3f} (test {r['test_auc']:.3f})"
                                  for _, r in table.iterrows())}


# ----------------------------------------------------------------------------- scored twice

def scored_table(table: pd.DataFrame, work: str | Path, cache: Cache) -> pd.DataFrame:
    """Each start's stored test logits scored our way and MedTransformer's (`stored_test_aucs`)."""
    return pd.DataFrame([
        {"start": start, **dict(zip((OURS, THEIRS), stored_test_aucs(runs_dir(work) / run, cache),
                                    strict=True))}
        for start, run in zip(table["start"], table["run"], strict=True)])


def scoring_words(scored: pd.DataFrame, published: pd.Series) -> dict[str, str]:
    """The published per-label table's means, with No Finding and without ("published_both"),
    and each start scored both ways ("scored_both")."""
    return {"published_both": f"{published.mean():.2f}% over its 15 labels and "
            f"{published.drop(NO_FINDING).mean():.2f}% over the 14 findings alone "
            f"({NO_FINDING}: {published[NO_FINDING]:.2f}%)",
            "scored_both": "; ".join(f"{r['start']}: {r[OURS]:.3f} ours, {r[THEIRS]:.3f} its way"
                                     for _, r in scored.iterrows())}


# ----------------------------------------------------------------------------- painters

def painter_table(shares: Sequence[float], labels: Sequence[str],
                  heldout: Sequence[HeldoutErrors], table: pd.DataFrame) -> pd.DataFrame:
    """Each MAE arm's held-out loss, the blank baseline's and its classifier's validation AUC
    (`labels`: the arms' starts in the table of runs)."""
    return pd.DataFrame([{
        "chest share": share, "held-out loss": h.mean("model"),
        "blank baseline": h.mean("mean_fill"),
        "fine-tuned AUC": float(table.loc[table["start"] == label, "valid_auc"].iloc[0]),
    } for share, label, h in zip(shares, labels, heldout, strict=True)])


def painter_figure(painter: pd.DataFrame) -> Figure:
    """Held-out loss against validation AUC, the blank prediction's loss dashed."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter(painter["held-out loss"], painter["fine-tuned AUC"], color="black")
    for _, r in painter.iterrows():
        ax.annotate(f"chest {r['chest share']:.0%}", (r["held-out loss"], r["fine-tuned AUC"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axvline(painter["blank baseline"].mean(), color="grey", linewidth=0.8, linestyle="--",
               label="blank prediction")
    ax.ticklabel_format(useOffset=False)  # the true values, however close
    ax.set(xlabel="reconstruction loss on held-out chest images", ylabel="validation AUC",
           title="Reconstruction against diagnosis")
    ax.legend(fontsize=8)
    return fig


def painter_sentence(labels: Sequence[str], heldout: Sequence[HeldoutErrors],
                     aucs: Sequence[float], apart: Callable[[str, str], bool]) -> str:
    """Does the encoder that paints held-out images best give the best classifier?

    `heldout` are the encoders' losses on the same images and masks, `aucs` their fine-tuned
    AUCs, aligned with `labels`. The answer is withheld where it would claim more than the runs
    show: when no encoder paints better than the blank prediction (`HeldoutErrors.mean_fill`: it has
    learnt nothing to compare), and when the best painter's losses cannot be told apart from
    another's image by image (`told_apart`). AUCs count as a tie unless `apart(label, label)`
    (`cxr_lib.methods.cocktail.auc_separation`).
    """
    if not len(labels) == len(heldout) == len(aucs) or not len(labels):
        raise ValueError("painter_sentence: labels, heldout and aucs must be non-empty and "
                         "aligned")
    loss = [h.mean("model") for h in heldout]
    best = min(range(len(labels)), key=lambda i: loss[i])
    losses = "; ".join(f"{label}: {v:.4f}" for label, v in zip(labels, loss, strict=True))
    blank = heldout[best].mean("mean_fill")
    learnt = [h.mean("model") < h.mean("mean_fill") and told_apart(h.mean_fill, h.model)
              for h in heldout]
    if not learnt[best]:
        short = ("are not below" if not loss[best] < blank else
                 "are below it by less than twice the standard error of the per-image "
                 "difference, not clearly below")
        return (f"no encoder painted the held-out chest images better than the blank "
                f"prediction: their losses ({losses}) {short} its {blank:.4f}. At this scale "
                "the encoders have not learnt to paint, so the comparison says nothing about "
                "whether a better painter makes a better classifier")
    failed = [labels[i] for i in range(len(labels)) if not learnt[i]]
    losses += f"; blank prediction: {blank:.4f}" + (
        f", which {listed(failed)} did not beat" if failed else "")
    tied = [labels[i] for i in range(len(labels))
            if i != best and not told_apart(heldout[best].model, heldout[i].model)]
    if tied:
        return (f"the held-out losses cannot tell {listed([labels[best], *tied])} apart "
                f"({losses}): they differ by less than twice the standard error of their "
                "per-image difference, so this edition cannot say which encoder painted best, "
                "nor whether a better painter makes a better classifier")
    painted = (f"the encoder that painted the held-out chest images best ({labels[best]}; "
               f"losses {losses})")
    top = max(range(len(labels)), key=lambda i: aucs[i])
    level = [labels[i] for i in range(len(labels))
             if i == top or not apart(labels[top], labels[i])]
    auc = f"{aucs[best]:.3f}"
    if labels[best] not in level:
        return (f"{painted} did not give the best classifier among them: its validation AUC, "
                f"{auc}, is clearly below the best, {aucs[top]:.3f} ({labels[top]})")
    if len(level) == 1:
        return (f"{painted} also gave the best classifier among them, with a validation AUC of "
                f"{auc}, clearly above the others")
    others = listed([label for label in level if label != labels[best]])
    return (f"{painted} gave a classifier (validation AUC {auc}) that cannot be told apart "
            f"from that of {others}")


def painter_words(painter: pd.DataFrame, heldout: Sequence[HeldoutErrors],
                  labels: Sequence[str], apart: Callable[[str, str], bool]) -> dict[str, str]:
    """How many MAE arms, the blank prediction's loss and `painter_sentence`, its classifiers
    told apart as in the ranking (`apart` of the starts, `labels` the arms' starts)."""
    start_of = {f"chest share {share:.0%}": label
                for share, label in zip(painter["chest share"], labels, strict=True)}
    return {"n_painters": f"{len(painter)} MAE arms",
            "blank_loss": f"{painter['blank baseline'].mean():.4f}",
            "painter_sentence": painter_sentence(
                list(start_of), heldout, painter["fine-tuned AUC"].tolist(),
                lambda a, b: apart(start_of[a], start_of[b]))}

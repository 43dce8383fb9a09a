"""Chapter 4, fine-tuning ablations: its arms, runs, tables, figures and words.

The notebook (notebooks/04_finetuning_ablations.ipynb) keeps the prose, the parameters and a few
calls: `arms` names every start (the labels are this module's constants), `run_starts`,
`run_sweeps` and `run_label_efficiency` fine-tune (or load) the runs through `cxr_lib.methods`,
the `..._figure` functions draw them, and the `..._words` functions return the Markdown the
prose quotes, name -> text, for `glue_all`. Every decision that turns numbers into words is a
sentence builder here, tested on hand-made numbers in tests/test_chapter_finetuning_ablations.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from fastai.torch_core import default_device
from matplotlib.figure import Figure

from cxr_lib.analysis.stats import paired_comparison
from cxr_lib.chapters.files import (
    CHAPTER4_TABLES,
    PNEUMONIA_FINETUNES,
    chapter4_table_name,
    chapter4_table_paths,
    runs_dir,
    test_scores,
)
from cxr_lib.chapters.paired import Compared, paired_sentence, paired_verdicts, seeds_figure
from cxr_lib.chapters.sentences import check_sentence, names, sweep_sentence
from cxr_lib.chapters.setup import images_origin
from cxr_lib.data.cache import Cache
from cxr_lib.data.splits import label_subset
from cxr_lib.engine import runs
from cxr_lib.engine.config import TrainConfig
from cxr_lib.methods.finetune import FinetuneRecipe
from cxr_lib.methods.grid import run_grid, run_points, seed_summary
from cxr_lib.methods.mae import load_encoder, untrained_encoder
from cxr_lib.methods.moco import load_backbone, untrained_backbone
from cxr_lib.methods.probe import SHARE_COMPARISON, cache_features, compare_on_label_shares
from cxr_lib.models.classifier import WeightsUnavailable, imagenet_weights

# The arms' labels: the two families and the starts each is fine-tuned from.
VIT = "ViT"
RANDOM = "random"
# the starts this edition pre-trained, on its own images (X-rays, or phantoms in a run
# without data: the label must not claim X-rays it did not see)
MAE = "MAE on these images"
MOCO = "MoCo v2 on these images"
IMAGENET = "ImageNet"
PAPER_START = MAE  # the start the paper fine-tunes from

# A timm CNN's name starts with its family's ("densenet121", "resnet50", "convnext_tiny").
CNN_FAMILIES = {"densenet": "DenseNet", "resnet": "ResNet", "resnext": "ResNeXt",
                "convnext": "ConvNeXt", "efficientnet": "EfficientNet", "regnet": "RegNet"}
FEW_POSITIVES = 5  # a finding with fewer positive test images than this is "few"
SIGNAL_FLOOR = 0.6  # below this best validation AUC no start got far from chance


def cnn_family(model: str) -> str:
    """The family the prose names a CNN by ("DenseNet" for densenet121); an unknown family by
    the model's own name."""
    prefix = re.match(r"[a-z]+", model.lower())
    return CNN_FAMILIES.get(prefix.group(0) if prefix else "", model)


def _auc(value: float) -> str:
    """An AUC as the sentences print it; one that could not be scored as such."""
    return f"{value:.3f}" if math.isfinite(value) else "not scored"


# ----------------------------------------------------------------------------- the images

@dataclass(frozen=True)
class MaeEncoder:
    """Chapter 2's saved encoder: its file, and the image size and patch it was trained at."""

    path: Path
    image_size: int
    patch_size: int


def mae_encoder(path: Path, vit_model: str, image_size: int) -> MaeEncoder:
    """Read the recipe chapter 2 saved with its encoder (a patch of None is the ViT's 16) and
    say what is fine-tuned at which size."""
    recipe = torch.load(path, weights_only=True)["recipe"]
    encoder = MaeEncoder(Path(path), recipe["image_size"], recipe["patch_size"] or 16)
    print(f"MAE encoder {encoder.path.name}: {vit_model}, patch {encoder.patch_size}, "
          f"pre-trained at {encoder.image_size} px; fine-tuned here at {image_size} px")
    return encoder


def resolution_note(pretrained_px: int, image_size: int, patch_size: int) -> str:
    """Nothing when the encoder is fine-tuned on the grid of patches it was pre-trained on;
    otherwise what changes with the grid."""
    then, now = pretrained_px // patch_size, image_size // patch_size
    if then == now:
        return ""
    return (f"The MAE encoder was pre-trained at {pretrained_px} px and is fine-tuned "
            f"here at {image_size} px, so each image has {now}x{now} patches instead of "
            f"{then}x{then}. The weights carry over (a ViT's weights do not depend on "
            "the number of patches, and MAE's fixed sine-cosine position table is regenerated "
            "for the new grid), but the encoder meets the anatomy at a scale it did not learn.")


def positives(labels: np.ndarray) -> np.ndarray:
    """Positive images per finding of labels [N, F] (NaN, unknown, counts as no)."""
    return np.nansum(labels, axis=0)


def few_positives_sentence(counts: Sequence[float]) -> str:
    """How many findings have fewer than `FEW_POSITIVES` positive test images, and the rarest."""
    counts = np.asarray(counts)
    if not counts.size:
        raise ValueError("few_positives_sentence: no findings")
    few, rarest = int((counts < FEW_POSITIVES).sum()), int(counts.min())
    if few:
        return (f"{few} of the {counts.size} findings have fewer than five positive images "
                f"there, the rarest {rarest}")
    return f"its rarest finding has {rarest} positive images"


def data_words(cache: Cache, data_root: str | Path | None, encoder: MaeEncoder,
               image_size: int) -> dict[str, str]:
    """The edition's images, its splits, the test split's rarest findings, and the note on a
    resolution other than the MAE encoder's."""
    test = cache.split_indices("test")
    return {"resolution_note": resolution_note(encoder.image_size, image_size,
                                               encoder.patch_size),
            "images_origin": images_origin(data_root),
            "n_train": f"{len(cache.split_indices('train')):,}",
            "n_val": f"{len(cache.split_indices('val')):,}",
            "n_test": f"{len(test):,}",
            "few_positives": few_positives_sentence(positives(cache.labels[test]))}


# ----------------------------------------------------------------------------- the recipe

def recipe_table(config: TrainConfig, *, epochs: int, warmup_epochs: float, batch_size: int,
                 layer_decay: float, drop_path: float, randaug: float,
                 crop_scale: Sequence[float], image_size: int, in_chans: int, eval_crop: float,
                 seeds: Sequence[int]) -> pd.DataFrame:
    """This edition's fine-tuning settings, one row a setting."""
    return pd.DataFrame({
        "setting": ["epochs (warm-up)", "batch", "peak learning rate", "weight decay",
                    "layer-wise LR decay (ViT)", "drop path (ViT)", "RandAugment",
                    "random-resized crop", "image size", "input channels", "evaluation view",
                    "seeds"],
        "this edition": [f"{epochs} ({warmup_epochs})", batch_size, f"{config.lr:.2g}",
                         config.weight_decay, layer_decay, drop_path,
                         f"rand-m{randaug}-mstd0.5-inc1", f"{crop_scale[0]}-{crop_scale[1]}",
                         image_size, channels_words(in_chans), view_words(eval_crop),
                         ", ".join(map(str, seeds))]})


def channels_words(in_chans: int) -> str:
    """The input channels as the recipe table names them."""
    return "1 (gray)" if in_chans == 1 else "3 (gray replicated to RGB)"


def view_words(eval_crop: float) -> str:
    """The evaluation view as the recipe table names it."""
    return ("whole image resized" if eval_crop == 1 else
            f"central {eval_crop:.1%} of the side, resized")


def seeds_words(n_seeds: int) -> str:
    """"one seed" or "3 seeds"."""
    return "one seed" if n_seeds == 1 else f"{n_seeds} seeds"


def recipe_words(layer_decay: float, drop_path: float, randaug: float, seeds: Sequence[int]
                 ) -> dict[str, str]:
    """The paper's three settings, as the prose quotes them, and the number of seeds."""
    return {"paper_ld": f"{layer_decay}", "paper_dp": f"{drop_path}", "paper_ra": f"{randaug}",
            "n_seeds": seeds_words(len(seeds))}


# ----------------------------------------------------------------------------- where to start

def arms(vit: FinetuneRecipe, cnn: FinetuneRecipe, mae_file: str | Path,
         moco_file: str | Path, imagenet_vit: str | None = None, imagenet_cnn: str | None = None
         ) -> tuple[dict[tuple[str, str], FinetuneRecipe], list[str]]:
    """Every start of each family, (family, start) -> recipe: random weights, this edition's
    pre-training (MAE for the ViT, MoCo v2 for the CNN) and ImageNet where its weights are on
    this machine (given, or in the Hugging Face cache); and why each ImageNet arm was skipped."""
    family = cnn_family(cnn.model)
    found = {(VIT, RANDOM): vit,
             (VIT, MAE): dataclasses.replace(vit, init="mae", weights=str(mae_file)),
             (family, RANDOM): cnn,
             (family, MOCO): dataclasses.replace(cnn, init="moco", weights=str(moco_file))}
    skipped = []
    for name, base, given in ((VIT, vit, imagenet_vit), (family, cnn, imagenet_cnn)):
        try:
            weights = given or str(imagenet_weights(base.model))
            found[(name, IMAGENET)] = dataclasses.replace(base, init="imagenet", weights=weights)
        except WeightsUnavailable as err:
            skipped.append(f"{name}: {err}")
    return found, skipped


def run_starts(starts: Mapping[tuple[str, str], FinetuneRecipe], config: TrainConfig,
               seeds: Sequence[int], cache: Cache, run_root: str | Path) -> pd.DataFrame:
    """Fine-tune (or load) every start with every seed; their mean and spread over seeds, one
    row a (family, start)."""
    points = [(recipe, dataclasses.replace(config, seed=s)) for recipe in starts.values()
              for s in seeds]
    table = run_points(points, cache, run_root, name=chapter4_table_name("starts"))
    table.insert(0, "start", [start for _, start in starts for _ in seeds])
    table.insert(0, "family", [family for family, _ in starts for _ in seeds])
    return seed_summary(table, ["family", "start"])


def start_label(family: str, start: str) -> str:
    """A bar's label in the figure of starts; the paper's start says so."""
    return f"{family}\n{start}" + ("\n(paper's choice)" if start == PAPER_START else "")


def split_name(split: str) -> str:
    """"valid" -> "validation"; other splits by their own name."""
    return "validation" if split == "valid" else split


def starts_figure(start_table: pd.DataFrame) -> Figure:
    """Validation and test AUC of every start, with the spread over seeds."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    labels = [start_label(f, s) for f, s in zip(start_table["family"], start_table["start"],
                                                 strict=True)]
    x = np.arange(len(labels))
    for offset, split, color in ((-0.2, "valid", "#4c72b0"), (0.2, "test", "#dd8452")):
        ax.bar(x + offset, start_table[f"{split}_auc_mean"], 0.4,
               yerr=start_table[f"{split}_auc_std"].fillna(0), color=color,
               label=f"{split_name(split)} AUC")
    shown = start_table[["valid_auc_mean", "test_auc_mean"]].to_numpy()
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--", label="chance")
    ax.set(xticks=x, ylabel="mean AUC over findings", title="Fine-tuned from each start",
           ylim=(min(0.45, np.nanmin(shown) - 0.05), min(1.0, np.nanmax(shown) + 0.08)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def start_auc(start_table: pd.DataFrame, family: str, start: str, split: str = "valid"
              ) -> float:
    """The mean AUC over seeds of one start on one split."""
    row = start_table[(start_table["family"] == family) & (start_table["start"] == start)]
    return float(row[f"{split}_auc_mean"].iloc[0])


def gain_sentence(family: str, pretrained: str, ours: float, base: float, test_ours: float,
                  test_base: float) -> str:
    """How far a pre-trained start put a family above (or below) its random start on the
    validation split (rounded to 0.001), and whether the test split agrees."""
    if not (math.isfinite(ours) and math.isfinite(base)):
        return (f"fine-tuned from {pretrained} the {family} reached a validation AUC of "
                f"{_auc(ours)}, against {_auc(base)} from random weights, so no gain can be "
                "read")
    gap = round(ours - base, 3)
    where = ("level with" if gap == 0 else f"{abs(gap):.3f} above" if gap > 0
             else f"{abs(gap):.3f} below")
    text = (f"fine-tuned from {pretrained} the {family} reached a validation AUC of {ours:.3f}, "
            f"{where} the same {family} from random weights ({base:.3f}); on the test split ")
    if not (math.isfinite(test_ours) and math.isfinite(test_base)):
        return text + (f"{_auc(test_ours)} against {_auc(test_base)}, which can neither "
                       "confirm nor reverse it")
    test_gap = round(test_ours - test_base, 3)
    agree = ("which agrees" if np.sign(test_gap) == np.sign(gap) else
             "which reverses it" if test_gap * gap < 0 else "which does not confirm it")
    return text + f"{test_ours:.3f} against {test_base:.3f}, {agree}"


def skipped_sentence(skipped: Sequence[str]) -> str:
    """Why ImageNet arms were skipped, or that both ran."""
    return (" ".join(skipped) if skipped else
            "Both ImageNet arms ran, from weights found on this machine.")


def spread_sentence(n_seeds: int) -> str:
    """What the error bars of the figure of starts are."""
    return ("The error bars are the standard deviation over seeds." if n_seeds > 1 else
            "Each bar is one run (one seed), so no error bar can be drawn.")


def signal_sentence(best_valid: float) -> str:
    """Nothing when some start got clear of chance (validation AUC `SIGNAL_FLOOR` or more);
    otherwise a warning that this chapter compares runs that learnt little."""
    if best_valid >= SIGNAL_FLOOR:
        return ""
    best = (f"the best validation AUC is {best_valid:.3f}" if math.isfinite(best_valid) else
            "no start could be scored on the validation split")
    return (f"No start got far from chance here ({best}): "
            "this edition's budget buys too few training steps for fine-tuning to learn the "
            "findings, so the comparisons in this chapter are between runs that have learnt "
            "little, and only the `gpu-sample` and `paper` profiles can settle them.")


def start_words(start_table: pd.DataFrame, skipped: Sequence[str], n_seeds: int,
                cnn_model: str) -> dict[str, str]:
    """Each pre-trained start against its family's random start; the skipped arms; the error
    bars; and a warning when no start learnt much."""
    family = cnn_family(cnn_model)
    gains = []
    for name, pretrained in ((VIT, MAE), (family, MOCO)):
        values = [start_auc(start_table, name, start, split)
                  for split in ("valid", "test") for start in (pretrained, RANDOM)]
        gains.append(gain_sentence(name, pretrained, *values))
    return {"start_sentence": "; ".join(gains) + ".",
            "skipped_arms": skipped_sentence(skipped),
            "start_spread": spread_sentence(n_seeds),
            "signal_note": signal_sentence(float(start_table["valid_auc_mean"].max()))}


# ----------------------------------------------------------------------------- the regularisers

@dataclass(frozen=True)
class Sweep:
    """One setting varied around the paper's value: its name in the prose and its values."""

    label: str
    values: Sequence[float]
    paper: float


def sweeps(layer_decays: Sequence[float], randaug_magnitudes: Sequence[float],
           drop_paths: Sequence[float], paper_layer_decay: float, paper_randaug: float,
           paper_drop_path: float) -> dict[str, Sweep]:
    """The three sweeps, by the recipe field each varies."""
    return {"layer_decay": Sweep("layer-wise LR decay", layer_decays, paper_layer_decay),
            "randaug_magnitude": Sweep("RandAugment magnitude", randaug_magnitudes,
                                       paper_randaug),
            "drop_path": Sweep("drop-path rate", drop_paths, paper_drop_path)}


def run_sweeps(start: FinetuneRecipe, plan: Mapping[str, Sweep], seeds: Sequence[int],
               cache: Cache | None, config: TrainConfig, run_root: str | Path,
               prefix: str = CHAPTER4_TABLES) -> dict[str, pd.DataFrame]:
    """Fine-tune (or load) every value of every sweep with every seed from `start`; per sweep,
    the mean and spread over seeds, one row a value, its table of runs saved as
    `<prefix><setting>.parquet`. No cache (no pediatric root for pneumonia): no sweep."""
    if cache is None:
        return {}
    tables = {}
    for setting, sweep in plan.items():
        table = run_grid(start, {setting: sweep.values, "seed": seeds}, cache, config, run_root,
                         name=prefix + setting)
        tables[setting] = seed_summary(table, setting)
    return tables


def sweeps_figure(plan: Mapping[str, Sweep], tables: Mapping[str, pd.DataFrame],
                  ylabel: str = "mean AUC over findings", title: str | None = None) -> Figure:
    """One panel a sweep: validation and test AUC by value, the paper's value marked; a sweep
    without a table says it did not run (no pediatric root for pneumonia)."""
    fig, axes = plt.subplots(1, len(plan), figsize=(13, 3.8), sharey=True)
    for ax, (setting, sweep) in zip(axes, plan.items(), strict=True):
        ax.set(xlabel=sweep.label, title=sweep.label)
        if setting not in tables:
            ax.text(0.5, 0.5, "not run: no pediatric root given", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        summary = tables[setting]
        for split, color in (("valid", "black"), ("test", "#dd8452")):
            ax.errorbar(summary[setting], summary[f"{split}_auc_mean"],
                        yerr=summary[f"{split}_auc_std"].fillna(0), marker="o", color=color,
                        label=split_name(split), capsize=3)
        ax.axvline(sweep.paper, color="#c44e52", linestyle=":", label=f"paper ({sweep.paper})")
        ax.legend(fontsize=8)
    axes[0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def setting_sentence(label: str, values: Sequence, valid: Sequence[float],
                     test: Sequence[float], paper: float) -> str:
    """One sweep judged on the validation split against the paper's choice, then checked on
    the test split; a sweep with a value not scored is not judged."""
    if len(values) and not np.isfinite(np.asarray(valid, dtype=float)).all():
        return (f"Not every value of the {label} could be scored on the validation split, so "
                "this sweep is not judged.")
    return (sweep_sentence(label, values, valid, {"the paper's choice": float(paper)},
                           metric="validation AUC") + " "
            + check_sentence(label, values, valid, test))


def sweep_words(plan: Mapping[str, Sweep], tables: Mapping[str, pd.DataFrame],
                prefix: str = "") -> dict[str, str]:
    """`<prefix><setting>_sentence` for every sweep; a sweep that did not run (no pediatric
    root for pneumonia) says so."""
    return {f"{prefix}{setting}_sentence": setting_sentence(
                sweep.label, tables[setting][setting].tolist(),
                tables[setting]["valid_auc_mean"].tolist(),
                tables[setting]["test_auc_mean"].tolist(), sweep.paper)
            if setting in tables else
            f"The {sweep.label} sweep did not run: no pediatric root was given (parameter "
            "`pediatric_root`)."
            for setting, sweep in plan.items()}


def sweep_table(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The sweeps' mean validation and test AUCs, indexed by (sweep, value); no sweep, no
    rows."""
    if not tables:
        return pd.DataFrame(columns=["valid_auc_mean", "test_auc_mean"])
    return pd.concat({s: t.set_index(s)[["valid_auc_mean", "test_auc_mean"]]
                      for s, t in tables.items()}, names=["sweep", "value"]).round(3)


# ----------------------------------------------------------------------------- label efficiency

def run_label_efficiency(vit: FinetuneRecipe, mae_start: FinetuneRecipe,
                         fractions: Sequence[float], seeds: Sequence[int], cache: Cache,
                         config: TrainConfig, run_root: str | Path) -> pd.DataFrame:
    """The random and the MAE start fine-tuned on each share of the training patients with each
    seed; the mean and spread over seeds, one row a (start, share)."""
    efficiency = pd.concat([
        run_grid(start, {"train_fraction": fractions, "seed": seeds}, cache, config, run_root,
                 name=chapter4_table_name(f"labels_{start.init}")).assign(start=name)
        for name, start in ((RANDOM, vit), (MAE, mae_start))])
    return seed_summary(efficiency, ["start", "train_fraction"])


def label_figure(label_table: pd.DataFrame, fractions: Sequence[float]) -> Figure:
    """Validation AUC of each start by share of the labels, on a log axis."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for (name, part), color in zip(label_table.groupby("start", sort=False),
                                   ("#4c72b0", "#c44e52"), strict=True):
        ax.errorbar(part["train_fraction"] * 100, part["valid_auc_mean"],
                    yerr=part["valid_auc_std"].fillna(0), marker="o", color=color, label=name,
                    capsize=3)
    ax.set(xscale="log", xlabel="training labels used (% of patients)",
           ylabel="validation mean AUC", title="Label efficiency")
    ax.set_xticks([f * 100 for f in fractions], [f"{f:.0%}" for f in fractions])
    ax.minorticks_off()
    ax.legend(title="start", fontsize=8)
    fig.tight_layout()
    return fig


def label_sentence(fractions: Sequence[float], images: Sequence[int], mae: Sequence[float],
                   random: Sequence[float]) -> str:
    """The MAE and the random start's validation AUC at each share of the labels (`images`:
    the share's training images), and the difference."""
    if not len(fractions):
        raise ValueError("label_sentence: no label shares")
    gaps = []
    for f, n, m, r in zip(fractions, images, mae, random, strict=True):
        diff = f" ({m - r:+.3f})" if math.isfinite(m - r) else ""
        gaps.append(f"{f:.0%} of the labels ({n:,} images): MAE {_auc(m)} against random "
                    f"{_auc(r)}{diff}")
    return "; ".join(gaps) + "."


def label_verdict(valid_mae: Sequence[float], valid_random: Sequence[float],
                  test_mae: Sequence[float], test_random: Sequence[float]) -> str:
    """At how many label shares the MAE start was ahead, on each split; shares a split could
    not score are counted as such."""
    def ahead(mae: Sequence[float], random: Sequence[float]) -> str:
        m, r = np.asarray(mae, dtype=float), np.asarray(random, dtype=float)
        unscored = int((~np.isfinite(m - r)).sum())
        return f"{int((m > r).sum())}" + (f" ({unscored} not scored)" if unscored else "")
    return (f"the MAE start was ahead at {ahead(valid_mae, valid_random)} of the "
            f"{len(valid_mae)} label shares on the validation split, and at "
            f"{ahead(test_mae, test_random)} of them on the test split")


def smallest_share_sentence(fraction: float, images: int, counts: Sequence[float]) -> str:
    """How small the smallest share of the labels is: its images and its rarest finding's
    positive cases (`counts`, one a finding)."""
    counts = np.asarray(counts)
    if not counts.size:
        raise ValueError("smallest_share_sentence: no findings")
    rarest = int(counts.min())
    return (f"the smallest share, {fraction:.0%}, is {images:,} images, in which the rarest "
            f"finding has {rarest} positive case{'' if rarest == 1 else 's'}")


def label_words(label_table: pd.DataFrame, cache: Cache, fractions: Sequence[float],
                seed: int) -> dict[str, str]:
    """The label-efficiency curve in words: each share, the verdict over shares, and how few
    labels the smallest share holds."""
    valid = label_table.pivot(index="train_fraction", columns="start", values="valid_auc_mean")
    test = label_table.pivot(index="train_fraction", columns="start", values="test_auc_mean")
    images = [len(label_subset(cache, f, seed)) for f in fractions]
    smallest = label_subset(cache, min(fractions), seed)
    return {"label_sentence": label_sentence(fractions, images,
                                             [valid.loc[f, MAE] for f in fractions],
                                             [valid.loc[f, RANDOM] for f in fractions]),
            "label_verdict": label_verdict(valid[MAE], valid[RANDOM], test[MAE], test[RANDOM]),
            "smallest_share": smallest_share_sentence(min(fractions), len(smallest),
                                                      positives(cache.labels[smallest]))}


# ----------------------------------------------------------------------------- carried forward

def carried_words(work: str | Path) -> dict[str, str]:
    """How many distinct runs chapter 4's tables hold (its pneumonia runs' among them), and
    the tables' files."""
    paths = chapter4_table_paths(work)
    if not paths:
        raise FileNotFoundError(f"chapter 4 wrote no table of runs under {work}")
    pneumonia = runs_dir(work) / f"{PNEUMONIA_FINETUNES}.parquet"
    paths += [pneumonia] if pneumonia.is_file() else []
    all_rows = pd.concat([pd.read_parquet(p) for p in paths])
    n_runs, names = all_rows["run"].nunique(), [p.name for p in paths]
    print(f"{n_runs} distinct runs; tables: {', '.join(names)}")
    return {"n_runs": f"{n_runs}", "tables": ", ".join(f"`{name}`" for name in names)}


# ----------------------------------------------------------------------------- pneumonia

SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class Pairing:
    """One paired comparison on pneumonia: the name its rows and its glued sentence
    (`<name>_sentence`) carry, its arms' short names (a the rival, b ours) and its words. A
    frozen arm is "MAE", "MoCo", or any other name for the other arm's architecture with
    random weights."""

    name: str
    a: str
    b: str
    compared: Compared

    @property
    def label(self) -> str:
        return f"{self.b} against {self.a}"


def frozen_pairings(cnn_model: str) -> tuple[Pairing, ...]:
    """The frozen comparisons on pneumonia: MAE against a random ViT, MoCo v2 against a random
    `cnn_model`, and MAE against MoCo v2, the papers' own pairing of a ViT and a CNN."""
    cnn = cnn_family(cnn_model)
    return (
        Pairing("pneumonia_probe", f"random {VIT}", "MAE",
                Compared("a probe on the MAE encoder's frozen features", "a random encoder",
                         "MAE", "the MAE encoder's features are the better ones",
                         "the random encoder's features are the better ones")),
        Pairing("pneumonia_moco_probe", f"random {cnn}", "MoCo",
                Compared(f"a probe on the MoCo v2 {cnn}'s frozen features",
                         f"a random {cnn}", "MoCo",
                         f"the MoCo v2 {cnn}'s features are the better ones",
                         f"the random {cnn}'s features are the better ones")),
        Pairing("pneumonia_mae_moco_probe", "MoCo", "MAE",
                Compared("a probe on the MAE ViT's frozen features",
                         f"one on the MoCo v2 {cnn}'s", "MAE",
                         "the MAE ViT's features are the better ones",
                         f"the MoCo v2 {cnn}'s features are the better ones")),
    )


def finetuned_pairings(cnn_model: str) -> tuple[Pairing, ...]:
    """The fine-tuned comparisons on pneumonia, the frozen ones' arms after every weight
    trained: MAE against a random ViT, MoCo v2 against a random `cnn_model`, and MAE against
    MoCo v2 (each arm a start of `pneumonia_starts`)."""
    cnn = cnn_family(cnn_model)
    return (
        Pairing("pneumonia_finetune", f"random {VIT}", "MAE",
                Compared("the ViT fine-tuned from MAE",
                         "the same ViT fine-tuned from random weights", "MAE",
                         "the MAE start is the better one", "the random start is the better one")),
        Pairing("pneumonia_moco_finetune", f"random {cnn}", "MoCo",
                Compared(f"the {cnn} fine-tuned from MoCo v2",
                         f"the same {cnn} fine-tuned from random weights", "MoCo",
                         "the MoCo v2 start is the better one",
                         "the random start is the better one")),
        Pairing("pneumonia_mae_moco_finetune", "MoCo", "MAE",
                Compared("the ViT fine-tuned from MAE", f"the {cnn} fine-tuned from MoCo v2",
                         "MAE", "the MAE ViT is the better one",
                         f"the MoCo v2 {cnn} is the better one")),
    )


PAIRED = ["pair", *SHARE_COMPARISON]  # the columns of every pneumonia comparison's runs


def pneumonia_probes(mae_file: str | Path, moco_file: str | Path, cache: Cache | None,
                     pairings: Sequence[Pairing], shares: Sequence[float], n_seeds: int,
                     n_boot: int = 1000) -> pd.DataFrame:
    """Chapter 2's MAE encoder and chapter 3's MoCo v2 backbone, each against the same
    architecture with random weights and against each other, all frozen, each under a linear
    probe fitted on a share of the pneumonia task's training patients and scored on its test
    images at the size it was pre-trained at: one row a (pairing, share, seed), `PAIRED`.
    Seed s draws the labelled patients and the random encoders' weights; two pre-trained
    encoders on every label leave a seed nothing to draw, so that pairing runs seed 0 alone.
    No cache (no pediatric root): no rows."""
    if cache is None:
        return pd.DataFrame(columns=PAIRED)
    if not shares:
        raise ValueError("pneumonia_probes: no label share given (parameter `probe_shares`)")
    splits = [cache.split_indices(split) for split in ("train", "test")]

    def features(encoder, view) -> tuple[np.ndarray, np.ndarray]:
        return tuple(cache_features(encoder, view.plain, cache, rows, device=default_device())
                     for rows in splits)

    pretrained = {"MAE": features(*load_encoder(mae_file)),
                  "MoCo": features(*load_backbone(moco_file))}
    untrained = {"MAE": lambda seed: features(*untrained_encoder(mae_file, seed)),
                 "MoCo": lambda seed: features(*untrained_backbone(moco_file, seed))}

    def arm(name: str, other: str):
        return (lambda seed: pretrained[name]) if name in pretrained else untrained[other]

    tables = []
    for pairing in pairings:
        runs = [(shares, range(n_seeds))]  # a random arm's features: drawn once per seed
        if pairing.a in pretrained and pairing.b in pretrained:  # no weights to draw, and on
            # every label nothing else either: each seed would repeat the same run
            runs = [([s for s in shares if s < 1.0], range(n_seeds)),
                    ([s for s in shares if s >= 1.0], range(1))]
        parts = [compare_on_label_shares(cache, arm(pairing.a, pairing.b),
                                         arm(pairing.b, pairing.a), some, seeds, n_boot=n_boot)
                 for some, seeds in runs if some]
        table = pd.concat(parts).sort_values(["share", "seed"], kind="stable")
        tables.append(table.assign(pair=pairing.name)[PAIRED])
    return pd.concat(tables, ignore_index=True)


def pretraining_words(work: str | Path, mae_file: str | Path, moco_file: str | Path,
                      cnn_model: str) -> dict[str, str]:
    """probe_sizes and pretraining_lengths: the image size each encoder was pre-trained at (and
    is probed and fine-tuned at on pneumonia), and its epochs, read from its file and the run
    the file names."""
    cnn = cnn_family(cnn_model)
    mae, moco = (_saved_header(path) for path in (mae_file, moco_file))
    return {"probe_sizes": f"{mae['recipe']['image_size']} px for the ViT, "
                           f"{moco['recipe']['image_size']} px for the {cnn}",
            "pretraining_lengths": f"{_pretraining_epochs(work, mae)} for the MAE ViT, "
                                   f"{_pretraining_epochs(work, moco)} for the MoCo v2 {cnn}"}


def pretrained_size(path: str | Path) -> int:
    """The image size a saved encoder (MAE or MoCo v2) was pre-trained at."""
    return _saved_header(path)["recipe"]["image_size"]


def _saved_header(path: str | Path) -> dict:
    """A saved encoder file as `torch.load` reads it (its recipe, run and weights)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _pretraining_epochs(work: str | Path, saved: dict) -> str:
    """A saved encoder's pre-training epochs in words ("100 epochs"), or that its run is not
    in this work directory."""
    config = runs_dir(work) / str(saved.get("run")) / runs.CONFIG
    if not config.is_file():
        return "epochs unknown (its run is not in this work directory)"
    epochs = json.loads(config.read_text())["epochs"]
    return f"{epochs} epoch{'' if epochs == 1 else 's'}"


def pneumonia_starts(vit: FinetuneRecipe, cnn: FinetuneRecipe, mae_file: str | Path,
                     moco_file: str | Path, cnn_model: str) -> dict[str, FinetuneRecipe]:
    """The starts fine-tuned on pneumonia, by the arm names of `finetuned_pairings`, each
    architecture at the size its encoder was pre-trained at: MAE with the chapter's ViT recipe
    and a random ViT with the same recipe but a layer-wise decay of 1.0 (none), since the decay
    would hold a random ViT's first blocks near their random start; MoCo v2 and a random
    `cnn_model` with the same CNN recipe (it has no layer-wise decay)."""
    vit = dataclasses.replace(vit, image_size=pretrained_size(mae_file))
    cnn = dataclasses.replace(cnn, image_size=pretrained_size(moco_file))
    return {f"random {VIT}": dataclasses.replace(vit, layer_decay=1.0),
            "MAE": dataclasses.replace(vit, init="mae", weights=str(mae_file)),
            f"random {cnn_family(cnn_model)}": cnn,
            "MoCo": dataclasses.replace(cnn, init="moco", weights=str(moco_file))}


def finetune_setup_words(epochs: int, n_seeds: int, shares: Sequence[float],
                         probe_shares: Sequence[float]) -> dict[str, str]:
    """The pneumonia fine-tuning's schedule, seeds and label shares, as the prose quotes them;
    a share the frozen probes used and the fine-tuning does not is named, and why."""
    def percents(values: Sequence[float]) -> str:
        return names([f"{v:.0%}" for v in values])

    left_out = [share for share in probe_shares if share not in shares]
    if not shares:
        said = "This edition fine-tunes on no share of the pneumonia labels."
    elif left_out:
        said = (f"The runs train on {percents(shares)} of the pneumonia training labels. The "
                f"frozen probes above also used {percents(left_out)}, where this edition does "
                "not fine-tune: each share costs as many runs again, and its time goes to seeds "
                "instead (the `gpu-sample` and `paper` profiles fine-tune at every share the "
                "probes use).")
    else:
        said = (f"The runs train on {percents(shares)} of the pneumonia training labels, the "
                "shares the frozen probes used.")
    return {"pneumonia_epochs": f"{epochs}", "pneumonia_seeds": seeds_words(n_seeds),
            "pneumonia_shares_sentence": said}


def run_pneumonia_finetunes(starts: Mapping[str, FinetuneRecipe], cache: Cache | None,
                            config: TrainConfig, shares: Sequence[float], n_seeds: int,
                            run_root: str | Path) -> pd.DataFrame:
    """Fine-tune (or load) every start on every share of the pneumonia task's training labels
    with seeds 0..n_seeds-1 (seed s draws the labelled patients, the batches and the head);
    one row a run, with its `start`. No cache (no pediatric root): no rows."""
    if cache is None:
        return pd.DataFrame(columns=["start", "train_fraction", "seed", "run"])
    keys = [(name, share, seed) for name in starts for share in shares for seed in range(n_seeds)]
    points = [(dataclasses.replace(starts[name], train_fraction=share),
               dataclasses.replace(config, seed=seed)) for name, share, seed in keys]
    table = run_points(points, cache, run_root, name=PNEUMONIA_FINETUNES)
    table.insert(0, "start", [name for name, _, _ in keys])
    return table


def finetune_comparison(table: pd.DataFrame, cache: Cache | None, work: str | Path,
                        pairings: Sequence[Pairing], n_boot: int = 1000) -> pd.DataFrame:
    """Each pairing's arm b against its arm a, fine-tuned with the same share and seed, on the
    test split: one row a (pairing, share, seed) in `PAIRED` columns, the paired
    patient-bootstrap interval from each run's saved test scores."""
    if cache is None or table.empty:
        return pd.DataFrame(columns=PAIRED)
    missing = sorted({arm for p in pairings for arm in (p.a, p.b)} - set(table["start"]))
    if missing:
        raise ValueError(f"finetune_comparison: no fine-tuned run of {', '.join(missing)}")
    test = cache.split_indices("test")
    ids = cache.index["id"].to_numpy()[test]
    patients = cache.index["patient"].to_numpy()[test]
    scores = {run: test_scores(work, run).loc[ids, cache.findings].to_numpy()
              for run in table["run"]}  # each run is read once, whatever its pairings
    rows = []
    for pairing in pairings:
        for (share, seed), part in table.groupby(["train_fraction", "seed"], sort=True):
            run = part.set_index("start")["run"]
            a, b = scores[run[pairing.a]], scores[run[pairing.b]]
            r = paired_comparison(a, b, cache.labels[test], patients, cache.findings,
                                  n_boot=n_boot, seed=int(seed))
            rows.append({"pair": pairing.name, "share": share, "seed": seed,
                         "labelled images": int(part["train_images"].iloc[0]),
                         "auc_a": r.mean_auc_a, "auc_b": r.mean_auc_b, "diff": r.diff,
                         "lower": r.lower, "upper": r.upper})
    return pd.DataFrame(rows, columns=PAIRED)


def pair_verdicts(table: pd.DataFrame, pairings: Sequence[Pairing]) -> pd.DataFrame:
    """Per pairing and share, `paired.paired_verdicts` of b against a, b's mean AUC as "AUC"
    and a's as "rival AUC", the pairing named in words."""
    parts = []
    for pairing in pairings:
        verdicts = paired_verdicts(table[table["pair"] == pairing.name], "share", "rival", "b")
        verdicts = verdicts.rename(columns={"b AUC": "AUC"})
        verdicts.insert(0, "comparison", pairing.label)
        parts.append(verdicts)
    return pd.concat(parts, ignore_index=True)


def pair_words(table: pd.DataFrame, pairings: Sequence[Pairing]) -> dict[str, str]:
    """`<name>_sentence` of each pairing: every share's comparison, or why it did not run."""
    verdicts = pair_verdicts(table, pairings)
    words = {}
    for pairing in pairings:
        rows = verdicts[verdicts["comparison"] == pairing.label].to_dict("records")
        if not rows:
            words[f"{pairing.name}_sentence"] = ("The pneumonia comparison did not run: no "
                                                 "pediatric root was given (parameter "
                                                 "`pediatric_root`).")
            continue
        text = "; ".join(
            paired_sentence(pairing.compared, f"with {r['share']:.0%} of the training labels "
                                              f"(about {r['labelled images']:,.0f} images)",
                            int(r["seeds"]), r["rival AUC"], r["AUC"], r["difference"],
                            r["seed lower"], r["seed upper"], int(r["seeds ahead"]),
                            int(r["bootstrap excludes 0"]))
            for r in rows)
        words[f"{pairing.name}_sentence"] = text[0].upper() + text[1:] + "."
    return words


def pairs_figure(table: pd.DataFrame, pairings: Sequence[Pairing], title: str) -> Figure:
    """Each seed's paired difference (b - a), one panel a pairing and share
    (`paired.seeds_figure`)."""
    shares = sorted(table["share"].unique())
    panels = table.assign(panel=table["pair"] + " " + table["share"].astype(str))
    titles = {f"{p.name} {s}": f"{p.b} - {p.a}, {s:.0%} of labels"
              for p in pairings for s in shares}
    return seeds_figure(panels, "panel", titles, title, "test AUC difference",
                        "not run: no pediatric root given")


def pneumonia_data_words(cache: Cache | None) -> dict[str, str]:
    """pneumonia_split: the task's images and positives per split, or that it is absent."""
    if cache is None:
        return {"pneumonia_split": "no split (no pediatric root was given)"}
    parts = []
    for split in ("train", "val", "test"):
        labels = cache.labels[cache.split_indices(split)][:, 0]
        parts.append(f"{len(labels):,} {SPLIT_WORDS[split]} images ({int(np.nansum(labels)):,} "
                     "with pneumonia)")
    return {"pneumonia_split": ", ".join(parts)}

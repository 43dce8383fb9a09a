"""Chapter 2, masked autoencoders: its arms (one MAE run and probe per setting, trained or
loaded through `cxr_lib.methods.mae`), tables, figures, and the sentences its prose quotes
(`..._words` return name -> Markdown for `glue_all`).

Every sentence builder takes plain numbers, tables or `HeldoutErrors`, so it is tested on
hand-made inputs (tests/test_chapter_mae_pretraining.py), also empty and all-NaN ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from fastai.torch_core import default_device
from matplotlib.figure import Figure

from cxr_lib.augment.crops import MaeAugment
from cxr_lib.chapters.paired import Compared, paired_sentence, paired_verdicts, seeds_figure
from cxr_lib.chapters.plots import image_grid, mae_pictures
from cxr_lib.chapters.sentences import floor_sentence, span, sweep_sentence
from cxr_lib.chapters.setup import images_origin, source_counts
from cxr_lib.data.cache import Cache
from cxr_lib.engine.config import TrainConfig
from cxr_lib.methods.mae import (
    HeldoutErrors,
    MaeRecipe,
    PretrainedMae,
    heldout_errors,
    pretrain_mae,
    probe_encoder,
)
from cxr_lib.methods.probe import (
    SHARE_COMPARISON,
    ProbeResult,
    cache_features,
    compare_on_label_shares,
    mae_features,
)
from cxr_lib.models.mae import MaskedAutoencoder, visible_count

IMAGENET_MASK = 0.75  # the natural-image MAE's mask ratio
IMAGENET_CROP = (0.2, 1.0)  # and its crop scale
FLOOR = "the untrained encoder"
SHOWN = 4  # validation images taken for the pictures
PAINTED = 2  # of them, painted by every model
UNSCORED = "no finding has both classes among the scored images"


def _auc(value: float) -> str:
    """A mean AUC to three decimals, or why there is none."""
    return f"undefined ({UNSCORED})" if math.isnan(value) else f"{value:.3f}"


# The data and the model

def data_words(cache: Cache, from_root: bool) -> dict[str, str]:
    """images_origin, n_train, n_val."""
    return {"images_origin": images_origin(from_root),
            "n_train": f"{len(cache.split_indices('train')):,}",
            "n_val": f"{len(cache.split_indices('val')):,}"}


def shown_images(cache: Cache, augment: MaeAugment, n: int = SHOWN) -> torch.Tensor:
    """The first `n` validation images as the model sees them (plain view, normalised):
    [n, C, image_size, image_size]."""
    rows = cache.split_indices("val")
    shown = torch.from_numpy(np.asarray(cache.images[rows[:n]]))[:, None]  # [n, 1, S, S] uint8
    return augment.plain(shown)


def tokens(mae: MaskedAutoencoder, image_size: int) -> int:
    """Patches (tokens) of an `image_size` image."""
    return (image_size // mae.config.patch_size) ** 2


def masking_figure(mae: MaskedAutoencoder, x_shown: torch.Tensor, augment: MaeAugment,
                   mask_ratios: Sequence[float], seed: int, image_size: int) -> Figure:
    """The first shown image, whole and with each mask ratio's patches hidden."""
    pictures = [mae_pictures(mae, x_shown[:1], augment.mean, augment.std, r, seed)[1][0]
                for r in mask_ratios]
    return image_grid([mae_pictures(mae, x_shown[:1], augment.mean, augment.std, 0.0)[0][0],
                       *pictures],
                      ["input", *[f"{r:.0%} masked" for r in mask_ratios]],
                      ncols=len(mask_ratios) + 1,
                      suptitle=f"{tokens(mae, image_size)} patches of {mae.config.patch_size} px")


def encoder_parameters(mae: torch.nn.Module) -> int:
    """Parameters of the encoder: all but the decoder's."""
    return sum(p.numel() for n, p in mae.named_parameters() if not n.startswith("decoder"))


def model_words(encoder_params: int, tokens: int, mask_ratio: float,
                crop_scale: Sequence[float]) -> dict[str, str]:
    """encoder_params, visible_tokens (at `mask_ratio`), paper_mask, paper_recipe."""
    return {"encoder_params": f"{encoder_params / 1e6:.1f} million",
            "visible_tokens": f"{visible_count(tokens, mask_ratio)} of {tokens}",
            "paper_mask": f"{mask_ratio:.0%}",
            "paper_recipe": "{:.0%} of the patches masked, crops of {}-{} of the image".format(
                mask_ratio, *crop_scale)}


# The arms

@dataclass
class MaeArms:
    """One pre-training run (trained, or loaded when finished) and its linear probe per
    setting (mask ratio, crop scale), each made once and kept."""

    cache: Cache
    recipe: MaeRecipe
    config: TrainConfig
    run_root: Path
    probe_images: int
    results: dict[tuple, tuple[PretrainedMae, ProbeResult]] = field(default_factory=dict)

    def run(self, mask_ratio: float, crop_scale: Sequence[float]
            ) -> tuple[PretrainedMae, ProbeResult]:
        key = (mask_ratio, tuple(crop_scale))
        if key not in self.results:
            print(f"mask ratio {mask_ratio}, crop scale {tuple(crop_scale)}")
            r = dataclasses.replace(self.recipe, mask_ratio=mask_ratio,
                                    crop_scale=tuple(crop_scale))
            pre = pretrain_mae(self.cache, r, self.config, self.run_root)
            probe = probe_encoder(pre.mae, self.cache, pre.augment, max_images=self.probe_images)
            self.results[key] = (pre, probe)
        return self.results[key]

    def summary(self, mask_ratio: float, crop_scale: Sequence[float]) -> dict:
        """One table row: final reconstruction loss, probe AUC, and whether it was loaded."""
        pre, probe = self.run(mask_ratio, crop_scale)
        return {"final loss": pre.run.history["train_loss"].iloc[-1],
                "probe AUC": probe.mean_auc,
                "loaded from an earlier run": pre.run.loaded_from_cache}

    def mask_table(self, mask_ratios: Sequence[float], crop_scale: Sequence[float]
                   ) -> pd.DataFrame:
        """Experiment 1: one row per mask ratio at `crop_scale`."""
        return pd.DataFrame([{"mask ratio": r, **self.summary(r, crop_scale)}
                             for r in mask_ratios])

    def crop_table(self, mask_ratio: float, crop_scales: Sequence[Sequence[float]]
                   ) -> pd.DataFrame:
        """Experiment 2: one row per crop scale range at `mask_ratio`."""
        return pd.DataFrame([{"crop scale": f"{lo}-{hi}", **self.summary(mask_ratio, (lo, hi))}
                             for lo, hi in crop_scales])


def arms(cache: Cache, recipe: MaeRecipe, config: TrainConfig, run_root: str | Path,
         probe_images: int) -> MaeArms:
    """The chapter's arms: runs under `run_root`, probes on at most `probe_images` a split."""
    return MaeArms(cache, recipe, config, Path(run_root), probe_images)


def floor_probe(recipe: MaeRecipe, cache: Cache, augment: MaeAugment, seed: int,
                probe_images: int) -> ProbeResult:
    """The probe of an encoder with random weights (drawn from `seed`): the floor."""
    torch.manual_seed(seed)
    floor = probe_encoder(recipe.build(), cache, augment, max_images=probe_images)
    print(f"probe of an untrained encoder: mean AUC {floor.mean_auc:.3f}")
    return floor


def floor_words(floor: float) -> dict[str, str]:
    """random_auc: the floor's mean AUC."""
    return {"random_auc": _auc(floor)}


# Experiment 1: how much to hide

def mask_figure(arms: MaeArms, mask_ratios: Sequence[float], table: pd.DataFrame, floor: float,
                crop_scale: Sequence[float], paper_mask_ratio: float) -> Figure:
    """Loss curves per mask ratio (left) and the probe AUC against the mask ratio (right)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for r in mask_ratios:
        h = arms.run(r, crop_scale)[0].run.history
        a.plot(h["epoch"] + 1, h["train_loss"], marker=".", label=f"{r:.0%}")
    a.set(xlabel="epoch", ylabel="reconstruction loss (masked patches)", title="Loss curves")
    a.legend(title="mask ratio", fontsize=8)
    b.plot(table["mask ratio"], table["probe AUC"], "o-", color="black")
    b.axhline(floor, color="grey", linestyle="--", label="untrained encoder")
    b.axvline(IMAGENET_MASK, color="#4c72b0", linestyle=":",
              label=f"ImageNet default ({IMAGENET_MASK})")
    b.axvline(paper_mask_ratio, color="#c44e52", linestyle=":",
              label=f"paper ({paper_mask_ratio})")
    b.set(xlabel="mask ratio", ylabel="probe mean AUC (validation)", title="Downstream probe")
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sweep_words(setting: str, values: Sequence, scores: Sequence[float],
                marks: Mapping[str, object], floor: float) -> str:
    """The verdict on a one-seed sweep of probe AUCs: where the best setting is, where the
    marked ones (those among `values`) stand, and how many settings clear the floor (the
    untrained encoder's AUC)."""
    if not len(values):
        return "no setting was run, so the sweep ranks nothing."
    unscored = [v for v, s in zip(values, scores, strict=True) if math.isnan(s)]
    if unscored:
        return (f"the probe could not score {len(unscored)} of the {len(values)} settings "
                f"({UNSCORED}), so the sweep ranks nothing.")
    shown = [str(v) for v in values]
    kept = {label: value for label, value in marks.items() if str(value) in shown}
    text = sweep_sentence(setting, values, list(scores), kept)
    if math.isnan(floor):
        return text + f" The probe could not score {FLOOR} ({UNSCORED})."
    return text + " " + floor_sentence(list(scores), floor, FLOOR)


def _column(table: pd.DataFrame, name: str) -> list:
    """A column of a sweep's table as a list; an empty table (no columns either) has none."""
    return table[name].tolist() if name in table else []


def mask_words(table: pd.DataFrame, floor: float, paper_mask_ratio: float) -> dict[str, str]:
    """mask_sentence, from `MaeArms.mask_table`."""
    return {"mask_sentence": sweep_words(
        "mask ratio", _column(table, "mask ratio"), _column(table, "probe AUC"),
        {"the paper's choice": paper_mask_ratio, "the ImageNet default": IMAGENET_MASK}, floor)}


# What the models paint

def painting_figure(arms: MaeArms, mask_ratios: Sequence[float], crop_scale: Sequence[float],
                    x_shown: torch.Tensor, augment: MaeAugment, seed: int) -> Figure:
    """Each mask ratio's model (moved to the CPU) painting the first PAINTED shown images."""
    cells, titles = [], []
    for r in mask_ratios:
        mae = arms.run(r, crop_scale)[0].mae.cpu()
        _, masked, pasted = mae_pictures(mae, x_shown[:PAINTED], augment.mean, augment.std, r,
                                         seed)
        for k in range(PAINTED):
            cells += [masked[k], pasted[k]]
            titles += [f"{r:.0%}: masked", f"{r:.0%}: painted"]
    return image_grid(cells, titles, ncols=2 * PAINTED,
                      suptitle="Reconstructions of two validation images")


def painting_errors(arms: MaeArms, mask_ratios: Sequence[float], crop_scale: Sequence[float],
                    seed: int) -> dict[float, HeldoutErrors]:
    """`heldout_errors` of each mask ratio's model on the probe's validation images."""
    rows = arms.cache.split_indices("val")[:arms.probe_images]
    return {r: heldout_errors(arms.run(r, crop_scale)[0], arms.cache, rows, seed=seed)
            for r in mask_ratios}


ERRORS = ("model", "model_flat", "mean_fill", "visible_fill")  # HeldoutErrors' per-image errors


def errors_table(errors: Mapping[float, HeldoutErrors]) -> pd.DataFrame:
    """The errors over all the images (`HeldoutErrors.mean`) and the contrast per mask ratio,
    to three decimals."""
    return pd.DataFrame([[*(e.mean(name) for name in ERRORS), e.contrast]
                         for e in errors.values()],
                        index=pd.Index([f"{r:.0%}" for r in errors], name="mask ratio"),
                        columns=["model", "model, flattened", "training mean", "visible mean",
                                 "contrast"]).round(3)


def painting_sentence(errors: Mapping[float, HeldoutErrors], margin: float = 0.1) -> str:
    """What `heldout_errors` of one model per mask ratio say about the pictures: the ratios
    where the model's error is more than `margin` (a share) below the better of the two
    fills, and those where flattening its painted patches to their own mean lowers the error,
    i.e. the detail it paints inside a patch is worse than none. Ratios whose errors are NaN
    (no held-out image) are named as unmeasured and left out."""
    if not errors:
        return "No model was trained here, so there are no paintings to judge."
    measured = {r: e for r, e in errors.items() if _measured(e)}
    if not measured:
        return ("The error on the hidden patches could not be measured: there is no validation "
                "image to measure it on.")
    text = _painting(measured, margin)
    unmeasured = [r for r in errors if r not in measured]
    if unmeasured:
        text += (f" At {_ratios(unmeasured, len(errors))} the error could not be measured (no "
                 "validation image).")
    return text


def _measured(errors: HeldoutErrors) -> bool:
    return all(np.isfinite(errors.mean(name))
               for name in ("model", "model_flat", "mean_fill", "visible_fill"))


def _painting(errors: Mapping[float, HeldoutErrors], margin: float) -> str:
    beat = [r for r, e in errors.items()
            if e.mean("model") < (1 - margin) * _best_fill(e)]
    flat = [r for r, e in errors.items() if e.mean("model_flat") < e.mean("model")]
    text = (f"On these validation images the models' error on the hidden patches is "
            f"{span([e.mean('model') for e in errors.values()])}, against "
            f"{span([_best_fill(e) for e in errors.values()])} for the "
            "better of the two fills.")
    if beat:
        where = "the models have" if len(beat) == len(errors) else "there the models have"
        text += (f" At {_ratios(beat, len(errors))} the model's error is more than {margin:.0%} "
                 f"below the better fill: {where} learnt something of where brightness goes in "
                 "these images")
        contrast = [errors[r].contrast for r in beat]
        text += (f"; they paint it at {span(contrast, '.0%')} of its true contrast (the spread "
                 "of the hidden patches' mean brightness)." if np.isfinite(contrast).all() else ".")
    else:
        above = sum(e.mean("model") >= _best_fill(e) for e in errors.values())
        worse = ""
        if above:
            worse = (" (at every one it is at or above it)" if above == len(errors) else
                     f" (at {above} of the {len(errors)} it is at or above it)")
        text += (f" At no mask ratio is the model's error more than {margin:.0%} below the better "
                 f"fill{worse}: the pictures show no structure the models have learnt.")
    if flat:
        flattened = span([errors[r].mean("model_flat") for r in flat])
        text += (f" Flattening each painted patch to its own mean brightness lowers the error at "
                 f"{_ratios(flat, len(errors))} (to {flattened}): the detail painted inside "
                 "the patches, the speckle in the pictures, is worse than none.")
    else:
        text += (" Flattening each painted patch to its own mean brightness would raise the error "
                 "at every ratio: the detail painted inside the patches is learnt too.")
    return text


def _ratios(ratios: list[float], of: int) -> str:
    """Mask ratios as the prose names them: all `of` of them, or each as a percentage."""
    if len(ratios) == of:
        return "every mask ratio"
    return f"mask ratio{'s' if len(ratios) > 1 else ''} " + ", ".join(f"{r:.0%}" for r in ratios)


def _best_fill(errors: HeldoutErrors) -> float:
    return min(errors.mean("mean_fill"), errors.mean("visible_fill"))


def painting_words(errors: Mapping[float, HeldoutErrors]) -> dict[str, str]:
    """painting_sentence."""
    return {"painting_sentence": painting_sentence(errors)}


# Experiment 2: how much to crop

def _crop_label(crop_scale: Sequence[float]) -> str:
    return "{}-{}".format(*crop_scale)


def crop_figure(table: pd.DataFrame, floor: float, crop_scales: Sequence[Sequence[float]],
                paper_crop_scale: Sequence[float]) -> Figure:
    """The probe AUC against the crop scale range, with the ImageNet and paper ranges marked
    where the sweep holds them."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(table["crop scale"], table["probe AUC"], "o-", color="black")
    ax.axhline(floor, color="grey", linestyle="--", label="untrained encoder")
    swept = [list(s) for s in crop_scales]
    for label, (lo, hi), color in [("ImageNet default", IMAGENET_CROP, "#4c72b0"),
                                   ("paper", tuple(paper_crop_scale), "#c44e52")]:
        if [lo, hi] in swept:
            ax.axvline(f"{lo}-{hi}", color=color, linestyle=":", label=f"{label} ({lo}-{hi})")
    ax.set(xlabel="crop scale range", ylabel="probe mean AUC (validation)", title="Crop scale")
    ax.legend(fontsize=8)
    return fig


def crop_words(table: pd.DataFrame, floor: float, paper_crop_scale: Sequence[float]
               ) -> dict[str, str]:
    """crop_sentence, from `MaeArms.crop_table`."""
    return {"crop_sentence": sweep_words(
        "crop scale", _column(table, "crop scale"), _column(table, "probe AUC"),
        {"the paper's choice": _crop_label(paper_crop_scale),
         "the ImageNet default": _crop_label(IMAGENET_CROP)}, floor)}


# Judged downstream: the paper's two choices on pneumonia

DOWNSTREAM = ("mask ratio", "crop scale")  # the paper's two choices, in the order judged


def paper_choices(paper_mask_ratio: float, paper_crop_scale: Sequence[float]
                  ) -> dict[str, tuple[tuple, tuple]]:
    """Each of the paper's choices as two arms, (mask ratio, crop scale) each: the
    natural-image default (a) and the paper's (b), everything else the paper's."""
    paper = (paper_mask_ratio, tuple(paper_crop_scale))
    return {"mask ratio": ((IMAGENET_MASK, paper[1]), paper),
            "crop scale": ((paper_mask_ratio, IMAGENET_CROP), paper)}


def downstream_probes(arms: MaeArms, task: Cache | None, paper_mask_ratio: float,
                      paper_crop_scale: Sequence[float], share: float, n_seeds: int,
                      n_boot: int = 1000) -> pd.DataFrame:
    """Each paper choice judged on the pneumonia task (`setup.pneumonia_cache`): both arms'
    encoders frozen, a linear probe on `share` of its training labels (seed s draws the
    patients), scored on its test images; one row a (comparison, seed),
    `compare_on_label_shares`' columns with a the default and b the paper's. No task (no
    pediatric root): no rows."""
    if task is None:
        return pd.DataFrame(columns=["comparison", *SHARE_COMPARISON])
    splits = [task.split_indices(split) for split in ("train", "test")]

    def features(setting: tuple) -> tuple[np.ndarray, np.ndarray]:
        pre = arms.run(*setting)[0]
        return tuple(cache_features(mae_features(pre.mae), pre.augment.plain, task, rows,
                                    device=default_device()) for rows in splits)

    tables = []
    for name, (default, paper) in paper_choices(paper_mask_ratio, paper_crop_scale).items():
        a, b = features(default), features(paper)
        table = compare_on_label_shares(task, lambda seed, a=a: a, lambda seed, b=b: b,
                                        [share], range(n_seeds), n_boot=n_boot)
        tables.append(table.assign(comparison=name))
    return pd.concat(tables, ignore_index=True)[["comparison", *SHARE_COMPARISON]]


def downstream_setup_words(share: float, n_seeds: int) -> dict[str, str]:
    """The downstream probe's share of the labels and its seeds, as the prose quotes them."""
    return {"downstream_share": f"{share:.0%}",
            "downstream_seeds": "one seed" if n_seeds == 1 else f"{n_seeds} seeds"}


def downstream_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """Per choice, in `DOWNSTREAM`'s order, `paired.paired_verdicts` of the paper's arm (b)
    against the default (a)."""
    verdicts = paired_verdicts(table, "comparison", "ImageNet default", "paper")
    if verdicts.empty:
        return verdicts
    order = verdicts["comparison"].map(DOWNSTREAM.index)
    return verdicts.iloc[order.argsort()].reset_index(drop=True)


def _setting(name: str, setting: tuple) -> str:
    mask_ratio, crop_scale = setting
    return f"{mask_ratio}" if name == "mask ratio" else _crop_label(crop_scale)


def downstream_words(verdicts: pd.DataFrame, share: float, paper_mask_ratio: float,
                     paper_crop_scale: Sequence[float]) -> dict[str, str]:
    """downstream_sentence: each choice's paired comparison on pneumonia at `share` of its
    training labels, or why there is none."""
    if verdicts.empty:
        return {"downstream_sentence": "the pneumonia judge did not run: no pediatric root was "
                                       "given (parameter `pediatric_root`)."}
    choices = paper_choices(paper_mask_ratio, paper_crop_scale)
    texts = []
    for r in verdicts.to_dict("records"):
        name = r["comparison"]
        default, paper = (_setting(name, s) for s in choices[name])
        compared = Compared(
            f"a probe on the encoder pre-trained with the paper's {name} ({paper})",
            f"the natural-image default ({default})", "the paper's choice",
            f"the paper's {name} gives the better features",
            f"the natural-image {name} gives the better features")
        texts.append(paired_sentence(
            compared, f"for the {name}, with {share:.0%} of the training labels (about "
                      f"{r['labelled images']:,.0f} images)",
            int(r["seeds"]), r["ImageNet default AUC"], r["paper AUC"], r["difference"],
            r["seed lower"], r["seed upper"], int(r["seeds ahead"]),
            int(r["bootstrap excludes 0"])))
    return {"downstream_sentence": "; ".join(texts) + "."}


def downstream_figure(table: pd.DataFrame, paper_mask_ratio: float,
                      paper_crop_scale: Sequence[float]) -> Figure:
    """Each seed's paired difference (paper - default), one panel a choice."""
    choices = paper_choices(paper_mask_ratio, paper_crop_scale)
    titles = {name: f"{name}: {_setting(name, choices[name][1])} against "
                    f"{_setting(name, choices[name][0])}" for name in DOWNSTREAM}
    return seeds_figure(table, "comparison", titles, "The paper's choices, probed on pneumonia",
                        "test AUC, paper - default", "not run: no pediatric root given")


# The encoder we carry forward

def probe_table(probe: ProbeResult) -> pd.DataFrame:
    """The probe's AUC per finding, to three decimals."""
    return pd.Series(probe.per_finding, name="probe AUC").round(3).to_frame()


def chosen_words(chosen: float, floor: float) -> dict[str, str]:
    """chosen_auc and chosen_vs_floor: the carried encoder's probe AUC against the floor's,
    compared at three decimals."""
    if math.isnan(chosen) or math.isnan(floor):
        versus = (f"not comparable with {FLOOR}, since one of the two probes could not be "
                  f"scored ({UNSCORED})")
        return {"chosen_auc": _auc(chosen), "chosen_vs_floor": versus}
    gap = round(chosen - floor, 3)
    where = (f"{gap:.3f} above" if gap > 0 else f"{-gap:.3f} below" if gap < 0 else "level with")
    return {"chosen_auc": f"{chosen:.3f}", "chosen_vs_floor": f"{where} {FLOOR} ({floor:.3f})"}


# The encoder carried forward

def carried_encoder(pooled: Cache, recipe: MaeRecipe, config: TrainConfig, run_root: str | Path,
                    epochs: int, cache: Cache, probe_images: int
                    ) -> tuple[PretrainedMae, ProbeResult]:
    """The encoder chapter 4 starts from: `recipe` pre-trained for `epochs` on the training
    images of every data set in `pooled` (`setup.pooled_cache`; their validation and test
    images held out), with its probe on the chapter's own task (`cache`)."""
    pre = pretrain_mae(pooled, recipe, dataclasses.replace(config, epochs=epochs), run_root)
    return pre, probe_encoder(pre.mae, cache, pre.augment, max_images=probe_images)


def carried_words(pooled: Cache, epochs: int) -> dict[str, str]:
    """carried_data (the training images it saw, by source) and carried_epochs."""
    train = pooled.index.iloc[pooled.split_indices("train")]
    return {"carried_data": f"{len(train):,} training images ({source_counts(train)})",
            "carried_epochs": f"{epochs}"}

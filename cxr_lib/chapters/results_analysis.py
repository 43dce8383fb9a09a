"""Chapter 5, reading the results: chapter 4's runs on one test split, how sure each is.

The notebook loads chapter 4's tables and each run's test scores (`read_results`), asks for
intervals and paired tests (`mean_intervals`, `every_run_intervals`, `paired_table`), which
sweep settings mattered (`sweep_runs`), where the models look (`where_models_look`), and sets
our numbers beside the published ones (`ours_beside_theirs`). Every sentence it glues comes
from a `*_words` function here, a dict of name -> Markdown for `glue_all`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from cxr_lib.analysis.localize import attention_map, grad_cam, peak_ratio, score_image_maps
from cxr_lib.analysis.stats import bootstrap_auc, holm_adjust, paired_comparison
from cxr_lib.chapters.files import chapter4_tables, runs_dir, test_scores
from cxr_lib.chapters.finetuning_ablations import cnn_family
from cxr_lib.chapters.setup import images_origin
from cxr_lib.data.cache import Cache
from cxr_lib.data.nih import read_bboxes, shipped_bbox_file
from cxr_lib.methods.finetune import load_finetuned
from cxr_lib.models.families import family

# ----------------------------------------------------------------------------- the runs

STARTS = {"random": "random", "mae": "MAE", "moco": "MoCo v2", "imagenet": "ImageNet",
          "torchvision": "released"}  # chapter 4's `init` -> how an arm's name says it
PRETRAINING = {"random": "none (random weights)", "mae": "MAE, this edition's images",
               "moco": "MoCo v2, this edition's images", "imagenet": "ImageNet, supervised",
               "torchvision": "released weights"}  # `init` -> the published table's column
SWEPT = ("layer_decay", "randaug_magnitude", "drop_path")  # chapter 4's one-at-a-time sweeps
# (claim, first arm, second arm): the paired tests, difference second minus first
CLAIMS = (("MAE vs random (ViT)", "ViT from random", "ViT from MAE"),
          ("MoCo v2 vs random (DenseNet)", "DenseNet from random", "DenseNet from MoCo v2"),
          ("ViT MAE vs DenseNet MoCo v2", "DenseNet from MoCo v2", "ViT from MAE"),
          ("ViT vs DenseNet (both random)", "DenseNet from random", "ViT from random"))
VIT_SHOWN = "ViT from MAE"  # the arm whose ROC curves and attention maps are drawn
CNN_SHOWN = ("DenseNet from MoCo v2", "DenseNet from random")  # Grad-CAM's, the first found
NIH_BOXES = "BBox_List_2017.csv"  # the bounding boxes of a ChestX-ray14 root, when present
FLAT_MAP = 1.5  # a map whose peak is less than this times its mean shows no focus


def model_family(model: str) -> str:
    """How the chapter names a model's family: "ViT", else the CNN's family as chapter 4 names
    it ("DenseNet" for densenet121)."""
    return "ViT" if family(model) == "vit" else cnn_family(model)


def arm_name(row: pd.Series) -> str:
    """One of chapter 4's runs named by its family and start: "ViT from MAE"."""
    return f"{model_family(row['model'])} from {STARTS[row['init']]}"


def run_label(row: pd.Series) -> str:
    """The run's start and the settings its sweeps vary."""
    parts = [arm_name(row)]
    if pd.notna(row["layer_decay"]):
        parts.append(f"decay {row['layer_decay']:g}")
    if model_family(row["model"]) == "ViT":
        parts.append(f"drop path {row['drop_path']:g}")
    magnitude = row["randaug_magnitude"]
    parts.append(f"RandAugment {magnitude:g}" if pd.notna(magnitude) else "no RandAugment")
    if row["train_fraction"] < 1:
        parts.append(f"{row['train_fraction']:.0%} of the labels")
    return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Results:
    """Chapter 4's runs and the test split they were all scored on."""

    work: Path
    tables: dict[str, pd.DataFrame]  # chapter 4's tables of runs, by name
    runs: pd.DataFrame  # every distinct run of those tables
    starts: pd.DataFrame  # the table of starts, with each run's `arm`
    rows: np.ndarray  # [N] the test rows of the cache
    index: pd.DataFrame  # [N] their index rows (id, patient, ...)
    labels: np.ndarray  # [N, F]
    findings: list[str]

    def scores(self, run: str) -> np.ndarray:
        """The run's test logits [N, F], aligned with the test rows by image id."""
        return test_scores(self.work, run).loc[self.index["id"], self.findings].to_numpy()

    def arm_scores(self) -> dict[str, np.ndarray]:
        """Test logits [N, F] of each start, by arm name."""
        return {arm: self.scores(run)
                for arm, run in zip(self.starts["arm"], self.starts["run"], strict=True)}


def read_results(work: str | Path, cache: Cache) -> Results:
    """Chapter 4's tables (an error says to run it first) and the cache's test split."""
    tables = chapter4_tables(work)
    rows = cache.split_indices("test")
    return Results(
        work=Path(work), tables=tables,
        runs=pd.concat(tables.values(), ignore_index=True).drop_duplicates("run"),
        starts=tables["starts"].assign(arm=lambda t: t.apply(arm_name, axis=1)),
        rows=rows, index=cache.index.iloc[rows].reset_index(drop=True),
        labels=cache.labels[rows], findings=list(cache.findings))


def setup_words(n_runs: int, n_images: int, n_patients: int, real: bool) -> dict[str, str]:
    """The edition's runs and test split; `real`: ChestX-ray14 images, else phantoms."""
    return {"n_runs": f"{n_runs}",
            "n_test": f"{n_images:,} images of {n_patients:,} patients",
            "images_origin": images_origin(real)}


def results_words(results: Results, data_root: str | Path | None) -> dict[str, str]:
    """`setup_words` of the runs read."""
    return setup_words(len(results.runs), len(results.rows), results.index["patient"].nunique(),
                       bool(data_root))


# ----------------------------------------------------------------------------- per finding

def auc_heat(starts: pd.DataFrame, arms: Sequence[str], findings: Sequence[str]
             ) -> pd.DataFrame:
    """Test AUC [arm, finding] of each start, from chapter 4's `test_auc.<finding>` columns."""
    by_arm = starts.set_index("arm")
    return pd.DataFrame({arm: pd.Series(by_arm.loc[arm, [f"test_auc.{f}" for f in findings]]
                                        .to_numpy(dtype=float), index=list(findings))
                         for arm in arms}).T


def heat_figure(heat: pd.DataFrame) -> Figure:
    """The per-finding AUCs as a heat map centred on chance."""
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(heat) + 1.5))
    sns.heatmap(heat, annot=True, fmt=".2f", cmap="vlag", center=0.5, vmin=0.3, vmax=0.9,
                annot_kws={"size": 7}, cbar_kws={"label": "test AUC"}, ax=ax)
    ax.set(title="Test AUC per finding", xlabel="", ylabel="")
    return fig


def heat_words(heat: pd.DataFrame) -> dict[str, str]:
    """How many findings each start ranks above chance, and the easiest and hardest finding
    on average ("heat_note", read after "In this edition")."""
    if heat.empty:
        return {"heat_note": "no start of chapter 4 was found, so no AUC is shown."}
    above = (heat > 0.5).sum(axis=1)
    scored = heat.notna().sum(axis=1)
    each = "; ".join(f"{arm} is above chance on {above[arm]} of {scored[arm]} findings"
                     for arm in heat.index)
    mean = heat.mean()
    if mean.isna().all():
        return {"heat_note": each + ". No finding has both classes among the test images, so "
                "none is easiest or hardest."}
    easiest, hardest = mean.idxmax(), mean.idxmin()
    return {"heat_note": each + f". Averaged over the starts, the easiest finding was "
            f"{easiest} ({mean[easiest]:.2f}) and the hardest {hardest} ({mean[hardest]:.2f})."}


# ----------------------------------------------------------------------------- intervals

def _mean_interval(scores: np.ndarray, results: Results, *, n_boot: int, seed: int,
                   level: float) -> pd.DataFrame:
    """The one-row table of the mean AUC's patient-bootstrap interval."""
    return bootstrap_auc(scores, results.labels, results.index["patient"], results.findings,
                         n_boot=n_boot, seed=seed, level=level).query("finding == 'mean'")


def mean_intervals(scores: Mapping[str, np.ndarray], results: Results, *, n_boot: int,
                   seed: int, level: float) -> pd.DataFrame:
    """Mean test AUC of each arm with its `level` interval (columns of `bootstrap_auc`, arm)."""
    return pd.concat([_mean_interval(s, results, n_boot=n_boot, seed=seed, level=level)
                      .assign(arm=arm) for arm, s in scores.items()], ignore_index=True)


def every_run_intervals(results: Results, *, n_boot: int, seed: int, level: float
                        ) -> pd.DataFrame:
    """`mean_intervals` of every distinct run, labelled by `run_label`, best first."""
    every = pd.concat([_mean_interval(results.scores(row["run"]), results, n_boot=n_boot,
                                      seed=seed, level=level).assign(run=run_label(row))
                       for _, row in results.runs.iterrows()], ignore_index=True)
    return every.sort_values("auc", ascending=False, ignore_index=True)


def interval_figure(table: pd.DataFrame, label: str, level: float, title: str, *,
                    height: float = 0.45, width: float = 7, color: str = "black",
                    capsize: float = 3, markersize: float | None = None,
                    fontsize: float | None = None) -> Figure:
    """Each row's mean AUC with its interval, labelled by column `label`, chance dashed."""
    fig, ax = plt.subplots(figsize=(width, height * len(table) + 1.2))
    y = np.arange(len(table))
    ax.errorbar(table["auc"], y, xerr=[table["auc"] - table["lower"],
                                       table["upper"] - table["auc"]],
                fmt="o", color=color, capsize=capsize, markersize=markersize)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set(yticks=y, xlabel=f"mean test AUC ({level:.0%} interval)", title=title)
    ax.set_yticklabels(table[label], fontsize=fontsize)
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def interval_words(intervals: pd.DataFrame, n_boot: int, level: float) -> dict[str, str]:
    """The level, the spread of the intervals' widths ("The intervals are <ci_widths> AUC
    wide.") and whether replicates without both classes were left out."""
    widths = (intervals["upper"] - intervals["lower"]).dropna().sort_values()
    if not len(intervals):
        ci_widths = "not drawn (no start was scored), so no"
    elif not len(widths):
        ci_widths = "undefined (no finding has both classes among the test images), so no"
    else:
        ci_widths = f"from {widths.iloc[0]:.3f} to {widths.iloc[-1]:.3f}"
    skipped = int(intervals["skipped"].max()) if len(intervals) else 0
    return {"level": f"{level:.0%}", "ci_widths": ci_widths,
            "skipped_note": "Every replicate held both classes of every finding." if not skipped
            else f"Up to {skipped} of the {n_boot:,} replicates drew no positive (or no "
            "negative) image of some finding and are left out of the mean's interval, so the "
            "interval describes only the resamples that contain the rare findings' few "
            "patients."}


def every_run_words(every_run: pd.DataFrame) -> dict[str, str]:
    """The best and the worst run (`every_run_intervals`, best first) and whether even their
    intervals overlap."""
    scored = every_run.dropna(subset=["auc"])
    if not len(scored):
        return {"every_run_sentence": "No run of chapter 4 has a mean test AUC here (no finding "
                "has both classes among the test images), so no run can be set against another."}
    top, bottom = scored.iloc[0], scored.iloc[-1]
    said = (f"The best run ({top['run']}) reached {top['auc']:.3f} [{top['lower']:.3f}, "
            f"{top['upper']:.3f}], the worst ({bottom['run']}) {bottom['auc']:.3f} "
            f"[{bottom['lower']:.3f}, {bottom['upper']:.3f}]: ")
    if len(scored) == 1:
        return {"every_run_sentence": f"Only one run has a mean test AUC here ({top['run']}, "
                f"{top['auc']:.3f} [{top['lower']:.3f}, {top['upper']:.3f}]), so no run can be "
                "set against another."}
    return {"every_run_sentence": said + (
        "even these two intervals overlap, so no run of this edition stands apart from the "
        "others on intervals alone." if bool(top["lower"] <= bottom["upper"]) else
        "their intervals do not overlap, so at least these two runs differ.")}


# ----------------------------------------------------------------------------- paired tests

PAIRED_COLUMNS = ["comparison", "first", "second", "difference", "lower", "upper", "p",
                  "p (Holm)"]


def paired_table(scores: Mapping[str, np.ndarray], results: Results, *, n_boot: int,
                 seed: int, level: float, claims: Sequence[tuple[str, str, str]] = CLAIMS
                 ) -> pd.DataFrame:
    """The paired bootstrap of each claim whose two arms ran, with Holm's adjusted p."""
    rows = []
    for claim, first, second in claims:
        if first in scores and second in scores:
            r = paired_comparison(scores[first], scores[second], results.labels,
                                  results.index["patient"], results.findings, n_boot=n_boot,
                                  seed=seed, level=level)
            rows.append({"comparison": claim, "first": r.mean_auc_a, "second": r.mean_auc_b,
                         "difference": r.diff, "lower": r.lower, "upper": r.upper,
                         "p": r.p_value})
    paired = pd.DataFrame(rows, columns=PAIRED_COLUMNS[:-1])
    paired["p (Holm)"] = holm_adjust(paired["p"])
    return paired


def paired_words(paired: pd.DataFrame, level: float) -> dict[str, str]:
    """The test's alpha and which comparisons hold after Holm's correction
    ("paired_sentence", read after "In this edition")."""
    alpha = 1 - level
    held = paired[paired["p (Holm)"] < alpha]
    corrected = f"after Holm's correction (adjusted p below {alpha:.0%})"
    if not len(paired):
        said = ("no comparison could be made: chapter 4 ran neither arm pair that the claims "
                "compare")
    elif len(held):
        said = (f"{len(held)} of the {len(paired)} comparisons hold {corrected}: "
                f"{', '.join(held['comparison'])}; the others cannot be told apart on this test "
                "split")
    else:
        said = (f"none of the {len(paired)} comparisons holds {corrected}: on this test split "
                "the models they compare cannot be told apart")
    return {"alpha": f"{alpha:.0%}", "paired_sentence": said}


# ----------------------------------------------------------------------------- ROC curves

def shown_arm(scores: Mapping[str, np.ndarray]) -> str:
    """The arm whose ROC curves and attention maps are drawn: the MAE ViT, else the first."""
    return VIT_SHOWN if VIT_SHOWN in scores else next(iter(scores))


def roc_figure(scores: np.ndarray, labels: np.ndarray, findings: Sequence[str],
               aucs: pd.Series, show: str, ncols: int = 5) -> Figure:
    """ROC curves [N, F] of every finding with both classes, each titled by its AUC."""
    valid = [j for j in range(len(findings))
             if len(np.unique(labels[:, j][~np.isnan(labels[:, j])])) == 2]
    nrows = -(-len(valid) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(13, 2.6 * nrows + 0.6), sharex=True,
                             sharey=True, squeeze=False)
    for ax in axes.flat[len(valid):]:
        ax.set_visible(False)
    for ax, j in zip(axes.flat, valid, strict=False):
        keep = ~np.isnan(labels[:, j])
        fpr, tpr, _ = roc_curve(labels[keep, j], scores[keep, j])
        ax.plot(fpr, tpr, color="#4c72b0")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"{findings[j]} (AUC {aucs[findings[j]]:.2f})", fontsize=9)
    fig.supxlabel("false-positive rate")
    fig.supylabel("true-positive rate")
    fig.suptitle(f"ROC curves on the test split: {show}, {len(valid)} of {len(findings)} "
                 "findings")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- sweeps

def sweep_runs(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The distinct runs of chapter 4's one-at-a-time sweeps (`SWEPT`)."""
    return pd.concat([t for name, t in tables.items() if name in SWEPT],
                     ignore_index=True).drop_duplicates("run")


def importance_figure(importance: pd.DataFrame) -> Figure:
    """Each setting's permutation importance with its spread."""
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.barh(importance["parameter"], importance["permutation_importance"],
            xerr=importance["permutation_std"], color="#55a868")
    ax.set(xlabel="permutation importance (drop in R² of the forest)", title="Sweep importance")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def sweep_words(n_runs: int, importance: pd.DataFrame) -> dict[str, str]:
    """How many sweep runs, and the most important setting (`hyperparameter_importance`,
    sorted) with its rank correlation: "the most important setting was <top_param>"."""
    if not len(importance):
        top = "none: no setting was measured"
    elif pd.isna(importance["spearman"].iloc[0]):
        top = (f"{importance['parameter'].iloc[0]} (no Spearman correlation with the validation "
               "AUC: the setting or the AUC did not vary)")
    else:
        top = (f"{importance['parameter'].iloc[0]} (Spearman correlation with the validation "
               f"AUC {importance['spearman'].iloc[0]:+.2f})")
    return {"n_sweep_runs": f"{n_runs}", "top_param": top}


# ----------------------------------------------------------------------------- maps

def box_file(data_root: str | Path | None) -> Path:
    """The NIH bounding boxes: the data root's own file when it has one, else the shipped."""
    own = Path(data_root) / NIH_BOXES if data_root else None
    return own if own is not None and own.exists() else shipped_bbox_file()


@dataclasses.dataclass
class Looks:
    """Where two fine-tuned models look on a few test images."""

    images: list[np.ndarray]  # k copies [S0, S0] of the cache's images
    ids: pd.Series  # [k] their image ids
    predicted: list[str]  # [k] the finding the CNN predicts
    vit_maps: torch.Tensor  # [k, H, W]
    cnn_maps: torch.Tensor  # [k, H, W]
    size: int  # the models' input size in px
    boxes: pd.DataFrame  # NIH boxes of the whole set
    n_boxed: int  # test images that have a box


def where_models_look(results: Results, cache: Cache, vit_arm: str,
                      data_root: str | Path | None, shown: int) -> Looks:
    """Attention of the `vit_arm` run and Grad-CAM of the MoCo DenseNet (else the random one)
    on the first `shown` test images with an NIH box (else the first test images)."""
    run_of = results.starts.set_index("arm")["run"]
    cnn_arm = next((arm for arm in CNN_SHOWN if arm in set(results.starts["arm"])),
                   CNN_SHOWN[-1])
    vit, vit_tf = load_finetuned(runs_dir(results.work) / run_of[vit_arm], cache)
    cnn, cnn_tf = load_finetuned(runs_dir(results.work) / run_of[cnn_arm], cache)
    boxes = read_bboxes(box_file(data_root))
    index = results.index
    boxed = index[index["id"].isin(boxes["id"])]
    picked = (boxed if len(boxed) else index).head(shown).index.to_numpy()
    images = torch.from_numpy(np.asarray(cache.images[results.rows[picked]]))[:, None]
    x_vit, x_cnn = vit_tf.plain(images), cnn_tf.plain(images)  # [k, 1, S, S]
    with torch.no_grad():
        predicted = torch.sigmoid(cnn(x_cnn)).argmax(1)
    return Looks(images=[np.array(cache.images[results.rows[i]]) for i in picked],  # copies
                 ids=index.loc[picked, "id"], predicted=[results.findings[int(c)]
                                                         for c in predicted],
                 vit_maps=attention_map(vit, x_vit), cnn_maps=grad_cam(cnn, x_cnn, predicted),
                 size=x_vit.shape[-1], boxes=boxes, n_boxed=len(boxed))


def maps_figure(looks: Looks) -> Figure:
    """The ViT's attention and the CNN's Grad-CAM over each image, bright where they look."""
    k, size = len(looks.images), looks.size
    fig, axes = plt.subplots(2, k, figsize=(2.3 * k, 5), squeeze=False)
    rows = (("ViT attention", looks.vit_maps, list(looks.ids)),
            ("DenseNet Grad-CAM", looks.cnn_maps, looks.predicted))
    for axes_row, (name, maps, titles) in zip(axes, rows, strict=True):
        for ax, img, heat, title in zip(axes_row, looks.images, maps, titles, strict=True):
            ax.imshow(img, cmap="gray", extent=(0, size, size, 0))
            ax.imshow(heat.numpy(), cmap="inferno", alpha=0.5, extent=(0, size, size, 0),
                      vmin=0, vmax=max(float(heat.max()), 1e-12))  # from 0: noise stays dark
            ax.set_title(f"{name}\n{title}", fontsize=8)
            ax.axis("off")
    fig.suptitle("Where the models look (bright: much attention or evidence)")
    fig.tight_layout()
    return fig


def map_note(name: str, maps: torch.Tensor | np.ndarray) -> str:
    """What the maps [k, H, W] show, from how far each one's peak stands above its mean."""
    if not len(maps):  # peak_ratio needs at least one map
        return f"no map of {name} was drawn"
    ratios = peak_ratio(maps)
    empty, flat = int(np.isnan(ratios).sum()), int((ratios < FLAT_MAP).sum())
    if empty == len(ratios):
        return (f"all of {name}'s maps are empty: no part of the image raised the "
                "predicted finding's score")
    low, high = f"{np.nanmin(ratios):.1f}", f"{np.nanmax(ratios):.1f}"
    parts = [f"the peak of {name}'s maps stands {low if low == high else f'{low} to {high}'} "
             "times above their mean (a flat map gives 1)"]
    if empty:
        parts.append(f"{empty} of them {'is' if empty == 1 else 'are'} empty: no part of the "
                     "image raised the predicted finding's score")
    if flat:
        which = f"all {flat}" if flat == len(ratios) else f"{flat} of {len(ratios)}"
        parts.append(f"{which} are nearly flat (under {FLAT_MAP:g} times), so the model looks "
                     "almost everywhere alike there and the picture shows no focus")
    return "; ".join(parts)


def box_note(n_boxed: int, n_shown: int) -> str:
    """Which of the maps the table of boxes scores."""
    if n_boxed:
        return (f"{n_boxed} test images carry NIH boxes here; the table above scores each box of "
                f"the first {n_shown} against its image's map.")
    return ("None of this edition's test images has an NIH box (phantoms carry none), so the "
            "maps are shown without a score.")


def map_words(looks: Looks) -> dict[str, str]:
    """The maps' notes ("map_note") and what the boxes score ("box_note")."""
    return {"map_note": f"In this edition {map_note('the ViT', looks.vit_maps)}. For DenseNet, "
            f"{map_note('Grad-CAM', looks.cnn_maps)}.",
            "box_note": box_note(looks.n_boxed, len(looks.images))}


def box_scores(looks: Looks) -> pd.DataFrame | None:
    """The pointing game and the share inside each box of the ViT's maps; None without boxes."""
    if not looks.n_boxed:
        return None
    return score_image_maps(looks.vit_maps, looks.ids, looks.boxes, image_size=looks.size)


# ----------------------------------------------------------------------------- published

def model_shown(row: pd.Series) -> str:
    """A run's model as the published table lists it: "vit_small_patch16, patch 16, 64 px"."""
    patch = f", patch {int(row['patch_size'])}" if pd.notna(row["patch_size"]) else ""
    return f"{row['model']}{patch}, {row['image_size']} px"


def ours_beside_theirs(theirs: pd.DataFrame, starts: pd.DataFrame, intervals: pd.DataFrame,
                       n_test: int) -> pd.DataFrame:
    """The published rows, then ours (each start's mean test AUC) in the same columns."""
    mine = starts.merge(intervals[["arm", "auc"]], on="arm")
    mine = pd.DataFrame({"source": "this edition", "model": mine.apply(model_shown, axis=1),
                         "pre-training": mine["init"].map(PRETRAINING),
                         "mean AUC (%)": 100 * mine["auc"],
                         "averaged over": "the findings with both classes in the test split",
                         "tested on": f"this edition's test split ({n_test:,} images)"})
    return pd.concat([theirs, mine], ignore_index=True).round(1)

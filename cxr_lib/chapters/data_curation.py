"""Chapter 1, the data: where its labels, splits and images come from, its figures, and the
sentences its prose quotes (`..._words` return name -> Markdown for `glue_all`).

The statistics themselves are `cxr_lib.analysis.curation`'s; this module turns them into
words. Every sentence builder takes plain tables and numbers, so it is tested on hand-made
inputs (tests/test_chapter_data_curation.py), also empty ones.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from cxr_lib.analysis.curation import ALL
from cxr_lib.analysis.localize import scale_boxes
from cxr_lib.chapters.files import cache_dir
from cxr_lib.chapters.plots import image_grid
from cxr_lib.data import FINDINGS, XrayDataset
from cxr_lib.data.cache import Cache, check_cache, is_complete, prepare_cache
from cxr_lib.data.nih import (
    NO_FINDING,
    SOURCE,
    assign_splits,
    find_label_file,
    read_bboxes,
    read_nih_labels,
    read_split_lists,
    shipped_bbox_file,
    shipped_label_file,
)
from cxr_lib.data.phantoms import phantom_dataset, render_phantom

BOX_FILE = "BBox_List_2017.csv"  # the box file in a ChestX-ray14 root (optional there)
VAL_FRACTION = 0.1  # of the train+validation patients drawn for validation, as everywhere
FREQUENT_VISITS = 10  # a patient with this many images or more is a frequent one
SHOWN_BOXED = 6  # boxed images drawn at most


def _plural(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def _share(value: float, spec: str) -> str:
    """A share as a percentage in `spec`; NaN (nothing to take a share of) says so."""
    return "an unknown share" if pd.isna(value) else f"{value:{spec}}"


# The label file

def read_labels(data_root: str | Path | None) -> tuple[Path, pd.DataFrame, np.ndarray]:
    """(label file, meta, labels) of all images: the data root's label file when one is given,
    else the copy TorchXRayVision ships."""
    label_file = find_label_file(data_root) if data_root else shipped_label_file()
    meta, labels = read_nih_labels(label_file)
    meta["source"] = SOURCE
    return label_file, meta, labels


def label_words(label_file: str | Path, meta: pd.DataFrame, from_root: bool) -> dict[str, str]:
    """label_origin, n_images, n_patients."""
    origin = (f"the label file found in the data root (`{Path(label_file).name}`)" if from_root
              else "the copy of the official label file shipped by TorchXRayVision")
    return {"label_origin": origin, "n_images": f"{len(meta):,}",
            "n_patients": f"{meta['patient'].nunique():,}"}


# How common is each finding?

def _by_prevalence(prev: pd.DataFrame) -> pd.DataFrame:
    return prev.sort_values("fraction", ascending=False)


def prevalence_figure(prev: pd.DataFrame) -> Figure:
    """Bars of each finding's share of the images, most common first, with the image counts."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = _by_prevalence(prev)
    sns.barplot(data=order, y="finding", x="fraction", color="#4c72b0", ax=ax)
    ax.set(xlabel="share of images", ylabel="", title="Prevalence of each finding (all images)")
    for patch, n in zip(ax.patches, order["images"], strict=True):
        ax.text(patch.get_width(), patch.get_y() + patch.get_height() / 2, f" {n:,}",
                va="center", fontsize=8)
    return fig


def prevalence_words(prev: pd.DataFrame) -> dict[str, str]:
    """no_finding_share and rarest, from `curation.prevalence` (finding, images, fraction).

    The rarest finding is the last of the 14 by share, an absent one included; when no image
    carries any finding (or there is no image) there is none to name."""
    order = _by_prevalence(prev)
    findings = order[order["finding"].isin(FINDINGS)]
    no_finding = prev.set_index("finding")["fraction"].get(NO_FINDING, math.nan)
    if findings.empty or not (findings["images"] > 0).any():
        rarest = "none: no image here carries any of the findings"
    else:
        rare = findings.iloc[-1]
        rarest = (f"{rare['finding']} ({_plural(int(rare['images']), 'image', 'images')}, "
                  f"{rare['fraction']:.2%})")
    return {"no_finding_share": _share(no_finding, ".1%"), "rarest": rarest}


# Which findings come together?

def cooccurrence_figure(co: pd.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(10, 8))
    sns.heatmap(co, cmap="mako_r", vmin=0, vmax=0.6, annot=True, fmt=".2f",
                annot_kws={"size": 7}, cbar_kws={"label": "P(column | row)"}, ax=ax)
    ax.set(xlabel="", ylabel="given", title="Co-occurrence of findings")
    return fig


def cooccurrence_words(co: pd.DataFrame) -> dict[str, str]:
    """top_pair: the largest P(column | row) off the diagonal of `curation.cooccurrence`."""
    off_diagonal = co.where(~np.eye(len(co), dtype=bool)).stack().dropna()
    if off_diagonal.empty:
        return {"top_pair": "none, since no finding occurs here alongside another one"}
    if off_diagonal.max() == 0:
        return {"top_pair": "none, since no two findings occur on the same image here"}
    pair = off_diagonal.idxmax()
    return {"top_pair": f"{off_diagonal.max():.0%} of images with {pair[0]} also carry "
                        f"{pair[1]}"}


# Findings per image and images per patient

def visits_figure(per_image: pd.DataFrame, per_patient: pd.DataFrame) -> Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    sns.barplot(data=per_image, x="findings", y="images", color="#55a868", ax=a)
    a.set(title="Findings per image", xlabel="findings on the image", ylabel="images")
    a.set_yscale("log")
    b.bar(per_patient["images_per_patient"], per_patient["patients"], width=1.0,
          color="#c44e52")
    b.set(title="Images per patient (follow-up studies)", xlabel="images of the patient",
          ylabel="patients", yscale="log")
    fig.tight_layout()
    return fig


def visits_words(per_patient: pd.DataFrame, n_images: int) -> dict[str, str]:
    """single_visit (share of patients with one image) and share_from_frequent (share of the
    `n_images` images from patients with FREQUENT_VISITS or more), from
    `curation.followups_per_patient`."""
    if per_patient.empty or not n_images:
        return {"single_visit": "none", "share_from_frequent": "none"}
    single = per_patient.set_index("images_per_patient")["fraction"].get(1, 0.0)
    frequent = per_patient["images_per_patient"] >= FREQUENT_VISITS
    many = per_patient.loc[frequent, "images"].sum() / n_images
    return {"single_visit": _share(single, ".0%"), "share_from_frequent": _share(many, ".0%")}


# Who the patients are

def demography_figure(demo: pd.DataFrame, views: pd.DataFrame) -> Figure:
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4.6), sharey=True)
    y = np.arange(len(demo))
    a.hlines(y, demo["age_q1"], demo["age_q3"], color="#4c72b0", linewidth=3)
    a.plot(demo["age_median"], y, "o", color="black", markersize=4)
    a.set(yticks=y, yticklabels=demo["finding"], xlabel="age (median, quartiles)", title="Age")
    a.invert_yaxis()
    b.barh(y, demo["female_share"], color="#dd8452")
    b.axvline(demo.set_index("finding").loc[ALL, "female_share"], color="black", linestyle=":")
    b.set(xlabel="share of female patients' images", title="Sex", xlim=(0, 1))
    c.barh(y, views["share_PA"], color="#8172b3", label="PA")
    c.barh(y, views["share_AP"], left=views["share_PA"], color="#ccb974", label="AP")
    c.set(xlabel="share of images", title="View position", xlim=(0, 1))
    c.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8)
    fig.tight_layout()
    return fig


def demography_words(demo: pd.DataFrame, views: pd.DataFrame) -> dict[str, str]:
    """ages_excluded (the "All" row of `curation.age_sex_by_finding`) and ap_extremes (the
    findings with the largest and smallest share of AP films, `curation.view_by_finding`)."""
    excluded = demo.set_index("finding")["ages_excluded"].get(ALL, 0)
    if pd.isna(excluded):
        ages = "this copy of the file gives no count of them"
    elif excluded:
        ages = (f"here {int(excluded):,} such "
                f"{'image was' if excluded == 1 else 'images were'} left out of the age "
                "statistics")
    else:
        ages = "this copy of the file has none"
    by_finding = views.set_index("finding")
    if "share_AP" in by_finding:
        shares = by_finding["share_AP"]
    else:  # no AP film at all: a share of 0 for every finding with images
        with_images = by_finding["images"] > 0 if "images" in by_finding else []
        shares = pd.Series(0.0, index=by_finding.index[with_images])
    ap_by = shares[shares.index.isin(FINDINGS)].dropna()
    if ap_by.empty:
        extremes = "finding to finding, though no AP share can be measured here"
    elif len(ap_by) == 1:
        extremes = f"{ap_by.index[0]} ({ap_by.iloc[0]:.0%} AP), the only finding present here"
    else:
        extremes = (f"{ap_by.idxmax()} ({ap_by.max():.0%} AP) to {ap_by.idxmin()} "
                    f"({ap_by.min():.0%} AP)")
    return {"ages_excluded": ages, "ap_extremes": extremes}


# The official split, and our validation split

def split_meta(data_root: str | Path | None, meta: pd.DataFrame, *, seed: int,
               n_phantoms: int, phantom_size: int) -> pd.DataFrame:
    """The images with their split: with a data root, every image of the label file (`meta`)
    split as `cxr_lib.data.nih.read_chestxray14` splits those present (the official test list,
    validation patients drawn from train+validation); else the phantoms'."""
    if not data_root:
        return phantom_dataset(n_phantoms, size=phantom_size, seed=seed).meta
    train_val, test = read_split_lists(data_root, meta["id"])
    split = meta.copy()
    split["split"] = assign_splits(split, train_val, test, VAL_FRACTION, seed, Path(data_root))
    return split


def split_words(from_root: bool) -> dict[str, str]:
    """split_origin: what the split table is computed on."""
    if from_root:
        return {"split_origin": "the official lists of the data root, over all images of the "
                                "label file"}
    return {"split_origin": "the phantom data set (no data root was given, and the official "
                            "split lists are part of the NIH download, not of TorchXRayVision)"}


# The bounding-box subset

def read_boxes(data_root: str | Path | None) -> pd.DataFrame:
    """The data root's box file when it has one, else the copy TorchXRayVision ships."""
    path = Path(data_root) / BOX_FILE if data_root else None
    return read_bboxes(path if path and path.exists() else shipped_bbox_file())


def box_words(boxes: pd.DataFrame) -> dict[str, str]:
    """n_boxes: how many boxes, on how many images, around how many findings."""
    if boxes.empty:
        return {"n_boxes": f"no box around any of the {len(FINDINGS)} findings"}
    return {"n_boxes": f"{_plural(len(boxes), 'box', 'boxes')} on "
                       f"{_plural(boxes['id'].nunique(), 'image', 'images')}, around "
                       f"{boxes['finding'].nunique()} of the {len(FINDINGS)} findings"}


# What the images look like

def images_words(dataset: XrayDataset, from_root: bool) -> dict[str, str]:
    """images_origin: real images (how many of the listed ones are present) or phantoms."""
    if not from_root:
        return {"images_origin": "synthetic phantoms (no data root was given): they are not "
                                 "real X-rays"}
    inventory = dataset.meta.attrs[SOURCE]
    return {"images_origin": f"real ChestX-ray14 images from the data root "
                             f"({inventory['present']:,} of the {inventory['listed']:,} listed "
                             "images are present)"}


def gallery_figure(dataset: XrayDataset, rng: np.random.Generator, per_finding: int,
                   images_origin: str) -> Figure:
    """Up to `per_finding` images of each finding, drawn with `rng`."""
    picks, titles = [], []
    for j, finding in enumerate(FINDINGS):
        rows = np.flatnonzero(dataset.labels[:, j] == 1)
        for i in rng.choice(rows, size=min(per_finding, len(rows)), replace=False):
            picks.append(int(i))
            titles.append(finding.replace("_", " "))
    return image_grid([dataset.load_image(i) for i in picks], titles, ncols=2 * per_finding,
                      suptitle=f"Images per finding: {images_origin}")


def boxes_figure(dataset: XrayDataset, boxes: pd.DataFrame, from_root: bool) -> Figure | None:
    """The NIH boxes drawn on the first present images that have some (scaled from the box
    file's 1024 px); None, saying so, when no such image is present (phantoms carry none)."""
    boxed = dataset.meta[dataset.meta["id"].isin(boxes["id"])] if from_root else dataset.meta[:0]
    if not len(boxed):
        print("No image with a bounding box is present here (phantoms, or none in the download).")
        return None
    images, shapes, titles = [], [], []
    for i, row in boxed.head(SHOWN_BOXED).iterrows():
        img = dataset.load_image(i)
        rows = boxes[boxes["id"] == row["id"]]
        images.append(img)
        shapes.append([tuple(box) for box in scale_boxes(rows, img.shape[1])])
        titles.append(", ".join(rows["finding"]))
    return image_grid(images, titles, ncols=3, boxes=shapes, suptitle="NIH boxes on present images")


# Phantoms

def phantom_figure(rng: np.random.Generator, size: int) -> Figure:
    """One phantom (its seed drawn with `rng`), healthy and with each finding in turn."""
    demo_seed = int(rng.integers(1_000_000))
    shown = [NO_FINDING, *FINDINGS]
    images = [render_phantom(demo_seed, size, [] if f == NO_FINDING else [f]) for f in shown]
    return image_grid(images, [f.replace("_", " ") for f in shown], ncols=5,
                      suptitle="One phantom, healthy and with each finding")


def phantom_rate(seed: int, size: int, n: int = 100) -> float:
    """Phantoms of `size` px drawn per second (with two findings each), over `n` of them."""
    start = time.perf_counter()
    for k in range(n):
        render_phantom(seed + k, size, ["Effusion", "Nodule"])
    return n / (time.perf_counter() - start)


def phantom_words(rate: float) -> dict[str, str]:
    """phantom_rate: phantoms per second, to the unit."""
    return {"phantom_rate": f"{rate:,.0f}"}


# The preprocessing cache

def open_cache(work: str | Path, dataset: XrayDataset, size: int) -> tuple[Cache, bool, float]:
    """(cache, whether it was found finished, seconds to open or make it): the profile's
    cache of `dataset` at `size` px, the one every later chapter reads."""
    Path(work).mkdir(parents=True, exist_ok=True)
    folder = cache_dir(work, dataset.name, size)
    found = is_complete(folder)
    start = time.perf_counter()
    cache = prepare_cache(dataset, folder, size=size)
    elapsed = time.perf_counter() - start
    print(check_cache(folder))
    return cache, found, elapsed


def cache_words(images: int, found: bool, elapsed: float) -> dict[str, str]:
    """cache_speed: whether the cache of `images` images was found or made, and how fast."""
    n = _plural(images, "image", "images")
    if found:
        return {"cache_speed": f"found the finished cache of {n} from an earlier run and "
                               f"opened it in {elapsed:.2f} s"}
    rate = f" ({images / elapsed:,.0f} images per second)" if elapsed > 0 else ""
    return {"cache_speed": f"decoded and stored {n} in {elapsed:.1f} s{rate}"}


def cache_figure(cache: Cache, rng: np.random.Generator, size: int,
                 shown: int = 12) -> Figure:
    """Up to `shown` cached images drawn with `rng`, titled with their split."""
    sample = rng.choice(len(cache), size=min(shown, len(cache)), replace=False)
    return image_grid([cache.images[i] for i in sample],
                      [cache.index.loc[i, "split"] for i in sample], ncols=6,
                      suptitle=f"Cached images ({size} px) with their split")


"""The results page: every chapter's verdicts, read from the executed chapters of this edition,
and this edition's fine-tuned starts beside the papers' published numbers.

The page (notebooks/07_results.ipynb) runs last. It reads the values the other chapters glued
(their executed notebooks in the profile's `chapters/` folder) and glues each verdict again
under `ch<N>_<name>`, so its prose quotes them; a chapter that did not run says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cxr_lib.analysis.published import published_chestxray14
from cxr_lib.chapters.files import chapter4_tables
from cxr_lib.chapters.results_analysis import model_family

MARKDOWN = "text/markdown"
# chapter -> the names of the sentences that carry its verdicts, in the order the page quotes
VERDICTS: Mapping[str, tuple[str, ...]] = {
    "01_data_curation": ("images_used", "split_origin"),
    "02_mae_pretraining": ("images_used", "mask_sentence", "crop_sentence", "downstream_sentence",
                           "painting_sentence"),
    "03_moco_baselines": ("images_used", "knn_sentence", "sim_sentence", "gathering_sentence"),
    "04_finetuning_ablations": ("images_used", "pneumonia_probe_sentence",
                                "pneumonia_moco_probe_sentence",
                                "pneumonia_mae_moco_probe_sentence",
                                "pneumonia_finetune_sentence",
                                "pneumonia_moco_finetune_sentence",
                                "pneumonia_mae_moco_finetune_sentence", "start_sentence",
                                "signal_note", "layer_decay_sentence", "randaug_magnitude_sentence",
                                "drop_path_sentence", "pneumonia_layer_decay_sentence",
                                "pneumonia_randaug_magnitude_sentence",
                                "pneumonia_drop_path_sentence", "label_verdict"),
    "05_results_analysis": ("images_used", "every_run_sentence", "paired_sentence", "map_note"),
    "06_cocktail_hiera": ("images_used", "ranking", "painter_sentence"),
}
NOT_RUN = "*(chapter {number} was not executed in this edition, so it has no verdict here)*"
# chapter 4's start (its `init`) -> the published row of the same pre-training
PAPER_START = {"mae": "X-ray MAE", "moco": "X-ray MoCo v2", "imagenet": "ImageNet, supervised"}


def glued_texts(notebook: Path) -> dict[str, str]:
    """The Markdown an executed notebook glued, by name (myst-nb's glue outputs)."""
    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    texts = {}
    for cell in cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            data = output.get("data", {})
            if name is not None:
                texts[name] = next((value for key, value in data.items()
                                    if key.endswith(MARKDOWN)), "")
    return texts


def verdict_words(chapters_dir: str | Path) -> dict[str, str]:
    """`ch<N>_<name>` -> each verdict of VERDICTS, from the executed chapters in
    `chapters_dir`; a chapter not executed (or that glued no such sentence) says so."""
    words = {}
    for stem, names in VERDICTS.items():
        number = int(stem[:2])
        path = Path(chapters_dir) / f"{stem}.ipynb"
        glued = glued_texts(path) if path.is_file() else {}
        for name in names:
            words[f"ch{number}_{name}"] = sentence(glued.get(name) or NOT_RUN.format(
                number=number))
    return words


def sentence(text: str) -> str:
    """A verdict as the page lists it: ending in a full stop (chapters glue some mid-sentence)."""
    text = text.strip()
    return text if text.endswith((".", "!", "?", ")*")) else text + "."


def starts_beside_papers(work: str | Path) -> pd.DataFrame:
    """Chapter 4's starts, their mean test AUC (%) over seeds in this edition, beside the mean
    AUC Xiao et al. publish for the same family and pre-training (NaN where they publish
    none: a random start). One row per family and start."""
    starts = chapter4_tables(work).get("starts")
    if starts is None or starts.empty:
        raise ValueError("chapter 4 wrote no table of starts: run chapter 4 of this profile")
    ours = (starts.assign(family=starts["model"].map(model_family))
            .groupby(["family", "init"], sort=False)["test_auc"].mean().mul(100))
    theirs = published_chestxray14()
    theirs = theirs[theirs["source"].str.startswith("Xiao")]
    papers = {("ViT", "ViT-S/16"), ("DenseNet", "DenseNet-121")}
    rows = []
    for (family, init), auc in ours.items():
        model = next((m for f, m in papers if f == family), None)
        match = theirs[(theirs["model"] == model) & (theirs["pre-training"] ==
                                                     PAPER_START.get(init))]
        rows.append({"family": family, "start": init, "ours": auc,
                     "theirs": match["mean AUC (%)"].iloc[0] if len(match) else np.nan,
                     "their model": model or ""})
    return pd.DataFrame(rows)


def starts_figure(table: pd.DataFrame) -> Figure:
    """Ours and theirs per start: this edition's test AUC against the mean AUC Xiao et al.
    publish on the full ChestX-ray14 (a start they publish none for has no grey bar)."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = np.arange(len(table))
    ax.bar(x - 0.2, table["ours"], 0.4, label="ours: this edition's test split", color="C0")
    published = table["theirs"].notna().to_numpy()
    ax.bar(x[published] + 0.2, table["theirs"][published], 0.4, color="C7",
           label="theirs: Xiao et al. 2023, official test split (25,596 images)")
    ax.axhline(50, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, [f"{f}\n{s}" for f, s in zip(table["family"], table["start"],
                                                  strict=True)])
    ax.set_ylim(40, 90)
    ax.set_ylabel("mean test AUC (%)")
    ax.set_title("Fine-tuned starts: this edition beside the paper")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig

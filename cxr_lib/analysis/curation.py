"""Label statistics of chapter 1, as pure functions returning tidy tables.

Inputs are what `cxr_lib.data.nih.read_nih_labels` returns (or a dataset's meta and labels):
`meta` has one row per image (patient, age, sex, view, split as needed) and `labels` is
float32 [N, F] over `findings`, 1 = present. "No Finding" is the row with no finding present;
"All" rows describe every image, so a finding can be read against the whole population.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cxr_lib.data.core import FINDINGS, SPLITS, DataError
from cxr_lib.data.nih import NO_FINDING

ALL = "All"
# Ages above this are recording errors (the original NIH file has a few ages in the 100s-400s).
MAX_PLAUSIBLE_AGE = 100.0


def prevalence(meta: pd.DataFrame, labels: np.ndarray,
               findings: Sequence[str] = FINDINGS) -> pd.DataFrame:
    """Images per finding and their share of all images, plus "No Finding".

    Columns: finding, images, fraction. The fractions of the findings sum to more than 1
    because an image can carry several.
    """
    groups = _groups(meta, labels, findings, with_all=False)
    images = [int(mask.sum()) for mask in groups.values()]
    return pd.DataFrame({"finding": list(groups), "images": images,
                         "fraction": np.array(images) / len(meta)})


def cooccurrence(meta: pd.DataFrame, labels: np.ndarray,
                 findings: Sequence[str] = FINDINGS) -> pd.DataFrame:
    """P(column finding | row finding): the share of images with the row finding that also
    carry the column finding. [F, F]; the diagonal is 1, a row of an absent finding is NaN."""
    present = _present(meta, labels, findings).astype(np.float64)  # [N, F]
    counts = present.T @ present  # [F, F]: images with both
    with np.errstate(invalid="ignore", divide="ignore"):
        table = counts / np.diag(counts)[:, None]
    return pd.DataFrame(table, index=pd.Index(findings, name="given"),
                        columns=pd.Index(findings, name="finding"))


def findings_per_image(meta: pd.DataFrame, labels: np.ndarray,
                       findings: Sequence[str] = FINDINGS) -> pd.DataFrame:
    """How many images carry 0, 1, 2, ... findings. Columns: findings, images, fraction."""
    per_image = _present(meta, labels, findings).sum(axis=1)  # [N]
    images = np.bincount(per_image, minlength=1)
    return pd.DataFrame({"findings": np.arange(len(images)), "images": images,
                         "fraction": images / len(meta)})


def followups_per_patient(meta: pd.DataFrame) -> pd.DataFrame:
    """How many patients have 1, 2, ... images. Columns: images_per_patient, patients,
    fraction (of patients), images (total images of those patients)."""
    per_patient = meta.groupby("patient").size()
    counts = per_patient.value_counts().sort_index()
    return pd.DataFrame({"images_per_patient": counts.index.to_numpy(),
                         "patients": counts.to_numpy(),
                         "fraction": counts.to_numpy() / len(per_patient),
                         "images": counts.index.to_numpy() * counts.to_numpy()})


def age_sex_by_finding(meta: pd.DataFrame, labels: np.ndarray,
                       findings: Sequence[str] = FINDINGS,
                       max_age: float = MAX_PLAUSIBLE_AGE) -> pd.DataFrame:
    """Age (median and quartiles, years) and share of female images per finding.

    Ages above `max_age` are implausible; they are left out of the age statistics and counted
    in `ages_excluded` rather than silently kept. Columns: finding, images, age_median,
    age_q1, age_q3, ages_excluded, female_share.
    """
    age = meta["age"].to_numpy(dtype=np.float64)
    plausible = age <= max_age
    female = (meta["sex"] == "F").to_numpy()
    rows = []
    for name, mask in _groups(meta, labels, findings).items():
        ages = age[mask & plausible]
        q1, median, q3 = np.percentile(ages, [25, 50, 75]) if len(ages) else (np.nan,) * 3
        rows.append({"finding": name, "images": int(mask.sum()), "age_median": median,
                     "age_q1": q1, "age_q3": q3, "ages_excluded": int((mask & ~plausible).sum()),
                     "female_share": female[mask].mean() if mask.any() else np.nan})
    return pd.DataFrame(rows)


def view_by_finding(meta: pd.DataFrame, labels: np.ndarray,
                    findings: Sequence[str] = FINDINGS) -> pd.DataFrame:
    """Share of each view position (PA, AP, ...) among the images of each finding.

    AP films are taken of patients too ill to stand, so findings with a high AP share are
    partly confounded with how sick (and where) the patient was. Columns: finding, images,
    share_<view> for every view, most frequent view first.
    """
    view = meta["view"].to_numpy()
    views = meta["view"].value_counts().index.tolist()
    rows = []
    for name, mask in _groups(meta, labels, findings).items():
        n = int(mask.sum())
        row = {"finding": name, "images": n}
        for v in views:
            row[f"share_{v}"] = (view[mask] == v).sum() / n if n else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def split_summary(meta: pd.DataFrame) -> pd.DataFrame:
    """Images and patients per split, plus "All". Columns: split, images, patients, fraction
    (of images)."""
    order = [s for s in SPLITS if s in set(meta["split"])]
    order += sorted(set(meta["split"]) - set(order))
    rows = [{"split": s, "images": int((meta["split"] == s).sum()),
             "patients": meta.loc[meta["split"] == s, "patient"].nunique()} for s in order]
    rows.append({"split": ALL, "images": len(meta), "patients": meta["patient"].nunique()})
    table = pd.DataFrame(rows)
    table["fraction"] = table["images"] / len(meta)
    return table


def bbox_summary(boxes: pd.DataFrame) -> pd.DataFrame:
    """Boxes per finding, in FINDINGS order, from `nih.read_bboxes`. Columns: finding, boxes,
    images (with at least one box), median_w, median_h (pixels)."""
    order = [f for f in FINDINGS if f in set(boxes["finding"])]
    grouped = boxes.groupby("finding")
    table = pd.DataFrame({"boxes": grouped.size(), "images": grouped["id"].nunique(),
                          "median_w": grouped["w"].median(), "median_h": grouped["h"].median()})
    return table.loc[order].rename_axis("finding").reset_index()


def _present(meta: pd.DataFrame, labels: np.ndarray, findings: Sequence[str]) -> np.ndarray:
    """bool [N, F]: finding present (1); 0 and NaN are not."""
    labels = np.asarray(labels)
    if labels.shape != (len(meta), len(findings)):
        raise DataError(f"labels {labels.shape} do not match {len(meta)} images x "
                        f"{len(findings)} findings")
    return labels == 1


def _groups(meta: pd.DataFrame, labels: np.ndarray, findings: Sequence[str],
            with_all: bool = True) -> dict[str, np.ndarray]:
    """Row masks [N] per finding, then "No Finding" and (optionally) "All"."""
    present = _present(meta, labels, findings)  # [N, F]
    groups = {name: present[:, j] for j, name in enumerate(findings)}
    groups[NO_FINDING] = ~present.any(axis=1)
    if with_all:
        groups[ALL] = np.ones(len(meta), dtype=bool)
    return groups

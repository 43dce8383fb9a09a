"""Folder-per-class data sets, such as the pediatric pneumonia release (Kermany et al. 2018):

    root/train/NORMAL/*.jpeg   root/train/PNEUMONIA/*.jpeg
    root/test/...              root/val/...           (both optional)

Each class folder other than NORMAL becomes a finding, spelled as in ChestX-ray14 where the
names match case-insensitively ("PNEUMONIA" -> "Pneumonia"), so that merging with NIH puts both
sources' pneumonia labels in one column; NORMAL images are all zeros. The official test folder
stays the test split. The train and (tiny, 16-image) val folders are pooled and re-split by
patient, because the official val folder is not patient-disjoint by construction. A root without
test images (the shipped sample holds train/ only) gets a test split drawn by patient too:
`test_fraction` of the patients, then `val_fraction` of them from the rest for validation.

The full Kermany release reuses patient numbers between its folders (`train/PNEUMONIA/
person1_bacteria_1.jpeg` and `test/PNEUMONIA/person1_virus_6.jpeg`), and its image counters
run across folders, so the numbers are taken to name the same child. The test folder is kept
as released, the benchmark others report on; the train and val images of its patients are
left out, so that no patient is on both sides of the evaluation. How many is logged (WARNING)
and kept in `meta.attrs[source]`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lib.data.core import (
    FINDINGS,
    META_COLUMNS,
    DataError,
    XrayDataset,
    check_patient_disjoint,
    data_root,
    read_image_row,
)
from cxr_lib.data.splits import patient_split, three_way_split

NORMAL = "normal"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
SPLIT_FOLDERS = ("train", "val", "test")
# Patient ids in Kermany file names: person1_bacteria_1.jpeg -> person1; IM-0115-0001.jpeg ->
# IM-0115; NORMAL2-IM-1427-0001.jpeg -> NORMAL2-IM-1427 (a separate numbering, prefix kept).
_PATIENT = re.compile(r"^(person\d+)_|^((?:NORMAL\d+-)?IM-\d+)-", re.IGNORECASE)
_SUBTYPE = re.compile(r"(bacteria|virus)", re.IGNORECASE)
_LOG = logging.getLogger(__name__)


def read_class_folders(root: str | Path, *, val_fraction: float = 0.1,
                       test_fraction: float = 0.2, seed: int = 0,
                       name: str | None = None) -> XrayDataset:
    """A folder-per-class data set as an XrayDataset over its non-normal classes.

    meta extras: class_name (the class folder), subtype (bacteria/virus where the file name
    says, else ""). The source and dataset name default to the root folder's name, lower-cased.
    Patients come from Kermany file names; any other file counts as its own patient.
    `test_fraction` is used only where the root holds no test images (see the module's
    docstring); `val_fraction` is then a share of all the patients, else of the pooled ones.
    """
    if root is None:
        raise DataError("folder: no data root given")
    root = data_root(root)
    source = name or root.name.lower()
    files = _list_images(root)
    classes = sorted({cls for _, cls, _ in files})
    findings = [_finding_name(c) for c in classes if c.lower() != NORMAL]
    if len(set(findings)) != len(findings):
        raise DataError(f"{root}: class folders {classes} differ only in letter case")
    meta = pd.DataFrame({
        "id": [f"{source}/{path.relative_to(root).as_posix()}" for path, _, _ in files],
        "patient": [_patient(path, root) for path, _, _ in files],
        "split": [split for _, _, split in files],
        "source": source,
        "path": [str(path) for path, _, _ in files],
        "class_name": [cls for _, cls, _ in files],
        "subtype": [_subtype(path.stem) for path, _, _ in files],
    })
    labels = _one_hot(meta["class_name"], classes, findings)
    meta, labels, left_out = _leave_out_test_patients(meta, labels, source)
    pool = (meta["split"] != "test").to_numpy()
    if pool.all():  # no test images: test, then validation, drawn by patient
        meta["split"] = three_way_split(meta["patient"], val_fraction, test_fraction, seed)
    else:
        meta.loc[pool, "split"] = patient_split(meta["patient"][pool], val_fraction, seed)
    check_patient_disjoint(meta, source)
    meta = meta[[*META_COLUMNS, "class_name", "subtype"]]
    meta.attrs[source] = left_out
    return XrayDataset(source, findings, labels, meta, {source: read_image_row})


def _leave_out_test_patients(meta: pd.DataFrame, labels: np.ndarray, source: str
                             ) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """Drop the train/val images of patients the official test folder also holds (see the
    module's docstring); returns the rest and {"left_out_images", "left_out_patients"}."""
    test = meta["split"] == "test"
    leaked = (~test & meta["patient"].isin(meta.loc[test, "patient"])).to_numpy()
    left_out = {"left_out_images": int(leaked.sum()),
                "left_out_patients": int(meta.loc[leaked, "patient"].nunique())}
    if leaked.any():
        _LOG.warning("%s: %d train/val image(s) of %d patient(s) who are also in the official "
                     "test folder are left out", source, left_out["left_out_images"],
                     left_out["left_out_patients"])
    return meta[~leaked].reset_index(drop=True), labels[~leaked], left_out


def _list_images(root: Path) -> list[tuple[Path, str, str]]:
    """(file, class folder, official split) for every image, in sorted order."""
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    split_dirs = [root / s for s in SPLIT_FOLDERS if (root / s).is_dir()]
    if not split_dirs:
        raise DataError(f"{root}: no {'/, '.join(SPLIT_FOLDERS)}/ folder (expected "
                        f"{root}/train/<CLASS>/<image>, e.g. train/NORMAL, train/PNEUMONIA)")
    files = []
    for split_dir in split_dirs:
        class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir()
                            and not d.name.startswith("."))
        if not class_dirs:
            raise DataError(f"{split_dir}: no class folders (expected e.g. NORMAL/, PNEUMONIA/)")
        for class_dir in class_dirs:
            images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                            and not p.name.startswith("."))
            if not images:
                raise DataError(f"{class_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
            split = "test" if split_dir.name == "test" else "train"
            files += [(p, class_dir.name, split) for p in images]
    return files


def _finding_name(folder: str) -> str:
    """The FINDINGS spelling of a class folder name where one matches, else the name."""
    matches = [f for f in FINDINGS if f.lower() == folder.lower()]
    return matches[0] if matches else folder


def _patient(path: Path, root: Path) -> str:
    match = _PATIENT.match(path.name)
    if match:
        return match.group(1) or match.group(2)
    return path.relative_to(root).as_posix()  # no id in the name: one patient per file


def _subtype(stem: str) -> str:
    match = _SUBTYPE.search(stem)
    return match.group(1).lower() if match else ""


def _one_hot(class_names: pd.Series, classes: list[str], findings: list[str]) -> np.ndarray:
    """float32 [N, F]: 1 in the image's class column, all zeros for NORMAL."""
    labels = np.zeros((len(class_names), len(findings)), dtype=np.float32)  # [N, F]
    for cls in classes:
        if cls.lower() != NORMAL:
            labels[(class_names == cls).to_numpy(), findings.index(_finding_name(cls))] = 1.0
    return labels

"""The COVID-19 Radiography Database (Chowdhury et al., "Can AI help in screening viral and
COVID-19 pneumonia?", IEEE Access 2020; Rahman et al., "Exploring the effect of image
enhancement techniques on COVID-19 detection using chest X-ray images", Computers in Biology
and Medicine 2021), as released on Kaggle. Two layouts:

    v4 and later:  root/<CLASS>/images/<CLASS>-<n>.png   (root/<CLASS>/masks/ and
                   root/<CLASS>.metadata.xlsx are ignored)
    earlier:       root/<CLASS>/<CLASS> (<n>).png

Classes and findings: COVID -> "COVID-19", Lung_Opacity -> "Lung Opacity" (CheXpert's name),
Viral Pneumonia -> "Pneumonia" (ChestX-ray14's spelling, so merging puts it in one column with
NIH's and CheXpert's), Normal -> all zeros. Class folders match case-insensitively, and the
first release's "COVID-19" folder counts as COVID.

The classes are exclusive folders, not reports, so a label is 0 only where the class rules the
finding out. A COVID-19 image is in most cases a viral pneumonia with lung opacities, a viral
pneumonia image shows opacities, and the Lung_Opacity class (non-COVID lung infection, taken
from the RSNA pneumonia challenge) may well be pneumonia: those cells are NaN, not 0.

No patient ids are released: each image counts as its own patient, so train, val and test are
drawn by image, and leakage of one patient's images (or of the duplicates that the collected
sources are known to share) between splits cannot be ruled out with this release. The release
notes name its sources: the Viral Pneumonia images and some of the Normal ones come from the
pediatric pneumonia set (Kermany et al. 2018, read by `cxr_lib.data.folder`), the Lung_Opacity
and most Normal images from the RSNA pneumonia challenge (a subset of ChestX-ray14), so a
cocktail of these sources holds the same images twice, possibly in different splits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lib.data.core import (
    META_COLUMNS,
    DataError,
    XrayDataset,
    check_patient_disjoint,
    data_root,
    read_image_row,
)
from cxr_lib.data.folder import IMAGE_SUFFIXES
from cxr_lib.data.splits import three_way_split

DOWNLOAD_PAGE = "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database"
FINDINGS: tuple[str, ...] = ("COVID-19", "Lung Opacity", "Pneumonia")
_N = np.nan
# Class folder (lower case) -> its labels over FINDINGS: 1 its own finding, 0 ruled out, NaN
# plausible (see the module docstring).
CLASS_LABELS: dict[str, tuple[float, float, float]] = {
    "covid": (1.0, _N, _N),
    "covid-19": (1.0, _N, _N),
    "lung_opacity": (0.0, 1.0, _N),
    "viral pneumonia": (0.0, _N, 1.0),
    "normal": (0.0, 0.0, 0.0),
}
KNOWN_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")


def read_covid_radiography(root: str | Path, *, val_fraction: float = 0.1,
                           test_fraction: float = 0.1, seed: int = 0,
                           name: str = "covid19_radiography") -> XrayDataset:
    """The images under `root` as an XrayDataset over the findings of the classes present.

    Splits: `test_fraction` and `val_fraction` of the images (each its own patient), drawn
    with `seed`. Source and dataset name are `name`. meta extra: class_name (the folder).
    """
    if root is None:
        raise DataError(f"{name}: no data root given; download the data set from "
                        f"{DOWNLOAD_PAGE}")
    root = data_root(root)
    files = list_images(root)
    rel = [path.relative_to(root).as_posix() for path, _ in files]
    meta = pd.DataFrame({
        "id": [f"{name}/{r}" for r in rel],
        "patient": rel,  # no patient ids in the release: one patient per image
        "source": name,
        "path": [str(path) for path, _ in files],
        "class_name": [cls for _, cls in files],
    })
    meta.insert(2, "split", three_way_split(meta["patient"], val_fraction, test_fraction, seed))
    table = np.array([CLASS_LABELS[c.lower()] for c in meta["class_name"]], dtype=np.float32)
    keep = [j for j in range(len(FINDINGS)) if (table[:, j] == 1.0).any()]
    check_patient_disjoint(meta, name)
    meta = meta[[*META_COLUMNS, "class_name"]]
    return XrayDataset(name, [FINDINGS[j] for j in keep], table[:, keep], meta,
                       {name: read_image_row})


def list_images(root: Path) -> list[tuple[Path, str]]:
    """(file, class folder) for every image of every class folder, in sorted order; a class
    folder's images/ subfolder where it has one (v4+), else the folder itself."""
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders (expected {', '.join(KNOWN_CLASSES)})")
    unknown = [d for d in class_dirs if d.name.lower() not in CLASS_LABELS]
    if unknown:
        raise DataError(f"{unknown[0]}: unknown class folder; the COVID-19 Radiography Database "
                        f"has {', '.join(KNOWN_CLASSES)} (point root at the folder holding them)")
    files = []
    for class_dir in class_dirs:
        folder = class_dir / "images" if (class_dir / "images").is_dir() else class_dir
        with os.scandir(folder) as entries:
            images = sorted(Path(e.path) for e in entries if e.is_file()
                            and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
                            and not e.name.startswith("."))
        if not images:
            raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(path, class_dir.name) for path in images]
    return files

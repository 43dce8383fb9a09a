"""The one dataset interface shared by every source (NIH, folder-per-class, phantoms, ...).

A dataset is a metadata table with one row per image, a label matrix aligned with it, and the
list of findings that names the label columns. Labels are 1 (present), 0 (absent) or NaN (the
source says nothing about that finding), so sources with different label spaces can be merged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

# The 14 findings of ChestX-ray14 in the official order; "No Finding" is all zeros.
FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
META_COLUMNS: tuple[str, ...] = ("id", "patient", "split", "source", "path")

# Reads one image for a metadata row; returns uint8 [H, W].
ImageLoader = Callable[[pd.Series], np.ndarray]


class DataError(ValueError):
    """Bad input data. The message names the file (and the row, where there is one)."""


def fail_at_line(path: Path, line: int, message: str) -> NoReturn:
    """Raise the DataError of a bad line of a table file (lines count from 1, the header's)."""
    raise DataError(f"{path}, line {int(line)}: {message}")


def check_whole(name: str, value: object, least: int) -> int:
    """`value` as an int if it is a whole number >= `least`, else a ValueError naming `name`.
    Options are checked before any work, so that a bad one leaves nothing behind."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")
    return int(value)


def data_root(root: str | Path) -> Path:
    """A data set root made absolute, without `.`, `..` or symbolic links. Readers build every
    image's path from it, and a cache request compares those paths (`cxr_lib.data.cache`):
    the same files must be the same request however the root was spelt."""
    return Path(root).resolve()


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to 8-bit grayscale, uint8 [H, W].

    Real releases mix modes: NIH ships a few RGBA PNGs among 8-bit grayscale ones, other sets
    ship RGB or 16-bit files. RGBA/LA drop alpha, RGB is converted by luminance. 16-bit images
    are scaled by their bit depth, 0..65535 onto 0..255 (round(v * 255 / 65535)), never by
    their own range: a per-image stretch gives one film other contrasts in other files. 32-bit
    integer images (mode "I", which is how Pillow may hold 16-bit data) are read the same way
    when every value lies in 0..65535, and refused otherwise; 32-bit float images carry no
    scale at all and are refused: convert such files to 8 or 16 bit first.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_gray_u8(img, path)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: cannot decode image ({err})") from err


def _to_gray_u8(img: Image.Image, path: Path) -> np.ndarray:
    if img.mode == "F":
        raise DataError(f"{path}: 32-bit float pixels have no bit depth to scale them to 8 bit "
                        "by; save the image as 8- or 16-bit")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.int64)  # [H, W]
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:  # only mode "I" holds such values
            raise DataError(f"{path}: 32-bit integer pixels {lo}..{hi} lie outside the 16-bit "
                            "range 0..65535; save the image as 8- or 16-bit")
        return ((arr + 128) // 257).astype(np.uint8)  # round(v * 255 / 65535), exact: no ties
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGB" if img.mode == "RGBA" else "L")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def read_image_row(row: pd.Series) -> np.ndarray:
    """ImageLoader for sources whose rows carry a file `path`."""
    return read_image(row["path"])


@dataclass
class XrayDataset:
    """Images of one or more sources: `meta` and `labels` are aligned row by row.

    meta columns: id (unique), patient, split (train/val/test), source, path ("" when the
    image is not a file, e.g. a phantom), plus any source-specific columns.
    labels: float32 [N, F] over `findings`; 1, 0 or NaN.
    loaders: how to read an image of each `source`.
    """

    name: str
    findings: list[str]
    labels: np.ndarray
    meta: pd.DataFrame
    loaders: dict[str, ImageLoader] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.float32)
        missing = [c for c in META_COLUMNS if c not in self.meta.columns]
        if missing:
            raise DataError(f"{self.name}: metadata lacks columns {missing}")
        if self.labels.shape != (len(self.meta), len(self.findings)):
            raise DataError(
                f"{self.name}: labels {self.labels.shape} do not match "
                f"{len(self.meta)} rows x {len(self.findings)} findings"
            )
        dup = self.meta["id"][self.meta["id"].duplicated()]
        if len(dup):
            raise DataError(f"{self.name}: duplicate image ids, e.g. {dup.iloc[0]!r}")
        self.meta = self.meta.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.meta)

    def load_image(self, i: int) -> np.ndarray:
        """uint8 [H, W] image of row i."""
        row = self.meta.iloc[i]
        return self.loaders[row["source"]](row)

    def select(self, rows: np.ndarray | Sequence[int] | pd.Series) -> XrayDataset:
        """A subset by boolean mask or integer positions."""
        rows = np.asarray(rows)
        idx = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(int)
        if len(idx) == 0:
            raise DataError(f"{self.name}: the selection is empty")
        return XrayDataset(
            self.name, list(self.findings), self.labels[idx], self.meta.iloc[idx], self.loaders
        )

    def split(self, name: str) -> XrayDataset:
        return self.select(self.meta["split"].to_numpy() == name)

    def relabel(self, findings: Sequence[str]) -> XrayDataset:
        """Align to another label space: shared findings are kept, new ones are NaN."""
        out = np.full((len(self), len(findings)), np.nan, dtype=np.float32)
        for j, f in enumerate(findings):
            if f in self.findings:
                out[:, j] = self.labels[:, self.findings.index(f)]
        return XrayDataset(self.name, list(findings), out, self.meta, self.loaders)

    def check_patient_disjoint(self) -> None:
        """Raise DataError if any patient appears in two splits."""
        check_patient_disjoint(self.meta, self.name)


def check_patient_disjoint(meta: pd.DataFrame, name: str = "dataset") -> None:
    """Patients are identified within their source: two sources may reuse an id."""
    per_patient = meta.groupby(["source", "patient"])["split"].nunique()
    leaking = per_patient[per_patient > 1]
    if len(leaking):
        source, p = leaking.index[0]
        rows = (meta["source"] == source) & (meta["patient"] == p)
        splits = sorted(meta.loc[rows, "split"].unique())
        raise DataError(
            f"{name}: {len(leaking)} patient(s) appear in more than one split, "
            f"e.g. patient {p!r} of {source!r} in {splits}"
        )


def merge(datasets: Sequence[XrayDataset], findings: Sequence[str] | None = None,
          name: str = "merged") -> XrayDataset:
    """Concatenate sources into one dataset over `findings` (default: the union, in order)."""
    if not datasets:
        raise DataError("merge: no datasets given")
    if findings is None:
        findings = []
        for ds in datasets:
            findings += [f for f in ds.findings if f not in findings]
    parts = [ds.relabel(findings) for ds in datasets]
    loaders: dict[str, ImageLoader] = {}
    for ds in parts:
        loaders.update(ds.loaders)
    meta = pd.concat([ds.meta for ds in parts], ignore_index=True)
    labels = np.concatenate([ds.labels for ds in parts])
    return XrayDataset(name, list(findings), labels, meta, loaders)

"""CheXpert (Irvin et al., "CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels
and Expert Comparison", AAAI 2019) read from its release layout, shared by `CheXpert-v1.0` and
`CheXpert-v1.0-small`:

    root/train.csv          (required)  root/valid.csv   (optional: the official validation set)
    root/train/patient00001/study1/view1_frontal.jpg ...   root/valid/...

The CSVs' `Path` column is relative to the folder *above* the release folder
(`CheXpert-v1.0-small/train/patient00001/...`); users often rename that folder, so a file at
`root/<Path without its first component>` is accepted too.

Labels come from an automatic report labeller: 1.0 positive, 0.0 negative, -1.0 uncertain,
blank when the report does not mention the observation. Blank reads as 0 (the standard reading:
nothing was found to mention); uncertain follows the paper's policies U-Ignore (NaN, so losses
and metrics skip it), U-Ones (1) or U-Zeros (0). Findings are the 13 observations other than
"No Finding", spelled as in ChestX-ray14 where they mean the same thing ("Pleural Effusion" is
"Effusion"), so merging with NIH puts both sources' labels in one column.

The official validation set (radiologist-labelled, 200 studies) is what papers report on, so it
is the test split here; train/val are drawn by patient from train.csv. A partial download is
normal (an interrupted unzip, only valid/ unpacked): the data set holds the images on disk, and
`dataset.meta.attrs[name]` records how many of the listed ones that is.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_lib.data.core import (
    META_COLUMNS,
    DataError,
    XrayDataset,
    check_patient_disjoint,
    data_root,
    fail_at_line,
    read_image_row,
)
from cxr_lib.data.splits import patient_split

DOWNLOAD_PAGE = "https://stanfordmlgroup.github.io/competitions/chexpert/"
TRAIN_CSV, VALID_CSV = "train.csv", "valid.csv"
# CheXpert observation column -> finding name (ChestX-ray14's spelling where it is the same).
OBSERVATIONS: dict[str, str] = {
    "Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum",
    "Cardiomegaly": "Cardiomegaly",
    "Lung Opacity": "Lung Opacity",
    "Lung Lesion": "Lung Lesion",
    "Edema": "Edema",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "Atelectasis": "Atelectasis",
    "Pneumothorax": "Pneumothorax",
    "Pleural Effusion": "Effusion",
    "Pleural Other": "Pleural Other",
    "Fracture": "Fracture",
    "Support Devices": "Support Devices",
}
FINDINGS: tuple[str, ...] = tuple(OBSERVATIONS.values())
# What an uncertain (-1.0) label becomes under each policy of the paper.
UNCERTAIN: dict[str, float] = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}
_META_FIELDS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
# <release>/<rest>, rest = [<split>/...]patientNNNNN/studyN/<image>.
_PATH = r"^([^/]+)/((?:[^/]+/)*?(patient\d+)/(study\d+)/[^/]+)$"

_LOG = logging.getLogger(__name__)


def read_chexpert(root: str | Path, *, val_fraction: float = 0.1, seed: int = 0,
                  uncertain: str = "ignore", frontal_only: bool = True,
                  name: str = "chexpert") -> XrayDataset:
    """The CheXpert images present under `root` as an XrayDataset over FINDINGS.

    `uncertain`: "ignore" (NaN), "ones" or "zeros". `frontal_only` keeps frontal views (most
    work, and every ChestX-ray14 image, is frontal). Source and dataset name are `name`.
    meta extras: sex, age (years), view (AP/PA, "" for laterals), frontal_lateral, study
    ("patientNNNNN/studyN", unique across patients). attrs[name]: {"train_csv", "valid_csv",
    "listed", "present", "train_val", "test"} (image counts after the frontal filter).
    """
    if root is None:
        raise DataError(f"{name}: no data root given; download CheXpert from {DOWNLOAD_PAGE}")
    if uncertain not in UNCERTAIN:
        raise ValueError(f"uncertain must be one of {list(UNCERTAIN)}, got {uncertain!r}")
    root = data_root(root)  # also makes root.parent the folder above for "."
    train_csv, valid_csv = root / TRAIN_CSV, root / VALID_CSV
    if not train_csv.is_file():
        raise DataError(f"{train_csv}: file not found; `root` must be the CheXpert release "
                        f"folder (CheXpert-v1.0 or CheXpert-v1.0-small) from {DOWNLOAD_PAGE}")
    csvs = [train_csv, *([valid_csv] if valid_csv.is_file() else [])]
    parts = [read_chexpert_csv(path, uncertain) for path in csvs]
    if len(parts) == 2:
        _check_csvs_disjoint(parts[0][0], parts[1][0], train_csv, valid_csv)
    splits = ("train", "test")[:len(parts)]  # valid.csv is the test split
    meta = pd.concat([m.assign(split=s) for (m, _), s in zip(parts, splits, strict=True)],
                     ignore_index=True)
    labels = np.concatenate([lab for _, lab in parts])  # [N, 13]
    if frontal_only:
        keep = (meta["frontal_lateral"] == "Frontal").to_numpy()
        meta, labels = meta[keep].reset_index(drop=True), labels[keep]
    if meta.empty:
        raise DataError(f"{train_csv}: no {'frontal ' if frontal_only else ''}images listed")
    paths = locate_images(meta["release"], meta["rest"], root)  # [N], "" when absent
    present = paths != ""
    if not present.any():
        raise DataError(_nothing_found(meta, root, train_csv))
    meta, labels = meta[present].reset_index(drop=True), labels[present]
    meta["path"] = paths[present].astype(str)
    return _dataset(meta, labels, name, val_fraction, seed, csvs, listed=len(present))


def _dataset(meta: pd.DataFrame, labels: np.ndarray, name: str, val_fraction: float, seed: int,
             csvs: list[Path], listed: int) -> XrayDataset:
    """Draw train/val by patient, add the common columns and the inventory."""
    pool = (meta["split"] == "train").to_numpy()
    meta.loc[pool, "split"] = patient_split(meta["patient"][pool], val_fraction, seed)
    meta["id"] = name + "/" + meta["rest"]
    meta["source"] = name
    check_patient_disjoint(meta, name)
    meta = meta[[*META_COLUMNS, "sex", "age", "view", "frontal_lateral", "study"]]
    meta.attrs[name] = {
        "train_csv": str(csvs[0]),
        "valid_csv": str(csvs[1]) if len(csvs) > 1 else "",
        "listed": listed,
        "present": len(meta),
        "train_val": int((meta["split"] != "test").sum()),
        "test": int((meta["split"] == "test").sum()),
    }
    _LOG.info("%s: %d of %d listed images present (%d train/val, %d test)", name,
              len(meta), listed, meta.attrs[name]["train_val"], meta.attrs[name]["test"])
    return XrayDataset(name, list(FINDINGS), labels, meta, {name: read_image_row})


def read_chexpert_csv(path: str | Path, uncertain: str = "ignore"
                      ) -> tuple[pd.DataFrame, np.ndarray]:
    """Parse train.csv or valid.csv into (meta, labels).

    meta: release (the Path's first component), rest (the Path below it), patient, study, sex,
    age, view, frontal_lateral, line (1-based line in the file). labels: float32 [N, 13] over
    FINDINGS under the `uncertain` policy, blank read as 0. Raises DataError naming the file
    and line for missing columns, short or long rows, bad label cells, ages, views or Paths,
    and Paths listed twice.
    """
    path = Path(path)
    raw = _read_rows(path)
    parts = raw["Path"].str.extract(_PATH)
    _fail_where(path, raw, parts[0].isna(), lambda v: f"Path {v!r} is not "
                "<release>/<split>/patientNNNNN/studyN/<image>", raw["Path"])
    dup = parts[1].duplicated()
    _fail_where(path, raw, dup, lambda v: f"Path {v!r} is listed twice", raw["Path"])
    side = raw["Frontal/Lateral"]
    _fail_where(path, raw, ~side.isin(["Frontal", "Lateral"]),
                lambda v: f"Frontal/Lateral {v!r} is not Frontal or Lateral", side)
    meta = pd.DataFrame({
        "release": parts[0],
        "rest": parts[1],
        "patient": parts[2],
        "study": parts[2] + "/" + parts[3],
        "sex": raw["Sex"],
        "age": _ages(raw, path),
        "view": raw["AP/PA"],
        "frontal_lateral": side,
        "line": raw["line"],
    })
    return meta, _labels(raw, path, UNCERTAIN[uncertain])


def _read_rows(path: Path) -> pd.DataFrame:
    """Every field as stripped text, plus `line`; blank lines skipped. The csv module rather
    than pandas, because pandas pads a short (truncated) row with blanks, which would read as
    "not mentioned" labels instead of an error."""
    rows, lines = [], []
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = [h.strip() for h in next(reader, [])]
            for fields in reader:
                if len(fields) != len(header):
                    if len(fields) <= 1 and not "".join(fields).strip():
                        continue  # a blank line
                    fail_at_line(path, reader.line_num,
                                 f"{len(fields)} fields where the header has {len(header)}")
                rows.append(fields)
                lines.append(reader.line_num)
    except (csv.Error, UnicodeDecodeError, OSError) as err:
        raise DataError(f"{path}: cannot read as CSV ({err})") from err
    missing = [c for c in (*_META_FIELDS, *OBSERVATIONS) if c not in header]
    if missing:
        raise DataError(f"{path}: not a CheXpert CSV, it lacks the columns {missing}")
    raw = pd.DataFrame(rows, columns=header, dtype=str)[[*_META_FIELDS, *OBSERVATIONS]]
    raw = raw.apply(lambda cells: cells.str.strip())
    raw["line"] = lines
    return raw


def _fail_where(path: Path, raw: pd.DataFrame, bad: pd.Series | np.ndarray,
                message: Callable[[str], str], values: pd.Series) -> None:
    """Fail on the first row where `bad` holds, describing its value with `message(value)`."""
    if bad.any():
        fail_at_line(path, raw["line"][bad].iloc[0], message(values[bad].iloc[0]))


def _ages(raw: pd.DataFrame, path: Path) -> pd.Series:
    """Age in years, NaN where blank."""
    age = pd.to_numeric(raw["Age"], errors="coerce")
    _fail_where(path, raw, age.isna() & (raw["Age"] != ""),
                lambda v: f"Age {v!r} is not a number", raw["Age"])
    return age.astype(np.float64)


def _labels(raw: pd.DataFrame, path: Path, if_uncertain: float) -> np.ndarray:
    """float32 [N, 13]: 1/0 as given, blank 0, -1.0 as `if_uncertain`. Each column is parsed
    once per distinct cell text (a handful), not per row."""
    labels = np.zeros((len(raw), len(OBSERVATIONS)), dtype=np.float32)  # [N, 13]
    for j, col in enumerate(OBSERVATIONS):
        codes, texts = pd.factorize(raw[col])  # codes [N] into the distinct texts [U]
        numbers = pd.to_numeric(pd.Series(texts), errors="coerce")  # [U]
        bad = ((texts != "") & ~numbers.isin([1.0, 0.0, -1.0])).to_numpy()[codes]  # [N]
        _fail_where(path, raw, bad,
                    lambda v, col=col: f"{col} {v!r} is not 1.0, 0.0, -1.0 or blank", raw[col])
        labels[:, j] = numbers.fillna(0.0).where(numbers != -1.0, if_uncertain).to_numpy()[codes]
    return labels


def _check_csvs_disjoint(train: pd.DataFrame, valid: pd.DataFrame, train_csv: Path,
                         valid_csv: Path) -> None:
    """The official validation patients must not be in train.csv: they are the test split."""
    first_line = train.drop_duplicates("patient").set_index("patient")["line"]
    shared = valid["patient"].isin(first_line.index)
    if shared.any():
        patient = valid["patient"][shared].iloc[0]
        fail_at_line(valid_csv, valid["line"][shared].iloc[0],
                     f"patient {patient!r} is also in {train_csv} (line {first_line[patient]}); "
                     "the official validation patients must not be in train.csv")


def locate_images(release: pd.Series, rest: pd.Series, root: Path) -> np.ndarray:
    """File path of each row's image, "" where it is not on disk: `root.parent/release/rest`,
    else `root/rest` (a renamed release folder).

    Walks the top folders the Paths name (train/, valid/) once under each place instead of
    testing ~200k files one by one, so an absent folder costs nothing.
    """
    tops = sorted(rest.str.split("/", n=1).str[0].unique())
    everywhere = pd.Series(True, index=rest.index)
    places = [(root.parent / r, release == r) for r in release.unique()] + [(root, everywhere)]
    paths = np.full(len(rest), "", dtype=object)  # [N]
    walked: dict[Path, set[str]] = {}
    for base, rows in places:
        if base not in walked:
            walked[base] = _files_under(base, tops)
        files = walked[base]
        hit = rows.to_numpy() & (paths == "") & np.fromiter(
            (r in files for r in rest), dtype=bool, count=len(rest))
        paths[hit] = [os.path.join(base, r) for r in rest[hit]]
    return paths


def _files_under(base: Path, tops: list[str]) -> set[str]:
    """Paths, relative to `base` with "/" separators, of the files in base/<top> folders."""
    found: set[str] = set()
    skip = len(str(base)) + 1
    for top in tops:
        if not (base / top).is_dir():
            continue
        for folder, _, names in os.walk(base / top, followlinks=True):
            rel = folder[skip:].replace(os.sep, "/")
            found.update(f"{rel}/{n}" for n in names)
    return found


def _nothing_found(meta: pd.DataFrame, root: Path, train_csv: Path) -> str:
    example = meta.iloc[0]
    places = [root.parent / r for r in meta["release"].unique()]
    places += [root] if root not in places else []
    return (f"{train_csv}: none of the {len(meta)} listed images is on disk (e.g. "
            f"{example['release']}/{example['rest']}); looked under "
            f"{' and '.join(str(p) for p in places)}. Unpack the image archive so that the "
            f"Paths resolve against the folder above {root}, or into {root} itself.")

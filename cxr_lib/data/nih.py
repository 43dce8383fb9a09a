"""ChestX-ray14 (NIH) read from its official layout: label file, split lists, images, boxes.

The label file and split lists describe all 112,120 images while a user often has only some of
the twelve image archives, so the reader works on whatever subset is on disk and says how much
that is. Every check names the file and line, because a silently wrong label table would
corrupt every number downstream.

Layout (as downloaded from https://nihcc.app.box.com/v/ChestXray-NIHCC):

    root/Data_Entry_2017_v2020.csv   (or Data_Entry_2017.csv, either optionally .gz)
    root/train_val_list.txt, root/test_list.txt
    root/images/*.png                (or root/images_001/images/*.png ... images_012/images/)
    root/BBox_List_2017.csv          (optional, read by `read_bboxes`)

The validation split is drawn by patient from train_val unless `split_lists` gives three lists
(train, val, test) in Xiao et al.'s format, `data_splits/chestxray/*_official.txt` of their
code: one image a line, its name first, then its 14 labels (ignored here: the label file's
are used). Theirs hold 75,312, 11,212 and 25,596 images, the test list the official one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

from cxr_lib.data.core import (
    FINDINGS,
    META_COLUMNS,
    SPLITS,
    DataError,
    XrayDataset,
    check_patient_disjoint,
    data_root,
    fail_at_line,
    read_image_row,
)
from cxr_lib.data.splits import patient_split

SOURCE = "chestxray14"
DOWNLOAD_PAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
LABEL_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
NO_FINDING = "No Finding"

# The label file's columns. The bracketed headers "OriginalImage[Width,Height]" and
# "OriginalImagePixelSpacing[x,y]" are split at their commas by any CSV reader, hence the odd
# names. Some copies of v2020 say "Patient Sex"; the original file adds an empty column at the
# end of every line (a trailing comma).
_LABEL_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                  "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                  "OriginalImagePixelSpacing[x", "y]")
_BOX_COLUMNS = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
# The box file names one finding differently from the label file.
_BOX_ALIASES = {"Infiltrate": "Infiltration"}
# Age units seen in copies of the label file ("058Y", "006M", "365D"), in years.
_AGE_UNITS = {"": 1.0, "Y": 1.0, "M": 12.0, "D": 365.0}

_LOG = logging.getLogger(__name__)


def find_label_file(root: str | Path) -> Path:
    """The label file under `root`: the v2020 revision if present, else the original."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give the ChestX-ray14 folder, the one holding "
                        f"Data_Entry_2017_v2020.csv and images/ (download: {DOWNLOAD_PAGE})")
    candidates = [root / (name + gz) for name in LABEL_FILES for gz in ("", ".gz")]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(
        f"{root}: no ChestX-ray14 label file (looked for {', '.join(p.name for p in candidates)}); "
        f"download Data_Entry_2017_v2020.csv from {DOWNLOAD_PAGE}"
    )


def shipped_label_file() -> Path:
    """The full label file torchxrayvision ships, usable without downloading any image."""
    return _shipped("Data_Entry_2017_v2020.csv.gz")


def shipped_bbox_file() -> Path:
    """The bounding-box file torchxrayvision ships."""
    return _shipped("BBox_List_2017.csv.gz")


def _shipped(name: str) -> Path:
    # find_spec locates the package without importing it (importing pulls in torch and more).
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"torchxrayvision is not installed, so its {name} is not available")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise DataError(f"{path}: not shipped by the installed torchxrayvision")
    return path


def read_nih_labels(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Parse a ChestX-ray14 label file into (meta, labels).

    meta: one row per image with id, patient (8-digit string, as in the image name), age
    (years, float), sex (M/F), view, follow_up, orig_width, orig_height, spacing_x, spacing_y,
    finding_labels (the raw '|'-joined text).
    labels: float32 [N, 14] multi-hot over FINDINGS; "No Finding" is all zeros.
    Raises DataError naming the file and line for unknown findings, missing or non-numeric
    fields and duplicate image ids.
    """
    path = Path(path)
    raw = _label_columns(_read_table(path), path)
    _check_complete(raw, list(_LABEL_COLUMNS), path)
    meta = pd.DataFrame({
        "id": _text(raw["Image Index"]),
        "patient": _integers(raw, "Patient ID", path).astype(str).str.zfill(8),
        "age": _ages(raw, path),
        "sex": _sexes(raw, path),
        "view": _text(raw["View Position"]),
        "follow_up": _integers(raw, "Follow-up #", path),
        "orig_width": _integers(raw, "OriginalImage[Width", path),
        "orig_height": _integers(raw, "Height]", path),
        "spacing_x": _floats(raw, "OriginalImagePixelSpacing[x", path),
        "spacing_y": _floats(raw, "y]", path),
        "finding_labels": _text(raw["Finding Labels"]),
    })
    _check_unique_ids(meta["id"], raw["line"], path)
    return meta, _multi_hot(meta["finding_labels"], raw["line"], path)


def _text(values: pd.Series) -> pd.Series:
    return values.astype(str).str.strip()


def _read_table(path: Path) -> pd.DataFrame:
    """The table with pandas' own type inference ("" where a text field is missing) plus
    `line`, the 1-based line number in the file. Blank lines are dropped."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            raw = pd.read_csv(path, keep_default_na=False, skip_blank_lines=False,
                              index_col=False)
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: malformed CSV ({str(err).strip()})") from err
    except (pd.errors.EmptyDataError, UnicodeDecodeError, EOFError, OSError) as err:
        raise DataError(f"{path}: cannot read as CSV ({err})") from err
    if any("Length of header" in str(w.message) for w in caught):
        _fail_at_long_first_row(path, len(raw.columns))
    raw["line"] = np.arange(len(raw)) + 2  # line 1 is the header
    fields = raw.drop(columns="line")
    blank = _is_empty(fields.iloc[:, 0])
    if blank.any():
        blank[blank] = fields[blank].apply(_is_empty).all(axis=1)
    return raw[~blank].reset_index(drop=True)


def _fail_at_long_first_row(path: Path, width: int) -> NoReturn:
    """With index_col=False, pandas cuts the first data row to the header's width and only
    warns (a longer row further down is a ParserError): that row is malformed too."""
    first = pd.read_csv(path, header=None, skiprows=1, nrows=1, dtype=str,
                        keep_default_na=False).iloc[0]
    fail_at_line(path, 2, f"unexpected extra field {first.iloc[width]!r}")


def _is_empty(values: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(values):
        return values.isna()
    return _text(values) == ""


def _label_columns(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The label file's columns (and `line`); tolerates empty unnamed trailing columns."""
    raw = raw.rename(columns=lambda c: c.strip()).rename(columns={"Patient Sex": "Patient Gender"})
    missing = [c for c in _LABEL_COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(f"{path}: not a ChestX-ray14 label file, it lacks the columns {missing}")
    _check_unnamed_empty(raw, path)
    return raw[[*_LABEL_COLUMNS, "line"]]


def _check_unnamed_empty(raw: pd.DataFrame, path: Path) -> None:
    """Trailing unnamed columns come from trailing commas; a value there is a misplaced field."""
    for col in [c for c in raw.columns if c.startswith("Unnamed:")]:
        filled = ~_is_empty(raw[col])
        if filled.any():
            value = raw[col][filled].iloc[0]
            fail_at_line(path, raw["line"][filled].iloc[0], f"unexpected extra field {value!r}")


def _check_complete(raw: pd.DataFrame, columns: list[str], path: Path) -> None:
    empty = raw[columns].apply(_is_empty)
    rows = empty.any(axis=1)
    if rows.any():
        i = int(np.flatnonzero(rows.to_numpy())[0])
        names = [c for c in columns if empty[c].iloc[i]]
        fail_at_line(path, raw["line"].iloc[i], f"missing field(s) {names}")


def _numbers(raw: pd.DataFrame, col: str, path: Path, integer: bool) -> pd.Series:
    values = raw[col]
    if not pd.api.types.is_numeric_dtype(values):  # pandas met a non-number: find it
        values = pd.to_numeric(_text(values), errors="coerce")
    bad = values.isna() | (integer & (values != values.round()))
    if bad.any():
        kind = "an integer" if integer else "a number"
        value = raw[col][bad].tolist()[0]  # a Python value: its repr has no numpy type name
        fail_at_line(path, raw["line"][bad].iloc[0], f"{col} {value!r} is not {kind}")
    return values.astype(np.int64 if integer else np.float64)


def _integers(raw: pd.DataFrame, col: str, path: Path) -> pd.Series:
    return _numbers(raw, col, path, integer=True)


def _floats(raw: pd.DataFrame, col: str, path: Path) -> pd.Series:
    return _numbers(raw, col, path, integer=False)


def _ages(raw: pd.DataFrame, path: Path) -> pd.Series:
    """Age in years; plain numbers or the '058Y' / '006M' / '365D' form of older copies."""
    age = raw["Patient Age"]
    if pd.api.types.is_numeric_dtype(age):
        return _floats(raw, "Patient Age", path)
    parts = _text(age).str.extract(r"^(\d+)([YMD]?)$")
    bad = parts[0].isna()
    if bad.any():
        fail_at_line(path, raw["line"][bad].iloc[0],
                     f"Patient Age {age[bad].tolist()[0]!r} is not a number")
    return parts[0].astype(np.float64) / parts[1].map(_AGE_UNITS).astype(np.float64)


def _sexes(raw: pd.DataFrame, path: Path) -> pd.Series:
    sex = _text(raw["Patient Gender"])
    bad = ~sex.isin(["M", "F"])
    if bad.any():
        fail_at_line(path, raw["line"][bad].iloc[0],
                     f"Patient Gender {sex[bad].tolist()[0]!r} is not M or F")
    return sex


def _check_unique_ids(ids: pd.Series, lines: pd.Series, path: Path) -> None:
    dup = ids.duplicated(keep=False)
    if dup.any():
        first = ids[dup].iloc[0]
        where = lines[ids == first].tolist()
        fail_at_line(path, where[-1], f"duplicate image id {first!r} (also on line {where[0]})")


def _multi_hot(finding_labels: pd.Series, lines: pd.Series, path: Path) -> np.ndarray:
    """float32 [N, 14] from '|'-joined finding names (parsed once per distinct combination:
    112,120 rows hold under a thousand)."""
    codes, combos = pd.factorize(finding_labels)
    table = np.zeros((len(combos), len(FINDINGS)), dtype=np.float32)  # [C, 14]
    for c, combo in enumerate(combos):
        try:
            table[c, _finding_indices(combo)] = 1.0
        except ValueError as err:
            fail_at_line(path, lines.iloc[int(np.argmax(codes == c))], str(err))
    return table[codes]  # [N, 14]


def _finding_indices(combo: str) -> list[int]:
    """Columns of FINDINGS named by one '|'-joined combination; [] for "No Finding"."""
    names = [name.strip() for name in combo.split("|")]
    if names == [NO_FINDING]:
        return []
    unknown = [name for name in names if name not in FINDINGS]
    if unknown:
        raise ValueError(f"unknown finding {unknown[0]!r}; expected {NO_FINDING!r} alone or "
                         f"some of {list(FINDINGS)}")
    return [FINDINGS.index(name) for name in names]


def read_split_lists(root: str | Path, ids: Iterable[str] | None = None
                     ) -> tuple[set[str], set[str]]:
    """The official (train_val, test) image names from root's two list files.

    Every name must be in the label file (`ids`; read from root's label file when not given),
    listed once, and in only one of the lists.
    """
    root = Path(root)
    if ids is None:
        ids = read_nih_labels(find_label_file(root))[0]["id"]
    known = set(ids.tolist() if isinstance(ids, pd.Series) else ids)
    train_val = _read_list(root / "train_val_list.txt", known)
    test = _read_list(root / "test_list.txt", known)
    both = train_val & test
    if both:
        raise DataError(f"{root}: {len(both)} image(s) are in both train_val_list.txt and "
                        f"test_list.txt, e.g. {min(both)!r}")
    return train_val, test


def _read_list(path: Path, known: set[str]) -> set[str]:
    if not path.is_file():
        raise DataError(f"{path}: official split list not found; it comes with the label file "
                        f"from {DOWNLOAD_PAGE}")
    names: set[str] = set()
    for line, name in _listed(path, known):
        if name in names:
            fail_at_line(path, line, f"{name!r} is listed twice")
        names.add(name)
    return names


def _listed(path: Path, known: set[str]) -> Iterator[tuple[int, str]]:
    """(line number, image name) of each non-empty line of a split list: its first field (the
    official lists hold only the name; Xiao et al.'s add the labels), which must be in the
    label file (`known`)."""
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = text.split()
        if not fields:
            continue
        if fields[0] not in known:
            fail_at_line(path, line, f"{fields[0]!r} is not in the label file")
        yield line, fields[0]


def read_named_splits(paths: Sequence[str | Path], known: set[str]) -> dict[str, str]:
    """Image name -> "train", "val" or "test" from three lists in that order (Xiao et al.'s
    format: a name, then anything, per line); a name must be in the label file (`known`) and
    listed once over the three."""
    if len(paths) != len(SPLITS):
        raise DataError(f"split lists: expected {len(SPLITS)} files (train, val, test), got "
                        f"{len(paths)}")
    named: dict[str, str] = {}
    for split, path in zip(SPLITS, map(Path, paths), strict=True):
        if not path.is_file():
            raise DataError(f"{path}: {split} split list not found")
        for line, name in _listed(path, known):
            if name in named:
                fail_at_line(path, line, f"{name!r} is already in the {named[name]} list")
            named[name] = split
    return named


def image_dirs(root: str | Path) -> list[Path]:
    """The image folders present: root/images and the archive folders images_NNN/images."""
    root = Path(root)
    dirs = [root / "images", *sorted(root.glob("images_[0-9][0-9][0-9]/images"))]
    return [d for d in dirs if d.is_dir()]


def _find_images(root: Path) -> dict[str, str]:
    """Image name -> file path for every PNG in the image folders (112,120 names: scandir and
    plain strings, since a Path per file costs seconds)."""
    found: dict[str, str] = {}
    for folder in image_dirs(root):
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.endswith(".png"):
                    continue
                if entry.name in found:
                    raise DataError(f"{entry.path}: image also present as {found[entry.name]}")
                found[entry.name] = entry.path
    if not found:
        raise DataError(
            f"{root}: no ChestX-ray14 images found in {root / 'images'} or in "
            f"{root / 'images_001' / 'images'} ... images_012/images. Download the image "
            f"archives images_001.tar.gz ... images_012.tar.gz from {DOWNLOAD_PAGE} and unpack "
            f"them into {root} (any subset works)."
        )
    return found


def read_chestxray14(root: str | Path, *, val_fraction: float = 0.1, seed: int = 0,
                     split_lists: Sequence[str | Path] | None = None) -> XrayDataset:
    """ChestX-ray14 images present under `root`, with official test split and a patient-level
    validation split drawn from train_val, or the splits of `split_lists` (train, val, test
    files in Xiao et al.'s format; every image on disk must be in one of them).

    A partial download is normal: the dataset holds the images on disk, and
    `dataset.meta.attrs["chestxray14"]` records, as read, {"label_file", "image_dirs",
    "listed", "present", "train_val", "test"} (counts of images); the same is logged at INFO.
    """
    if root is None:
        raise DataError(f"chestxray14: no data root given; download the data set from "
                        f"{DOWNLOAD_PAGE}")
    root = data_root(root)
    label_file = find_label_file(root)
    meta, labels = read_nih_labels(label_file)
    ids = meta["id"].tolist()
    named = None if split_lists is None else read_named_splits(split_lists, set(ids))
    train_val, test = read_split_lists(root, ids) if named is None else (set(), set())
    files = _find_images(root)
    unknown = sorted(set(files).difference(ids))
    if unknown:
        raise DataError(f"{files[unknown[0]]}: image not in the label file {label_file} "
                        f"({len(unknown)} such image(s))")
    paths = np.array([files.get(i, "") for i in ids], dtype=object)  # [N], "" when absent
    present = paths != ""
    meta, labels = meta[present].reset_index(drop=True), labels[present]
    meta["split"] = (assign_splits(meta, train_val, test, val_fraction, seed, root)
                     if named is None else _named_splits(meta, named, split_lists))
    meta["source"] = SOURCE
    meta["path"] = paths[present].astype(str)
    check_patient_disjoint(meta, SOURCE)
    meta = meta[[*META_COLUMNS, *[c for c in meta.columns if c not in META_COLUMNS]]]
    meta.attrs[SOURCE] = _inventory(meta, label_file, root, listed=len(present))
    _LOG.info("chestxray14: %(present)d of %(listed)d listed images present "
              "(%(train_val)d train/val, %(test)d test)", meta.attrs[SOURCE])
    return XrayDataset(SOURCE, list(FINDINGS), labels, meta, {SOURCE: read_image_row})


def assign_splits(meta: pd.DataFrame, train_val: set[str], test: set[str],
                   val_fraction: float, seed: int, root: Path) -> np.ndarray:
    """test from the official list; train/val drawn by patient from the official train_val."""
    ids = meta["id"].tolist()
    in_test, in_train_val = _member(ids, test), _member(ids, train_val)
    unlisted = ~(in_test | in_train_val)
    if unlisted.any():
        raise DataError(f"{root}: image {meta['id'][unlisted].iloc[0]!r} is in neither "
                        f"train_val_list.txt nor test_list.txt")
    split = np.full(len(meta), "test", dtype=object)
    split[in_train_val] = patient_split(meta["patient"][in_train_val], val_fraction, seed)
    return split


def _named_splits(meta: pd.DataFrame, named: dict[str, str],
                  paths: Sequence[str | Path]) -> np.ndarray:
    """Each image's split from `read_named_splits`; an image on disk that no list names is an
    error naming the lists."""
    split = meta["id"].map(named)
    if split.isna().any():
        raise DataError(f"{', '.join(map(str, paths))}: image {meta['id'][split.isna()].iloc[0]!r}"
                        f" is in none of these split lists ({int(split.isna().sum())} such)")
    return split.to_numpy(dtype=object)


def _member(ids: list[str], names: set[str] | dict[str, str]) -> np.ndarray:
    """bool [N]: which ids are in `names` (hash look-ups; pandas' isin copies the whole set)."""
    return np.fromiter((i in names for i in ids), dtype=bool, count=len(ids))


def _inventory(meta: pd.DataFrame, label_file: Path, root: Path, listed: int) -> dict:
    return {
        "label_file": str(label_file),
        "image_dirs": [str(d) for d in image_dirs(root)],
        "listed": listed,
        "present": len(meta),
        "train_val": int((meta["split"] != "test").sum()),
        "test": int((meta["split"] == "test").sum()),
    }


def read_bboxes(path: str | Path) -> pd.DataFrame:
    """The official bounding boxes: columns id, finding (FINDINGS spelling), x, y, w, h
    (pixels of the 1024x1024 image). Unknown finding names and bad numbers raise DataError."""
    path = Path(path)
    raw = _read_table(path).rename(columns=lambda c: c.strip())
    if tuple(raw.columns[: len(_BOX_COLUMNS)]) != _BOX_COLUMNS:
        raise DataError(f"{path}: not a ChestX-ray14 box file, expected the columns "
                        f"{list(_BOX_COLUMNS)}, found {list(raw.columns[:-1])}")
    _check_unnamed_empty(raw, path)
    raw = raw[[*_BOX_COLUMNS, "line"]].set_axis(["id", "finding", "x", "y", "w", "h", "line"],
                                                 axis=1)
    _check_complete(raw, ["id", "finding", "x", "y", "w", "h"], path)
    finding = _text(raw["finding"]).replace(_BOX_ALIASES)
    unknown = ~finding.isin(FINDINGS)
    if unknown.any():
        fail_at_line(path, raw["line"][unknown].iloc[0],
                     f"unknown box finding {finding[unknown].iloc[0]!r}; expected one of "
                     f"{list(FINDINGS)}")
    boxes = pd.DataFrame({"id": _text(raw["id"]), "finding": finding})
    for col in ("x", "y", "w", "h"):
        boxes[col] = _floats(raw, col, path)
    return boxes

"""CheXpert reader: label policies, frontal filter, Path resolution, partial downloads, splits,
bad input, merging with the COVID-19 and phantom sources, and `cxr data prepare`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_lib.cli import main
from cxr_lib.data import open_source
from cxr_lib.data.cache import open_cache
from cxr_lib.data.chexpert import FINDINGS, OBSERVATIONS, read_chexpert, read_chexpert_csv
from cxr_lib.data.core import FINDINGS as NIH_FINDINGS
from cxr_lib.data.core import DataError, merge
from cxr_lib.data.covid import read_covid_radiography
from cxr_lib.data.phantoms import phantom_dataset

RELEASE = "CheXpert-v1.0-small"
HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", *OBSERVATIONS]


def row(patient: int, study: int = 1, view: int = 1, *, frontal: bool = True,
        labels: dict[str, str] | None = None, split: str = "train", age: str = "63",
        release: str = RELEASE) -> list[str]:
    """One CSV row; label cells blank unless given."""
    image = f"view{view}_{'frontal' if frontal else 'lateral'}.jpg"
    cells = {c: "" for c in OBSERVATIONS} | (labels or {})
    return [f"{release}/{split}/patient{patient:05d}/study{study}/{image}", "Female", age,
            "Frontal" if frontal else "Lateral", "AP" if frontal else "", "", *cells.values()]


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(",".join(r) + "\n" for r in [header, *rows]))


def write_jpeg(path: Path, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 9), value, dtype=np.uint8)).save(path)


def write_images(base: Path, rows: list[list[str]]) -> None:
    """Each row's image at base/<Path without its first component>."""
    for r in rows:
        write_jpeg(base / r[0].split("/", 1)[1])


def make_release(tmp_path: Path, train: list[list[str]], valid: list[list[str]] | None = None,
                 folder: str = RELEASE, images: bool = True) -> Path:
    root = tmp_path / folder
    write_csv(root / "train.csv", train)
    if valid is not None:
        write_csv(root / "valid.csv", valid)
    if images:
        write_images(root, train + (valid or []))
    return root


def label(ds, row_id: str, finding: str) -> float:
    i = ds.meta.index[ds.meta["id"] == row_id][0]
    return float(ds.labels[i, ds.findings.index(finding)])


# --- labels -----------------------------------------------------------------------------------

LABELLED = [row(1, labels={"Pleural Effusion": "1.0", "Cardiomegaly": "-1.0", "Pneumonia": "0.0",
                           "Support Devices": "1"}),
            row(2, labels={"Edema": "-1", "Pleural Effusion": "0.0"})]
FIRST = "chexpert/train/patient00001/study1/view1_frontal.jpg"


def test_findings_are_the_13_observations_with_nih_spellings(tmp_path):
    ds = read_chexpert(make_release(tmp_path, LABELLED))
    assert ds.findings == list(FINDINGS) and len(FINDINGS) == 13
    assert "Effusion" in ds.findings and "Pleural Effusion" not in ds.findings
    assert "No Finding" not in ds.findings
    shared = {"Cardiomegaly", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
              "Pneumothorax", "Effusion"}
    assert shared == set(FINDINGS) & set(NIH_FINDINGS)
    assert ds.labels.dtype == np.float32 and ds.labels.shape == (2, 13)


@pytest.mark.parametrize("policy, uncertain", [("ignore", np.nan), ("ones", 1.0), ("zeros", 0.0)])
def test_label_policies(tmp_path, policy, uncertain):
    ds = read_chexpert(make_release(tmp_path, LABELLED), uncertain=policy)
    assert label(ds, FIRST, "Effusion") == 1.0  # "Pleural Effusion" 1.0
    assert label(ds, FIRST, "Support Devices") == 1.0  # "1" as well as "1.0"
    assert label(ds, FIRST, "Pneumonia") == 0.0
    assert label(ds, FIRST, "Edema") == 0.0  # blank: not mentioned
    np.testing.assert_equal(label(ds, FIRST, "Cardiomegaly"), uncertain)
    second = FIRST.replace("patient00001", "patient00002")
    np.testing.assert_equal(label(ds, second, "Edema"), uncertain)
    # Every other cell of the two rows is blank or 0.0, so 0.
    assert np.nansum(ds.labels) == 2.0 + 2 * (uncertain == 1.0)
    assert np.isnan(ds.labels).sum() == 2 * (policy == "ignore")


def test_unknown_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="uncertain must be one of"):
        read_chexpert(make_release(tmp_path, LABELLED), uncertain="maybe")


def test_meta_extras(tmp_path):
    ds = read_chexpert(make_release(tmp_path, [row(1, 2, age="41"), row(7, age="")]))
    first = ds.meta.iloc[0]
    assert first["id"] == "chexpert/train/patient00001/study2/view1_frontal.jpg"
    assert (first["patient"], first["study"], first["sex"], first["age"], first["view"]) == (
        "patient00001", "patient00001/study2", "Female", 41.0, "AP")
    assert np.isnan(ds.meta["age"].iloc[1])  # a blank age is unknown, not an error
    assert set(ds.meta["source"]) == {"chexpert"}
    assert ds.load_image(0).shape == (6, 9)


# --- views and files --------------------------------------------------------------------------

def test_frontal_filter(tmp_path):
    root = make_release(tmp_path, [row(1, view=1), row(1, view=2, frontal=False)])
    frontal = read_chexpert(root)
    assert len(frontal) == 1 and set(frontal.meta["frontal_lateral"]) == {"Frontal"}
    both = read_chexpert(root, frontal_only=False)
    assert len(both) == 2
    lateral = both.meta[both.meta["frontal_lateral"] == "Lateral"].iloc[0]
    assert lateral["id"].endswith("view2_lateral.jpg") and lateral["view"] == ""


def test_path_resolves_against_the_folder_above_the_release(tmp_path):
    rows = [row(1), row(2)]
    root = make_release(tmp_path, rows, folder="labels_only", images=False)
    write_images(tmp_path / RELEASE, rows)  # tmp_path is root.parent; Path starts with RELEASE
    ds = read_chexpert(root)
    assert len(ds) == 2
    assert ds.meta["path"].iloc[0] == str(tmp_path / RELEASE / "train/patient00001/study1/"
                                         "view1_frontal.jpg")
    assert ds.meta["id"].iloc[0] == FIRST  # ids do not depend on where the files are


def test_path_resolves_inside_a_renamed_release_folder(tmp_path):
    root = make_release(tmp_path, [row(1), row(2)], folder="my_chexpert")
    ds = read_chexpert(root)
    assert len(ds) == 2 and ds.meta["id"].iloc[0] == FIRST
    assert ds.meta["path"].iloc[0] == str(root / "train/patient00001/study1/view1_frontal.jpg")


def test_partial_download_keeps_the_images_present(tmp_path):
    train = [row(p) for p in range(1, 5)]
    valid = [row(p, split="valid") for p in range(90, 92)]
    root = make_release(tmp_path, train, valid, images=False)
    write_images(root, train[:3])  # one train image missing, valid/ not unpacked at all
    ds = read_chexpert(root)
    assert len(ds) == 3 and "patient00004" not in set(ds.meta["patient"])
    assert set(ds.meta["split"]) <= {"train", "val"}
    inventory = ds.meta.attrs["chexpert"]
    assert (inventory["listed"], inventory["present"], inventory["test"]) == (6, 3, 0)


def test_no_image_present_says_where_it_looked(tmp_path):
    root = make_release(tmp_path, [row(1), row(2)], folder="renamed", images=False)
    with pytest.raises(DataError, match=r"none of the 2 listed images is on disk.*looked under "
                       rf".*{RELEASE} and .*renamed"):
        read_chexpert(root)


# --- splits -----------------------------------------------------------------------------------

def test_splits_are_patient_disjoint_and_valid_csv_is_test(tmp_path):
    train = [row(p, s) for p in range(1, 31) for s in (1, 2)]
    valid = [row(p, split="valid") for p in range(64541, 64544)]
    root = make_release(tmp_path, train, valid)
    ds = read_chexpert(root, val_fraction=0.2, seed=3)
    ds.check_patient_disjoint()
    assert ds.meta.groupby("patient")["split"].nunique().max() == 1
    per_split = ds.meta.groupby("split")["patient"].nunique().to_dict()
    assert per_split == {"train": 24, "val": 6, "test": 3}
    test = ds.split("test").meta
    assert test["id"].str.startswith("chexpert/valid/").all()
    again = read_chexpert(root, val_fraction=0.2, seed=3)
    assert again.meta["split"].tolist() == ds.meta["split"].tolist()
    other = read_chexpert(root, val_fraction=0.2, seed=4)
    assert other.meta["split"].tolist() != ds.meta["split"].tolist()


def test_a_patient_in_both_csvs_is_an_error(tmp_path):
    root = make_release(tmp_path, [row(1), row(2)], [row(5, split="valid"), row(2, split="valid")])
    with pytest.raises(DataError, match=r"valid\.csv, line 3: patient 'patient00002' is also in "
                       r".*train\.csv \(line 3\)"):
        read_chexpert(root)


# --- bad input --------------------------------------------------------------------------------

def bad_cell(column: str, value: str) -> list[str]:
    r = row(2)
    r[HEADER.index(column)] = value
    return r


@pytest.mark.parametrize("bad_row, message", [
    (bad_cell("Edema", "2.0"), r"line 3: Edema '2\.0' is not 1\.0, 0\.0, -1\.0 or blank"),
    (bad_cell("Pleural Effusion", "yes"), r"line 3: Pleural Effusion 'yes' is not"),
    (bad_cell("Age", "old"), r"line 3: Age 'old' is not a number"),
    (bad_cell("Frontal/Lateral", "Side"), r"line 3: Frontal/Lateral 'Side' is not Frontal"),
    (bad_cell("Path", "CheXpert-v1.0-small/train/view1.jpg"), r"line 3: Path .* is not "),
    (row(1), r"line 3: Path '.*patient00001.*' is listed twice"),
    (row(2)[:-3], r"line 3: 16 fields where the header has 19"),
    (row(2) + ["1.0"], r"line 3: 20 fields where the header has 19"),
])
def test_a_malformed_row_names_file_and_line(tmp_path, bad_row, message):
    root = make_release(tmp_path, [row(1), bad_row, row(3)], images=False)
    with pytest.raises(DataError, match=r"train\.csv, " + message):
        read_chexpert(root)
    with pytest.raises(DataError, match=message):
        read_chexpert_csv(root / "train.csv")


def test_missing_files_and_columns(tmp_path):
    with pytest.raises(DataError, match=r"train\.csv: file not found.*release folder"):
        read_chexpert(tmp_path)
    with pytest.raises(DataError, match="no data root given"):
        read_chexpert(None)
    header = [h for h in HEADER if h != "Fracture"]
    write_csv(tmp_path / "train.csv", [r[:-2] + r[-1:] for r in [row(1)]], header)
    with pytest.raises(DataError, match=r"train\.csv: not a CheXpert CSV.*\['Fracture'\]"):
        read_chexpert(tmp_path)


def test_only_laterals_with_frontal_only_is_an_error(tmp_path):
    root = make_release(tmp_path, [row(1, frontal=False)])
    with pytest.raises(DataError, match="no frontal images listed"):
        read_chexpert(root)


# --- merging and the command line -------------------------------------------------------------

def write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 120, dtype=np.uint8)).save(path)


def test_merge_puts_pneumonia_of_every_source_in_one_column(tmp_path):
    chexpert = read_chexpert(make_release(tmp_path, [
        row(1, labels={"Pneumonia": "1.0", "Lung Opacity": "1.0"}),
        row(2, labels={"Pneumonia": "-1.0"}), row(3)]))
    covid_root = tmp_path / "covid"
    for cls in ("COVID", "Normal", "Viral Pneumonia"):
        write_png(covid_root / cls / "images" / f"{cls}-1.png")
    covid = read_covid_radiography(covid_root)
    phantoms = phantom_dataset(20, size=32)
    merged = merge([chexpert, covid, phantoms])
    assert merged.findings.count("Pneumonia") == 1 and len(merged) == 3 + 3 + 20
    assert merged.findings[:13] == list(FINDINGS) and "COVID-19" in merged.findings
    pneumonia = merged.labels[:, merged.findings.index("Pneumonia")]
    np.testing.assert_array_equal(pneumonia[:3], [1.0, np.nan, 0.0])
    by_class = dict(zip(merged.meta["class_name"][3:6], pneumonia[3:6], strict=True))
    assert by_class["Viral Pneumonia"] == 1.0 and by_class["Normal"] == 0.0
    assert np.isnan(by_class["COVID"])  # COVID-19 is often a pneumonia: not ruled out
    phantom_pneumonia = phantoms.labels[:, NIH_FINDINGS.index("Pneumonia")]
    np.testing.assert_array_equal(pneumonia[6:], phantom_pneumonia)
    assert set(merged.meta["source"]) == {"chexpert", "covid19_radiography", "phantom"}
    assert [merged.load_image(i).shape for i in (0, 3, 6)] == [(6, 9), (8, 8), (32, 32)]


def test_open_source_and_cxr_data_prepare(tmp_path, capsys):
    train = [row(p, labels={"Pneumonia": "-1.0"} if p == 1 else {}) for p in range(1, 9)]
    root = make_release(tmp_path, train, [row(70, split="valid"), row(71, split="valid")])
    assert len(open_source("chexpert", root)) == 10
    out = tmp_path / "cache"
    main(["data", "prepare", "--source", "chexpert", "--root", str(root), "--size", "16",
          "--out", str(out), "--workers", "1"])
    assert "10 images" in capsys.readouterr().out
    cache = open_cache(out)
    assert cache.findings == list(FINDINGS) and cache.images.shape == (10, 16, 16)
    assert cache.index["split"].value_counts()["test"] == 2
    assert np.isnan(cache.labels).sum() == 1  # the uncertain Pneumonia, U-Ignore
    main(["data", "check", str(out)])

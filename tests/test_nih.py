"""ChestX-ray14 reader: the real samples, the shipped label files, and synthetic bad input."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from samples import sample

from cxr_lib.data.core import FINDINGS, DataError, check_patient_disjoint, read_image
from cxr_lib.data.nih import (
    DOWNLOAD_PAGE,
    find_label_file,
    read_bboxes,
    read_chestxray14,
    read_nih_labels,
    read_split_lists,
    shipped_bbox_file,
    shipped_label_file,
)
from cxr_lib.data.splits import patient_split

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
          "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"




@pytest.fixture(scope="module")
def nih_sample() -> Path:
    return sample("nih-cxr14-sample")


@pytest.fixture(scope="module")
def sample_dataset(nih_sample):
    return read_chestxray14(nih_sample)


# --- synthetic ChestX-ray14 folders -----------------------------------------------------------

def row(image: str, findings: str = "No Finding", patient: str | int | None = None,
        age: str | int = 50, sex: str = "M", view: str = "PA") -> str:
    patient = int(image[:8]) if patient is None else patient
    follow_up = int(image[9:12])
    return f"{image},{findings},{follow_up},{patient},{age},{sex},{view},2500,2048,0.14,0.14\n"


def write_png(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def make_nih(root: Path, rows: list[str], train_val: list[str], test: list[str],
             present: list[str] | None = None, folder: str = "images") -> Path:
    """A ChestX-ray14 root with the given label rows, lists and images (default: all listed)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "Data_Entry_2017_v2020.csv").write_text(HEADER + "".join(rows))
    (root / "train_val_list.txt").write_text("".join(f"{n}\n" for n in train_val))
    (root / "test_list.txt").write_text("".join(f"{n}\n" for n in test))
    for name in train_val + test if present is None else present:
        write_png(root / folder / name)
    return root


TINY = [row("00000001_000.png", "Mass|Effusion"), row("00000001_001.png"),
        row("00000002_000.png", "Hernia", sex="F"), row("00000003_000.png", view="AP"),
        row("00000004_000.png", "Pneumonia")]
TINY_TRAIN_VAL = ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png"]
TINY_TEST = ["00000004_000.png"]


def labels_file(tmp_path: Path, rows: list[str], header: str = HEADER) -> Path:
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    path.write_text(header + "".join(rows))
    return path


# --- the real samples -------------------------------------------------------------------------

def test_sample_counts_and_splits(sample_dataset):
    ds = sample_dataset
    assert len(ds) == 621
    assert ds.name == "chestxray14" and ds.findings == list(FINDINGS)
    assert ds.labels.shape == (621, 14) and ds.labels.dtype == np.float32
    assert ds.meta.attrs["chestxray14"] | {"label_file": None, "image_dirs": None} == {
        "label_file": None, "image_dirs": None,
        "listed": 112_120, "present": 621, "train_val": 546, "test": 75}
    counts = ds.meta["split"].value_counts()
    assert counts["test"] == 75 and counts["train"] + counts["val"] == 546
    val_patients = ds.meta.loc[ds.meta["split"] != "test", "patient"]
    assert round(0.1 * val_patients.nunique()) == ds.meta.loc[ds.meta["split"] == "val",
                                                              "patient"].nunique()
    assert ds.meta.groupby("patient")["split"].nunique().max() == 1
    ds.check_patient_disjoint()
    assert (ds.meta["source"] == "chestxray14").all()
    assert all(Path(p).is_file() for p in ds.meta["path"])


def test_sample_counts_match_the_readme(sample_dataset):
    per_finding = dict(zip(FINDINGS, sample_dataset.labels.sum(axis=0).astype(int), strict=True))
    assert per_finding["Infiltration"] == 123 and per_finding["Atelectasis"] == 92
    assert per_finding["Hernia"] == 20 and per_finding["Edema"] == 18
    assert int((sample_dataset.labels.sum(axis=1) == 0).sum()) == 100  # No Finding
    assert sample_dataset.meta["view"].value_counts().to_dict() == {"PA": 518, "AP": 103}


def test_sample_labels_equal_torchxrayvision(nih_sample, sample_dataset):
    xrv = pytest.importorskip("torchxrayvision")
    ref = xrv.datasets.NIH_Dataset(imgpath=str(nih_sample / "images"),
                                   csvpath=str(nih_sample / "Data_Entry_2017_v2020.csv"),
                                   views=["PA", "AP"], unique_patients=False)
    assert len(ref.csv) == 112_120  # every view kept, one row per image
    ref_rows = pd.Series(np.arange(len(ref.csv)), index=ref.csv["Image Index"])
    rows = ref_rows[sample_dataset.meta["id"]].to_numpy()
    cols = [ref.pathologies.index(f) for f in FINDINGS]
    np.testing.assert_array_equal(sample_dataset.labels, ref.labels[rows][:, cols])


def test_sample_loads_images(sample_dataset):
    rgba = sample_dataset.meta.index[sample_dataset.meta["id"] == "00000100_000.png"][0]
    for i in (0, rgba):
        img = sample_dataset.load_image(i)
        assert img.dtype == np.uint8 and img.shape == (256, 256)


def test_fullres_sample_decodes_to_1024(tmp_path):
    root = sample("nih-cxr14-fullres")
    ds = read_chestxray14(root)
    assert len(ds) == 16 and ds.meta.attrs["chestxray14"]["present"] == 16
    modes = []
    for i in range(len(ds)):
        with Image.open(ds.meta["path"][i]) as img:
            modes.append(img.mode)
        img = read_image(ds.meta["path"][i])
        assert img.dtype == np.uint8 and img.shape == (1024, 1024)
        assert img.std() > 10  # a real radiograph, not a blank from a bad conversion
    assert modes.count("RGBA") == 2


def test_shipped_label_file_parses_fast():
    path = shipped_label_file()
    assert path.name == "Data_Entry_2017_v2020.csv.gz"
    start = time.perf_counter()
    meta, labels = read_nih_labels(path)
    assert time.perf_counter() - start < 5.0  # vectorised: about 0.2 s
    assert len(meta) == 112_120 and labels.shape == (112_120, 14)
    assert meta["patient"].nunique() == 30_805
    assert int((labels.sum(axis=1) == 0).sum()) == 60_361  # No Finding
    assert dict(zip(FINDINGS, labels.sum(axis=0).astype(int), strict=True))["Hernia"] == 227
    first = meta.iloc[0]
    assert (first["id"], first["patient"], first["age"], first["sex"]) == (
        "00000001_000.png", "00000001", 57.0, "M")
    assert (first["orig_width"], first["orig_height"]) == (2682, 2749)


def test_shipped_bbox_file():
    boxes = read_bboxes(shipped_bbox_file())
    assert len(boxes) == 984 and boxes["id"].nunique() == 880
    assert set(boxes["finding"]) <= set(FINDINGS) and boxes["finding"].nunique() == 8
    assert (boxes["finding"] == "Infiltration").sum() == 123
    first = boxes.iloc[0]
    assert first["id"] == "00013118_008.png" and first["finding"] == "Atelectasis"
    assert first["x"] == pytest.approx(225.084745762712)
    assert first["h"] == pytest.approx(79.1864406779661)


# --- label file: formats and errors -----------------------------------------------------------

def test_labels_multi_hot_and_meta(tmp_path):
    meta, labels = read_nih_labels(labels_file(tmp_path, TINY))
    assert labels.shape == (5, 14)
    assert labels[0].nonzero()[0].tolist() == [FINDINGS.index("Effusion"), FINDINGS.index("Mass")]
    assert labels[1].sum() == 0  # No Finding
    assert meta["patient"].tolist() == ["00000001", "00000001", "00000002", "00000003",
                                        "00000004"]
    assert meta["follow_up"].tolist() == [0, 1, 0, 0, 0]
    assert meta["sex"].tolist() == ["M", "M", "F", "M", "M"]


def test_original_label_file_format(tmp_path):
    """The 2017 file: trailing commas, 'Patient Sex' in some copies, '058Y'-style ages, gz."""
    header = HEADER.replace("Patient Gender", "Patient Sex").replace("\n", ",\n")
    rows = [r.replace("\n", ",\n") for r in TINY]
    rows[0] = rows[0].replace(",50,M,", ",058Y,M,")
    rows[1] = rows[1].replace(",50,M,", ",006M,M,")
    path = tmp_path / "Data_Entry_2017.csv.gz"
    path.write_bytes(gzip.compress((header + "".join(rows)).encode()))
    assert find_label_file(tmp_path) == path
    meta, labels = read_nih_labels(path)
    ref_meta, ref_labels = read_nih_labels(labels_file(tmp_path, TINY))
    np.testing.assert_array_equal(labels, ref_labels)
    assert meta["age"].tolist() == [58.0, 0.5, 50.0, 50.0, 50.0]
    assert meta["sex"].tolist() == ref_meta["sex"].tolist()
    assert find_label_file(tmp_path).name == "Data_Entry_2017_v2020.csv"  # v2020 preferred


@pytest.mark.parametrize("bad_row, message", [
    (row("00000009_000.png", "Mass|Cancer"), r"line 3: unknown finding 'Cancer'"),
    (row("00000009_000.png", "No Finding|Mass"), r"line 3: unknown finding 'No Finding'"),
    (row("00000009_000.png", "Infiltrate"), r"line 3: unknown finding 'Infiltrate'"),
    (row("00000009_000.png", patient="P9"), r"line 3: Patient ID 'P9' is not an integer"),
    (row("00000009_000.png", patient="2.5"), r"line 3: Patient ID 2.5 is not an integer$"),
    (row("00000009_000.png", age="old"), r"line 3: Patient Age 'old' is not a number"),
    (row("00000009_000.png", sex="X"), r"line 3: Patient Gender 'X' is not M or F"),
    ("00000009_000.png,Mass,0,9\n", r"line 3: missing field\(s\) \['Patient Age', 'Patient G"),
    (row("00000009_000.png").replace("\n", ",7,7\n"), r"malformed CSV .*line 3"),
    (row("00000001_000.png"), r"line 3: duplicate image id '00000001_000.png' \(also on line 2\)"),
])
def test_label_file_errors_name_file_and_line(tmp_path, bad_row, message):
    path = labels_file(tmp_path, [TINY[0], bad_row, TINY[1]])
    with pytest.raises(DataError, match=message) as err:
        read_nih_labels(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("extra, value", [(",7", "7"), (",0,143,0,143", "0")])
def test_extra_fields_on_the_first_row_are_refused(tmp_path, extra, value):
    """pandas would cut the first data row to the header's width with a mere warning."""
    path = labels_file(tmp_path, [TINY[0].replace("\n", extra + "\n"), TINY[1]])
    with pytest.raises(DataError, match=f"line 2: unexpected extra field '{value}'") as err:
        read_nih_labels(path)
    assert str(path) in str(err.value)


def test_label_file_with_wrong_columns(tmp_path):
    path = labels_file(tmp_path, ["a,b\n"], header="Image,Labels\n")
    with pytest.raises(DataError, match="not a ChestX-ray14 label file"):
        read_nih_labels(path)


def test_blank_lines_keep_line_numbers(tmp_path):
    path = labels_file(tmp_path, [TINY[0], "\n", row("00000009_000.png", "Cancer")])
    with pytest.raises(DataError, match="line 4: unknown finding"):
        read_nih_labels(path)


# --- split lists and the dataset --------------------------------------------------------------

def test_split_lists(tmp_path):
    root = make_nih(tmp_path, TINY, TINY_TRAIN_VAL, TINY_TEST)
    assert read_split_lists(root) == (set(TINY_TRAIN_VAL), set(TINY_TEST))


@pytest.mark.parametrize("train_val, test, message", [
    (TINY_TRAIN_VAL + ["00000099_000.png"], TINY_TEST,
     r"train_val_list.txt, line 5: '00000099_000.png' is not in the label file"),
    (TINY_TRAIN_VAL, TINY_TEST + ["00000001_000.png"],
     r"1 image\(s\) are in both train_val_list.txt and test_list.txt, e.g. '00000001_000.png'"),
    (TINY_TRAIN_VAL, TINY_TEST * 2, r"test_list.txt, line 2: '00000004_000.png' is listed twice"),
])
def test_split_list_errors(tmp_path, train_val, test, message):
    root = make_nih(tmp_path, TINY, train_val, test, present=[])
    with pytest.raises(DataError, match=message):
        read_split_lists(root)


def test_dataset_from_synthetic_root(tmp_path):
    ds = read_chestxray14(make_nih(tmp_path, TINY, TINY_TRAIN_VAL, TINY_TEST), val_fraction=0.5)
    assert ds.meta["id"].tolist() == [r.split(",")[0] for r in TINY]
    assert ds.meta.loc[ds.meta["split"] == "test", "id"].tolist() == TINY_TEST
    # patients 1, 2, 3 in train_val: round(1.5) = 2 drawn for val; patient 1's images stay together
    assert ds.meta.loc[ds.meta["split"] == "val", "patient"].nunique() == 2
    assert ds.meta["split"][0] == ds.meta["split"][1]
    assert ds.load_image(0).tolist() == np.full((8, 8), 100, dtype=np.uint8).tolist()


def test_image_paths_do_not_depend_on_how_the_root_is_spelt(tmp_path, monkeypatch):
    """A cache request compares the paths: `nih`, `./nih/` and `x/../nih` are the same files."""
    root = make_nih(tmp_path / "nih", TINY, TINY_TRAIN_VAL, TINY_TEST)
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path)
    paths = [read_chestxray14(r).meta["path"].tolist() for r in (root, "nih", "./nih/", "x/../nih")]
    assert all(p == paths[0] for p in paths)
    assert paths[0][0] == str(root / "images" / "00000001_000.png")


def xiao_list(path: Path, names: list[str]) -> Path:
    """A split list in Xiao et al.'s format (`data_splits/chestxray/*_official.txt`): an image
    name, then its 14 labels as 0/1, per line."""
    path.write_text("".join(f"{n} {' '.join(['0'] * 14)}\n" for n in names))
    return path


def test_split_lists_in_xiao_et_al_format_give_exactly_their_split(tmp_path):
    root = make_nih(tmp_path / "nih", TINY, TINY_TRAIN_VAL, TINY_TEST)
    val = ["00000002_000.png", "00000003_000.png"]  # not the draw's: exactly the lists'
    lists = [xiao_list(tmp_path / f"{s}_official.txt", names) for s, names in (
        ("train", ["00000001_000.png", "00000001_001.png"]), ("val", val), ("test", TINY_TEST))]
    ds = read_chestxray14(root, split_lists=lists)
    assert ds.meta.loc[ds.meta["split"] == "val", "id"].tolist() == val
    assert ds.meta["split"].tolist() == ["train", "train", "val", "val", "test"]
    drawn = read_chestxray14(root, val_fraction=0.5, seed=0)
    assert drawn.meta["split"].tolist() != ds.meta["split"].tolist()


def test_split_lists_refuse_a_name_twice_or_an_image_they_leave_out(tmp_path):
    root = make_nih(tmp_path / "nih", TINY, TINY_TRAIN_VAL, TINY_TEST)
    train = xiao_list(tmp_path / "train.txt", TINY_TRAIN_VAL)
    val = xiao_list(tmp_path / "val.txt", ["00000003_000.png"])
    test = xiao_list(tmp_path / "test.txt", TINY_TEST)
    with pytest.raises(DataError, match=r"val.txt, line 1: '00000003_000.png' is already in "
                                        r"the train list"):
        read_chestxray14(root, split_lists=[train, val, test])
    short = xiao_list(tmp_path / "short.txt", TINY_TRAIN_VAL[:2])
    with pytest.raises(DataError, match=r"image '00000002_000.png' is in none of these split "
                                        r"lists \(1 such\)"):
        read_chestxray14(root, split_lists=[short, val, test])


def test_patient_in_both_official_lists_is_refused(tmp_path):
    """Tampered lists: patient 1's first image moved to the test list."""
    train_val = [n for n in TINY_TRAIN_VAL if n != "00000001_000.png"]
    root = make_nih(tmp_path, TINY, train_val, TINY_TEST + ["00000001_000.png"])
    leak = r"patient '00000001' of 'chestxray14' in \['test', 'train'\]"
    with pytest.raises(DataError, match=leak):
        read_chestxray14(root, val_fraction=0.0)


def test_archive_folder_layout(tmp_path):
    root = make_nih(tmp_path, TINY, TINY_TRAIN_VAL, TINY_TEST, present=[],
                    folder="images_001/images")
    for name in TINY_TRAIN_VAL[:2]:
        write_png(root / "images_001" / "images" / name)
    for name in TINY_TRAIN_VAL[2:] + TINY_TEST:
        write_png(root / "images_012" / "images" / name)
    ds = read_chestxray14(root)
    assert len(ds) == 5
    assert ds.meta.attrs["chestxray14"]["image_dirs"] == [
        str(root / "images_001" / "images"), str(root / "images_012" / "images")]
    assert Path(ds.meta["path"][4]).parent == root / "images_012" / "images"


def test_partial_download_counts(tmp_path, caplog):
    present = ["00000001_000.png", "00000003_000.png", "00000004_000.png"]
    root = make_nih(tmp_path, TINY, TINY_TRAIN_VAL, TINY_TEST, present=present)
    with caplog.at_level("INFO", logger="cxr_lib.data.nih"):
        ds = read_chestxray14(root, val_fraction=0.0)
    assert ds.meta["id"].tolist() == present
    report = ds.meta.attrs["chestxray14"]
    counts = (report["listed"], report["present"], report["train_val"], report["test"])
    assert counts == (5, 3, 2, 1)
    assert "3 of 5 listed images present (2 train/val, 1 test)" in caplog.text
    with pytest.raises(DataError, match="the selection is empty"):
        ds.split("val")  # val_fraction 0: no validation images


def test_image_not_in_label_file(tmp_path):
    root = make_nih(tmp_path, TINY, TINY_TRAIN_VAL, TINY_TEST)
    write_png(root / "images" / "00000077_000.png")
    with pytest.raises(DataError, match=r"00000077_000.png: image not in the label file"):
        read_chestxray14(root)


def test_image_in_neither_list(tmp_path):
    root = make_nih(tmp_path, TINY, TINY_TRAIN_VAL[1:], TINY_TEST,
                    present=TINY_TRAIN_VAL + TINY_TEST)
    with pytest.raises(DataError, match="'00000001_000.png' is in neither"):
        read_chestxray14(root)


def test_no_images_says_where_and_how(tmp_path):
    root = make_nih(tmp_path, TINY, TINY_TRAIN_VAL, TINY_TEST, present=[])
    with pytest.raises(DataError, match="no ChestX-ray14 images found") as err:
        read_chestxray14(root)
    assert str(root / "images") in str(err.value) and DOWNLOAD_PAGE in str(err.value)
    assert "images_001" in str(err.value)


def test_no_label_file(tmp_path):
    with pytest.raises(DataError, match="no ChestX-ray14 label file") as err:
        read_chestxray14(tmp_path)
    assert DOWNLOAD_PAGE in str(err.value)
    with pytest.raises(DataError, match=f"{tmp_path / 'typo'}: no such folder; give the "
                       "ChestX-ray14 folder"):
        read_chestxray14(tmp_path / "typo")


# --- bounding boxes ---------------------------------------------------------------------------

def test_bboxes_map_infiltrate(tmp_path):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text(BOX_HEADER + "a.png,Infiltrate,1,2,3,4\nb.png,Mass,5.5,6,7,8,,,\n")
    boxes = read_bboxes(path)
    assert boxes.to_dict("list") == {"id": ["a.png", "b.png"], "finding": ["Infiltration", "Mass"],
                                     "x": [1.0, 5.5], "y": [2.0, 6.0], "w": [3.0, 7.0],
                                     "h": [4.0, 8.0]}


@pytest.mark.parametrize("line, message", [
    ("b.png,Lung Opacity,1,2,3,4\n", "line 3: unknown box finding 'Lung Opacity'"),
    ("b.png,Mass,1,2,wide,4\n", "line 3: w 'wide' is not a number"),
    ("b.png,Mass,1,2\n", r"line 3: missing field\(s\) \['w', 'h'\]"),
    ("b.png,Mass,1,2,3,4,9\n", "line 3: unexpected extra field '9'"),
])
def test_bbox_errors(tmp_path, line, message):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text(BOX_HEADER + "a.png,Mass,1,2,3,4\n" + line)
    with pytest.raises(DataError, match=message):
        read_bboxes(path)


# --- patient-level split ----------------------------------------------------------------------

def test_patient_split_is_by_patient_and_deterministic():
    patients = pd.Series([f"p{i // 3}" for i in range(300)])  # 100 patients, 3 images each
    split = patient_split(patients, 0.2, seed=1)
    frame = pd.DataFrame({"patient": patients, "split": split, "source": "test"})
    check_patient_disjoint(frame)
    assert frame.loc[frame["split"] == "val", "patient"].nunique() == 20
    np.testing.assert_array_equal(split, patient_split(patients, 0.2, seed=1))
    assert not np.array_equal(split, patient_split(patients, 0.2, seed=2))
    reordered = patient_split(patients[::-1], 0.2, seed=1)[::-1]  # independent of row order
    np.testing.assert_array_equal(split, reordered)


def test_patient_split_edge_cases():
    patients = pd.Series(["a", "b", "c"])
    assert patient_split(patients, 0.0, seed=0).tolist() == ["train"] * 3
    assert sorted(patient_split(patients, 0.01, seed=0)) == ["train", "train", "val"]
    assert sorted(patient_split(patients, 0.99, seed=0)) == ["train", "val", "val"]
    assert patient_split(pd.Series(["a"]), 0.5, seed=0).tolist() == ["train"]
    with pytest.raises(DataError, match="val_fraction"):
        patient_split(patients, 1.0, seed=0)

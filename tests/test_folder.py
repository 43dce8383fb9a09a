"""Folder-per-class reader: the real pediatric sample, synthetic layouts, merging with NIH."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from samples import sample

from cxr_lib.data.core import FINDINGS, DataError, XrayDataset, merge, read_image_row
from cxr_lib.data.folder import read_class_folders


def write_jpeg(path: Path, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 9), value, dtype=np.uint8)).save(path)


def make_folders(root: Path, files: list[str]) -> Path:
    for name in files:
        write_jpeg(root / name)
    return root


KERMANY = [
    "train/NORMAL/IM-0115-0001.jpeg",
    "train/NORMAL/IM-0115-0002.jpeg",
    "train/NORMAL/NORMAL2-IM-1427-0001.jpeg",
    "train/NORMAL/IM-0429-0001-0001.jpeg",
    "train/PNEUMONIA/person1_bacteria_1.jpeg",
    "train/PNEUMONIA/person1_bacteria_2.jpeg",
    "train/PNEUMONIA/person2_virus_3.jpeg",
    "train/PNEUMONIA/scan.png",
    "val/NORMAL/IM-0200-0001.jpeg",
    "val/PNEUMONIA/person3_virus_4.jpeg",
    "test/NORMAL/IM-0001-0001.jpeg",
    "test/PNEUMONIA/person100_bacteria_5.jpeg",
]


def nih_shaped(n: int = 4) -> XrayDataset:
    """A tiny dataset over the 14 ChestX-ray14 findings, as the NIH reader returns."""
    labels = np.zeros((n, len(FINDINGS)), dtype=np.float32)
    labels[0, FINDINGS.index("Pneumonia")] = 1.0
    labels[1, FINDINGS.index("Mass")] = 1.0
    meta = pd.DataFrame({"id": [f"{i:08d}_000.png" for i in range(n)],
                         "patient": [f"{i:08d}" for i in range(n)],
                         "split": ["train"] * n, "source": "chestxray14", "path": ""})
    return XrayDataset("chestxray14", list(FINDINGS), labels, meta,
                       {"chestxray14": read_image_row})


# --- the real sample --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pediatric():
    return read_class_folders(sample("pediatric-pneumonia-sample"), name="pediatric")


def test_real_sample(pediatric):
    ds = pediatric
    assert len(ds) == 806 and ds.findings == ["Pneumonia"]
    assert ds.meta["class_name"].value_counts().to_dict() == {"NORMAL": 403, "PNEUMONIA": 403}
    np.testing.assert_array_equal(ds.labels[:, 0], (ds.meta["class_name"] == "PNEUMONIA"))
    assert ds.meta["subtype"].value_counts().to_dict() == {"": 403, "bacteria": 271, "virus": 132}
    # the sample has no test folder: test (20%), then val (10%) drawn by patient
    assert set(ds.meta["split"]) == {"train", "val", "test"}
    ds.check_patient_disjoint()
    patients = ds.meta.groupby("split")["patient"].nunique()
    total = ds.meta["patient"].nunique()
    assert patients["test"] == round(0.2 * total)
    assert patients["val"] == round(0.1 / 0.8 * (total - patients["test"]))
    assert (ds.meta["source"] == "pediatric").all() and ds.name == "pediatric"
    assert ds.meta["id"].is_unique and ds.meta["id"][0].startswith("pediatric/train/NORMAL/")
    img = ds.load_image(int(np.argmax(ds.labels[:, 0])))
    assert img.dtype == np.uint8 and img.ndim == 2 and min(img.shape) == 256


def test_real_sample_default_name_and_determinism(pediatric):
    again = read_class_folders(sample("pediatric-pneumonia-sample"))
    assert again.name == "pediatric-pneumonia-sample"
    np.testing.assert_array_equal(again.meta["split"], pediatric.meta["split"])


def test_real_merge_with_nih_sample(pediatric):
    from cxr_lib.data.nih import read_chestxray14

    nih = read_chestxray14(sample("nih-cxr14-sample"))
    both = merge([nih, pediatric])
    assert both.findings == list(FINDINGS) and len(both) == 621 + 806
    ped = (both.meta["source"] == "pediatric").to_numpy()
    col = FINDINGS.index("Pneumonia")
    assert both.labels[ped, col].sum() == 403 and not np.isnan(both.labels[:, col]).any()
    assert both.labels[~ped, col].sum() == 32  # NIH sample's pneumonia images
    assert np.isnan(np.delete(both.labels[ped], col, axis=1)).all()
    both.check_patient_disjoint()


# --- synthetic layouts ------------------------------------------------------------------------

def test_kermany_patients_splits_and_subtypes(tmp_path):
    ds = read_class_folders(make_folders(tmp_path / "Kids", KERMANY), val_fraction=0.5)
    assert ds.name == "kids" and ds.findings == ["Pneumonia"]
    by_file = ds.meta.set_index(ds.meta["path"].map(lambda p: Path(p).name))
    assert by_file["patient"].to_dict() == {
        "IM-0115-0001.jpeg": "IM-0115", "IM-0115-0002.jpeg": "IM-0115",
        "NORMAL2-IM-1427-0001.jpeg": "NORMAL2-IM-1427", "IM-0429-0001-0001.jpeg": "IM-0429",
        "person1_bacteria_1.jpeg": "person1", "person1_bacteria_2.jpeg": "person1",
        "person2_virus_3.jpeg": "person2", "scan.png": "train/PNEUMONIA/scan.png",
        "IM-0200-0001.jpeg": "IM-0200", "person3_virus_4.jpeg": "person3",
        "IM-0001-0001.jpeg": "IM-0001", "person100_bacteria_5.jpeg": "person100"}
    assert by_file["subtype"]["person2_virus_3.jpeg"] == "virus"
    assert by_file["subtype"]["person1_bacteria_1.jpeg"] == "bacteria"
    assert by_file["subtype"]["IM-0115-0001.jpeg"] == ""
    # official test stays test; train and val folders are pooled and re-split by patient:
    # 8 patients in the pool, 4 drawn for val
    assert sorted(by_file.index[by_file["split"] == "test"]) == [
        "IM-0001-0001.jpeg", "person100_bacteria_5.jpeg"]
    pool = by_file[by_file["split"] != "test"]
    assert pool.groupby("split")["patient"].nunique().to_dict() == {"train": 4, "val": 4}
    assert pool.groupby("patient")["split"].nunique().max() == 1
    assert ds.labels[:, 0].tolist() == (ds.meta["class_name"] == "PNEUMONIA").tolist()
    assert ds.load_image(0).tolist() == np.full((6, 9), 90, dtype=np.uint8).tolist()


def test_several_classes_and_spelling(tmp_path):
    root = make_folders(tmp_path / "mix", ["train/normal/a.png", "train/Covid/b.png",
                                           "train/EFFUSION/c.png", "train/pneumonia/d.png"])
    ds = read_class_folders(root, val_fraction=0.0, test_fraction=0.0, name="mix")
    assert ds.findings == ["Covid", "Effusion", "Pneumonia"]  # FINDINGS spelling where it exists
    expected = {"normal": [0, 0, 0], "Covid": [1, 0, 0], "EFFUSION": [0, 1, 0],
                "pneumonia": [0, 0, 1]}
    for cls, labels in zip(ds.meta["class_name"], ds.labels, strict=True):
        assert labels.tolist() == expected[cls]
    assert set(ds.meta["split"]) == {"train"}


def test_merge_aligns_pneumonia_and_leaves_other_findings_unknown(tmp_path):
    ped = read_class_folders(make_folders(tmp_path / "ped", KERMANY[:8]), name="pediatric")
    both = merge([nih_shaped(), ped])
    col = FINDINGS.index("Pneumonia")
    assert both.findings == list(FINDINGS)
    assert both.labels[:4, col].tolist() == [1, 0, 0, 0]
    assert both.labels[4:, col].tolist() == ped.labels[:, 0].tolist()
    others = np.delete(both.labels, col, axis=1)  # [12, 13]
    assert np.isnan(others[4:]).all() and not np.isnan(others[:4]).any()
    assert both.labels[1, FINDINGS.index("Mass")] == 1.0
    assert set(both.loaders) == {"chestxray14", "pediatric"}


def test_train_images_of_official_test_patients_are_left_out(tmp_path, caplog):
    """As in the full Kermany release: person1 has training images and test images."""
    root = make_folders(tmp_path / "leak", [
        "train/NORMAL/IM-0115-0001.jpeg", "train/PNEUMONIA/person1_bacteria_1.jpeg",
        "train/PNEUMONIA/person1_bacteria_2.jpeg", "val/PNEUMONIA/person2_virus_3.jpeg",
        "test/PNEUMONIA/person1_virus_6.jpeg", "test/NORMAL/IM-0001-0001.jpeg"])
    with caplog.at_level("WARNING", logger="cxr_lib.data.folder"):
        ds = read_class_folders(root, val_fraction=0.5)
    names = ds.meta["path"].map(lambda p: Path(p).name)
    assert sorted(names) == ["IM-0001-0001.jpeg", "IM-0115-0001.jpeg", "person1_virus_6.jpeg",
                             "person2_virus_3.jpeg"]
    assert sorted(names[ds.meta["split"] == "test"]) == ["IM-0001-0001.jpeg",
                                                         "person1_virus_6.jpeg"]
    assert ds.labels[:, 0].tolist() == (ds.meta["class_name"] == "PNEUMONIA").tolist()
    ds.check_patient_disjoint()
    assert ds.meta.attrs["leak"] == {"left_out_images": 2, "left_out_patients": 1}
    assert "leak: 2 train/val image(s) of 1 patient(s)" in caplog.text


@pytest.mark.parametrize("files, message", [
    ([], "no train/, val/, test/ folder"),
    (["train/readme.txt"], "train: no class folders"),
    (["train/NORMAL/a.jpeg", "train/PNEUMONIA/notes.txt"], "PNEUMONIA: no images"),
    (["train/Pneumonia/a.jpeg", "train/PNEUMONIA/b.jpeg"], "differ only in letter case"),
])
def test_layout_errors(tmp_path, files, message):
    root = tmp_path / "bad"
    root.mkdir()
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            (root / name).write_text("not an image")
        else:
            write_jpeg(root / name)
    with pytest.raises(DataError, match=message):
        read_class_folders(root)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        read_class_folders(tmp_path / "absent")


def test_corrupt_image_fails_at_decode(tmp_path):
    root = make_folders(tmp_path / "c", ["train/NORMAL/a.jpeg"])
    (root / "train/PNEUMONIA").mkdir()
    (root / "train/PNEUMONIA/person1_virus_1.jpeg").write_bytes(b"\xff\xd8 truncated")
    ds = read_class_folders(root, val_fraction=0.0)
    assert ds.load_image(0).shape == (6, 9)
    with pytest.raises(DataError, match="person1_virus_1.jpeg: cannot decode image"):
        ds.load_image(1)


def test_without_a_test_folder_a_test_split_is_drawn_by_patient(pediatric):
    """The shipped sample holds train/ only; its test split is drawn by patient, the share
    asked for, the same for the same seed, and test_fraction 0 gives the former two splits."""
    root = sample("pediatric-pneumonia-sample")
    total = pediatric.meta["patient"].nunique()
    for fraction in (0.2, 0.3):
        ds = read_class_folders(root, test_fraction=fraction, seed=5)
        ds.check_patient_disjoint()  # train, val and test share no child
        test = ds.meta.loc[ds.meta["split"] == "test", "patient"].nunique()
        assert test == round(fraction * total)
        assert abs((ds.meta["split"] == "test").mean() - fraction) < 0.05  # of the images too
        again = read_class_folders(root, test_fraction=fraction, seed=5)
        np.testing.assert_array_equal(again.meta["split"], ds.meta["split"])
    other = read_class_folders(root, seed=6)
    assert not np.array_equal(other.meta["split"], pediatric.meta["split"])
    two = read_class_folders(root, test_fraction=0.0)
    assert set(two.meta["split"]) == {"train", "val"}
    assert two.meta.groupby("split")["patient"].nunique()["val"] == round(0.1 * total)
    with pytest.raises(DataError, match="with a sum below 1, got 0.5 and 0.5"):
        read_class_folders(root, val_fraction=0.5, test_fraction=0.5)


def test_an_official_test_folder_ignores_the_test_fraction(tmp_path):
    root = make_folders(tmp_path / "Kids", KERMANY)
    ds = read_class_folders(root, val_fraction=0.5)
    for fraction in (0.0, 0.4):
        other = read_class_folders(root, val_fraction=0.5, test_fraction=fraction)
        np.testing.assert_array_equal(other.meta["split"], ds.meta["split"])

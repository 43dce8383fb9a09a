"""COVID-19 Radiography Database reader: both layouts, labels per class, bad folders, splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_lib.data import open_source
from cxr_lib.data.core import DataError
from cxr_lib.data.covid import read_covid_radiography, three_way_split

V4_COUNTS = {"COVID": 3, "Lung_Opacity": 2, "Normal": 2, "Viral Pneumonia": 2}


def write_png(path: Path, value: int = 120, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).convert(mode).save(path)


def make_v4(root: Path, counts: dict[str, int]) -> Path:
    """root/<CLASS>/images/<CLASS>-<n>.png with masks/ and metadata beside them."""
    for cls, n in counts.items():
        for i in range(1, n + 1):
            write_png(root / cls / "images" / f"{cls}-{i}.png", mode="RGB")
            write_png(root / cls / "masks" / f"{cls}-{i}.png", value=255)
        (root / f"{cls}.metadata.xlsx").write_bytes(b"PK\x03\x04 not read")
    (root / "README.md.txt").write_text("COVID-19 Radiography Database")
    return root


def make_old(root: Path, counts: dict[str, int]) -> Path:
    """root/<CLASS>/<CLASS> (<n>).png, the layout of the releases before v4."""
    for cls, n in counts.items():
        for i in range(1, n + 1):
            write_png(root / cls / f"{cls} ({i}).png")
    return root


def labels_by_class(ds) -> dict[str, list[float]]:
    first = ds.meta.drop_duplicates("class_name")
    return {c: ds.labels[i].tolist() for c, i in zip(first["class_name"], first.index, strict=True)}


def test_v4_layout_ignores_masks_and_metadata(tmp_path):
    ds = read_covid_radiography(make_v4(tmp_path / "db", V4_COUNTS))
    assert len(ds) == 9 and ds.findings == ["COVID-19", "Lung Opacity", "Pneumonia"]
    assert not ds.meta["path"].str.contains("/masks/").any()
    assert ds.meta["class_name"].value_counts().to_dict() == V4_COUNTS
    assert ds.meta["id"].iloc[0] == "covid19_radiography/COVID/images/COVID-1.png"
    assert set(ds.meta["source"]) == {"covid19_radiography"}
    nan = np.nan
    np.testing.assert_equal(labels_by_class(ds), {
        "COVID": [1.0, nan, nan],
        "Lung_Opacity": [0.0, 1.0, nan],
        "Normal": [0.0, 0.0, 0.0],
        "Viral Pneumonia": [0.0, nan, 1.0],
    })
    assert ds.labels.dtype == np.float32
    img = ds.load_image(0)  # an RGB file, read as gray
    assert img.dtype == np.uint8 and img.shape == (8, 8) and img.max() == 120


def test_older_layout_and_the_first_releases_folder_names(tmp_path):
    ds = read_covid_radiography(make_old(tmp_path / "db", {"COVID-19": 2, "NORMAL": 2,
                                                           "Viral Pneumonia": 1}))
    assert len(ds) == 5 and ds.findings == ["COVID-19", "Pneumonia"]  # no Lung_Opacity class
    assert "covid19_radiography/Viral Pneumonia/Viral Pneumonia (1).png" in set(ds.meta["id"])
    np.testing.assert_equal(labels_by_class(ds), {
        "COVID-19": [1.0, np.nan], "NORMAL": [0.0, 0.0], "Viral Pneumonia": [0.0, 1.0]})


def test_name_sets_source_and_ids(tmp_path):
    ds = read_covid_radiography(make_old(tmp_path / "db", {"COVID": 1, "Normal": 1}), name="cov")
    assert ds.name == "cov" and set(ds.meta["source"]) == {"cov"} and "cov" in ds.loaders
    assert ds.meta["id"].str.startswith("cov/").all()


def test_unknown_class_folder_lists_the_known_ones(tmp_path):
    root = make_old(tmp_path / "db", {"COVID": 1, "Tuberculosis": 1})
    with pytest.raises(DataError, match=r"Tuberculosis: unknown class folder.*COVID, "
                       r"Lung_Opacity, Normal, Viral Pneumonia"):
        read_covid_radiography(root)
    wrapper = make_v4(tmp_path / "kaggle" / "COVID-19_Radiography_Dataset", {"COVID": 1})
    with pytest.raises(DataError, match="point root at the folder holding them"):
        read_covid_radiography(wrapper.parent)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        read_covid_radiography(tmp_path / "absent")
    with pytest.raises(DataError, match="no class folders"):
        read_covid_radiography(tmp_path)
    (tmp_path / "Normal" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=r"Normal/images: no images"):
        read_covid_radiography(tmp_path)
    with pytest.raises(DataError, match="no data root given"):
        read_covid_radiography(None)


def test_split_fractions_on_50_images(tmp_path):
    root = make_v4(tmp_path / "db", {"COVID": 20, "Normal": 30})
    ds = read_covid_radiography(root, val_fraction=0.1, test_fraction=0.1, seed=1)
    assert ds.meta["split"].value_counts().to_dict() == {"train": 40, "val": 5, "test": 5}
    assert ds.meta["patient"].is_unique  # no patient ids released: one per image
    ds.check_patient_disjoint()
    again = read_covid_radiography(root, val_fraction=0.1, test_fraction=0.1, seed=1)
    assert again.meta["split"].tolist() == ds.meta["split"].tolist()
    other = read_covid_radiography(root, val_fraction=0.1, test_fraction=0.1, seed=2)
    assert other.meta["split"].tolist() != ds.meta["split"].tolist()
    wide = read_covid_radiography(root, val_fraction=0.3, test_fraction=0.2)
    assert wide.meta["split"].value_counts().to_dict() == {"train": 25, "val": 15, "test": 10}
    no_test = read_covid_radiography(root, test_fraction=0.0)
    assert set(no_test.meta["split"]) == {"train", "val"}


def test_three_way_split_refuses_fractions_that_leave_no_train():
    patients = pd.Series([f"p{i}" for i in range(10)])
    with pytest.raises(DataError, match="sum below 1"):
        three_way_split(patients, 0.5, 0.5, 0)
    with pytest.raises(DataError, match=">= 0"):
        three_way_split(patients, -0.1, 0.2, 0)


def test_open_source_reaches_both_readers(tmp_path):
    covid = open_source("covid19_radiography", make_v4(tmp_path / "db", V4_COUNTS), seed=5)
    assert covid.name == "covid19_radiography" and len(covid) == 9
    chexpert = tmp_path / "CheXpert-v1.0-small"
    with pytest.raises(DataError, match=r"train\.csv: file not found"):
        open_source("chexpert", chexpert)
    with pytest.raises(DataError, match="chexpert, covid19_radiography or phantom"):
        open_source("mimic", tmp_path)

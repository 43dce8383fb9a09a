"""The real samples ship with the package: every file is covered by the package-data patterns
(so a `pip install` carries them), the folders keep the official layouts, and the readers load
them as the full data sets."""

import fnmatch

import pytest
from samples import patient_share

from cxr_lib.book.profiles import repo_root
from cxr_lib.data import open_source
from cxr_lib.data.folder import read_class_folders
from cxr_lib.data.nih import read_chestxray14
from cxr_lib.data.samples import SHIPPED, sample_path, samples_root


def test_every_shipped_file_is_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    config = tomllib.loads((repo_root() / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["cxr_lib.data.samples"]
    files = [p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py"]
    assert len(files) > 1400
    uncovered = [f for f in files if not any(fnmatch.fnmatchcase(f, pat) for pat in patterns)]
    assert uncovered == []


def test_the_samples_load_as_their_official_releases(monkeypatch):
    monkeypatch.delenv("CXR_SAMPLE_DATA", raising=False)
    assert samples_root() == SHIPPED
    nih = read_chestxray14(sample_path("nih-cxr14-sample"))
    assert len(nih) == 621 and nih.meta["patient"].nunique() == 621
    assert (nih.meta["split"] == "test").sum() == 75
    fullres = read_chestxray14(sample_path("nih-cxr14-fullres"))
    assert len(fullres) == 16 and set(fullres.meta["id"]) <= set(nih.meta["id"])
    pediatric = read_class_folders(sample_path("pediatric-pneumonia-sample"))
    assert len(pediatric) == 806 and (SHIPPED / "README.md").read_text().count("CC BY 4.0") == 1


def test_another_samples_folder_can_be_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_SAMPLE_DATA", str(tmp_path))
    assert sample_path("nih-cxr14-sample") == tmp_path / "nih-cxr14-sample"


@pytest.mark.parametrize("name, source", [("nih-cxr14-sample", "chestxray14"),
                                          ("pediatric-pneumonia-sample", "folder")])
def test_a_patient_share_keeps_whole_patients_and_the_official_files(tmp_path, name, source):
    whole = open_source(source, sample_path(name)).meta
    part = open_source(source, patient_share(name, source, tmp_path / name, every=4)).meta
    patients = sorted(whole["patient"].unique())
    assert sorted(part["patient"].unique()) == patients[::4]
    kept = whole[whole["patient"].isin(patients[::4])]
    assert len(part) == len(kept) and (part["split"] != "test").any()
    top = {p.name for p in sample_path(name).iterdir() if p.is_file()}
    assert {p.name for p in (tmp_path / name).iterdir() if p.is_file()} == top

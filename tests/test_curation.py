"""Chapter 1 statistics on a hand-built table whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from samples import sample

from cxr_lib.analysis import curation
from cxr_lib.data.core import FINDINGS, DataError

F3 = ["Atelectasis", "Effusion", "Mass"]

# Six images of four patients; i6 has an absurd age (414, as in the original NIH file).
META = pd.DataFrame({
    "id": ["i1", "i2", "i3", "i4", "i5", "i6"],
    "patient": ["p1", "p1", "p2", "p3", "p3", "p4"],
    "age": [30.0, 31.0, 50.0, 70.0, 71.0, 414.0],
    "sex": ["F", "F", "M", "M", "M", "F"],
    "view": ["PA", "AP", "PA", "AP", "PA", "PA"],
    "split": ["train", "train", "val", "test", "test", "train"],
})
LABELS = np.array([
    [1, 0, 0],  # i1 Atelectasis
    [1, 1, 0],  # i2 Atelectasis|Effusion
    [0, 0, 0],  # i3 No Finding
    [0, 1, 1],  # i4 Effusion|Mass
    [1, 1, 0],  # i5 Atelectasis|Effusion
    [0, 0, 0],  # i6 No Finding
], dtype=np.float32)


def test_prevalence():
    table = curation.prevalence(META, LABELS, F3)
    assert table["finding"].tolist() == [*F3, "No Finding"]
    assert table["images"].tolist() == [3, 3, 1, 2]
    np.testing.assert_allclose(table["fraction"], [1 / 2, 1 / 2, 1 / 6, 1 / 3])


def test_prevalence_counts_only_positives():
    labels = LABELS.copy()
    labels[0, 0] = np.nan  # unknown is not present
    assert curation.prevalence(META, labels, F3)["images"].tolist() == [2, 3, 1, 3]


def test_cooccurrence_is_conditional_on_the_row():
    table = curation.cooccurrence(META, LABELS, F3)
    assert table.index.tolist() == F3 and table.columns.tolist() == F3
    np.testing.assert_allclose(table.to_numpy(), [
        [1, 2 / 3, 0],      # given Atelectasis (i1, i2, i5)
        [2 / 3, 1, 1 / 3],  # given Effusion (i2, i4, i5)
        [0, 1, 1],          # given Mass (i4)
    ])


def test_cooccurrence_of_an_absent_finding_is_nan():
    labels = np.zeros((6, 14), dtype=np.float32)
    labels[:2, 0] = 1
    table = curation.cooccurrence(META, labels)
    assert table.shape == (14, 14) and table.iloc[0, 0] == 1.0
    assert table.iloc[1].isna().all()


def test_findings_per_image():
    table = curation.findings_per_image(META, LABELS, F3)
    assert table.to_dict("list") == {"findings": [0, 1, 2], "images": [2, 1, 3],
                                     "fraction": [2 / 6, 1 / 6, 3 / 6]}


def test_followups_per_patient():
    table = curation.followups_per_patient(META)
    assert table.to_dict("list") == {"images_per_patient": [1, 2], "patients": [2, 2],
                                     "fraction": [0.5, 0.5], "images": [2, 4]}


def test_age_sex_by_finding_excludes_absurd_ages():
    table = curation.age_sex_by_finding(META, LABELS, F3).set_index("finding")
    assert table.index.tolist() == [*F3, "No Finding", "All"]
    assert table["images"].tolist() == [3, 3, 1, 2, 6]
    # numpy's linear quartiles: Atelectasis ages 30, 31, 71 -> q1 30.5, median 31, q3 51
    expected = {"Atelectasis": (30.5, 31, 51), "Effusion": (50.5, 70, 70.5), "Mass": (70, 70, 70),
                "No Finding": (50, 50, 50), "All": (31, 50, 70)}
    for name, quartiles in expected.items():
        got = table.loc[name, ["age_q1", "age_median", "age_q3"]].tolist()
        assert got == pytest.approx(quartiles), name
    assert table["ages_excluded"].tolist() == [0, 0, 0, 1, 1]
    np.testing.assert_allclose(table["female_share"], [2 / 3, 1 / 3, 0, 1 / 2, 1 / 2])


def test_age_when_every_age_is_excluded():
    meta = META.assign(age=500.0)
    table = curation.age_sex_by_finding(meta, LABELS, F3).set_index("finding")
    assert table["age_median"].isna().all() and table.loc["All", "ages_excluded"] == 6


def test_view_by_finding():
    table = curation.view_by_finding(META, LABELS, F3)
    assert table.columns.tolist() == ["finding", "images", "share_PA", "share_AP"]
    np.testing.assert_allclose(table["share_PA"], [2 / 3, 1 / 3, 0, 1, 4 / 6])
    np.testing.assert_allclose(table["share_AP"], [1 / 3, 2 / 3, 1, 0, 2 / 6])


def test_split_summary():
    table = curation.split_summary(META)
    assert table["split"].tolist() == ["train", "val", "test", "All"]
    assert table["images"].tolist() == [3, 1, 2, 6]
    assert table["patients"].tolist() == [2, 1, 1, 4]
    np.testing.assert_allclose(table["fraction"], [1 / 2, 1 / 6, 1 / 3, 1])


def test_bbox_summary_in_findings_order():
    boxes = pd.DataFrame({
        "id": ["i1", "i1", "i2", "i5", "i4"],
        "finding": ["Atelectasis", "Atelectasis", "Effusion", "Atelectasis", "Cardiomegaly"],
        "x": 0.0, "y": 0.0,
        "w": [10.0, 30.0, 5.0, 50.0, 100.0],
        "h": [20.0, 40.0, 5.0, 60.0, 100.0],
    })
    table = curation.bbox_summary(boxes)
    assert table.to_dict("list") == {
        "finding": ["Atelectasis", "Cardiomegaly", "Effusion"], "boxes": [3, 1, 1],
        "images": [2, 1, 1], "median_w": [30.0, 100.0, 5.0], "median_h": [40.0, 100.0, 5.0]}


def test_misaligned_labels_are_refused():
    with pytest.raises(DataError, match=r"labels \(6, 3\) do not match 6 images x 14 findings"):
        curation.prevalence(META, LABELS)


def test_real_sample_statistics():
    root = sample("nih-cxr14-sample")
    from cxr_lib.data.nih import read_chestxray14

    ds = read_chestxray14(root)
    prevalence = curation.prevalence(ds.meta, ds.labels).set_index("finding")["images"]
    assert prevalence[["Infiltration", "No Finding", "Pneumonia", "Edema"]].tolist() == [
        123, 100, 32, 18]
    assert curation.followups_per_patient(ds.meta)["images_per_patient"].tolist() == [1]
    views = curation.view_by_finding(ds.meta, ds.labels).set_index("finding")
    assert views.loc["All", "share_PA"] == pytest.approx(518 / 621)
    splits = curation.split_summary(ds.meta).set_index("split")
    assert splits.loc["test", "images"] == 75 and splits.loc["All", "patients"] == 621
    assert curation.cooccurrence(ds.meta, ds.labels).shape == (len(FINDINGS),) * 2

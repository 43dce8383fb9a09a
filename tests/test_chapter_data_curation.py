"""Chapter 1's sentences on hand-made label tables: typical, empty, all-NaN and one positive."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from cxr_lib.analysis import curation
from cxr_lib.chapters import data_curation as ch
from cxr_lib.data import FINDINGS


def table(rows: list[tuple[str, str, float, str, str]]) -> tuple[pd.DataFrame, np.ndarray]:
    """meta and labels of images given as (patient, findings joined by |, age, sex, view)."""
    meta = pd.DataFrame(rows, columns=["patient", "finding_labels", "age", "sex", "view"])
    labels = np.array([[float(f in text.split("|")) for f in FINDINGS]
                       for text in meta["finding_labels"]], dtype=np.float32).reshape(-1, 14)
    meta["id"] = [f"{i:08d}_000.png" for i in range(len(meta))]
    return meta, labels


TYPICAL = table([("1", "Effusion", 60, "F", "AP"), ("1", "Effusion|Edema", 61, "F", "AP"),
                 ("2", "No Finding", 40, "M", "PA"), ("3", "Edema", 150, "M", "PA"),
                 ("3", "No Finding", 70, "M", "PA")])
EMPTY = table([])
ONE = table([("1", "Nodule", 50, "F", "PA")])


def quiet(function, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0 / 0 on no images
        return function(*args)


def test_label_words_name_the_file_and_count_images_and_patients():
    meta, _ = TYPICAL
    assert ch.label_words("/d/Data_Entry_2017_v2020.csv", meta, True) == {
        "label_origin": "the label file found in the data root (`Data_Entry_2017_v2020.csv`)",
        "n_images": "5", "n_patients": "3"}
    shipped = ch.label_words("x.csv.gz", EMPTY[0], False)
    assert shipped == {"label_origin": "the copy of the official label file shipped by "
                                       "TorchXRayVision", "n_images": "0", "n_patients": "0"}


def test_prevalence_words_give_the_no_finding_share_and_the_rarest_finding():
    typical = ch.prevalence_words(curation.prevalence(*TYPICAL))
    assert typical["no_finding_share"] == "40.0%"
    # the last of the 14 by share: an absent finding, as in any file that lacks one
    assert typical["rarest"].endswith("(0 images, 0.00%)")
    one = ch.prevalence_words(curation.prevalence(*ONE))
    assert one["no_finding_share"] == "0.0%" and one["rarest"].endswith("(0 images, 0.00%)")
    prev = pd.DataFrame({"finding": [*FINDINGS, "No Finding"], "images": [3] * 14 + [5],
                         "fraction": [0.3] * 13 + [0.1, 0.5]})
    assert ch.prevalence_words(prev) == {"no_finding_share": "50.0%",
                                         "rarest": f"{FINDINGS[-1]} (3 images, 10.00%)"}
    single = prev.assign(images=[1] * 15)
    assert ch.prevalence_words(single)["rarest"] == f"{FINDINGS[-1]} (1 image, 10.00%)"


def test_prevalence_words_on_no_images_and_no_findings():
    empty = ch.prevalence_words(quiet(curation.prevalence, *EMPTY))  # all fractions NaN
    assert empty == {"no_finding_share": "an unknown share",
                     "rarest": "none: no image here carries any of the findings"}
    healthy = ch.prevalence_words(curation.prevalence(*table([("1", "No Finding", 5, "F", "PA")])))
    assert healthy == {"no_finding_share": "100.0%",
                       "rarest": "none: no image here carries any of the findings"}
    rows = pd.DataFrame(columns=["finding", "images", "fraction"])
    assert ch.prevalence_words(rows)["no_finding_share"] == "an unknown share"


def test_cooccurrence_words_name_the_strongest_pair():
    co = quiet(curation.cooccurrence, *TYPICAL)
    # Effusion: 2 images, 1 with Edema (50%); Edema: 2 images, 1 with Effusion (50%)
    assert ch.cooccurrence_words(co) == {
        "top_pair": "50% of images with Effusion also carry Edema"}
    hand = pd.DataFrame([[1.0, 0.25], [0.8, 1.0]], index=["A", "B"], columns=["A", "B"])
    assert ch.cooccurrence_words(hand)["top_pair"] == "80% of images with B also carry A"


def test_cooccurrence_words_when_nothing_comes_together():
    nan = quiet(curation.cooccurrence, *EMPTY)  # every row NaN
    assert ch.cooccurrence_words(nan) == {
        "top_pair": "none, since no finding occurs here alongside another one"}
    one = quiet(curation.cooccurrence, *ONE)  # one finding, with nothing else
    assert ch.cooccurrence_words(one) == {
        "top_pair": "none, since no two findings occur on the same image here"}
    assert ch.cooccurrence_words(pd.DataFrame())["top_pair"].startswith("none")


def test_visits_words_share_single_visits_and_frequent_patients():
    meta, _ = TYPICAL
    words = ch.visits_words(curation.followups_per_patient(meta), len(meta))
    assert words == {"single_visit": "33%", "share_from_frequent": "0%"}
    many = pd.DataFrame({"patient": ["1"] * 10 + ["2"]})
    assert ch.visits_words(curation.followups_per_patient(many), 11) == {
        "single_visit": "50%", "share_from_frequent": "91%"}
    none_single = pd.DataFrame({"patient": ["1", "1"]})  # no patient with one image
    assert ch.visits_words(curation.followups_per_patient(none_single), 2)["single_visit"] == "0%"
    one = ch.visits_words(curation.followups_per_patient(ONE[0]), 1)
    assert one == {"single_visit": "100%", "share_from_frequent": "0%"}


def test_visits_words_on_no_patients_and_nan_shares():
    empty = curation.followups_per_patient(EMPTY[0])
    assert ch.visits_words(empty, 0) == {"single_visit": "none", "share_from_frequent": "none"}
    nan = pd.DataFrame({"images_per_patient": [1, 10], "patients": [1, 1],
                        "fraction": [math.nan, math.nan], "images": [math.nan, math.nan]})
    assert ch.visits_words(nan, 11) == {"single_visit": "an unknown share",
                                        "share_from_frequent": "0%"}


def test_demography_words_count_excluded_ages_and_name_the_ap_extremes():
    words = ch.demography_words(curation.age_sex_by_finding(*TYPICAL),
                                curation.view_by_finding(*TYPICAL))
    assert words["ages_excluded"] == ("here 1 such image was left out of the age statistics")
    assert words["ap_extremes"] == "Effusion (100% AP) to Edema (50% AP)"
    demo = pd.DataFrame({"finding": ["All"], "ages_excluded": [1234]})
    assert ch.demography_words(demo, pd.DataFrame({"finding": []}))["ages_excluded"] == (
        "here 1,234 such images were left out of the age statistics")


def test_demography_words_on_no_images_nan_shares_and_one_finding():
    empty = quiet(ch.demography_words, quiet(curation.age_sex_by_finding, *EMPTY),
                  curation.view_by_finding(*EMPTY))  # no view, so no share_AP column
    assert empty == {"ages_excluded": "this copy of the file has none",
                     "ap_extremes": "finding to finding, though no AP share can be measured here"}
    nan = pd.DataFrame({"finding": ["All", "Edema"], "ages_excluded": [math.nan, 0],
                        "share_AP": [math.nan, math.nan]})
    assert ch.demography_words(nan, nan) == {
        "ages_excluded": "this copy of the file gives no count of them",
        "ap_extremes": "finding to finding, though no AP share can be measured here"}
    one = ch.demography_words(curation.age_sex_by_finding(*ONE), curation.view_by_finding(*ONE))
    assert one["ap_extremes"] == "Nodule (0% AP), the only finding present here"  # PA films only
    ap = table([("1", "Nodule", 50, "F", "AP"), ("2", "Mass", 50, "F", "PA")])
    assert ch.demography_words(curation.age_sex_by_finding(*ap), curation.view_by_finding(*ap))[
        "ap_extremes"] == "Nodule (100% AP) to Mass (0% AP)"


def test_split_and_image_words_say_where_they_come_from():
    assert ch.split_words(True)["split_origin"].startswith("the official lists of the data root")
    assert "no data root was given" in ch.split_words(False)["split_origin"]
    assert ch.images_words(None, False) == {
        "images_origin": "synthetic phantoms (no data root was given): they are not real X-rays"}


def test_box_words_count_boxes_images_and_findings():
    boxes = pd.DataFrame({"id": ["a", "a", "b"], "finding": ["Nodule", "Mass", "Nodule"]})
    assert ch.box_words(boxes) == {"n_boxes": "3 boxes on 2 images, around 2 of the 14 findings"}
    assert ch.box_words(boxes[:1]) == {"n_boxes": "1 box on 1 image, around 1 of the 14 findings"}
    assert ch.box_words(boxes[:0]) == {"n_boxes": "no box around any of the 14 findings"}


def test_cache_words_say_found_or_made_and_how_fast():
    assert ch.cache_words(96, True, 0.0123) == {
        "cache_speed": "found the finished cache of 96 images from an earlier run and opened it "
                       "in 0.01 s"}
    assert ch.cache_words(2000, False, 2.0) == {
        "cache_speed": "decoded and stored 2,000 images in 2.0 s (1,000 images per second)"}
    assert ch.cache_words(1, False, 0.0) == {"cache_speed": "decoded and stored 1 image in 0.0 s"}
    assert ch.phantom_words(1234.4) == {"phantom_rate": "1,234"}


def test_split_meta_of_phantoms_is_patient_disjoint():
    split = ch.split_meta(None, EMPTY[0], seed=0, n_phantoms=12, phantom_size=32)
    assert len(split) == 12 and set(split["split"]) <= {"train", "val", "test"}


@pytest.mark.parametrize("seed", [0, 3])
def test_split_meta_of_a_root_follows_the_official_lists(tmp_path, seed):
    meta, _ = TYPICAL
    (tmp_path / "train_val_list.txt").write_text("\n".join(meta["id"][:4]) + "\n")
    (tmp_path / "test_list.txt").write_text(meta["id"][4] + "\n")
    split = ch.split_meta(tmp_path, meta, seed=seed, n_phantoms=0, phantom_size=32)
    assert split["split"].iloc[4] == "test" and set(split["split"][:4]) == {"train", "val"}
    assert "split" not in meta  # the label table itself is left as it was


def test_images_words_count_the_present_images_of_a_root():
    meta = pd.DataFrame()
    meta.attrs["chestxray14"] = {"present": 621, "listed": 112_120}
    dataset = type("Dataset", (), {"meta": meta})()
    assert ch.images_words(dataset, True) == {
        "images_origin": "real ChestX-ray14 images from the data root (621 of the 112,120 "
                         "listed images are present)"}

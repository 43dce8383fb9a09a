"""Chapter 5's words and tables, on hand-made runs: typical, empty, all-NaN and one-positive."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr_lib.chapters.files import runs_dir
from cxr_lib.chapters.results_analysis import (
    CLAIMS,
    Results,
    arm_name,
    auc_heat,
    box_file,
    box_note,
    every_run_words,
    heat_words,
    interval_words,
    map_note,
    model_family,
    model_shown,
    ours_beside_theirs,
    paired_table,
    paired_words,
    run_label,
    setup_words,
    shown_arm,
    sweep_runs,
    sweep_words,
)
from cxr_lib.methods.finetune import TEST_SCORES


def run(model="vit_small_patch16", init="mae", **changes) -> pd.Series:
    """One row of chapter 4's tables of runs."""
    row = {"model": model, "init": init, "layer_decay": np.nan, "drop_path": 0.1,
           "randaug_magnitude": np.nan, "train_fraction": 1.0, "patch_size": 16.0,
           "image_size": 64}
    return pd.Series({**row, **changes})


def test_a_model_family_and_a_runs_names():
    assert model_family("vit_small_patch16") == "ViT" and model_family("densenet121") == "DenseNet"
    assert model_family("resnet50") == "ResNet"  # chapter 4 names the CNN by its family too
    assert arm_name(run()) == "ViT from MAE"
    assert arm_name(run("densenet121", "moco")) == "DenseNet from MoCo v2"
    assert run_label(run()) == "ViT from MAE, drop path 0.1, no RandAugment"
    assert run_label(run("densenet121", "torchvision", layer_decay=0.65, randaug_magnitude=6.0,
                         train_fraction=0.1)) == (
        "DenseNet from released, decay 0.65, RandAugment 6, 10% of the labels")
    assert model_shown(run()) == "vit_small_patch16, patch 16, 64 px"
    assert model_shown(run("densenet121", patch_size=np.nan)) == "densenet121, 64 px"


def test_setup_words_say_what_the_images_are():
    assert setup_words(9, 1234, 10, False) == {
        "n_runs": "9", "n_test": "1,234 images of 10 patients",
        "images_origin": "synthetic phantoms (no data root was given), not real X-rays"}
    assert setup_words(0, 0, 0, True)["images_origin"] == "real ChestX-ray14 images"
    assert setup_words(0, 0, 0, True)["n_test"] == "0 images of 0 patients"


def starts_table() -> pd.DataFrame:
    return pd.DataFrame({"arm": ["ViT from MAE", "DenseNet from random"],
                         "test_auc.A": [0.7, 0.4], "test_auc.B": [0.6, np.nan]})


def test_heat_counts_the_findings_above_chance_and_names_the_extremes():
    heat = auc_heat(starts_table(), ["ViT from MAE", "DenseNet from random"], ["A", "B"])
    assert heat.loc["DenseNet from random"].tolist()[0] == 0.4
    assert heat_words(heat)["heat_note"] == (
        "ViT from MAE is above chance on 2 of 2 findings; DenseNet from random is above chance "
        "on 0 of 1 findings. Averaged over the starts, the easiest finding was B (0.60) and the "
        "hardest A (0.55).")
    one = heat_words(heat.iloc[:1, :1])["heat_note"]  # one start, one finding
    assert one == ("ViT from MAE is above chance on 1 of 1 findings. Averaged over the starts, "
                   "the easiest finding was A (0.70) and the hardest A (0.70).")


def test_heat_words_without_starts_or_without_any_auc():
    assert heat_words(pd.DataFrame())["heat_note"] == (
        "no start of chapter 4 was found, so no AUC is shown.")
    blank = pd.DataFrame({"A": [np.nan]}, index=["ViT from MAE"])
    assert heat_words(blank)["heat_note"] == (
        "ViT from MAE is above chance on 0 of 0 findings. No finding has both classes among the "
        "test images, so none is easiest or hardest.")


def intervals(aucs, lower, upper, skipped) -> pd.DataFrame:
    return pd.DataFrame({"auc": aucs, "lower": lower, "upper": upper, "skipped": skipped,
                         "run": [f"run {i}" for i in range(len(aucs))]})


def test_interval_words_give_the_widths_and_the_replicates_left_out():
    words = interval_words(intervals([0.6, 0.5], [0.5, 0.45], [0.7, 0.52], [0, 3]), 1000, 0.9)
    assert words == {"level": "90%", "ci_widths": "from 0.070 to 0.200", "skipped_note": (
        "Up to 3 of the 1,000 replicates drew no positive (or no negative) image of some finding "
        "and are left out of the mean's interval, so the interval describes only the resamples "
        "that contain the rare findings' few patients.")}
    one = interval_words(intervals([0.6], [0.5], [0.7], [0]), 1000, 0.95)
    assert one["ci_widths"] == "from 0.200 to 0.200"
    assert one["skipped_note"] == "Every replicate held both classes of every finding."


def test_interval_words_without_starts_or_with_nan_intervals():
    empty = interval_words(intervals([], [], [], []), 1000, 0.95)
    assert empty["ci_widths"] == "not drawn (no start was scored), so no"
    assert empty["skipped_note"] == "Every replicate held both classes of every finding."
    nan = interval_words(intervals([np.nan], [np.nan], [np.nan], [1000]), 1000, 0.95)
    assert nan["ci_widths"].startswith("undefined (no finding has both classes")
    assert nan["skipped_note"].startswith("Up to 1000 of the 1,000 replicates")


def test_every_run_words_set_the_best_against_the_worst():
    apart = every_run_words(intervals([0.7, 0.6, 0.5], [0.65, 0.5, 0.45], [0.75, 0.7, 0.55],
                                      [0, 0, 0]))["every_run_sentence"]
    assert apart == ("The best run (run 0) reached 0.700 [0.650, 0.750], the worst (run 2) 0.500 "
                     "[0.450, 0.550]: their intervals do not overlap, so at least these two runs "
                     "differ.")
    overlap = every_run_words(intervals([0.7, 0.5], [0.4, 0.3], [0.8, 0.6], [0, 0]))
    assert overlap["every_run_sentence"].endswith(
        "even these two intervals overlap, so no run of this edition stands apart from the "
        "others on intervals alone.")


def test_every_run_words_for_no_run_one_run_and_nan_aucs():
    none = every_run_words(intervals([], [], [], []))["every_run_sentence"]
    assert none.startswith("No run of chapter 4 has a mean test AUC here")
    nan = every_run_words(intervals([np.nan, np.nan], [np.nan] * 2, [np.nan] * 2, [0, 0]))
    assert nan["every_run_sentence"] == none
    one = every_run_words(intervals([0.6, np.nan], [0.5, np.nan], [0.7, np.nan], [0, 0]))
    assert one["every_run_sentence"] == (
        "Only one run has a mean test AUC here (run 0, 0.600 [0.500, 0.700]), so no run can be "
        "set against another.")


def paired(p, holm) -> pd.DataFrame:
    return pd.DataFrame({"comparison": [c for c, _, _ in CLAIMS][:len(p)], "p": p,
                         "p (Holm)": holm})


def test_paired_words_name_the_claims_that_hold():
    words = paired_words(paired([0.001, 0.2, 0.01], [0.003, 0.2, 0.02]), 0.95)
    assert words["alpha"] == "5%"
    assert words["paired_sentence"] == (
        "2 of the 3 comparisons hold after Holm's correction (adjusted p below 5%): MAE vs "
        "random (ViT), ViT MAE vs DenseNet MoCo v2; the others cannot be told apart on this "
        "test split")
    one = paired_words(paired([0.001], [0.001]), 0.9)["paired_sentence"]
    assert one.startswith("1 of the 1 comparisons hold after Holm's correction (adjusted p "
                          "below 10%): MAE vs random (ViT);")


def test_paired_words_when_none_holds_none_ran_or_every_p_is_nan():
    none = paired_words(paired([0.2, 0.3], [0.4, 0.4]), 0.95)["paired_sentence"]
    assert none == ("none of the 2 comparisons holds after Holm's correction (adjusted p below "
                    "5%): on this test split the models they compare cannot be told apart")
    assert paired_words(paired([np.nan], [np.nan]), 0.95)["paired_sentence"].startswith(
        "none of the 1 comparisons holds")
    assert paired_words(paired([], []), 0.95)["paired_sentence"] == (
        "no comparison could be made: chapter 4 ran neither arm pair that the claims compare")


def results(tmp_path, arms: dict[str, np.ndarray], labels: np.ndarray) -> Results:
    """A work folder with one run per arm, its test scores stored as chapter 4 stores them."""
    index = pd.DataFrame({"id": [f"i{k}" for k in range(len(labels))],
                          "patient": [f"p{k // 2}" for k in range(len(labels))]})
    for arm, logits in arms.items():
        folder = runs_dir(tmp_path) / arm
        folder.mkdir(parents=True)
        table = pd.DataFrame(logits, columns=["A", "B"]).assign(**index)
        table.sample(frac=1, random_state=0).to_parquet(folder / TEST_SCORES)  # any order
    starts = pd.DataFrame({"arm": list(arms), "run": list(arms)})
    return Results(tmp_path, {"starts": starts}, starts, starts, np.arange(len(labels)), index,
                   labels, ["A", "B"])


def test_scores_align_by_id_and_paired_claims_need_both_arms(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (40, 2)).astype(float)  # [N, F]
    arms = {"ViT from random": rng.normal(0, 1, (40, 2)), "ViT from MAE": labels + 0.1}
    res = results(tmp_path, arms, labels)
    scores = res.arm_scores()
    np.testing.assert_allclose(scores["ViT from MAE"], labels + 0.1)
    table = paired_table(scores, res, n_boot=50, seed=0, level=0.95)
    assert table["comparison"].tolist() == ["MAE vs random (ViT)"]  # the one claim that ran
    assert table.loc[0, "second"] == pytest.approx(1.0) and table.loc[0, "difference"] > 0
    assert shown_arm(scores) == "ViT from MAE"
    assert shown_arm({"ViT from random": None}) == "ViT from random"
    empty = paired_table({}, res, n_boot=50, seed=0, level=0.95)
    assert len(empty) == 0 and "p (Holm)" in empty.columns
    assert paired_words(empty, 0.95)["paired_sentence"].startswith("no comparison could be made")


def test_sweep_words_name_the_most_important_setting():
    importance = pd.DataFrame({"parameter": ["drop_path", "layer_decay"], "spearman": [-0.77, 0.1]})
    assert sweep_words(4, importance) == {
        "n_sweep_runs": "4",
        "top_param": "drop_path (Spearman correlation with the validation AUC -0.77)"}
    flat = sweep_words(2, importance.assign(spearman=np.nan))["top_param"]
    assert flat == ("drop_path (no Spearman correlation with the validation AUC: the setting or "
                    "the AUC did not vary)")
    assert sweep_words(0, importance.iloc[:0])["top_param"] == "none: no setting was measured"


def test_sweep_runs_are_the_distinct_runs_of_the_three_sweeps():
    tables = {"starts": pd.DataFrame({"run": ["s"]}),
              "drop_path": pd.DataFrame({"run": ["a", "b"]}),
              "layer_decay": pd.DataFrame({"run": ["b", "c"]})}
    assert sweep_runs(tables)["run"].tolist() == ["a", "b", "c"]


def test_map_note_reads_the_peaks_of_the_maps():
    focused = np.zeros((2, 4, 4))
    focused[:, 0, 0] = 1.0  # peak 16 times the mean
    assert map_note("the ViT", focused) == (
        "the peak of the ViT's maps stands 16.0 times above their mean (a flat map gives 1)")
    mixed = np.stack([focused[0], np.ones((4, 4)), np.zeros((4, 4))])
    assert map_note("Grad-CAM", mixed) == (
        "the peak of Grad-CAM's maps stands 1.0 to 16.0 times above their mean (a flat map gives "
        "1); 1 of them is empty: no part of the image raised the predicted finding's score; 1 of "
        "3 are nearly flat (under 1.5 times), so the model looks almost everywhere alike there "
        "and the picture shows no focus")
    assert map_note("Grad-CAM", np.zeros((2, 4, 4))) == (
        "all of Grad-CAM's maps are empty: no part of the image raised the predicted finding's "
        "score")
    assert map_note("Grad-CAM", np.full((2, 4, 4), np.nan)).startswith("all of Grad-CAM's maps")
    assert map_note("the ViT", np.zeros((0, 4, 4))) == "no map of the ViT was drawn"
    assert "all 2 are nearly flat" in map_note("the ViT", np.ones((2, 4, 4)))


def test_box_note_and_the_box_file(tmp_path):
    assert box_note(12, 4) == ("12 test images carry NIH boxes here; the table above scores each "
                               "box of the first 4 against its image's map.")
    assert box_note(0, 4).startswith("None of this edition's test images has an NIH box")
    assert box_file(None).name == "BBox_List_2017.csv.gz"  # the shipped file
    assert box_file(tmp_path).name == "BBox_List_2017.csv.gz"  # a root without its own
    (tmp_path / "BBox_List_2017.csv").write_text("")
    assert box_file(tmp_path) == tmp_path / "BBox_List_2017.csv"


def test_ours_beside_theirs_follow_the_published_rows():
    theirs = pd.DataFrame({"source": ["Xiao et al."], "mean AUC (%)": [81.04]})
    starts = pd.DataFrame([run(), run("densenet121", "random", patch_size=np.nan)]).assign(
        arm=["ViT from MAE", "DenseNet from random"])
    table = ours_beside_theirs(theirs, starts, pd.DataFrame({"arm": ["ViT from MAE"],
                                                             "auc": [0.61234]}), 1500)
    assert table["mean AUC (%)"].tolist() == [81.0, 61.2]  # a start without an interval: no row
    assert table.loc[1, "pre-training"] == "MAE, this edition's images"
    assert table.loc[1, "tested on"] == "this edition's test split (1,500 images)"

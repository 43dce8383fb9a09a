"""Chapter 4's arms and words (cxr_lib.chapters.finetuning_ablations) on hand-made numbers: the
typical case, no input, all NaN, and one positive or one share, checking the words themselves."""

import math

import numpy as np
import pandas as pd
import pytest

from cxr_lib.chapters import finetuning_ablations as ch4
from cxr_lib.chapters.finetuning_ablations import (
    few_positives_sentence,
    gain_sentence,
    label_sentence,
    label_verdict,
    setting_sentence,
    signal_sentence,
    smallest_share_sentence,
)
from cxr_lib.methods.finetune import FinetuneRecipe
from cxr_lib.models.classifier import WeightsUnavailable

NAN = math.nan


# ----------------------------------------------------------------------------- names

def test_the_cnn_family_comes_from_the_model_parameter():
    assert ch4.cnn_family("densenet121") == "DenseNet"
    assert ch4.cnn_family("resnet50") == "ResNet" and ch4.cnn_family("resnet10t") == "ResNet"
    assert ch4.cnn_family("convnext_tiny") == "ConvNeXt"
    assert ch4.cnn_family("mystery_net") == "mystery_net" and ch4.cnn_family("") == ""


def test_small_words_of_the_recipe():
    assert ch4.seeds_words(1) == "one seed" and ch4.seeds_words(3) == "3 seeds"
    assert ch4.channels_words(1) == "1 (gray)"
    assert ch4.channels_words(3) == "3 (gray replicated to RGB)"
    assert ch4.view_words(1.0) == "whole image resized"
    assert ch4.view_words(0.875) == "central 87.5% of the side, resized"
    assert ch4.recipe_words(0.55, 0.2, 6, [0]) == {"paper_ld": "0.55", "paper_dp": "0.2",
                                                   "paper_ra": "6", "n_seeds": "one seed"}
    assert ch4.start_label("ViT", ch4.MAE) == "ViT\nMAE on these images\n(paper's choice)"
    assert ch4.start_label("ResNet", ch4.RANDOM) == "ResNet\nrandom"
    assert ch4.split_name("valid") == "validation" and ch4.split_name("test") == "test"


def test_resolution_note_only_when_the_patch_grid_changes():
    assert ch4.resolution_note(64, 64, 16) == ""
    assert ch4.resolution_note(64, 70, 16) == ""  # 4x4 patches either way
    note = ch4.resolution_note(64, 32, 16)
    assert note.startswith("The MAE encoder was pre-trained at 64 px and is fine-tuned here at "
                           "32 px, so each image has 2x2 patches instead of 4x4.")


def test_few_positives_counts_the_rare_findings():
    assert few_positives_sentence([2, 10, 4, 30]) == (
        "2 of the 4 findings have fewer than five positive images there, the rarest 2")
    assert few_positives_sentence([5, 12]) == "its rarest finding has 5 positive images"
    assert few_positives_sentence([1]) == (
        "1 of the 1 findings have fewer than five positive images there, the rarest 1")
    unknown = ch4.positives(np.full((3, 2), np.nan))  # every label unknown: no positive
    assert few_positives_sentence(unknown) == (
        "2 of the 2 findings have fewer than five positive images there, the rarest 0")
    with pytest.raises(ValueError, match="no findings"):
        few_positives_sentence([])


# ----------------------------------------------------------------------------- the arms

def test_arms_are_labelled_by_the_module_and_the_cnn_parameter(monkeypatch):
    def no_weights(model):
        raise WeightsUnavailable(f"no ImageNet weights for {model}")
    monkeypatch.setattr(ch4, "imagenet_weights", no_weights)
    vit = FinetuneRecipe(model="vit_tiny_patch16", image_size=32)
    cnn = FinetuneRecipe(model="resnet50", image_size=32, layer_decay=None, drop_path=0.0)
    found, skipped = ch4.arms(vit, cnn, "mae.pt", "moco.pt")
    assert list(found) == [("ViT", "random"), ("ViT", "MAE on these images"), ("ResNet", "random"),
                           ("ResNet", "MoCo v2 on these images")]
    assert found[("ViT", ch4.MAE)].init == "mae" and found[("ViT", ch4.MAE)].weights == "mae.pt"
    assert found[("ResNet", ch4.MOCO)].model == "resnet50"
    assert skipped == ["ViT: no ImageNet weights for vit_tiny_patch16",
                       "ResNet: no ImageNet weights for resnet50"]
    given, none_skipped = ch4.arms(vit, cnn, "mae.pt", "moco.pt", "vit.pth", "cnn.pth")
    assert given[("ViT", ch4.IMAGENET)].weights == "vit.pth" and none_skipped == []
    assert given[("ResNet", ch4.IMAGENET)].init == "imagenet"


# ----------------------------------------------------------------------------- where to start

def test_gain_sentence_compares_with_the_random_start_on_both_splits():
    above = gain_sentence("ViT", ch4.MAE, 0.6, 0.5, 0.58, 0.52)
    assert above == ("fine-tuned from MAE on these images the ViT reached a validation AUC of "
                     "0.600, 0.100 above the same ViT from random weights (0.500); on the test "
                     "split 0.580 against 0.520, which agrees")
    assert gain_sentence("ViT", ch4.MAE, 0.4, 0.5, 0.6, 0.5).endswith(
        "0.100 below the same ViT from random weights (0.500); on the test split 0.600 against "
        "0.500, which reverses it")
    level = gain_sentence("DenseNet", ch4.MOCO, 0.345, 0.345, 0.545, 0.408)
    assert "level with the same DenseNet" in level and level.endswith("which does not confirm it")
    assert gain_sentence("A", "B", 0.5, 0.4, 0.5, 0.5).endswith("which does not confirm it")


def test_gain_sentence_says_what_could_not_be_scored():
    nan = gain_sentence("ViT", ch4.MAE, NAN, NAN, NAN, NAN)
    assert nan == ("fine-tuned from MAE on these images the ViT reached a validation AUC of not "
                   "scored, against not scored from random weights, so no gain can be read")
    test = gain_sentence("ViT", ch4.MAE, 0.6, 0.5, NAN, 0.5)
    assert test.endswith("on the test split not scored against 0.500, which can neither confirm "
                         "nor reverse it")


def test_skipped_spread_and_signal_sentences():
    assert ch4.skipped_sentence([]) == "Both ImageNet arms ran, from weights found on this machine."
    assert ch4.skipped_sentence(["ViT: none.", "DenseNet: none."]) == "ViT: none. DenseNet: none."
    assert ch4.spread_sentence(1) == "Each bar is one run (one seed), so no error bar can be drawn."
    assert ch4.spread_sentence(2) == "The error bars are the standard deviation over seeds."
    assert signal_sentence(0.6) == "" and signal_sentence(0.9) == ""
    assert signal_sentence(0.489).startswith(
        "No start got far from chance here (the best validation AUC is 0.489): this edition's")
    assert signal_sentence(NAN).startswith(
        "No start got far from chance here (no start could be scored on the validation split)")


def _start_table(family: str, valid: list[float], test: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"family": ["ViT", "ViT", family, family],
                         "start": [ch4.RANDOM, ch4.MAE, ch4.RANDOM, ch4.MOCO],
                         "valid_auc_mean": valid, "test_auc_mean": test})


def test_start_words_name_the_cnn_by_its_parameter():
    table = _start_table("ResNet", [0.5, 0.6, 0.55, 0.5], [0.5, 0.7, 0.6, 0.4])
    words = ch4.start_words(table, [], 1, "resnet50")
    assert words["start_sentence"] == (
        "fine-tuned from MAE on these images the ViT reached a validation AUC of 0.600, 0.100 "
        "above the same ViT from random weights (0.500); on the test split 0.700 against 0.500, "
        "which agrees; fine-tuned from MoCo v2 on these images the ResNet reached a validation "
        "AUC of 0.500, 0.050 below the same ResNet from random weights (0.550); on the test "
        "split 0.400 against 0.600, which agrees.")
    assert "DenseNet" not in words["start_sentence"]
    assert words["signal_note"] == "" and words["start_spread"].startswith("Each bar is one run")
    assert words["skipped_arms"].startswith("Both ImageNet arms ran")
    nan = ch4.start_words(_start_table("DenseNet", [NAN] * 4, [NAN] * 4), ["x"], 2,
                          "densenet121")
    assert nan["start_sentence"].count("so no gain can be read") == 2
    assert "no start could be scored" in nan["signal_note"] and nan["skipped_arms"] == "x"


# ----------------------------------------------------------------------------- the sweeps

def test_setting_sentence_judges_on_validation_and_checks_on_test():
    text = setting_sentence("drop-path rate", [0.0, 0.2], [0.363, 0.345], [0.5, 0.4], 0.2)
    assert text.startswith("the best validation AUC (0.363) came at drop-path rate 0.0; the "
                           "paper's choice (0.2) reached 0.345, 0.018 below the best.")
    assert text.endswith("On the test split the best was the same, drop-path rate 0.0 (0.500).")
    one = setting_sentence("drop-path rate", [0.2], [0.5], [0.4], 0.2)
    assert "the paper's choice (0.2) reached 0.500, the best" in one
    nan = setting_sentence("drop-path rate", [0.0, 0.2], [NAN, NAN], [NAN, NAN], 0.2)
    assert nan == ("Not every value of the drop-path rate could be scored on the validation "
                   "split, so this sweep is not judged.")
    with pytest.raises(ValueError, match="non-empty"):
        setting_sentence("drop-path rate", [], [], [], 0.2)


def test_sweep_words_and_table_cover_every_sweep():
    plan = ch4.sweeps([0.55, 1.0], [0, 6], [0.0, 0.2], 0.55, 6, 0.2)
    assert [s.label for s in plan.values()] == ["layer-wise LR decay", "RandAugment magnitude",
                                               "drop-path rate"]
    tables = {setting: pd.DataFrame({setting: [float(v) for v in sweep.values],  # as run_grid
                                     "valid_auc_mean": [0.5, 0.6],
                                     "test_auc_mean": [0.4, 0.45]})
              for setting, sweep in plan.items()}
    words = ch4.sweep_words(plan, tables)
    assert list(words) == ["layer_decay_sentence", "randaug_magnitude_sentence",
                           "drop_path_sentence"]
    assert words["randaug_magnitude_sentence"].startswith(
        "the best validation AUC (0.600) came at RandAugment magnitude 6.0; the paper's choice "
        "(6.0) reached 0.600, the best.")
    table = ch4.sweep_table(tables)
    assert table.index.names == ["sweep", "value"] and len(table) == 6


# ----------------------------------------------------------------------------- label efficiency

def test_label_sentence_gives_each_share_and_its_gap():
    assert label_sentence([0.1, 1.0], [10, 1071], [0.427, 0.345], [0.375, 0.345]) == (
        "10% of the labels (10 images): MAE 0.427 against random 0.375 (+0.052); 100% of the "
        "labels (1,071 images): MAE 0.345 against random 0.345 (+0.000).")
    assert label_sentence([0.01], [1], [0.5], [0.6]) == (
        "1% of the labels (1 images): MAE 0.500 against random 0.600 (-0.100).")
    assert label_sentence([0.1], [10], [NAN], [NAN]) == (
        "10% of the labels (10 images): MAE not scored against random not scored.")
    with pytest.raises(ValueError, match="no label shares"):
        label_sentence([], [], [], [])


def test_label_verdict_counts_the_shares_where_mae_was_ahead():
    assert label_verdict([0.6, 0.5], [0.5, 0.5], [0.6, 0.7], [0.5, 0.5]) == (
        "the MAE start was ahead at 1 of the 2 label shares on the validation split, and at 2 "
        "of them on the test split")
    assert label_verdict([0.6], [0.5], [0.4], [0.5]) == (
        "the MAE start was ahead at 1 of the 1 label shares on the validation split, and at 0 "
        "of them on the test split")
    assert label_verdict([NAN, NAN], [NAN, NAN], [0.6, NAN], [0.5, 0.5]) == (
        "the MAE start was ahead at 0 (2 not scored) of the 2 label shares on the validation "
        "split, and at 1 (1 not scored) of them on the test split")
    assert label_verdict([], [], [], []) == (
        "the MAE start was ahead at 0 of the 0 label shares on the validation split, and at 0 "
        "of them on the test split")


def test_smallest_share_sentence_counts_cases_in_the_singular_for_one():
    assert smallest_share_sentence(0.1, 1071, [3, 1, 8]) == (
        "the smallest share, 10%, is 1,071 images, in which the rarest finding has 1 positive "
        "case")
    assert smallest_share_sentence(0.01, 10, [0.0, 2.0]).endswith("has 0 positive cases")
    assert smallest_share_sentence(0.5, 4, ch4.positives(np.full((4, 3), np.nan))).endswith(
        "has 0 positive cases")  # every label unknown
    with pytest.raises(ValueError, match="no findings"):
        smallest_share_sentence(0.1, 0, [])


# ----------------------------------------------------------------------------- carried forward

def test_carried_words_count_distinct_runs_over_the_tables(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    pd.DataFrame({"run": ["a", "b"]}).to_parquet(runs / "ch4_starts.parquet")
    pd.DataFrame({"run": ["b", "c"]}).to_parquet(runs / "ch4_drop_path.parquet")
    pd.DataFrame({"run": ["z"]}).to_parquet(runs / "ch6_other.parquet")
    assert ch4.carried_words(tmp_path) == {
        "n_runs": "3", "tables": "`ch4_drop_path.parquet`, `ch4_starts.parquet`"}
    with pytest.raises(FileNotFoundError, match="chapter 4 wrote no table"):
        ch4.carried_words(tmp_path / "empty")

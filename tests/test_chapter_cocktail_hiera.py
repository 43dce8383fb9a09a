"""Chapter 6's words: the ranking of the starts, the painters, and every sentence glued."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from heldout import errors, heldout

from cxr_lib.chapters.cocktail_hiera import (
    OURS,
    THEIRS,
    cocktail_words,
    label_words,
    mask_words,
    norm_words,
    painter_sentence,
    painter_table,
    painter_words,
    plural,
    ranking_sentence,
    ranking_words,
    scoring_words,
    start_label,
)
from cxr_lib.methods.cocktail import NO_FINDING


def gap_at_least(aucs: dict, tie: float):
    return lambda a, b: abs(aucs[a] - aucs[b]) >= tie


def test_ranking_puts_greater_only_where_both_sides_are_told_apart():
    aucs = {"random": 0.529, "chest only": 0.550, "cocktail": 0.553}
    assert (ranking_sentence(aucs, gap_at_least(aucs, 0.02))
            == "the order is cocktail ≈ chest only > random")
    assert ranking_sentence(aucs, gap_at_least(aucs, 0.03)) == (
        "the validation AUCs cannot split the starts into a better and a worse group "
        "(cocktail ≈ chest only ≈ random), so this edition cannot rank them")
    three = {"a": 0.70, "b": 0.60, "c": 0.65}
    assert ranking_sentence(three, gap_at_least(three, 0.03)) == "the order is a > c > b"
    spaced = {"a": 0.7, "b": 0.65, "c": 0.6}

    def only_ac(x: str, y: str) -> bool:
        return {x, y} == {"a", "c"}

    def all_but_bc(x: str, y: str) -> bool:
        return {x, y} != {"b", "c"}

    assert ranking_sentence(spaced, only_ac).startswith(
        "the validation AUCs cannot split")  # a and c differ, but b sits between both
    assert ranking_sentence(spaced, all_but_bc) == "the order is a > b ≈ c"


def test_painters_that_do_not_beat_the_blank_baseline_say_nothing():
    aucs = {"chest share 100%": 0.550, "chest share 50%": 0.553}
    said = painter_sentence(list(aucs), [heldout(1.0798), heldout(1.0792)], list(aucs.values()),
                            gap_at_least(aucs, 0.03))
    assert said.startswith("no encoder painted the held-out chest images better than the blank")
    assert "(chest share 100%: 1.0798; chest share 50%: 1.0792) are not below its 0.9800" in said
    assert "says nothing" in said and "best classifier" not in said
    # below the blank prediction, but within the noise of the images
    close = errors(0.978 + heldout(0, 0.05).model)
    said = painter_sentence(["A", "B"], [close, heldout(1.0)], [0.7, 0.6], lambda a, b: True)
    assert "not clearly below its 0.9800" in said and "says nothing" in said


def test_painters_whose_losses_cannot_be_told_apart_are_a_tie():
    said = painter_sentence(["A", "B", "C"], [heldout(0.60, 0.05), heldout(0.601, 0.05),
                                              heldout(0.70)], [0.70, 0.60, 0.65],
                            lambda a, b: True)
    assert said.startswith("the held-out losses cannot tell A and B apart (A: 0.6000; B: 0.6010")
    assert "cannot say which encoder painted best" in said


@pytest.mark.parametrize("aucs, verdict", [
    ([0.70, 0.60, 0.65], "A; losses A: 0.6000; B: 0.7000; C: 0.8000; blank prediction: 0.9800) "
     "also gave the best classifier among them, with a validation AUC of 0.700, clearly above "
     "the others"),
    ([0.60, 0.70, 0.65], "did not give the best classifier among them: its validation AUC, "
     "0.600, is clearly below the best, 0.700 (B)"),
    ([0.68, 0.70, 0.60], "gave a classifier (validation AUC 0.680) that cannot be told apart "
     "from that of B"),
])
def test_a_clear_best_painter_is_set_against_the_classifiers(aucs, verdict):
    said = painter_sentence(["A", "B", "C"], [heldout(0.6), heldout(0.7), heldout(0.8)], aucs,
                            gap_at_least(dict(zip("ABC", aucs, strict=True)), 0.03))
    assert said.startswith("the encoder that painted the held-out chest images best (A;")
    assert verdict in said


def test_painters_that_did_not_learn_are_named():
    said = painter_sentence(["A", "B"], [heldout(0.6), heldout(0.99)], [0.7, 0.6],
                            lambda a, b: True)
    assert "blank prediction: 0.9800, which B did not beat) also gave the best" in said
    with pytest.raises(ValueError, match="aligned"):
        painter_sentence(["A"], [heldout(0.6)], [0.7, 0.6], lambda a, b: True)


def test_ranking_of_no_start_one_start_and_nan_aucs():
    assert ranking_sentence({}, lambda a, b: True) == (
        "no start has a validation AUC (no finding has both classes among the validation "
        "images), so this edition cannot rank them")
    assert ranking_sentence({"a": np.nan, "b": np.nan}, lambda a, b: True).startswith(
        "no start has a validation AUC")
    assert ranking_sentence({"random": 0.6}, lambda a, b: True) == (
        "only random has a validation AUC, so this edition cannot rank the starts")
    # a start without an AUC is left out of the order, not ranked anywhere
    assert ranking_sentence({"a": 0.7, "b": np.nan, "c": 0.6}, lambda a, b: True) == (
        "the order is a > c")


def test_painters_without_a_score_say_nothing():
    said = painter_sentence(["A", "B"], [errors(np.full(100, np.nan))] * 2, [0.6, 0.7],
                            lambda a, b: True)
    assert said.startswith("no encoder painted the held-out chest images better than the blank "
                           "prediction: their losses (A: nan; B: nan) are not below its 0.9800")
    with pytest.raises(ValueError, match="non-empty"):
        painter_sentence([], [], [], lambda a, b: True)


def test_one_painter_that_learnt_is_the_best_of_one():
    said = painter_sentence(["A"], [heldout(0.6)], [0.7], lambda a, b: True)
    assert said == ("the encoder that painted the held-out chest images best (A; losses A: "
                    "0.6000; blank prediction: 0.9800) also gave the best classifier among them, "
                    "with a validation AUC of 0.700, clearly above the others")


def test_painter_words_map_the_shares_to_the_starts_of_the_ranking():
    starts = ["MAE, chest only", "MAE, cocktail (50% chest)"]
    table = pd.DataFrame({"start": ["random", *starts], "valid_auc": [0.5, 0.7, 0.6]})
    painter = painter_table([1.0, 0.5], starts, [heldout(0.6), heldout(0.7)], table)
    assert painter["fine-tuned AUC"].tolist() == [0.7, 0.6]
    asked = []
    words = painter_words(painter, [heldout(0.6), heldout(0.7)], starts,
                          lambda a, b: asked.append((a, b)) or True)
    assert words["n_painters"] == "2 MAE arms" and words["blank_loss"] == "0.9800"
    assert words["painter_sentence"].startswith(
        "the encoder that painted the held-out chest images best (chest share 100%;")
    assert asked == [("MAE, chest only", "MAE, cocktail (50% chest)")]


def test_cocktail_words_name_each_source_and_the_other_domain():
    table = pd.DataFrame({"source": ["phantom", "phantom-lowres"],
                          "what": ["synthetic chest phantoms", "lowres"],
                          "training images": [1200, 40]})
    words = cocktail_words(table, "phantom")
    assert words["cocktail_sources"] == ("synthetic chest phantoms (1,200 images), lowres "
                                         "(40 images)")
    assert words["other_domain"].startswith("The chest images of this edition are themselves "
                                            "phantoms")
    nih = pd.DataFrame({"source": ["chestxray14", "phantom"],
                        "what": ["NIH ChestX-ray14, adult chest X-rays", "synthetic phantoms"],
                        "training images": [491, 71]})
    assert cocktail_words(nih, "chestxray14")["other_domain"] == (
        "Phantoms play the part of a different domain: drawn, not X-rayed.")
    real = pd.DataFrame({"source": ["chestxray14", "pediatric"],
                         "what": ["NIH ChestX-ray14, adult chest X-rays",
                                  "pediatric chest X-rays (Kermany et al.)"],
                         "training images": [491, 728]})
    assert cocktail_words(real, "chestxray14")["other_domain"] == (
        "The second domain is real: pediatric chest X-rays (Kermany et al.), X-rays of other "
        "patients from another hospital.")
    alone = cocktail_words(real.iloc[:1], "chestxray14")
    assert alone["cocktail_sources"] == "NIH ChestX-ray14, adult chest X-rays (491 images)"
    assert alone["other_domain"] == (
        "This edition has no second domain: the chest images are its only source.")
    assert cocktail_words(table.iloc[:0], "chestxray14")["cocktail_sources"] == "no source"


def test_norm_words_say_whose_statistics():
    assert norm_words("mix", None) == {"norm_used": "This edition uses them so, arm by arm."}
    fixed = norm_words("medtransformer", None)["norm_used"]
    assert fixed.startswith("This edition uses MedTransformer's own instead, as it does, for "
                            "every arm and start: (0.5066, 0.2241), the mean of its three")


def test_mask_words_count_units_and_say_what_the_views_keep():
    hidden = np.array([[1.0] * 10 + [0.0] * 6])  # [1, 16], 10 of 16 hidden
    words = mask_words(16, hidden, 1.0, [0.5, 1.0], 10, 1)
    assert words == {
        "units": "16", "visible_units": "6", "paper_mask": "60%", "xray_mae_mask": "90%",
        "mae_views": "this edition's MAE sees the whole image, through a random-resized crop of "
        "0.5 to 1 of its area and a horizontal flip, which that run did without",
        "pt_epochs": "10 epochs", "ft_epochs": "1 epoch"}
    paper = mask_words(16, np.zeros((1, 16)), 0.875, (1.0, 1.0), 80, 10)
    assert paper["visible_units"] == "16"
    assert paper["mae_views"] == ("this edition's MAE sees the central 87.5% of each side, as "
                                  "there, with none of the random crop, only the horizontal flip "
                                  "of our engine")
    assert plural(0, "epoch") == "0 epochs"


def test_start_labels_and_the_labels_trained():
    assert start_label(1.0, False) == "MAE, chest only"
    assert start_label(0.2, True) == "ImageNet, then MAE, cocktail (20% chest)"
    assert label_words(["A", "B", NO_FINDING]) == {
        "ft_labels": "Like MedTransformer, this edition trains 3 outputs: the findings and "
        "No Finding."}
    assert label_words(["A"])["ft_labels"] == (
        "This edition trains the 1 findings alone; MedTransformer trains No Finding as a 15th "
        "output (the `paper` profile does too).")


def test_ranking_words_list_each_start_and_what_the_missing_weights_changed():
    table = pd.DataFrame({"start": ["random", "MAE, chest only"], "valid_auc": [0.52, 0.61],
                          "test_auc": [0.5, np.nan]})
    words = ranking_words(table, lambda a, b: True, 0.03, False, "No weights in the cache.")
    assert words["auc_tie"] == "0.03"
    assert words["ranking"] == "the order is MAE, chest only > random"
    assert words["arm_aucs"] == "random: 0.520 (test 0.500); MAE, chest only: 0.610 (test nan)"
    assert words["skipped"].startswith("The ImageNet arm did not run")
    assert words["skipped"].endswith("the effect of the MAE data alone. No weights in the cache.")
    found = ranking_words(table.iloc[:0], lambda a, b: True, 0.03, True, "")
    assert found["arm_aucs"] == ""
    assert found["skipped"].startswith("The ImageNet weights were found")
    assert found["ranking"].startswith("no start has a validation AUC")


def test_scoring_words_give_both_means_of_the_published_table():
    published = pd.Series({"A": 80.0, "B": 70.0, NO_FINDING: 90.0})
    scored = pd.DataFrame({"start": ["random"], OURS: [0.55], THEIRS: [np.nan]})
    words = scoring_words(scored, published)
    assert words["published_both"] == ("80.00% over its 15 labels and 75.00% over the 14 findings "
                                       "alone (No Finding: 90.00%)")
    assert words["scored_both"] == "random: 0.550 ours, nan its way"
    assert scoring_words(scored.iloc[:0], published)["scored_both"] == ""

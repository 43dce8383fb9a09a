"""Chapter 3's words (cxr_lib.chapters.moco_baselines) on hand-made numbers: the typical case,
no input, all NaN, and one backbone or one positive, checking the words themselves."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_lib.chapters import moco_baselines as ch3
from cxr_lib.chapters.moco_baselines import (
    gathering_sentence,
    knn_sentence,
    loss_sentence,
    similarity_sentence,
    start_sentence,
)
from cxr_lib.methods.moco import COLLAPSE_MARGIN, KeySimilarity, NeighbourShare, gathering_table

NAN = math.nan


class _Cache:
    """What the words read of a cache: the rows of each split."""

    def __init__(self, train: int, val: int, sources: list[str] | None = None) -> None:
        self.rows = {"train": np.arange(train), "val": np.arange(train, train + val)}
        sources = sources or ["chestxray14"] * train
        self.index = pd.DataFrame({"source": sources + ["chestxray14"] * val})

    def split_indices(self, split: str) -> np.ndarray:
        return self.rows[split]


# ----------------------------------------------------------------------------- names and counts

def test_backbones_are_named_as_the_prose_names_them():
    assert ch3.pretty("densenet121") == "DenseNet-121" and ch3.pretty("resnet50") == "ResNet-50"
    assert ch3.pretty("resnet10t") == "resnet10t"
    assert ch3.panel_name("densenet121", "Effusion") == "DenseNet-121: Effusion"


def test_data_and_recipe_words_count_the_splits_and_the_queue():
    pooled = _Cache(1200, 8, sources=["chestxray14"] * 500 + ["pediatric"] * 700)
    words = ch3.data_words(pooled, _Cache(500, 8), "/data/nih")
    assert words == {"images_origin": "real ChestX-ray14 images",
                     "n_train": "1,200 training images (500 NIH ChestX-ray14, adult chest "
                                "X-rays and 700 pediatric chest X-rays (Kermany et al.))",
                     "n_val": "8"}
    phantoms = _Cache(3, 1, sources=["phantom"] * 3)
    assert ch3.data_words(phantoms, phantoms, None)["images_origin"] == (
        "synthetic phantoms (no data root was given), not real X-rays")
    recipe = ch3.MocoRecipe(model="resnet50", queue_size=64, momentum=0.99, temperature=0.2)
    assert ch3.recipe_words(_Cache(71, 8), recipe) == {
        "queue": "64", "temperature": "0.2", "key_momentum": "0.99", "queue_share": "90%"}
    assert ch3.chance_loss(64) == pytest.approx(math.log(65))


def test_crop_words_compare_the_two_ranges():
    words = ch3.crop_words(32, (0.2, 1.0), (0.5, 1.0), seed=0)
    assert set(words) == {"moco_small_crops", "moco_mean_crop", "mae_mean_crop"}
    assert all(w.endswith("%") for w in words.values())
    assert int(words["moco_mean_crop"][:-1]) < int(words["mae_mean_crop"][:-1])
    whole = ch3.crop_words(32, (1.0, 1.0), (1.0, 1.0), seed=0)
    assert whole == {"moco_small_crops": "0%", "moco_mean_crop": "100%", "mae_mean_crop": "100%"}
    shares = ch3.area_shares(32, (0.5, 1.0), seed=0, n=500)
    assert shares.shape == (500,) and 0.45 <= shares.min() and shares.max() <= 1.0


def test_top_findings_rank_by_prevalence_and_skip_unknown_labels():
    labels = np.array([[1, 0, 1, np.nan], [1, 0, 0, np.nan], [0, 1, 1, np.nan]], dtype=float)
    assert ch3.top_findings(labels, 2) == [0, 2]  # 2/3 each, in column order
    assert ch3.top_findings(labels, 4)[-1] == 3  # all unknown: last


def test_saved_words_name_the_files_as_code():
    assert ch3.saved_words({"a": Path("/w/encoders/moco_a.pt"), "b": Path("moco_b.pt")}) == {
        "saved_files": "`moco_a.pt`, `moco_b.pt`"}
    assert ch3.saved_words({}) == {"saved_files": ""}


# ----------------------------------------------------------------------------- kNN and loss

def test_knn_sentence_reports_the_change_and_the_ranking():
    text = knn_sentence({"DenseNet-121": (0.5, 0.6), "ResNet-50": (0.55, 0.5)}, epochs=2)
    assert "DenseNet-121's kNN AUC rose from 0.500 before pre-training to 0.600" in text
    assert "ResNet-50's kNN AUC fell from 0.550" in text and "(-0.050)" in text
    assert "after 2 epochs" in text
    assert "DenseNet-121 ended highest, 0.100 above the next." in text
    assert knn_sentence({"A": (0.5, 0.6), "B": (0.4, 0.6)}, 1).endswith(" They ended level.")


def test_knn_sentence_with_one_backbone_no_result_or_nan():
    one = knn_sentence({"A": (0.5, 0.5)}, epochs=1)
    assert one == "A's kNN AUC stayed at 0.500 after 1 epoch."  # no ranking of one backbone
    assert "could not be computed" in knn_sentence({"A": (math.nan, 0.5)}, epochs=1)
    both = knn_sentence({"A": (NAN, NAN), "B": (NAN, NAN)}, epochs=3)
    assert both.count("could not be computed (no finding has both classes") == 2
    assert "ended" not in both
    with pytest.raises(ValueError, match="knn_sentence: no results"):
        knn_sentence({}, epochs=1)


def test_start_sentence_reads_the_random_initialisations_against_chance():
    assert start_sentence([0.438, 0.418], 8) == (
        "The random initialisations score 0.438 and 0.418, against 0.5 for chance; on 8 "
        "validation images, a few hundredths either way is noise.")
    assert start_sentence([0.6, 0.55], 100).startswith(
        "Even the random initialisations score well above 0.5 (0.600 and 0.550): random")
    assert start_sentence([0.61], 100).startswith("Even the random initialisations score well "
                                                 "above 0.5 (0.610)")  # one backbone
    assert start_sentence([0.6, 0.54], 100).startswith("The random initialisations score")
    assert start_sentence([NAN, NAN], 8) == "Not every random initialisation could be scored."
    assert start_sentence([0.6, NAN], 8) == "Not every random initialisation could be scored."
    with pytest.raises(ValueError, match="start_sentence"):
        start_sentence([], 8)


def test_loss_sentence_names_the_backbones_whose_loss_rose():
    assert loss_sentence({"A": [4.0]}, epochs=1) == (
        "One epoch gives one loss value per backbone, not yet a curve.")
    assert loss_sentence({}, epochs=1).startswith("One epoch")
    fell = loss_sentence({"A": pd.Series([4.0, 3.0]), "B": [4.1, 3.9, 3.5]}, epochs=3)
    assert fell == "The loss fell from the first epoch to the last for every backbone."
    rose = loss_sentence({"A": [4.0, 3.0], "B": [3.0, 3.5], "C": [3.0, 3.1]}, epochs=2)
    assert rose.startswith("The loss of B and C ended higher than after the first epoch")
    one = loss_sentence({"A": [3.0, 3.5]}, epochs=2)
    assert one.startswith("The loss of A ended higher")
    nan = loss_sentence({"A": [NAN, NAN], "B": [4.0, NAN]}, epochs=2)
    assert nan.startswith("The loss of A and B is not a number")
    with pytest.raises(ValueError, match="loss_sentence: no losses"):
        loss_sentence({}, epochs=2)


# ----------------------------------------------------------------------------- similarities

def test_similarity_sentence_names_a_collapse_by_the_stated_rule():
    random_queue = KeySimilarity(0.97, 0.97, 0.0)  # untrained: all images alike, random queue
    collapsed = similarity_sentence(random_queue, KeySimilarity(0.96, 0.96, 0.95), 4.8, 4.86)
    assert "0.96 to its own image's key, 0.96 to the keys of the other images and 0.95" in collapsed
    assert "the embeddings have collapsed, every key about as similar" in collapsed
    assert "(final loss 4.80, chance 4.86)" in collapsed
    assert "already mapped different images almost alike (their keys at 0.97)" in collapsed
    assert "the collapse was there before pre-training" in collapsed
    apart = similarity_sentence(KeySimilarity(0.9, 0.3, 0.0), KeySimilarity(0.8, 0.2, 0.1), 2.0,
                                4.86)
    assert "collapsed" not in apart
    assert "by 0.70 and from the other images' keys by 0.60" in apart
    assert "tells an image's own key from the others" in apart
    assert apart.endswith("stood out from the other images' keys by 0.60.")
    # apart from the queue, not from the batch: no collapse, and no claim that it tells keys apart
    batch = similarity_sentence(random_queue, KeySimilarity(0.86, 0.79, 0.55), 4.0, 4.17)
    assert "collapsed" not in batch and "tells an image's own key" not in batch
    assert "by 0.31, but the other images' keys are within 0.1 of the positives" in batch
    assert batch.endswith("almost alike (their keys at 0.97).")
    # the rule: the queue within the margin of the positives, on average
    at_margin = KeySimilarity(0.75, 0.25, 0.5)
    assert "collapsed" in similarity_sentence(random_queue, at_margin, 4.0, 4.86, margin=0.25)
    assert "collapsed" not in similarity_sentence(random_queue, at_margin, 4.0, 4.86,
                                                  margin=0.125)


def test_similarity_sentence_does_not_judge_similarities_that_are_not_numbers():
    nan = KeySimilarity(NAN, NAN, NAN)
    for before, after in ((nan, nan), (KeySimilarity(0.9, 0.3, 0.0), nan)):
        text = similarity_sentence(before, after, NAN, 4.17)
        assert text.startswith("The similarities before or after pre-training are not numbers")
        assert "collapsed" not in text and "nan" not in text


def test_similarity_words_take_the_means_of_the_matrices():
    before = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0]])  # 2 queries, 2 keys, 1 queue key
    after = np.array([[0.8, 0.1, 0.2], [0.1, 0.8, 0.2]])
    words = ch3.similarity_words({"before": before, "after": after}, 3.0, queue_size=64)
    assert words["collapse_margin"] == f"{COLLAPSE_MARGIN:g}" == "0.1"
    assert words["sim_sentence"].startswith(
        "After pre-training, a query's mean cosine similarity is 0.80 to its own image's key, "
        "0.10 to the keys of the other images and 0.20 to the queue's keys; before, 1.00, 0.90 "
        "and 0.00")
    assert "tells an image's own key from the others" in words["sim_sentence"]


# ----------------------------------------------------------------------------- gathering

def _gathering() -> pd.DataFrame:
    return gathering_table({"A": NeighbourShare(10, 0.5, 0.1, 0.001),
                            "B": NeighbourShare(8, 0.2, 0.1, 0.04),
                            "C": NeighbourShare(9, 0.12, 0.1, 0.5),
                            "D": NeighbourShare(1, NAN, NAN, NAN)})


def test_gathering_sentence_reads_the_holm_adjusted_table():
    table = _gathering()
    text = gathering_sentence(table, k=20)
    assert text.startswith("Among the 20 nearest neighbours of a validation image with a finding")
    assert "is 12% to 50% over the 3 panels measured, against 10% if" in text
    assert "In 1 of them (A) it is higher than random relabellings make it" in text
    assert "a test at the 5% level with Holm's correction" in text
    assert "1 panel(s) had too few images" in text
    assert "In no panel" in gathering_sentence(table.loc[["B", "C"]], k=20)
    assert "had too few" not in gathering_sentence(table.loc[["B", "C"]], k=20)
    assert ch3.gathering_words(table, 20) == {"gathering_sentence": text}


def test_gathering_sentence_with_one_panel_none_or_all_nan():
    table = _gathering()
    one = gathering_sentence(table.loc[["A"]], k=5)
    assert "is 50% over the 1 panels measured, against 10%" in one  # one share: one number
    assert "In 1 of them (A)" in one
    too_few = "Too few validation images carry these findings to measure whether they gather."
    assert gathering_sentence(table.loc[["D"]], k=20) == too_few  # all NaN
    assert gathering_sentence(table.iloc[:0], k=20) == too_few  # no panel

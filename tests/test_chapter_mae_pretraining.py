"""Chapter 2's sentences on hand-made numbers: typical, empty, all-NaN and one setting."""

import math

import numpy as np
import pandas as pd
import pytest

from cxr_lib.chapters import mae_pretraining as ch
from cxr_lib.methods.mae import HeldoutErrors
from cxr_lib.methods.probe import ProbeResult

NAN = math.nan


def errs(model: float, model_flat: float, mean_fill: float, visible_fill: float,
         contrast: float) -> HeldoutErrors:
    """HeldoutErrors of one image: the sentence reads only the means."""
    return HeldoutErrors(*(np.array([v]) for v in (model, model_flat, mean_fill, visible_fill)),
                         contrast)


def test_painting_sentence_applies_its_margin_and_the_flattening_test():
    noisy = {0.25: errs(0.60, 0.57, 1.00, 0.91, 0.5),
             0.9: errs(0.85, 0.80, 1.0, 0.93, 0.3)}
    text = ch.painting_sentence(noisy)
    assert "error on the hidden patches is 0.60 to 0.85, against 0.91 to 0.93 for the" in text
    # 0.85 is not 10% below 0.93 (0.837); 0.60 is below 0.819
    assert "At mask ratio 25% the model's error is more than 10% below the better fill" in text
    assert "lowers the error at every mask ratio (to 0.57 to 0.80)" in text
    assert "25% the model's error is more than 10% below the better fill: there the" in text
    assert "they paint it at 50% of its true contrast" in text
    everywhere = ch.painting_sentence(noisy, margin=0.05)
    assert "At every mask ratio the model's error is more than 5% below the better fill: the " \
        "models have learnt" in everywhere
    assert "at 30% to 50% of its true contrast" in everywhere
    no_contrast = {0.9: errs(0.5, 0.6, 1.0, 1.0, math.nan)}  # norm_pix_loss targets
    assert "where brightness goes in these images. Flattening" in ch.painting_sentence(no_contrast)
    flat = ch.painting_sentence({0.75: errs(0.95, 0.97, 1.0, 0.99, 0.1)})
    assert "At no mask ratio is the model's error more than 10% below the better fill:" in flat
    worse = ch.painting_sentence({0.5: errs(1.2, 0.9, 1.0, 0.95, 0.1),
                                  0.9: errs(0.9, 0.9, 1.0, 0.95, 0.1)})
    assert "better fill (at 1 of the 2 it is at or above it): the pictures show no" in worse
    worst = ch.painting_sentence({0.5: errs(1.2, 0.9, 1.0, 0.95, 0.1)})
    assert "better fill (at every one it is at or above it): the pictures" in worst
    assert "would raise the error at every ratio" in flat


def test_painting_sentence_of_one_model_reads_in_full():
    one = ch.painting_sentence({0.9: errs(0.5, 0.6, 1.0, 0.8, 0.4)})
    assert one == (
        "On these validation images the models' error on the hidden patches is 0.50, against "
        "0.80 for the better of the two fills. At every mask ratio the model's error is more "
        "than 10% below the better fill: the models have learnt something of where brightness "
        "goes in these images; they paint it at 40% of its true contrast (the spread of the "
        "hidden patches' mean brightness). Flattening each painted patch to its own mean "
        "brightness would raise the error at every ratio: the detail painted inside the patches "
        "is learnt too.")


def test_painting_sentence_on_no_models_and_unmeasured_errors():
    assert ch.painting_words({}) == {
        "painting_sentence": "No model was trained here, so there are no paintings to judge."}
    empty = HeldoutErrors(*(np.array([]) for _ in range(4)), NAN)  # no held-out image
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        assert ch.painting_sentence({0.9: empty}) == (
            "The error on the hidden patches could not be measured: there is no validation image "
            "to measure it on.")
    nan = {0.5: errs(NAN, NAN, NAN, NAN, NAN), 0.9: errs(0.95, 0.97, 1.0, 0.99, 0.1)}
    text = ch.painting_sentence(nan)
    assert text.startswith("On these validation images the models' error on the hidden patches "
                           "is 0.95, against 0.99")
    assert text.endswith(" At mask ratio 50% the error could not be measured (no validation "
                         "image).")


def test_sweep_words_judge_a_sweep_against_its_marks_and_the_floor():
    table = pd.DataFrame({"mask ratio": [0.25, 0.75, 0.9], "probe AUC": [0.61, 0.66, 0.64]})
    words = ch.mask_words(table, 0.62, 0.9)
    assert words == {"mask_sentence": (
        "the best probe AUC (0.660) came at mask ratio 0.75; the paper's choice (0.9) reached "
        "0.640, 0.020 below the best; the ImageNet default (0.75) reached 0.660, the best. All "
        "settings lie within 0.050 of each other. 1 of the 3 settings fell below the untrained "
        "encoder (0.620).")}
    crops = pd.DataFrame({"crop scale": ["0.2-1.0", "0.5-1.0"], "probe AUC": [0.7, 0.6]})
    assert ch.crop_words(crops, 0.5, [0.5, 1.0])["crop_sentence"] == (
        "the best probe AUC (0.700) came at crop scale 0.2-1.0; the paper's choice (0.5-1.0) "
        "reached 0.600, 0.100 below the best; the ImageNet default (0.2-1.0) reached 0.700, the "
        "best. All settings lie within 0.100 of each other. Every setting cleared the untrained "
        "encoder (0.500).")


def test_sweep_words_on_one_setting_no_setting_and_nan_scores():
    one = pd.DataFrame({"mask ratio": [0.9], "probe AUC": [0.55]})
    assert ch.mask_words(one, 0.6, 0.9)["mask_sentence"] == (  # the ImageNet mark is not swept
        "the best probe AUC (0.550) came at mask ratio 0.9; the paper's choice (0.9) reached "
        "0.550, the best. All settings lie within 0.000 of each other. No setting cleared the "
        "untrained encoder (0.600).")
    assert ch.mask_words(pd.DataFrame(), 0.6, 0.9) == {
        "mask_sentence": "no setting was run, so the sweep ranks nothing."}
    nan = pd.DataFrame({"crop scale": ["0.2-1.0", "0.5-1.0"], "probe AUC": [NAN, NAN]})
    assert ch.crop_words(nan, NAN, [0.5, 1.0])["crop_sentence"] == (
        "the probe could not score 2 of the 2 settings (no finding has both classes among the "
        "scored images), so the sweep ranks nothing.")
    no_floor = ch.mask_words(one, NAN, 0.9)["mask_sentence"]
    assert no_floor.endswith("of each other. The probe could not score the untrained encoder (no "
                             "finding has both classes among the scored images).")


def test_chosen_words_set_the_carried_encoder_against_the_floor():
    assert ch.chosen_words(0.415, 0.420) == {
        "chosen_auc": "0.415", "chosen_vs_floor": "0.005 below the untrained encoder (0.420)"}
    assert ch.chosen_words(0.6, 0.5)["chosen_vs_floor"] == (
        "0.100 above the untrained encoder (0.500)")
    assert ch.chosen_words(0.5001, 0.5)["chosen_vs_floor"] == (  # level at three decimals
        "level with the untrained encoder (0.500)")
    nan = ch.chosen_words(NAN, 0.5)
    assert nan == {"chosen_auc": "undefined (no finding has both classes among the scored "
                                 "images)",
                   "chosen_vs_floor": "not comparable with the untrained encoder, since one of "
                                      "the two probes could not be scored (no finding has both "
                                      "classes among the scored images)"}
    assert ch.floor_words(0.4204) == {"random_auc": "0.420"}
    assert ch.floor_words(NAN)["random_auc"].startswith("undefined")


def test_model_words_count_parameters_and_visible_patches():
    assert ch.model_words(5_412_345, 64, 0.9, [0.5, 1.0]) == {
        "encoder_params": "5.4 million", "visible_tokens": "6 of 64", "paper_mask": "90%",
        "paper_recipe": "90% of the patches masked, crops of 0.5-1.0 of the image"}


def test_tables_of_errors_and_of_the_probe():
    two = HeldoutErrors(np.array([0.5, 0.52468]), *(np.array([v, v]) for v in (0.6, 1.0, 0.8)),
                        0.4)
    table = ch.errors_table({0.9: two, 0.25: errs(NAN, NAN, NAN, NAN, NAN)})
    assert table.index.tolist() == ["90%", "25%"]
    assert table.loc["90%"].tolist() == [0.512, 0.6, 1.0, 0.8, 0.4]  # means over the images
    assert table.loc["25%"].isna().all()
    probe = ProbeResult(0.5, {"Edema": 0.61234, "Mass": NAN}, 10, 5)
    assert ch.probe_table(probe)["probe AUC"].tolist()[0] == 0.612
    assert ch.errors_table({}).empty


class Splits:
    """A stand-in cache: only its split rows."""

    def __init__(self, train: int, val: int):
        self.rows = {"train": np.arange(train), "val": np.arange(val)}

    def split_indices(self, split: str) -> np.ndarray:
        return self.rows[split]


def test_data_words_say_what_the_chapter_trains_on():
    assert ch.data_words(Splits(12_345, 8), True) == {
        "images_origin": "real ChestX-ray14 images", "n_train": "12,345", "n_val": "8"}
    assert ch.data_words(Splits(0, 0), False) == {
        "images_origin": "synthetic phantoms (no data root was given), not real X-rays",
        "n_train": "0", "n_val": "0"}

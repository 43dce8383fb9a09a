"""Chapter 2's sentences on hand-made numbers: typical, empty, all-NaN and one setting."""

import math

import numpy as np
import pandas as pd
import pytest

from cxr_lib.chapters import mae_pretraining as ch
from cxr_lib.chapters.setup import chapter_cache
from cxr_lib.data.phantoms import phantom_dataset
from cxr_lib.engine.config import TrainConfig
from cxr_lib.methods.mae import HeldoutErrors, MaeRecipe
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


def test_the_paper_s_choices_each_face_the_natural_image_default():
    choices = ch.paper_choices(0.9, [0.5, 1.0])
    assert choices == {"mask ratio": ((0.75, (0.5, 1.0)), (0.9, (0.5, 1.0))),
                       "crop scale": ((0.9, (0.2, 1.0)), (0.9, (0.5, 1.0)))}
    assert ch.downstream_setup_words(0.1, 10) == {"downstream_share": "10%",
                                                  "downstream_seeds": "10 seeds"}
    assert ch.downstream_setup_words(0.5, 1)["downstream_seeds"] == "one seed"


def downstream_rows(diffs: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"comparison": name, "share": 0.1, "seed": seed, "labelled images": 57,
                          "auc_a": 0.7, "auc_b": 0.7 + d, "diff": d, "lower": d - 0.02,
                          "upper": d + 0.02}
                         for name, ds in diffs.items() for seed, d in enumerate(ds)])


def test_downstream_words_read_each_choice_mask_first():
    table = downstream_rows({"crop scale": [0.01, -0.02, 0.0], "mask ratio": [0.05, 0.06, 0.04]})
    verdicts = ch.downstream_verdicts(table)
    text = ch.downstream_words(verdicts, 0.1, 0.9, [0.5, 1.0])["downstream_sentence"]
    mask, crop = text.split("; for the crop scale")
    assert mask.startswith("for the mask ratio, with 10% of the training labels (about 57 "
                           "images) a probe on the "
                           "encoder pre-trained with the paper's mask ratio (0.9) reached a "
                           "test AUC of 0.750 against 0.700 for the natural-image default (0.75)")
    assert "the paper's choice was ahead in 3 of 3 seeds" in mask
    assert mask.endswith("decided: the paper's mask ratio gives the better features")
    assert "(0.5-1.0) reached" in crop and "default (0.2-1.0)" in crop
    assert crop.endswith("not decided at this scale.")
    assert list(verdicts["comparison"]) == ["mask ratio", "crop scale"]
    fig = ch.downstream_figure(table, 0.9, [0.5, 1.0])
    assert [ax.get_title() for ax in fig.axes] == [
        "mask ratio: 0.9 against 0.75", "crop scale: 0.5-1.0 against 0.2-1.0"]


def test_downstream_without_a_task_or_with_an_unscored_choice():
    empty = ch.downstream_probes(None, None, 0.9, [0.5, 1.0], 0.1, 3)
    assert empty.empty and "comparison" in empty.columns
    words = ch.downstream_words(ch.downstream_verdicts(empty), 0.1, 0.9, [0.5, 1.0])
    assert words["downstream_sentence"].startswith("the pneumonia judge did not run")
    unscored = downstream_rows({"mask ratio": [NAN, NAN]})
    text = ch.downstream_words(ch.downstream_verdicts(unscored), 0.1, 0.9, [0.5, 1.0])
    assert text["downstream_sentence"] == (
        "for the mask ratio, with 10% of the training labels (about 57 images) no seed could "
        "be scored "
        "(labelled images of one class only leave nothing to fit).")


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
def test_downstream_probes_pair_real_encoders_by_seed(tmp_path):
    """Three short MAE runs on phantoms (the paper's arm and each default), their frozen
    features probed on another phantom set: one row per choice and seed, both arms scored."""
    cache = chapter_cache(tmp_path / "pre", phantom_dataset(48, size=32, seed=1), 32)
    task = chapter_cache(tmp_path / "task", phantom_dataset(120, size=32, seed=2), 32)
    recipe = MaeRecipe(model="vit_tiny_patch16", image_size=32, patch_size=8, decoder_dim=16,
                       decoder_depth=1, decoder_heads=1)
    arms = ch.arms(cache, recipe, TrainConfig(epochs=1, batch_size=16), tmp_path / "runs", 100)
    table = ch.downstream_probes(arms, task, 0.9, [0.5, 1.0], 1.0, 2, n_boot=50)
    assert list(table["comparison"]) == ["mask ratio"] * 2 + ["crop scale"] * 2
    assert list(table["seed"]) == [0, 1, 0, 1]
    assert len(arms.results) == 3  # the paper's arm is trained once, for both choices
    assert table[["auc_a", "auc_b"]].notna().all().all()
    assert np.allclose(table["diff"], table["auc_b"] - table["auc_a"])

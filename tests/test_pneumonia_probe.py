"""The frozen-feature comparison over label shares and seeds (chapter 4's pneumonia probe):
probe scores, the paired comparison per seed, the interval over seeds, and its words."""

import dataclasses
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cxr_lib.analysis.stats import seed_interval
from cxr_lib.book.profiles import repo_root
from cxr_lib.chapters import finetuning_ablations as ch4
from cxr_lib.chapters.files import PNEUMONIA_SWEEPS, chapter4_table_paths, runs_dir
from cxr_lib.chapters.mae_pretraining import carried_words
from cxr_lib.chapters.setup import chapter_cache, pediatric_dataset, pneumonia_cache, pooled_cache
from cxr_lib.data.phantoms import phantom_dataset
from cxr_lib.data.samples import samples_root
from cxr_lib.engine.config import TrainConfig
from cxr_lib.methods.finetune import FinetuneRecipe
from cxr_lib.methods.mae import (
    MaeRecipe,
    load_encoder,
    pretrain_mae,
    save_encoder,
    untrained_encoder,
)
from cxr_lib.methods.moco import (
    KnnSettings,
    MocoRecipe,
    moco_config,
    pretrain_moco,
    save_backbone,
)
from cxr_lib.methods.probe import SHARE_COMPARISON, compare_on_label_shares, probe_scores

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return chapter_cache(tmp_path_factory.mktemp("work"), phantom_dataset(300, size=32, seed=3), 32)


def test_seed_interval_is_the_student_t_interval_and_says_when_there_is_none():
    mean, lower, upper = seed_interval([0.01, 0.03, 0.02, np.nan])
    assert mean == pytest.approx(0.02)
    assert (upper - mean) == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    assert lower == pytest.approx(2 * mean - upper)
    one = seed_interval([0.5])
    assert one[0] == 0.5 and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(v) for v in seed_interval([]))
    assert all(math.isnan(v) for v in seed_interval([np.nan, np.nan]))


def test_probe_scores_leave_a_one_class_finding_unscored():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    labels = np.column_stack([(x[:, 0] > 0).astype(float), np.ones(40), np.full(40, np.nan)])
    scores = probe_scores(x, labels, x[:5])
    assert scores.shape == (5, 3)
    assert np.isfinite(scores[:, 0]).all() and np.isnan(scores[:, 1:]).all()
    assert np.array_equal(scores, probe_scores(x, labels, x[:5]), equal_nan=True)


def _features(cache, informative: bool):
    """Features of the train and test rows: the labels plus noise, or noise alone."""
    def draw(seed: int):
        out = []
        for split in ("train", "test"):
            labels = np.nan_to_num(cache.labels[cache.split_indices(split)])
            rng = np.random.default_rng([seed, len(labels)])
            noise = rng.normal(size=(len(labels), 4))
            out.append(np.hstack([labels * 3.0 * informative, noise]) if informative else noise)
        return tuple(out)
    return draw


def test_informative_features_beat_noise_in_every_seed(cache):
    table = compare_on_label_shares(cache, _features(cache, False), _features(cache, True),
                                    [0.5, 1.0], range(3), n_boot=200)
    assert list(table["share"]) == [0.5, 1.0] * 3 and list(table["seed"]) == [0, 0, 1, 1, 2, 2]
    full = len(cache.split_indices("train"))
    assert (table.loc[table["share"] == 1.0, "labelled images"] == full).all()
    assert (table.loc[table["share"] == 0.5, "labelled images"] < full).all()
    assert np.allclose(table["diff"], table["auc_b"] - table["auc_a"])
    assert (table["diff"] > 0).all() and (table["lower"] <= table["diff"]).all()
    mae = ch4.frozen_pairings("densenet121")[0]
    paired = table.assign(pair=mae.name)
    verdicts = ch4.pair_verdicts(paired, [mae])
    assert list(verdicts["comparison"]) == ["MAE against random ViT"] * 2
    assert list(verdicts["seeds"]) == [3, 3] and list(verdicts["seeds ahead"]) == [3, 3]
    assert (verdicts["seed lower"] > 0).all() and (verdicts["AUC"] > verdicts["rival AUC"]).all()
    words = ch4.pair_words(paired, [mae])
    assert words["pneumonia_probe_sentence"].count("decided: the MAE encoder's features") == 2
    assert words["pneumonia_probe_sentence"].count("MAE was ahead in 3 of 3 seeds") == 2
    assert "interval over 3 seeds [" in words["pneumonia_probe_sentence"]
    assert words["pneumonia_probe_sentence"].startswith("With 50% of the training labels")


def test_without_a_pediatric_root_the_comparison_says_it_did_not_run(tmp_path):
    assert pneumonia_cache(tmp_path, None, 32, 0) is None
    frozen = ch4.frozen_pairings("densenet121")
    table = ch4.pneumonia_probes(tmp_path / "unused.pt", tmp_path / "unused.pt", None, frozen,
                                 [0.1], 3)
    assert table.empty and list(table.columns) == ch4.PAIRED
    words = ch4.pair_words(table, frozen)
    assert set(words) == {"pneumonia_probe_sentence", "pneumonia_moco_probe_sentence",
                          "pneumonia_mae_moco_probe_sentence"}
    assert all(w.startswith("The pneumonia comparison did not run") for w in words.values())
    assert ch4.pneumonia_data_words(None)["pneumonia_split"].startswith("no split")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty legend would warn the reader
        fig = ch4.pairs_figure(table, frozen, "Frozen features")
    assert "not run" in fig.axes[0].texts[0].get_text()


def test_all_nan_rows_make_an_unscored_share():
    table = pd.DataFrame({"share": [0.1, 0.1], "seed": [0, 1], "labelled images": [5, 6],
                          **{c: [np.nan, np.nan] for c in ("auc_a", "auc_b", "diff", "lower",
                                                           "upper")}})
    mae = ch4.frozen_pairings("densenet121")[0]
    table = table.assign(pair=mae.name)
    assert ch4.pair_verdicts(table, [mae])["seeds"].iloc[0] == 0
    words = ch4.pair_words(table, [mae])
    assert "no seed could be scored" in words["pneumonia_probe_sentence"]


def test_real_pediatric_images_pool_with_nih_and_keep_their_test_patients_out(tmp_path):
    """The shipped samples, pooled for pre-training: each source keeps its own split, and the
    pneumonia task's cache has the same test patients as the pool."""
    ped = pediatric_dataset(samples_root() / "pediatric-pneumonia-sample", seed=0)
    pooled = pooled_cache(tmp_path, [phantom_dataset(20, size=32, seed=1), ped], 32)
    task = pneumonia_cache(tmp_path, samples_root() / "pediatric-pneumonia-sample", 32, 0)
    in_pool = pooled.index[pooled.index["source"] == "pediatric"]
    assert set(in_pool.loc[in_pool["split"] == "test", "id"]) == set(
        task.index.loc[task.index["split"] == "test", "id"])
    assert task.findings == ["Pneumonia"] and len(task.split_indices("test")) > 0
    words = carried_words(pooled, 7)
    n_train = len(pooled.split_indices("train"))
    assert words["carried_data"].startswith(f"{n_train:,} training images (")
    assert "pediatric chest X-rays (Kermany et al.)" in words["carried_data"]
    assert words["carried_epochs"] == "7"
    assert "with pneumonia" in ch4.pneumonia_data_words(task)["pneumonia_split"]
    with pytest.raises(ValueError, match="no data set given"):
        pooled_cache(tmp_path, [None], 32)


def test_untrained_encoder_has_the_saved_recipe_and_view_and_seeded_weights(cache, tmp_path):
    recipe = MaeRecipe(model="vit_tiny_patch16", image_size=32, patch_size=8, decoder_dim=32,
                       decoder_depth=1, decoder_heads=2)
    pre = pretrain_mae(cache, recipe, TrainConfig(epochs=1, batch_size=16, base_lr=1e-3,
                                                  warmup_epochs=0), tmp_path, progress=False)
    path = save_encoder(pre, tmp_path / "mae.pt")
    trained, view = load_encoder(path)
    a, view_a = untrained_encoder(path, 0)
    b, _ = untrained_encoder(path, 0)
    c, _ = untrained_encoder(path, 1)
    assert (view_a.mean, view_a.std, view_a.size) == (view.mean, view.std, view.size)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
        assert not torch.equal(a(x), trained(x))


def _write_scores(work, run, cache, scores):
    """A run's test scores as `finetune` saves them, rows in reverse order (read by id)."""
    test = cache.split_indices("test")
    table = pd.DataFrame(scores, columns=cache.findings)
    table.insert(0, "patient", cache.index["patient"].to_numpy()[test])
    table.insert(0, "id", cache.index["id"].to_numpy()[test])
    folder = work / "runs" / run
    folder.mkdir(parents=True)
    table.iloc[::-1].to_parquet(folder / "test_scores.parquet")


FINETUNED = ch4.finetuned_pairings("densenet121")
MAE_VS_RANDOM, MOCO_VS_RANDOM, MAE_VS_MOCO = FINETUNED


def _finetune_rows(work, cache, shares, n_seeds, gains):
    """Fine-tuned runs of every start, each with its saved test scores: start s scores
    noise + gains[s] x labels, the noise drawn per seed and shared by every start."""
    labels = np.nan_to_num(cache.labels[cache.split_indices("test")])
    rows = []
    for share in shares:
        for seed in range(n_seeds):
            noise = np.random.default_rng(seed).normal(size=labels.shape)
            for number, (start, gain) in enumerate(gains.items()):
                run = f"finetune-{number}-{share}-{seed}"
                _write_scores(work, run, cache, noise + gain * labels)
                rows.append({"start": start, "train_fraction": share, "seed": seed, "run": run,
                             "train_images": int(100 * share)})
    return pd.DataFrame(rows)


def test_finetune_comparison_pairs_the_starts_by_share_and_seed(tmp_path, cache):
    gains = {"random ViT": 0, "MAE": 3, "random DenseNet": 0, "MoCo": 0}
    runs = _finetune_rows(tmp_path, cache, (0.5, 1.0), 3, gains)
    pairs = ch4.finetune_comparison(runs, cache, tmp_path, FINETUNED, n_boot=200)
    assert list(pairs.columns) == ["pair", *SHARE_COMPARISON]
    assert list(pairs["pair"]) == [p.name for p in FINETUNED for _ in range(6)]
    mae = pairs[pairs["pair"] == MAE_VS_RANDOM.name]
    assert list(mae["share"]) == [0.5] * 3 + [1.0] * 3
    assert list(mae["labelled images"]) == [50] * 3 + [100] * 3
    assert (mae["auc_b"] > 0.9).all() and (mae["auc_a"] < 0.8).all()
    assert (mae["lower"] > 0).all()
    # MoCo and its random rival scored the same: a difference of exactly zero in every seed
    moco = pairs[pairs["pair"] == MOCO_VS_RANDOM.name]
    assert (moco["diff"] == 0).all() and np.allclose(moco["auc_a"], mae["auc_a"])
    words = ch4.pair_words(pairs, FINETUNED)
    sentence = words["pneumonia_finetune_sentence"]
    assert sentence.count("decided: the MAE start is the better one") == 2
    assert sentence.count("MAE was ahead in 3 of 3 seeds") == 2
    assert sentence.count("the paired bootstrap over test patients excluded zero in 3 of 3") == 2
    assert "the ViT fine-tuned from MAE reached a test AUC of" in sentence
    assert "for the same ViT fine-tuned from random weights" in sentence
    assert sentence.startswith("With 50% of the training labels (about 50 images)")
    moco_words = words["pneumonia_moco_finetune_sentence"]
    assert moco_words.count("MoCo was ahead in 0 of 3 seeds") == 2
    assert moco_words.count("not decided at this scale") == 2
    assert "the DenseNet fine-tuned from MoCo v2 reached" in moco_words
    assert "for the same DenseNet fine-tuned from random weights" in moco_words
    both = words["pneumonia_mae_moco_finetune_sentence"]
    assert both.count("decided: the MAE ViT is the better one") == 2
    assert "against" in both and "for the DenseNet fine-tuned from MoCo v2" in both


def test_a_random_start_that_wins_in_every_seed_is_decided_its_way(tmp_path, cache):
    gains = {"random ViT": 3, "MAE": 0, "random DenseNet": 3, "MoCo": 0}
    runs = _finetune_rows(tmp_path, cache, (1.0,), 3, gains)
    pairs = ch4.finetune_comparison(runs, cache, tmp_path, FINETUNED[:2], n_boot=200)
    words = ch4.pair_words(pairs, FINETUNED[:2])
    assert "MAE was ahead in 0 of 3 seeds" in words["pneumonia_finetune_sentence"]
    assert words["pneumonia_finetune_sentence"].endswith(
        "decided: the random start is the better one.")
    assert words["pneumonia_moco_finetune_sentence"].endswith(
        "decided: the random start is the better one.")


def test_a_pairing_whose_start_never_ran_is_named(tmp_path, cache):
    runs = _finetune_rows(tmp_path, cache, (1.0,), 1, {"random ViT": 0, "MAE": 3})
    with pytest.raises(ValueError, match="no fine-tuned run of MoCo, random DenseNet"):
        ch4.finetune_comparison(runs, cache, tmp_path, FINETUNED)


def _saved_sizes(tmp_path, mae_size=64, moco_size=32):
    """An MAE and a MoCo v2 file as far as the starts read them: their recipe's image size."""
    mae, moco = tmp_path / "mae.pt", tmp_path / "moco.pt"
    torch.save({"recipe": {"image_size": mae_size}}, mae)
    torch.save({"recipe": {"image_size": moco_size}}, moco)
    return mae, moco


def test_pneumonia_starts_differ_only_in_the_start_and_the_random_vit_s_decay(tmp_path):
    vit = FinetuneRecipe(model="vit_tiny_patch16", image_size=32, patch_size=8)
    cnn = FinetuneRecipe(model="densenet121", image_size=32, layer_decay=None, drop_path=0.0)
    mae_file, moco_file = _saved_sizes(tmp_path, 64, 48)
    starts = ch4.pneumonia_starts(vit, cnn, mae_file, moco_file, "densenet121")
    assert list(starts) == [arm for p in FINETUNED[:2] for arm in (p.a, p.b)]
    random, mae = starts["random ViT"], starts["MAE"]
    assert (random.init, random.layer_decay, random.image_size) == ("random", 1.0, 64)
    assert (mae.init, mae.weights, mae.layer_decay) == ("mae", str(mae_file), 0.55)
    assert dataclasses.replace(mae, init="random", weights=None, layer_decay=1.0) == random
    random_cnn, moco = starts["random DenseNet"], starts["MoCo"]
    assert (random_cnn.init, random_cnn.image_size, random_cnn.layer_decay) == ("random", 48,
                                                                                None)
    assert (moco.init, moco.weights) == ("moco", str(moco_file))
    assert dataclasses.replace(moco, init="random", weights=None) == random_cnn
    words = ch4.finetune_setup_words(10, 3, [0.1, 1.0], [0.1, 1.0])
    assert words == {"pneumonia_epochs": "10", "pneumonia_seeds": "3 seeds",
                     "pneumonia_shares_sentence": "The runs train on 10% and 100% of the "
                     "pneumonia training labels, the shares the frozen probes used."}


def test_a_share_the_probes_used_and_fine_tuning_skips_is_named_with_why():
    said = ch4.finetune_setup_words(6, 1, [0.1], [0.1, 1.0])["pneumonia_shares_sentence"]
    assert said.startswith("The runs train on 10% of the pneumonia training labels. The frozen "
                           "probes above also used 100%, where this edition does not fine-tune")
    assert ch4.finetune_setup_words(6, 1, [], [0.1])["pneumonia_shares_sentence"] == (
        "This edition fine-tunes on no share of the pneumonia labels.")
    # the sentence sends the reader to these profiles for the shares it leaves out
    for name in ("gpu-sample", "paper"):
        chapter = yaml.safe_load((repo_root() / "profiles" / f"{name}.yaml").read_text())[
            "chapters"]["04_finetuning_ablations"]
        assert set(chapter["probe_shares"]) <= set(chapter["pneumonia_shares"]), name


def test_without_a_pediatric_root_nothing_is_fine_tuned(tmp_path):
    vit = FinetuneRecipe(model="vit_tiny_patch16", image_size=32, patch_size=8)
    cnn = FinetuneRecipe(model="densenet121", image_size=32, layer_decay=None)
    starts = ch4.pneumonia_starts(vit, cnn, *_saved_sizes(tmp_path), "densenet121")
    table = ch4.run_pneumonia_finetunes(starts, None, TrainConfig(), [0.1], 3, tmp_path)
    assert table.empty and not (tmp_path / "pneumonia_finetunes.parquet").exists()
    pairs = ch4.finetune_comparison(table, None, tmp_path, FINETUNED)
    assert pairs.empty and list(pairs.columns) == ch4.PAIRED
    words = ch4.pair_words(pairs, FINETUNED)
    assert all(words[f"{p.name}_sentence"].startswith("The pneumonia comparison did not run")
               for p in FINETUNED)


def test_three_frozen_pairings_share_their_probes_seed_by_seed(cache, tmp_path):
    """MAE and MoCo files as chapters 2 and 3 save them: each probe appears in two pairings
    with the same AUC for the same share and seed, and each random rival has its own draw."""
    mae = pretrain_mae(cache, MaeRecipe(model="vit_tiny_patch16", image_size=32, patch_size=8,
                                        decoder_dim=32, decoder_depth=1, decoder_heads=2),
                       TrainConfig(epochs=1, batch_size=16, base_lr=1e-3, warmup_epochs=0),
                       tmp_path / "runs", progress=False)
    moco = pretrain_moco(cache, MocoRecipe(model="resnet10t", image_size=16, dim=16,
                                           hidden_dim=32, queue_size=64, bn_splits=2),
                         moco_config(2, 16, base_lr=0.3), tmp_path / "runs",
                         knn=KnnSettings(k=5, batch_size=64), progress=False)
    mae_file = save_encoder(mae, tmp_path / "mae.pt")
    moco_file = save_backbone(moco, tmp_path / "moco.pt")
    frozen = ch4.frozen_pairings("resnet10t")
    assert [p.label for p in frozen] == ["MAE against random ViT", "MoCo against random ResNet",
                                         "MAE against MoCo"]
    table = ch4.pneumonia_probes(mae_file, moco_file, cache, frozen, [0.5, 1.0], 2, n_boot=50)
    assert list(table.columns) == ch4.PAIRED
    by = {p.name: table[table["pair"] == p.name].set_index(["share", "seed"]) for p in frozen}
    mae_random, moco_random, mae_moco = by.values()
    assert list(mae_random.index) == list(moco_random.index) == [(0.5, 0), (0.5, 1), (1.0, 0),
                                                                   (1.0, 1)]
    # every label and two fixed encoders: a second seed would repeat the first run exactly
    assert list(mae_moco.index) == [(0.5, 0), (0.5, 1), (1.0, 0)]
    np.testing.assert_allclose(mae_moco["auc_b"], mae_random.loc[mae_moco.index, "auc_b"])
    np.testing.assert_allclose(mae_moco["auc_a"], moco_random.loc[mae_moco.index, "auc_b"])
    np.testing.assert_allclose(mae_random.loc[1.0, "auc_b"].iloc[0],
                               mae_random.loc[1.0, "auc_b"].iloc[1])  # the MAE probe is fixed
    assert not np.allclose(mae_random["auc_a"], moco_random["auc_a"])  # two random rivals
    assert ch4.pretraining_words(tmp_path, mae_file, moco_file, "resnet10t") == {
        "probe_sizes": "32 px for the ViT, 16 px for the ResNet",
        "pretraining_lengths": "1 epoch for the MAE ViT, 2 epochs for the MoCo v2 ResNet"}
    elsewhere = ch4.pretraining_words(tmp_path / "other", mae_file, moco_file, "resnet10t")
    assert elsewhere["pretraining_lengths"].startswith(
        "epochs unknown (its run is not in this work directory) for the MAE ViT")
    words = ch4.pair_words(table, frozen)
    assert words["pneumonia_moco_probe_sentence"].startswith(
        "With 50% of the training labels")
    assert "a probe on the MoCo v2 ResNet's frozen features reached" in words[
        "pneumonia_moco_probe_sentence"]
    assert "for one on the MoCo v2 ResNet's" in words["pneumonia_mae_moco_probe_sentence"]
    assert "(one seed, so no interval over seeds)" in words["pneumonia_mae_moco_probe_sentence"]
    fig = ch4.pairs_figure(table, frozen, "Frozen features")
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == [
        "MAE - random ViT, 50% of labels", "MAE - random ViT, 100% of labels",
        "MoCo - random ResNet, 50% of labels", "MoCo - random ResNet, 100% of labels",
        "MAE - MoCo, 50% of labels", "MAE - MoCo, 100% of labels"]


def test_probes_without_a_label_share_say_which_parameter_is_empty(cache, tmp_path):
    with pytest.raises(ValueError, match=r"no label share given \(parameter `probe_shares`\)"):
        ch4.pneumonia_probes(tmp_path / "mae.pt", tmp_path / "moco.pt", cache,
                             ch4.frozen_pairings("densenet121"), [], 2)


def test_sweeps_on_pneumonia_keep_their_tables_out_of_chapter_5s(cache, tmp_path):
    """The sweeps run again on a second task under their own prefix: chapter 5, which reads
    the `ch4_` tables of the 14 findings, does not see them."""
    start = FinetuneRecipe(model="vit_tiny_patch16", image_size=32, patch_size=16,
                           train_fraction=0.5)
    plan = {"layer_decay": ch4.Sweep("layer-wise LR decay", [0.55, 1.0], 0.55)}
    config = TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, base_lr=1e-3)
    tables = ch4.run_sweeps(start, plan, [0], cache, config, runs_dir(tmp_path),
                            prefix=PNEUMONIA_SWEEPS)
    assert list(tables["layer_decay"]["layer_decay"]) == [0.55, 1.0]
    assert (runs_dir(tmp_path) / "pneumonia_layer_decay.parquet").is_file()
    assert chapter4_table_paths(tmp_path) == []
    words = ch4.sweep_words(plan, tables, prefix="pneumonia_")
    assert list(words) == ["pneumonia_layer_decay_sentence"]
    assert "layer-wise LR decay" in words["pneumonia_layer_decay_sentence"]


def test_without_a_pediatric_root_the_pneumonia_sweeps_say_they_did_not_run(tmp_path):
    plan = ch4.sweeps([0.55, 1.0], [0, 6], [0.0, 0.2], 0.55, 6, 0.2)
    start = FinetuneRecipe(model="vit_tiny_patch16", image_size=32, patch_size=8)
    tables = ch4.run_sweeps(start, plan, [0], None, TrainConfig(), tmp_path,
                            prefix=PNEUMONIA_SWEEPS)
    assert tables == {} and not list(tmp_path.iterdir())
    words = ch4.sweep_words(plan, tables, prefix="pneumonia_")
    assert words["pneumonia_drop_path_sentence"] == (
        "The drop-path rate sweep did not run: no pediatric root was given (parameter "
        "`pediatric_root`).")
    assert len(words) == 3 and ch4.sweep_table(tables).empty
    fig = ch4.sweeps_figure(plan, tables, "AUC", "Sweeps on pneumonia")
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts == ["not run: no pediatric root given"] * 3
    assert fig._suptitle.get_text() == "Sweeps on pneumonia"

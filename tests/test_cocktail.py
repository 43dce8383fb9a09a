"""The cocktail: per-source shares hold over many draws, the mix's statistics, the presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from heldout import NOISE, heldout

from cxr_lib.augment.crops import pixel_stats, random_rotate
from cxr_lib.data.cache import Cache, prepare_cache
from cxr_lib.data.core import FINDINGS, XrayDataset, merge
from cxr_lib.data.loaders import CacheBatches
from cxr_lib.data.phantoms import phantom_dataset
from cxr_lib.methods import cocktail
from cxr_lib.methods.cocktail import (
    NO_FINDING,
    auc_both_ways,
    auc_separation,
    chest_share_weights,
    cocktail_sources,
    medtransformer_finetune_config,
    medtransformer_finetune_recipe,
    medtransformer_pretrain_config,
    medtransformer_scores,
    medtransformer_start,
    mix_stats,
    paired_gap,
    row_weights,
    source_shares,
    told_apart,
    with_no_finding,
)
from cxr_lib.methods.finetune import FinetuneRecipe, finetune_augment

SIZE = 8
# Source "dark" images are all 40, "bright" all 200 with a 20-px checker; sizes differ 4:1.
COUNTS = {"dark": 40, "bright": 10}


def draw(row: pd.Series) -> np.ndarray:
    if row["source"] == "dark":
        return np.full((SIZE, SIZE), 40, dtype=np.uint8)
    checker = (np.indices((SIZE, SIZE)).sum(axis=0) % 2) * 20
    return (200 + checker).astype(np.uint8)


def source_dataset(source: str, n: int) -> XrayDataset:
    meta = pd.DataFrame({
        "id": [f"{source}/{i}" for i in range(n)],
        "patient": [f"{source}{i}" for i in range(n)],
        "split": ["val" if i % 10 == 9 else "train" for i in range(n)],
        "source": source,
        "path": "",
    })
    labels = np.zeros((n, 1), dtype=np.float32)
    return XrayDataset(source, ["Pneumonia"], labels, meta, {source: draw})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    ds = merge([source_dataset(s, n) for s, n in COUNTS.items()], name="mix")
    return prepare_cache(ds, tmp_path_factory.mktemp("mix") / "c", size=SIZE, workers=1,
                         progress=False)


def test_shares_hold_over_many_draws_whatever_the_source_sizes(cache):
    weights = {"dark": 1.0, "bright": 1.0}  # equal shares, though dark has 4x the images
    batches = CacheBatches(cache, "train", 16, shuffle=True, seed=3,
                           sample_weights=row_weights(cache, weights))
    sources = cache.index["source"].to_numpy()
    drawn = np.concatenate([np.concatenate(batches.batch_indices(epoch)) for epoch in range(200)])
    share = (sources[drawn] == "bright").mean()
    assert len(drawn) == 200 * 45  # each pass draws as many rows as the split holds
    assert share == pytest.approx(0.5, abs=0.02)  # 9,000 draws: the sd of the share is 0.005
    # Passes differ (a fresh draw per epoch) and repeat under the same seed.
    assert not np.array_equal(batches.batch_indices(0)[0], batches.batch_indices(1)[0])
    again = CacheBatches(cache, "train", 16, shuffle=True, seed=3,
                         sample_weights=row_weights(cache, weights))
    assert np.array_equal(np.concatenate(again.batch_indices(5)),
                          np.concatenate(batches.batch_indices(5)))


def test_a_zero_weight_leaves_a_source_out_and_shares_follow_the_weights(cache):
    assert source_shares(cache, {"dark": 3, "bright": 1}) == {"bright": 0.25, "dark": 0.75}
    weights = row_weights(cache, {"dark": 1, "bright": 0})
    batches = CacheBatches(cache, "train", 8, shuffle=True, sample_weights=weights)
    drawn = np.concatenate(batches.batch_indices(0))
    assert set(cache.index["source"].to_numpy()[drawn]) == {"dark"}
    assert weights.sum() == pytest.approx(1.0)


def test_weights_must_name_exactly_the_sources(cache):
    with pytest.raises(ValueError, match=r"unknown \['brigth'\], missing \['bright'\]"):
        row_weights(cache, {"dark": 1, "brigth": 1})
    with pytest.raises(ValueError, match="not all zero"):
        source_shares(cache, {"dark": 0, "bright": 0})
    with pytest.raises(ValueError, match="shuffle=True"):
        CacheBatches(cache, "train", 8, sample_weights=row_weights(cache, {"dark": 1,
                                                                           "bright": 1}))
    with pytest.raises(ValueError, match="3 values for 45 rows"):
        CacheBatches(cache, "train", 8, shuffle=True, sample_weights=np.ones(3))


def test_mix_statistics_follow_the_shares_not_the_image_counts(cache):
    mean, std = mix_stats(cache, {"dark": 1, "bright": 1})
    dark, bright = 40 / 255, 210 / 255  # bright: half its pixels 200, half 220
    assert mean == pytest.approx((dark + bright) / 2, abs=1e-6)
    spread_bright = 10 / 255
    var = 0.5 * (dark**2) + 0.5 * (bright**2 + spread_bright**2) - mean**2
    assert std == pytest.approx(var**0.5, abs=1e-6)
    # Shares proportional to the counts give the statistics of the pooled images.
    pooled = pixel_stats(cache.images[cache.split_indices("train")])
    assert mix_stats(cache, {"dark": 36, "bright": 9}) == pytest.approx(pooled, abs=1e-6)


def test_finetuning_reuses_given_statistics_and_rotates(cache):
    recipe = FinetuneRecipe(model="densenet121", layer_decay=None, drop_path=0.0,
                            randaug_magnitude=None, image_size=SIZE, normalise=(0.3, 0.2),
                            rotation=30)
    augment = finetune_augment(cache, recipe)
    assert (augment.mean, augment.std, augment.rotation) == (0.3, 0.2, 30.0)
    own = finetune_augment(cache, FinetuneRecipe(model="densenet121", layer_decay=None,
                                                 drop_path=0.0, image_size=SIZE))
    assert own.mean == pytest.approx(pixel_stats(cache.images[cache.split_indices("train")])[0],
                                     abs=1e-4)
    with pytest.raises(ValueError, match="normalise"):
        FinetuneRecipe(model="densenet121", layer_decay=None, normalise=(0.5, 0.0)).check()


def test_rotation_turns_each_image_within_the_range():
    x = torch.zeros(64, 1, 33, 33, dtype=torch.uint8)
    x[:, :, 16, 16:] = 255  # a ray from the centre to the right edge
    out = random_rotate(x, 30.0, fill=0, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    ys, xs = torch.meshgrid(torch.arange(33.0) - 16, torch.arange(33.0) - 16, indexing="ij")
    w = out[:, 0].float()  # [B, H, W]
    angle = torch.rad2deg(torch.atan2((w * ys).sum((1, 2)), (w * xs).sum((1, 2))))  # [B]
    assert angle.abs().max() <= 31  # within +-30 degrees (plus interpolation)
    assert angle.abs().max() > 20 and angle.std() > 8  # and spread over the range
    assert torch.equal(random_rotate(x, 0.0, fill=0), x)


def test_the_mae_continues_hieras_imagenet_mae_not_its_fine_tuned_classifier(monkeypatch):
    asked = []
    monkeypatch.setattr(cocktail, "imagenet_weights",
                        lambda model, tag=None: asked.append((model, tag)) or Path("w.pt"))
    assert medtransformer_start("hiera_tiny") == Path("w.pt")
    medtransformer_start("vit_tiny_patch16")
    assert asked == [("hiera_tiny", "mae"), ("vit_tiny_patch16", None)]


def test_presets_are_medtransformers_recipes():
    pre = medtransformer_pretrain_config(epochs=3)
    fine = medtransformer_finetune_config()
    assert (pre.optimizer, pre.schedule, pre.batch_size, pre.epochs) == (
        "adam", "torch_one_cycle", 64, 3)
    assert pre.pct_start == fine.pct_start == 0.3  # torch's OneCycleLR as it comes
    assert pre.lr == pytest.approx(1e-4)
    assert (fine.epochs, fine.batch_size, fine.weight_decay) == (10, 64, 1e-8)
    assert fine.lr == pytest.approx(1e-4) and fine.optimizer == "adam"
    assert pre.betas == fine.betas == (0.9, 0.999)  # torch's Adam as it comes
    recipe = medtransformer_finetune_recipe(init="mae", weights="enc.pt")
    assert (recipe.rotation, recipe.randaug_magnitude, recipe.layer_decay) == (30.0, None, None)


def test_the_cocktail_always_holds_a_second_domain(tmp_path):
    from PIL import Image

    for cls, name in (("NORMAL", "IM-0001-0001.jpeg"), ("PNEUMONIA", "person1_virus_1.jpeg")):
        folder = tmp_path / "kids" / "train" / cls
        folder.mkdir(parents=True)
        Image.new("L", (20, 20), 90).save(folder / name)
    chest = phantom_dataset(12, size=32, seed=0)
    alone = cocktail_sources(chest, n_phantoms=8, phantom_size=32)
    assert [s.name for s in alone] == ["phantom", "phantom-lowres"]
    assert alone[1].load_image(0).shape == (16, 16)  # a quarter of 32, at least 16
    with_kids = cocktail_sources(chest, pediatric_root=tmp_path / "kids", n_phantoms=8,
                                 phantom_size=32)
    assert [s.name for s in with_kids] == ["phantom", "pediatric"]  # a real second domain
    merged = merge(with_kids)
    assert merged.labels[merged.meta["source"] == "pediatric"][:, FINDINGS.index(
        "Pneumonia")].tolist() == [0.0, 1.0]


def test_chest_share_weights_split_the_rest_evenly():
    assert chest_share_weights(["a", "b", "c"], "a", 0.5) == {"a": 0.5, "b": 0.25, "c": 0.25}
    assert chest_share_weights(["a", "b"], "a", 1.0) == {"a": 1.0, "b": 0.0}
    with pytest.raises(ValueError, match="chest_share"):
        chest_share_weights(["a", "b"], "a", 0.0)
    with pytest.raises(ValueError, match="not among"):
        chest_share_weights(["a", "b"], "x", 0.5)


def test_a_pass_can_draw_a_set_number_of_images(cache):
    weights = row_weights(cache, {"dark": 1, "bright": 1})
    batches = CacheBatches(cache, "train", 8, shuffle=True, sample_weights=weights, draws=20)
    assert len(batches) == 3 and sum(len(b) for b in batches.batch_indices(0)) == 20
    with pytest.raises(ValueError, match="needs sample_weights"):
        CacheBatches(cache, "train", 8, shuffle=True, draws=20)


# ----------------------------------------------------------------------------- verdicts

def test_paired_gap_is_the_mean_difference_and_its_standard_error():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.5, 2.0, 3.5, 5.0])
    gap, se = paired_gap(a, b)
    assert gap == pytest.approx(0.5) and se == pytest.approx(np.std([0.5, 0, 0.5, 1], ddof=1) / 2)
    assert np.isnan(paired_gap(a[:1], b[:1])[1]) and not told_apart(a[:1], b[:1])
    # the spread the images share cancels: a steady gap of 0.01 is told apart...
    assert told_apart(1 + NOISE, 1.01 + NOISE)
    # ...one buried in each image's own noise is not
    assert not told_apart(heldout(1.0, 0.05).model, heldout(1.001, 0.05).model)


def test_auc_separation_needs_the_seed_floor_and_a_clear_bootstrap():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, (300, 2)).astype(float)  # [N, F]
    good = targets + rng.normal(0, 0.6, targets.shape)  # AUC about 0.88
    scores = {"good": good, "chance": rng.normal(0, 1, targets.shape),
              "jittered": good + rng.normal(0, 0.1, targets.shape)}
    patients, findings = np.arange(300) // 2, ["a", "b"]  # two images a patient
    apart = auc_separation(scores, targets, patients, findings, 0.03, n_boot=200)
    assert apart("good", "chance") and apart("chance", "good")
    # jittered is 0.006 below good, an interval clear of 0 on 300 images: only the floor holds
    assert not apart("good", "jittered")
    assert auc_separation(scores, targets, patients, findings, 0.0, n_boot=200)(
        "good", "jittered")
    # on 10 images jittered is 0.024 above good, over a floor of 0.02, but the interval is wide
    few = {k: v[:10] for k, v in scores.items()}
    assert not auc_separation(few, targets[:10], patients[:10], findings, 0.02, n_boot=200)(
        "good", "jittered")


def test_medtransformers_labels_add_no_finding_where_every_finding_is_absent(tmp_path):
    labels = np.array([[0, 0], [1, 0], [np.nan, 0], [np.nan, 1]], dtype=np.float32)
    index = pd.DataFrame({"id": list("abcd"), "split": "train"})
    cache = Cache(tmp_path, "nih", np.zeros((4, 2, 2), np.uint8), index, labels, ["A", "B"], 2)
    fifteen = with_no_finding(cache)
    assert fifteen.findings == ["A", "B", NO_FINDING] and fifteen.images is cache.images
    np.testing.assert_array_equal(fifteen.labels[:, 2], [1, 0, np.nan, 0])
    assert fifteen.name != cache.name  # another run, not the 14-label one loaded
    with pytest.raises(ValueError, match="unknown label set 'nih15'"):
        cocktail.label_set(cache, "nih15")
    assert cocktail.label_set(cache, "findings") is cache


def test_medtransformers_scores_are_a_softmax_over_the_outputs_then_a_sigmoid():
    """As its report's evaluation scores them: eval-mode Hiera's head is a softmax, the script
    adds a sigmoid. Each label's own logit ranks it perfectly here, yet image 2's large logit
    for the other label squashes its score: AUC 1 for our sigmoid per label, not for theirs."""
    logits = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 9.0], [-1.0, 0.0]])
    targets = np.array([[0, 0], [1, 0], [1, 1], [0, 0]], dtype=np.float32)
    z = torch.from_numpy(logits)
    expected = torch.sigmoid(torch.softmax(z, dim=1)).numpy()
    np.testing.assert_allclose(medtransformer_scores(logits), expected, rtol=1e-12)
    ours, theirs = auc_both_ways(logits, targets, ["A", "B"])
    assert ours == 1.0 and theirs == pytest.approx((0.5 + 1.0) / 2)  # A: 2 of 4 pairs
    with_nf = np.column_stack([targets, [1, 0, 0, 1]])
    ours, _ = auc_both_ways(np.column_stack([logits, -logits[:, 0]]), with_nf,
                            ["A", "B", NO_FINDING])
    assert ours == 1.0  # No Finding left out of ours


def test_medtransformers_view_is_the_central_224_of_256_of_the_same_pixels(cache):
    """Resize to 256, crop the central 224: of this 8 px cache, the central 7 px (0.875)."""
    cropped = cocktail.center_cropped(cache, cocktail.MEDTRANSFORMER_CROP)
    assert cropped.size == 7 and cropped.name != cache.name  # other runs
    x, _ = next(iter(CacheBatches(cropped, "train", 4)))  # [4, 1, 7, 7]
    assert torch.equal(x[:, 0], torch.from_numpy(np.array(cache.images[:4, 0:7, 0:7])))
    assert cocktail.center_cropped(cache, 1.0) is cache
    with pytest.raises(ValueError, match="center_crop must lie in"):
        cocktail.center_cropped(cache, 1.5)


def test_medtransformers_fixed_statistics_or_ours_of_the_mix(cache):
    weights = {"dark": 1.0, "bright": 1.0}
    assert cocktail.normalisation("mix", cache, weights) == mix_stats(cache, weights)
    assert cocktail.normalisation("medtransformer", cache, weights) == (0.5066, 0.2241)
    with pytest.raises(ValueError, match="unknown normalisation 'imagenet'"):
        cocktail.normalisation("imagenet", cache, weights)


def test_a_runs_stored_test_scores_are_scored_both_ways_by_image_id(cache, tmp_path):
    rows = np.array([3, 0, 44, 12, 40])  # dark rows are 0-39, bright 40-49
    logits = np.array([[0.1], [0.4], [2.0], [-1.0], [0.9]])
    labelled = dataclasses.replace(cache, labels=(np.arange(50) >= 40).astype(np.float32)[:, None])
    table = pd.DataFrame({"id": cache.index["id"].to_numpy()[rows], "Pneumonia": logits[:, 0]})
    table.to_parquet(tmp_path / cocktail.TEST_SCORES)
    assert cocktail.stored_test_aucs(tmp_path, labelled) == auc_both_ways(
        logits, labelled.labels[rows], ["Pneumonia"])
    assert cocktail.stored_test_aucs(tmp_path, labelled)[0] == 1.0

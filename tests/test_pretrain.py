"""MAE pre-training on a cache through the engine: runs, reuse, the probe and the saved encoder."""

import dataclasses
import json
import math

import numpy as np
import pytest
import timm
import torch

from cxr_lib.augment.crops import pixel_stats, split_stats
from cxr_lib.book.profiles import load_profile
from cxr_lib.chapters.setup import chapter_cache
from cxr_lib.cli import main
from cxr_lib.data.phantoms import phantom_dataset
from cxr_lib.engine import runs
from cxr_lib.engine.config import TrainConfig
from cxr_lib.methods.mae import (
    MaeRecipe,
    PretrainedMae,
    cache_identity,
    heldout_errors,
    heldout_loss,
    mae_augment,
    pretrain_mae,
    probe_encoder,
    save_encoder,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
RECIPE = MaeRecipe(model="vit_tiny_patch16", image_size=32, patch_size=8, decoder_dim=32,
                   decoder_depth=1, decoder_heads=2)
CONFIG = TrainConfig(epochs=2, batch_size=16, base_lr=1e-3, warmup_epochs=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    return chapter_cache(work, phantom_dataset(60, size=32, seed=2), 32)


def test_pretraining_trains_then_loads_the_finished_run(cache, tmp_path):
    first = pretrain_mae(cache, RECIPE, CONFIG, tmp_path, progress=False)
    assert not first.run.loaded_from_cache
    assert len(first.run.history) == 2 and first.run.history["train_loss"].notna().all()
    again = pretrain_mae(cache, RECIPE, CONFIG, tmp_path, progress=False)
    assert again.run.loaded_from_cache and again.run.path == first.run.path
    for a, b in zip(first.mae.state_dict().values(), again.mae.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = pretrain_mae(cache, dataclasses.replace(RECIPE, mask_ratio=0.75), CONFIG, tmp_path,
                         progress=False)
    assert other.run.path != first.run.path  # the recipe is part of the run's identity
    assert first.augment.scale == RECIPE.crop_scale
    train = cache.images[cache.split_indices("train")]  # under 1000 images: split_stats sees all
    stats = tuple(round(v, 4) for v in pixel_stats(train))
    assert (first.augment.mean, first.augment.std) == stats == split_stats(cache)
    given = mae_augment(cache, RECIPE, normalise=(0.123456, 0.2))
    assert (given.mean, given.std) == (0.1235, 0.2)


def test_probe_scores_every_finding_with_both_classes(cache):
    torch.manual_seed(0)
    mae = RECIPE.build()
    result = probe_encoder(mae, cache, mae_augment(cache, RECIPE))
    assert 0.0 <= result.mean_auc <= 1.0
    assert result.n_train == len(cache.split_indices("train"))
    assert result.n_val == len(cache.split_indices("val"))
    assert set(result.per_finding) | set(result.skipped) == set(cache.findings)


def test_saved_encoder_loads_into_timm_with_only_the_head_missing(cache, tmp_path):
    pre = pretrain_mae(cache, RECIPE, CONFIG, tmp_path / "runs", progress=False)
    path = save_encoder(pre, tmp_path / "encoders" / "mae.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["recipe"]["mask_ratio"] == RECIPE.mask_ratio and saved["run"] == pre.run.path.name
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=1,
                            num_classes=14)
    missing, unexpected = vit.load_state_dict(saved["model"], strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []


def test_cache_identity_counts_the_splits(cache):
    ident = cache_identity(cache)
    assert ident["images"] == len(cache) == sum(ident["splits"].values())
    assert ident["name"] == "phantom" and ident["size"] == 32


def test_command_line_pretrains_with_profile_defaults_and_saves(cache, tmp_path, capsys):
    args = ["pretrain", "mae", "--profile", "smoke", "--data", str(cache.path), "--runs",
            str(tmp_path), "--image-size", "32", "--epochs", "1", "--save",
            str(tmp_path / "enc.pt")]
    main(args)
    out = capsys.readouterr().out
    assert "trained" in out and (tmp_path / "enc.pt").is_file()
    main(args)
    assert "loaded the finished run" in capsys.readouterr().out


def test_a_mix_of_draws_and_given_statistics_make_their_own_run(cache, tmp_path):
    config = dataclasses.replace(CONFIG, epochs=1)
    plain = pretrain_mae(cache, RECIPE, config, tmp_path, progress=False)
    rows = cache.split_indices("train")
    weights = np.linspace(1, 2, len(rows))
    drawn = pretrain_mae(cache, RECIPE, config, tmp_path, sample_weights=weights,
                         normalise=(0.5, 0.25), progress=False)
    assert drawn.run.path != plain.run.path and not drawn.run.loaded_from_cache
    assert (drawn.augment.mean, drawn.augment.std) == (0.5, 0.25)
    again = pretrain_mae(cache, RECIPE, config, tmp_path, sample_weights=weights,
                         normalise=(0.5, 0.25), progress=False)
    assert again.run.path == drawn.run.path and again.run.loaded_from_cache


def test_heldout_loss_uses_the_same_masks_for_every_model(cache):
    recipe = MaeRecipe(model="hiera_tiny", image_size=64, mask_ratio=0.6, norm_pix_loss=True,
                       decoder_dim=32, decoder_depth=1, decoder_heads=2)
    torch.manual_seed(0)
    pre = PretrainedMae(recipe.build(), None, mae_augment(cache, recipe), recipe)
    assert type(pre.mae).__name__ == "HieraMae" and pre.mae.mask_ratio == 0.6
    rows = cache.split_indices("val")
    first = heldout_loss(pre, cache, rows, seed=3, batch_size=4)
    assert heldout_loss(pre, cache, rows, seed=3, batch_size=4) == first  # masks repeat
    assert heldout_loss(pre, cache, rows, seed=4, batch_size=4) != first  # other masks
    errors = heldout_errors(pre, cache, rows, seed=3, batch_size=4)
    assert errors.model.shape == errors.mean_fill.shape == (len(rows),)  # image by image
    assert errors.mean("model") == first and math.isnan(errors.contrast)  # norm_pix
    torch.manual_seed(1)
    other = dataclasses.replace(pre, mae=recipe.build())
    assert heldout_loss(other, cache, rows, seed=3, batch_size=4) != first
    assert np.allclose(heldout_errors(other, cache, rows, seed=3, batch_size=4).mean_fill,
                       errors.mean_fill)  # the blank fill is the masks', not the model's
    assert pre.mae.training  # the model's mode is given back

    whole = heldout_errors(pre, cache, rows, seed=3, batch_size=len(rows))
    torch.manual_seed(3)
    x = pre.augment.plain(torch.from_numpy(np.asarray(cache.images[rows]))[:, None])
    pre.mae.eval()
    with torch.no_grad():
        assert whole.mean("model") == pytest.approx(float(pre.mae(x)[0]), rel=1e-5)  # its loss
    # norm_pix_loss: a blank prediction scores (n-1)/n on a patch of n pixels that is not flat
    n = pre.mae.patchify(x).shape[-1]
    assert 0 < whole.mean("mean_fill") <= (n - 1) / n + 1e-6
    with torch.no_grad():
        pre.mae.decoder_pred.weight.zero_()
        pre.mae.decoder_pred.bias.zero_()
    blank = heldout_errors(pre, cache, rows, seed=3, batch_size=len(rows))
    assert np.allclose(blank.model, blank.mean_fill)
    assert blank.mean("mean_fill") == pytest.approx(whole.mean("mean_fill"))


def test_heldout_errors_set_the_model_against_two_fills_on_the_same_masks(cache):
    torch.manual_seed(0)
    pre = PretrainedMae(RECIPE.build(), None, mae_augment(cache, RECIPE), RECIPE)
    rows = cache.split_indices("val")
    errors = heldout_errors(pre, cache, rows, seed=5, batch_size=64)
    assert errors.mean("model") == heldout_loss(pre, cache, rows, seed=5, batch_size=64)
    x = pre.augment.plain(torch.from_numpy(np.asarray(cache.images[rows]))[:, None])
    with torch.no_grad():
        torch.manual_seed(5)
        _, pred, mask = pre.mae.eval()(x)  # the masks heldout_errors drew: [N, L]
        target = pre.mae.loss_target(x).numpy()  # [N, L, P]
    hidden = mask.numpy().astype(bool)
    painted, true = pred.numpy().mean(-1)[hidden], target.mean(-1)[hidden]  # patch brightness
    assert errors.contrast == pytest.approx(painted.std(ddof=1) / true.std(ddof=1), rel=1e-4)
    assert errors.mean("mean_fill") == pytest.approx(np.mean(target[hidden] ** 2), rel=1e-5)
    by_image = [np.mean((t[h] - t[~h].mean()) ** 2) for t, h in zip(target, hidden, strict=True)]
    assert np.allclose(errors.visible_fill, by_image, rtol=1e-5)  # image by image
    pre.mae.forward_decoder = lambda latent, ids: pre.mae.loss_target(x)  # paints the truth
    truth = heldout_errors(pre, cache, rows, seed=5, batch_size=64)
    assert truth.mean("model") == 0.0
    # flattened, the truth keeps only each patch's mean: what is left is the detail inside it
    flat = np.mean((target - target.mean(axis=-1, keepdims=True))[hidden] ** 2)
    assert truth.mean("model_flat") == pytest.approx(flat, rel=1e-5) and flat > 0
    assert truth.contrast == pytest.approx(1.0)


def test_pretraining_can_continue_from_a_weights_file(cache, tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=3,
                            num_classes=1000)  # an ImageNet-like file: RGB, with a classifier
    torch.save(vit.state_dict(), tmp_path / "imagenet.pt")
    started = dataclasses.replace(RECIPE, init_weights=str(tmp_path / "imagenet.pt"))
    assert "init_weights" not in RECIPE.identity()  # runs without a start keep their identity
    assert len(started.identity()["init_weights"]) == 16  # the file's digest, not its path
    config = dataclasses.replace(CONFIG, epochs=1, base_lr=1e-12)  # train, but move nothing
    pre = pretrain_mae(cache, started, config, tmp_path / "runs", progress=False)
    block = pre.mae.blocks[0].attn.qkv.weight.detach()
    assert torch.allclose(block, vit.blocks[0].attn.qkv.weight, atol=1e-6)
    summed = vit.patch_embed.proj.weight.sum(dim=1, keepdim=True)  # RGB kernels summed to gray
    assert torch.allclose(pre.mae.patch_embed.proj.weight.detach(), summed, atol=1e-5)
    plain = pretrain_mae(cache, RECIPE, config, tmp_path / "runs", progress=False)
    assert plain.run.path != pre.run.path


def test_rgb_input_pretrains_the_papers_mae_in_a_run_of_its_own(cache, tmp_path):
    """in_chans=3: the gray crops replicated to RGB, a 3-channel patch projection and three
    predicted values per pixel, as Xiao et al.'s MAE; the run hash names the channel count."""
    every = dataclasses.asdict(RECIPE)
    del every["init_weights"]  # none: no start file to name
    assert RECIPE.identity() == every and every["in_chans"] == 1
    rgb = dataclasses.replace(RECIPE, in_chans=3)
    assert runs.config_hash(rgb.identity()) != runs.config_hash(RECIPE.identity())
    pre = pretrain_mae(cache, rgb, dataclasses.replace(CONFIG, epochs=1), tmp_path,
                       progress=False)
    assert pre.mae.patch_embed.proj.weight.shape[1] == 3
    assert pre.mae.decoder_pred.out_features == 8 * 8 * 3
    config = json.loads((pre.run.path / runs.CONFIG).read_text())
    assert pre.augment.channels == 3 and config["extra"]["recipe"]["in_chans"] == 3


def test_command_line_continues_a_released_rgb_mae_with_its_pixel_predictor(cache, tmp_path,
                                                                           capsys):
    section = load_profile("smoke").chapters["02_mae_pretraining"]
    released = MaeRecipe(model=section["model"], image_size=32, patch_size=section["patch_size"],
                         decoder_dim=section["decoder_dim"], decoder_depth=section["decoder_depth"],
                         decoder_heads=section["decoder_heads"], in_chans=3).build()
    torch.save({"model": released.state_dict(), "epoch": 799}, tmp_path / "released.pth")
    main(["pretrain", "mae", "--profile", "smoke", "--data", str(cache.path), "--runs",
          str(tmp_path / "runs"), "--image-size", "32", "--epochs", "1", "--init-weights",
          str(tmp_path / "released.pth")])
    out = capsys.readouterr().out
    assert "adapted 3 (patch_embed.proj.weight, decoder_pred.weight, decoder_pred.bias)" in out
    assert "mismatched" not in out and "trained" in out

"""The masked autoencoder: masking, loss, timm compatibility, checkpoint loading."""

import argparse
import math

import pytest
import timm
import torch

from cxr_lib.models import (
    PRESETS,
    MaeConfig,
    build_mae,
    encoder_state_dict,
    load_mae_checkpoint,
    sincos_pos_embed,
    to_timm_vit,
)
from cxr_lib.models.mae import visible_count


def tiny(img_size: int = 32, patch_size: int = 8, in_chans: int = 1, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return build_mae("vit_tiny_patch16", img_size=img_size, patch_size=patch_size,
                     in_chans=in_chans, decoder_dim=64, decoder_heads=4, **kwargs)


@pytest.fixture(scope="module")
def mae():
    """ViT-tiny, 32 px, patch 8 (16 patches); tests only read it."""
    return tiny()


@pytest.fixture(scope="module")
def mae_normpix():
    return tiny(norm_pix_loss=True)


def test_patchify_round_trip_and_layout(mae):
    imgs = torch.randn(2, 1, 32, 32)
    patches = mae.patchify(imgs)
    assert patches.shape == (2, 16, 8 * 8)
    expected = imgs[1, 0, 0:8, 8:16].reshape(-1)  # patch 1 is row 0, column 1
    assert torch.equal(patches[1, 1], expected)
    assert torch.equal(mae.unpatchify(patches), imgs)


def test_random_masking_per_sample(mae):
    torch.manual_seed(1)
    b, n, d = 4, 64, 3
    ids = torch.arange(n, dtype=torch.float32)
    x = ids.view(1, n, 1).expand(b, n, d).clone()  # each token carries its own index
    x_masked, mask, ids_restore = mae.random_masking(x, 0.75)
    keep = 16  # a quarter of 64
    assert x_masked.shape == (b, keep, d)
    assert torch.equal(mask.sum(1), torch.full((b,), float(n - keep)))
    assert len({tuple(m.tolist()) for m in mask}) == b  # a different mask per sample
    for i in range(b):
        visible = x_masked[i, :, 0].long()
        assert torch.all(mask[i, visible] == 0)  # the kept tokens are the unmasked ones
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore),
                       torch.arange(n).expand(b, n))
    with pytest.raises(ValueError, match="mask_ratio"):
        mae.random_masking(x, 1.0)


def test_visible_count_truncates_as_maes_code():
    assert visible_count(196, 0.9) == 19  # 19.6: the paper's ViT-S/16 at 224 px
    assert visible_count(196, 0.75) == 49 and visible_count(64, 0.9) == 6
    assert visible_count(16, 0.95) == 0  # random_masking refuses this


def test_encoder_sees_only_visible_patches():
    mae = tiny(img_size=64, patch_size=8, mask_ratio=0.9)
    seen = []
    mae.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    loss, pred, mask = mae(torch.randn(2, 1, 64, 64))
    keep = 6  # int(6.4), as MAE's code
    assert seen == [torch.Size([2, 1 + keep, 192])]
    assert pred.shape == (2, 64, 64) and mask.shape == (2, 64)
    assert torch.isfinite(loss)


def test_loss_counts_masked_patches_only(mae):
    imgs = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        loss, pred, mask = mae(imgs)
    patches = mae.patchify(imgs)
    visible = (mask == 0).unsqueeze(-1)
    changed_visible = mae.unpatchify(torch.where(visible, patches + 5.0, patches))
    changed_masked = mae.unpatchify(torch.where(visible, patches, patches + 5.0))
    assert torch.allclose(mae.forward_loss(changed_visible, pred, mask), loss)
    assert not torch.allclose(mae.forward_loss(changed_masked, pred, mask), loss)
    expected = ((pred - patches) ** 2).mean(-1)[mask.bool()].mean()
    assert torch.allclose(loss, expected)


def test_norm_pix_loss_normalises_each_patch(mae, mae_normpix):
    imgs = torch.rand(2, 1, 32, 32) * 3 + 1
    target = mae_normpix.loss_target(imgs)
    assert torch.equal(mae.loss_target(imgs), mae.patchify(imgs))
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 16), atol=1e-3)


def test_backward_reaches_encoder_and_decoder_but_not_fixed_tables():
    mae = tiny()
    loss, _, _ = mae(torch.randn(2, 1, 32, 32))
    loss.backward()
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "cls_token",
                 "mask_token", "decoder_pred.weight"):
        grad = mae.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    names = {n for n, _ in mae.named_parameters()}
    assert "pos_embed" not in names and "decoder_pos_embed" not in names
    assert {"pos_embed", "decoder_pos_embed"} <= set(mae.state_dict())


def test_three_channels_patch16():
    mae = tiny(img_size=32, patch_size=16, in_chans=3)
    imgs = torch.randn(2, 3, 32, 32)
    patches = mae.patchify(imgs)
    expected = imgs[1, :, 0:16, 16:32].permute(1, 2, 0).reshape(-1)  # (row, col, channel)
    assert torch.equal(patches[1, 1], expected)
    assert torch.equal(mae.unpatchify(patches), imgs)
    loss, pred, mask = mae(imgs, mask_ratio=0.5)
    assert pred.shape == (2, 4, 16 * 16 * 3) and mask.sum() == 4
    loss.backward()
    assert mae.patch_embed.proj.weight.grad.shape == (192, 3, 16, 16)


def test_sincos_layout_matches_released_mae():
    emb = sincos_pos_embed(16, 3)  # 4 frequencies per (axis, sin/cos) quarter
    assert emb.shape == (1, 10, 16)
    assert torch.equal(emb[0, 0], torch.zeros(16))  # class token
    row0_col1 = emb[0, 1 + 1]
    assert row0_col1[0] == pytest.approx(math.sin(1.0))  # first half: the column
    assert row0_col1[4] == pytest.approx(math.cos(1.0))
    assert row0_col1[8] == pytest.approx(0.0) and row0_col1[12] == pytest.approx(1.0)
    row1_col0 = emb[0, 1 + 3]
    assert row1_col0[8] == pytest.approx(math.sin(1.0))  # second half: the row


def test_encoder_loads_into_timm_vit_and_matches(mae):
    mae.eval()
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                            patch_size=8, in_chans=1, num_classes=14).eval()
    result = vit.load_state_dict(encoder_state_dict(mae), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
    assert result.unexpected_keys == []
    imgs = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = vit.forward_features(imgs)  # [B, 1+L, D]
        assert torch.allclose(mae.forward_features(imgs), expected, atol=1e-5)
        latent, mask, ids_restore = mae.forward_encoder(imgs, 0.0)
        assert mask.sum() == 0
        index = ids_restore.unsqueeze(-1).expand(-1, -1, latent.shape[2])
        patches = torch.gather(latent[:, 1:], 1, index)  # back to patch order
        assert torch.allclose(latent[:, :1], expected[:, :1], atol=1e-5)
        assert torch.allclose(patches, expected[:, 1:], atol=1e-5)
        assert torch.allclose(to_timm_vit(mae, 14).eval().forward_features(imgs), expected,
                              atol=1e-5)


def test_load_released_layout_restores_weights(tmp_path, mae):
    source = mae
    target = tiny(seed=5)
    path = tmp_path / "checkpoint-399.pth"
    torch.save({"model": source.state_dict(), "epoch": 399,
                "args": argparse.Namespace(mask_ratio=0.9)}, path)  # as MAE's main_pretrain
    report = load_mae_checkpoint(target, path)
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_reports_tampered_and_adapts(mae):
    source = mae
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # a DDP save
    del state["module.decoder_pred.weight"]
    state["head.weight"] = torch.zeros(14, 192)
    state["pos_embed"] = sincos_pos_embed(192, 14)  # trained at another grid
    rgb = source.patch_embed.proj.weight.repeat(1, 3, 1, 1) / 3  # [D, 3, p, p]
    state["patch_embed.proj.weight"] = rgb
    target = tiny(seed=5)
    report = load_mae_checkpoint(target, state)
    assert report.missing == ["decoder_pred.weight"]
    assert report.unexpected == ["head.weight"]
    assert report.regenerated == ["pos_embed"] and report.adapted == ["patch_embed.proj.weight"]
    assert torch.allclose(target.patch_embed.proj.weight, source.patch_embed.proj.weight,
                          atol=1e-6)  # summing the RGB copies gives back the gray filter
    assert torch.equal(target.pos_embed, sincos_pos_embed(192, 4))
    assert "missing 1 (decoder_pred.weight)" in report.summary


def test_a_released_rgb_mae_keeps_its_pixel_predictor_on_one_channel(tmp_path):
    """A released MAE (facebookresearch/mae's `{"model": ...}` layout, 3 input channels and a
    `decoder_pred` of p*p*3 outputs ordered pixel, channel) continues on 1-channel X-rays: the
    predictor is adapted, not left random, and predicts the mean of its 3 channel predictions,
    so the reconstruction loss starts where the released model's is (no higher, by Jensen)."""
    rgb, gray = tiny(in_chans=3, seed=1), tiny(seed=5)
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": rgb.state_dict(), "epoch": 799}, path)
    report = load_mae_checkpoint(gray, path)
    assert report.mismatched == [] and report.missing == []
    assert report.adapted == ["patch_embed.proj.weight", "decoder_pred.weight",
                              "decoder_pred.bias"]
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.manual_seed(0)
        loss_rgb, pred_rgb, _ = rgb.eval()(x.expand(-1, 3, -1, -1))  # [B, L, p*p*3]
        torch.manual_seed(0)
        loss_gray, pred_gray, _ = gray.eval()(x)  # [B, L, p*p], the same masks
    per_channel = pred_rgb.reshape(2, 16, 64, 3)  # [B, L, p*p, C]
    assert torch.allclose(pred_gray, per_channel.mean(-1), atol=1e-5)
    assert loss_gray <= loss_rgb + 1e-6
    # and back: a 1-channel MAE's predictor copied to each of 3 channels predicts the same
    again = tiny(in_chans=3, seed=7)
    load_mae_checkpoint(again, gray.state_dict())
    with torch.no_grad():
        torch.manual_seed(0)
        _, pred_again, _ = again.eval()(x.expand(-1, 3, -1, -1))
    assert torch.allclose(pred_again.reshape(2, 16, 64, 3), pred_gray[..., None].expand(
        -1, -1, -1, 3), atol=1e-5)


def test_every_layer_norm_has_maes_eps_whatever_timms_block_default():
    norms = [m for m in tiny().modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) > 4 and {m.eps for m in norms} == {1e-6}


def test_load_rejects_foreign_files(tmp_path, mae):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_mae_checkpoint(mae, tmp_path / "nope.pth")
    path = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ValueError, match="other.pth: no tensor matches"):
        load_mae_checkpoint(mae, path)


def test_presets_and_bad_arguments():
    assert (PRESETS["vit_small_patch16"].decoder_dim, PRESETS["vit_small_patch16"].decoder_depth,
            PRESETS["vit_small_patch16"].decoder_heads) == (512, 2, 16)
    assert PRESETS["vit_base_patch16"].decoder_depth == 8
    mae = build_mae("vit_tiny_patch16", img_size=32)
    assert mae.config.patch_size == 16 and len(mae.decoder_blocks) == 2
    assert mae.decoder_embed.out_features == 512 and mae.mask_ratio == 0.9
    assert mae.decoder_blocks[0].attn.num_heads == 16
    with pytest.raises(ValueError, match="unknown MAE model"):
        build_mae("vit_huge")
    with pytest.raises(ValueError, match="not divisible"):
        build_mae("vit_tiny_patch16", img_size=60)
    with pytest.raises(ValueError, match="in_chans must be 1 or 3"):
        MaeConfig(model="vit_tiny_patch16", in_chans=2)
    with pytest.raises(ValueError, match="mask_ratio"):
        MaeConfig(mask_ratio=1.0)


def test_reconstruct_pastes_visible_patches(mae_normpix):
    mae = mae_normpix
    imgs = torch.rand(2, 1, 32, 32)
    masked, pred, pasted = mae.reconstruct(imgs, mask_ratio=0.75)
    assert masked.shape == pred.shape == pasted.shape == imgs.shape
    assert masked.abs().sum() > 0
    diff = mae.patchify((pasted - imgs).abs()).sum(-1)  # [B, L]
    zeros = mae.patchify(masked).abs().sum(-1)  # [B, L]
    visible = zeros > 0
    assert torch.all(diff[visible] < 1e-6)  # the visible patches are the input's own
    assert visible.sum() == 2 * 4

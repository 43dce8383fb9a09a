"""HieraMae: unit masking, the loss, the ViT-MAE interface, and its encoder in timm's Hiera.

Tiny: hiera_tiny at 64 px (4x4 mask units of 4x4 tokens) with a 32-wide 1-block decoder; one
test also runs 128 px, where units are timm's 8x8 tokens.
"""

import inspect

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.hiera import Hiera
from timm.optim import param_groups_layer_decay

from cxr_lib.chapters import plots
from cxr_lib.methods.probe import mae_features
from cxr_lib.models.classifier import build_classifier, load_start
from cxr_lib.models.hiera_mae import HieraMae, build_hiera_mae, hiera_kwargs
from cxr_lib.models.mae import encoder_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

HEAD = ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]


def tiny(img_size: int = 64, seed: int = 0, **kwargs) -> HieraMae:
    torch.manual_seed(seed)
    return build_hiera_mae("hiera_tiny", img_size=img_size, decoder_dim=32, decoder_depth=1,
                           decoder_heads=2, **kwargs)


@pytest.fixture(scope="module")
def mae() -> HieraMae:
    """Shared by the tests that only run it forward, in eval mode (no dropout anywhere)."""
    return tiny().eval()


def images(size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_hiera_kwargs_are_timms_defaults_at_224_and_give_16_units_at_64():
    defaults = inspect.signature(Hiera).parameters
    assert hiera_kwargs(224) == {"img_size": (224, 224),
                                 "mask_unit_size": defaults["mask_unit_size"].default,
                                 "q_pool": defaults["q_pool"].default}
    assert hiera_kwargs(224)["mask_unit_size"] == (8, 8) and hiera_kwargs(224)["q_pool"] == 3
    assert hiera_kwargs(64) == {"img_size": (64, 64), "mask_unit_size": (4, 4), "q_pool": 2}
    net = timm.create_model("hiera_tiny_224", **hiera_kwargs(64), in_chans=1, num_classes=2)
    assert net.tokens_spatial_shape == [16, 16] and net.mask_spatial_shape == [4, 4]
    assert hiera_kwargs(128)["mask_unit_size"] == (8, 8)  # 4 units per side: timm's units
    for bad in (100, 48, 0):
        with pytest.raises(ValueError, match=f"divisible by 32.*got {bad}"):
            hiera_kwargs(bad)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="patch_size must be None or 4"):
        build_hiera_mae("hiera_tiny", img_size=64, patch_size=16)
    with pytest.raises(ValueError, match="unknown Hiera MAE model"):
        build_hiera_mae("hiera_huge", img_size=64)
    with pytest.raises(ValueError, match="divisible by 32"):
        build_hiera_mae("hiera_tiny", img_size=80)


def test_whole_units_are_hidden_and_the_encoder_sees_only_the_visible_ones(mae):
    units, per_unit = 16, 4  # 4x4 units; each reaches the decoder as 2x2 tokens of 8 px
    assert (mae.num_units, mae.pred_stride, mae.grid_final) == (units, 8, [8, 8])
    seen = []
    hook = mae.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            _, pred, mask = mae(images(), 0.6)
    finally:
        hook.remove()
    visible = int(units * (1 - 0.6))  # timm's rule: 6 units kept
    assert pred.shape == (2, 64, 8 * 8) and mask.shape == (2, 64)
    assert mask.sum(dim=1).tolist() == [(units - visible) * per_unit] * 2
    by_unit = mask.view(2, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(2, units, per_unit)
    assert (by_unit == by_unit[..., :1]).all()  # constant inside every unit
    assert seen == [visible * 16]  # 16 first-stage tokens per unit
    with pytest.raises(ValueError, match="no visible unit"):
        mae(images(), 0.95)


@pytest.mark.parametrize("size", [64, 128])
def test_dropped_tokens_are_the_hidden_units_pixels(size):
    """The encoder on the visible units equals the full encoder on the image with the hidden
    units blacked out, unit by unit, in the first two stages (they attend within a unit): the
    tokens dropped are exactly the units the mask names, in raster order."""
    mae = tiny(size).eval()
    x = images(size)
    torch.manual_seed(3)
    keep = mae.random_units(x, 0.5)  # [B, U]
    visible = (1 - mae.token_mask(keep))[..., None].expand(-1, -1, mae.pred_stride**2)
    pixels = mae.unpatchify(visible)  # [B, 1, H, W], 0 on hidden units
    with torch.no_grad():
        _, masked = Hiera.forward_features(mae, x, mask=keep, return_intermediates=True)
        full = mae.forward_intermediates(x * pixels, intermediates_only=True, output_fmt="NHWC")
    u = mae.mask_unit_size[0]
    for stage in (0, 1):
        side = u // 2**stage
        grid = full[stage].unflatten(1, (-1, side)).unflatten(3, (-1, side))  # [B,Uy,s,Ux,s,C]
        per_unit = grid.permute(0, 1, 3, 2, 4, 5).flatten(1, 2)  # [B, U, s, s, C]
        assert torch.allclose(masked[stage], per_unit[keep].view_as(masked[stage]), atol=1e-5)


def test_hidden_pixels_do_not_reach_the_encoder_and_mask_tokens_fill_their_places(mae):
    x = images()
    torch.manual_seed(4)
    keep = mae.random_units(x, 0.6)
    mask = mae.token_mask(keep)  # [B, L]
    hidden = mae.unpatchify(mask[..., None].expand(-1, -1, 64)).bool()  # [B, 1, H, W]
    changed = torch.where(hidden, torch.randn_like(x) * 10, x)
    seen = []
    hook = mae.decoder_blocks.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            latent = mae.forward_encoder(x, keep)
            assert torch.equal(latent, mae.forward_encoder(changed, keep))
            mae.forward_decoder(latent, keep)
    finally:
        hook.remove()
    tokens = seen[0] - mae.decoder_pos_embed  # [B, L, Dd], before the decoder blocks
    is_mask_token = torch.isclose(tokens, mae.mask_token).all(dim=-1)  # [B, L]
    assert torch.equal(is_mask_token, mask.bool())


def test_loss_counts_the_masked_units_only(mae):
    x = images()
    with torch.no_grad():
        loss, pred, mask = mae(x)
        m = mask[..., None]  # [B, L, 1]
        assert torch.equal(mae.forward_loss(x, pred + (1 - m) * 5.0, mask), loss)
        assert mae.forward_loss(x, pred + m * 5.0, mask) > loss
    target = mae.loss_target(x)  # norm_pix_loss: each 8x8 token normalised
    assert torch.allclose(target.mean(dim=-1), torch.zeros(2, 64), atol=1e-5)


def test_patchify_and_unpatchify_invert_each_other_in_raster_order(mae):
    x = images()
    tokens = mae.patchify(x)  # [2, 64, 64]
    assert tokens.shape == (2, 64, 64) and torch.equal(mae.unpatchify(tokens), x)
    assert torch.equal(tokens[:, 8 * 2 + 5], x[:, 0, 16:24, 40:48].flatten(1))  # row 2, col 5


def test_rgb_tokens_order_their_pixels_channel_first_as_hieras_mae_does():
    """Hiera's MAE targets a token's pixels channel by channel, each channel row by row: the
    order of torch's `F.unfold`, written here independently of `patchify`."""
    mae = tiny(in_chans=3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    tokens = mae.patchify(x)  # [2, 64, 3*8*8]
    assert torch.equal(tokens, F.unfold(x, 8, stride=8).transpose(1, 2))
    assert torch.equal(mae.unpatchify(tokens), x)


def released_rgb_mae(tmp_path) -> tuple[HieraMae, str]:
    """A file as facebookresearch/hiera releases its MAEs (and med-hiera continues them):
    {"model_state": ...} in the official names, RGB, decoder included; `decoder_pred` row
    c*p*p + r*p + q predicts channel c, row r, column q of its token."""
    released = tiny(seed=7, in_chans=3).eval()
    path = tmp_path / "mae_hiera_tiny_224.pth"
    torch.save({"model_state": released.state_dict(), "epoch": 400}, path)
    return released, str(path)


def hieras_loss(x, pred, mask):
    """The loss as Hiera's MAE describes it: each token's pixels channel-major, normalised by
    their mean and unbiased variance (+1e-6), squared error averaged over the hidden tokens."""
    target = F.unfold(x, 8, stride=8).transpose(1, 2)  # [B, L, C*8*8]
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** .5
    hidden = mask.bool()
    return ((pred[hidden] - target[hidden]) ** 2).mean()


def test_a_released_rgb_mae_loads_and_scores_the_loss_hiera_describes(tmp_path):
    _, path = released_rgb_mae(tmp_path)
    mae = tiny(seed=1, in_chans=3).eval()
    report = load_start(mae, "imagenet", path)
    assert report.missing == report.unexpected == report.adapted == []
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss, pred, mask = mae(x)
    assert loss.item() == pytest.approx(hieras_loss(x, pred, mask).item(), abs=1e-6)
    # The ViT MAE's (row, col, channel) order would score the same predictions otherwise.
    rgb_last = mae.loss_target(x).view(2, 64, 3, 64).transpose(2, 3).flatten(2)  # [B, L, 192]
    assert abs(((pred - rgb_last)[mask.bool()] ** 2).mean() - loss) > 1e-4


def test_a_grey_mae_loads_a_released_rgb_mae_whole(tmp_path):
    """The patch projection summed over channels (timm's `adapt_input_conv`), each pixel's three
    `decoder_pred` rows averaged: on a grey image the grey MAE predicts the mean of the RGB
    MAE's three channels on that image replicated, everything else loaded as it is."""
    released, path = released_rgb_mae(tmp_path)
    mae = tiny(seed=1).eval()
    report = load_start(mae, "imagenet", path)
    assert report.missing == report.unexpected == []
    assert sorted(report.adapted) == ["decoder_pred.bias", "decoder_pred.weight",
                                      "patch_embed.proj.weight"]
    x = images()
    with torch.no_grad():
        torch.manual_seed(4)
        _, grey, mask = mae(x)  # [B, L, 8*8]
        torch.manual_seed(4)
        _, rgb, rgb_mask = released(x.expand(-1, 3, -1, -1))  # [B, L, 3*8*8]
    assert torch.equal(mask, rgb_mask)
    assert torch.allclose(grey, rgb.view(2, 64, 3, 64).mean(2), atol=1e-5)


def test_backward_reaches_encoder_fusion_and_decoder():
    mae = tiny()
    loss, _, _ = mae(images())
    loss.backward()
    for name in ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight",
                 "blocks.11.mlp.fc2.weight", "multi_scale_fusion_heads.0.weight",
                 "encoder_norm.weight", "mask_token", "decoder_pos_embed",
                 "decoder_blocks.0.attn.qkv.weight", "decoder_pred.weight"):
        grad = mae.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_encoder_state_dict_is_timms_hiera_and_computes_the_same_stages(mae):
    state = mae.encoder_state_dict()
    assert state.keys() == encoder_state_dict(mae).keys()  # the ViT MAE's helper agrees
    assert not [k for k in state if k.startswith(("decoder", "mask_token", "multi_scale",
                                                  "encoder_norm", "head"))]
    x = images()
    with torch.no_grad():
        ours = mae.forward_intermediates(x, intermediates_only=True)
        # The MAE's own shape (one pooling fewer): every stage equal.
        same = timm.create_model("hiera_tiny_224", **mae.config.encoder_kwargs, in_chans=1,
                                 num_classes=3).eval()
        result = same.load_state_dict(state, strict=False)
        assert sorted(result.missing_keys) == HEAD and result.unexpected_keys == []
        for a, b in zip(same.forward_intermediates(x, intermediates_only=True), ours,
                        strict=True):
            assert torch.allclose(a, b, atol=1e-5)
        # The classifier's shape (hiera_kwargs): same weights; it pools the third stage too.
        net = timm.create_model("hiera_tiny_224", **hiera_kwargs(64), in_chans=1,
                                num_classes=3).eval()
        result = net.load_state_dict(state, strict=False)
        assert sorted(result.missing_keys) == HEAD and result.unexpected_keys == []
        stages = net.forward_intermediates(x, intermediates_only=True)
    assert torch.allclose(stages[0], ours[0], atol=1e-5)
    assert torch.allclose(stages[1], ours[1], atol=1e-5)
    assert stages[2].shape[-1] == ours[2].shape[-1] // 2


def test_classifier_from_a_saved_encoder_or_whole_mae_loads_it_all(mae, tmp_path):
    x = images()
    with torch.no_grad():
        ours = mae.forward_intermediates(x, intermediates_only=True)
    for name, state in (("encoder", mae.encoder_state_dict()), ("whole", mae.state_dict())):
        path = tmp_path / f"hiera_{name}.pt"
        torch.save({"model": state, "recipe": {"img_size": 64}}, path)
        net, report = build_classifier("hiera_tiny", init="mae", weights=path, img_size=64)
        assert report.mismatched == [] and report.adapted == [] and report.unexpected == []
        assert sorted(report.missing) == HEAD
        assert len(report.loaded) == len(mae.encoder_state_dict())
        net.eval()
        with torch.no_grad():
            stages = net.forward_intermediates(x, intermediates_only=True)
            assert net(x).shape == (2, 14)
        assert torch.allclose(stages[0], ours[0], atol=1e-5)
        assert torch.allclose(stages[1], ours[1], atol=1e-5)


def test_probe_features_are_the_average_of_the_last_stage(mae):
    x = images()
    with torch.no_grad():
        tokens = mae.forward_features(x)  # [B, 1+L', D]
        pooled = mae_features(mae)(x)  # [B, D]
        last = mae.forward_intermediates(x, intermediates_only=True)[-1]  # [B, D, h, w]
    assert tokens.shape == (2, 1 + 64, 768) and pooled.shape == (2, 768)
    assert torch.allclose(pooled, last.mean(dim=(2, 3)), atol=1e-5)


def test_layer_decay_groups_every_hiera_block():
    net, _ = build_classifier("hiera_tiny", img_size=64, drop_path=0.1)
    assert net.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    groups = param_groups_layer_decay(net, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == len(net.blocks) + 2  # stem, 12 blocks, head
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.5 ** (len(net.blocks) + 1))


def test_mae_pictures_and_reconstruct_work_on_hiera(mae):
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(5)) * 0.6 + 0.2
    mean, std = 0.5, 0.25
    normed = (x - mean) / std
    original, masked, pasted = plots.mae_pictures(mae, normed, mean, std, mask_ratio=0.6)
    assert original.shape == masked.shape == pasted.shape == (2, 64, 64)
    assert original.dtype == np.uint8
    darkened = masked < original  # the hidden units, darkened
    assert darkened.mean(axis=(1, 2)).tolist() == [40 / 64] * 2
    assert (pasted[~darkened] == original[~darkened]).all()  # visible units pasted back
    hidden, pred, both = mae.reconstruct(normed)
    assert hidden.shape == pred.shape == both.shape == (2, 1, 64, 64)


def test_imagenet_hiera_weights_start_the_mae(tmp_path):
    """MedTransformer starts its MAE from ImageNet: timm-layout RGB weights at 224 px load
    into the 64 px grayscale MAE, position table resampled, first conv summed to one channel."""
    torch.manual_seed(0)
    source = timm.create_model("hiera_tiny_224", num_classes=1000)
    path = tmp_path / "hiera_tiny_in1k.pth"
    torch.save(source.state_dict(), path)
    mae = tiny()
    report = load_start(mae, "imagenet", path)
    assert sorted(report.adapted) == ["patch_embed.proj.weight", "pos_embed"]
    assert report.unexpected == []  # timm's head.norm is the MAE's encoder_norm
    assert torch.equal(mae.encoder_norm.weight, source.head.norm.weight)
    assert report.missing and all(k.startswith(("decoder", "mask_token", "multi_scale"))
                                  for k in report.missing)
    assert torch.equal(mae.blocks[5].mlp.fc1.weight, source.blocks[5].mlp.fc1.weight)
    assert mae.pos_embed.shape == (1, 16 * 16, 96)


def test_the_released_mae_checkpoint_continues_whole(tmp_path):
    """MedTransformer continues facebookresearch/hiera's `mae_in1k` MAE, decoder included:
    {"model_state": ...} in the official names, encoder_norm too (timm's filter renames it
    head.norm, which the MAE must take back)."""
    torch.manual_seed(0)
    released = tiny()
    path = tmp_path / "mae_hiera_tiny_224.pth"
    torch.save({"model_state": released.state_dict(), "epoch": 400}, path)
    torch.manual_seed(1)
    mae = tiny()
    report = load_start(mae, "imagenet", path)
    assert report.missing == [] and report.unexpected == []
    for name, value in released.state_dict().items():
        assert torch.equal(mae.state_dict()[name], value), name


def test_an_rgb_mae_continues_a_grey_one_with_each_pixels_row_repeated(tmp_path):
    """The reverse: a grey file into an RGB MAE, whose three channels on a grey image copied to
    RGB then predict what the grey MAE predicts (timm spreads the grey projection over them)."""
    grey = tiny(seed=7).eval()
    path = tmp_path / "grey_mae.pth"
    torch.save({"model_state": grey.state_dict()}, path)
    mae = tiny(seed=1, in_chans=3).eval()
    report = load_start(mae, "imagenet", path)
    assert report.missing == report.unexpected == [] and "decoder_pred.weight" in report.adapted
    x = images()
    with torch.no_grad():
        torch.manual_seed(4)
        _, ours, _ = grey(x)  # [B, L, 64]
        torch.manual_seed(4)
        _, rgb, _ = mae(x.expand(-1, 3, -1, -1))  # [B, L, 3*64]
    assert torch.allclose(rgb, ours.repeat(1, 1, 3), atol=1e-5)

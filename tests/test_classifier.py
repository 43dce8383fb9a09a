"""build_classifier from every kind of start, each on a state dict synthesised in its layout."""

import argparse
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from timm.models.hiera import Hiera

from cxr_lib.models import classifier
from cxr_lib.models.classifier import WeightsUnavailable, build_classifier, imagenet_weights
from cxr_lib.models.hiera_mae import build_hiera_mae
from cxr_lib.models.mae import build_mae, encoder_state_dict

VIT = dict(img_size=32, patch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mae_encoder(in_chans: int = 1, img_size: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return build_mae("vit_tiny_patch16", img_size=img_size, patch_size=8, in_chans=in_chans,
                     decoder_dim=32, decoder_depth=1, decoder_heads=2)


def forward(net: torch.nn.Module, size: int = 32) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net(torch.randn(2, 1, size, size))


def test_random_start_is_timms_model_for_one_channel_and_14_findings():
    net, report = build_classifier("vit_tiny_patch16", drop_path=0.1, **VIT)
    assert isinstance(net, timm.models.VisionTransformer) and net.global_pool == "avg"
    assert net.patch_embed.proj.weight.shape == (192, 1, 8, 8)
    assert net.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert report.loaded == [] and forward(net).shape == (2, 14)
    resnet, _ = build_classifier("resnet50", drop_path=0.1)
    assert resnet.conv1.in_channels == 1 and resnet.fc.out_features == 14
    assert resnet.layer4[2].drop_path.drop_prob == pytest.approx(0.1)


def test_saved_mae_encoder_loads_every_encoder_tensor(tmp_path):
    mae = mae_encoder()
    path = tmp_path / "mae_vit_tiny_patch16.pt"
    torch.save({"model": encoder_state_dict(mae), "recipe": {"patch_size": 8},
                "normalise": [0.5, 0.25], "run": "mae-abc"}, path)
    net, report = build_classifier("vit_tiny_patch16", init="mae", weights=path, **VIT)
    assert torch.equal(net.blocks[3].attn.qkv.weight, mae.blocks[3].attn.qkv.weight)
    assert torch.equal(net.pos_embed, mae.pos_embed)
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias",
                                      "head.weight"]
    assert sorted(report.unexpected) == ["norm.bias", "norm.weight"]  # MAE's avg-pool head
    assert net.head.weight.std() < 1e-4  # MAE's fine-tuning head initialisation
    assert forward(net).shape == (2, 14)


def test_released_mae_checkpoint_drops_the_decoder_and_fits_channels_and_grid(tmp_path):
    """facebookresearch/mae layout: {"model": encoder + decoder, "args": Namespace}, RGB, on
    another grid: the decoder goes, the patch kernel is summed to one channel, the sin-cos
    table is regenerated for the classifier's grid."""
    mae = mae_encoder(in_chans=3, img_size=64)
    state = {f"module.{k}": v for k, v in mae.state_dict().items()}
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": state, "args": argparse.Namespace(mask_ratio=0.75)}, path)
    net, report = build_classifier("vit_tiny_patch16", init="mae", weights=path, **VIT)
    assert report.regenerated == ["pos_embed"] and report.adapted == ["patch_embed.proj.weight"]
    assert not [k for k in report.unexpected if k.startswith(("decoder", "mask_token"))]
    assert torch.allclose(net.patch_embed.proj.weight, mae.patch_embed.proj.weight.sum(1, True))
    assert torch.equal(net.pos_embed, mae_encoder(img_size=32).pos_embed)


def test_imagenet_weights_file_in_timm_layout_is_resampled_to_the_small_vit(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # 3 channels, 224 px
    path = tmp_path / "vit_tiny_in1k.pth"
    torch.save(source.state_dict(), path)
    net, report = build_classifier("vit_tiny_patch16", init="imagenet", weights=path, **VIT)
    assert set(report.adapted) == {"pos_embed", "patch_embed.proj.weight"}  # interpolated
    assert net.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(net.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    assert "head.weight" in report.missing  # the 1000-class head was dropped


def test_imagenet_without_local_weights_is_skipped_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(classifier, "try_to_load_from_cache", lambda repo, filename: None)
    with pytest.raises(WeightsUnavailable, match="arm is skipped") as err:
        build_classifier("vit_small_patch16", init="imagenet")
    assert "vit_small_patch16_224" in str(err.value) and "downloads nothing" in str(err.value)
    monkeypatch.setattr(classifier.constants, "HF_HUB_CACHE",
                        str(Path.home() / ".cache" / "huggingface" / "hub"))
    with pytest.raises(WeightsUnavailable, match=r"\(~/\.cache/huggingface/hub\)") as err:
        imagenet_weights("vit_small_patch16")
    assert str(Path.home()) + "/" not in str(err.value)  # the book shows no local home folder
    cached = tmp_path / "model.safetensors"
    cached.write_bytes(b"")
    monkeypatch.setattr(classifier, "try_to_load_from_cache",
                        lambda repo, filename: str(cached) if repo.startswith("timm/") else None)
    assert imagenet_weights("densenet121") == cached
    seen = []
    monkeypatch.setattr(classifier, "try_to_load_from_cache",
                        lambda repo, filename: seen.append(repo) or str(cached))
    assert imagenet_weights("hiera_tiny", tag="mae") == cached
    assert seen == ["timm/hiera_tiny_224.mae"]  # MAE alone, not timm's fine-tuned default
    with pytest.raises(WeightsUnavailable, match="no weights 'densenet121.mae'"):
        imagenet_weights("densenet121", tag="mae")


def test_moco_backbones_load_in_timm_layout_and_in_mocos_released_layout(tmp_path):
    torch.manual_seed(0)
    backbone = timm.create_model("densenet121", num_classes=0, in_chans=1).state_dict()
    path = tmp_path / "moco_densenet121.pt"
    torch.save({"model": backbone}, path)
    net, report = build_classifier("densenet121", init="moco", weights=path)
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]
    assert report.unexpected == [] and len(report.loaded) == len(backbone)
    key = "features.denseblock4.denselayer16.conv2.weight"
    assert torch.equal(net.state_dict()[key], backbone[key])

    released = {f"module.encoder_q.{k}": v for k, v in backbone.items()}
    released["module.encoder_q.classifier.0.weight"] = torch.zeros(1024, 1024)  # projection
    released["module.encoder_k.features.conv0.weight"] = torch.zeros(64, 1, 7, 7)
    released["module.queue"] = torch.zeros(128, 16)
    path = tmp_path / "moco_v2_checkpoint.pth.tar"
    torch.save({"epoch": 800, "arch": "densenet121", "state_dict": released}, path)
    net, report = build_classifier("densenet121", init="moco", weights=path)
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]
    assert report.unexpected == [] and len(report.loaded) == len(backbone)
    assert torch.equal(net.features.conv0.weight, backbone["features.conv0.weight"])
    assert forward(net).shape == (2, 14)


def test_torchvision_densenet_weights_map_onto_timms_densenet(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.densenet121(num_classes=14).state_dict()  # RGB
    # torchvision before 0.4 named some layers `norm.1` and had no num_batches_tracked
    old = {k.replace("denselayer1.norm1.", "denselayer1.norm.1."): v for k, v in state.items()
           if not k.endswith("denselayer1.norm1.num_batches_tracked")}
    path = tmp_path / "densenet121_xray.pth"
    torch.save({"state_dict": old}, path)
    net, report = build_classifier("densenet121", init="torchvision", weights=path)
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]
    assert report.unexpected == [] and report.adapted == ["features.conv0.weight"]
    for key in ("features.denseblock1.denselayer1.norm1.weight",
                "features.denseblock4.denselayer16.conv2.weight"):
        assert torch.equal(net.state_dict()[key], state[key])
    assert forward(net).shape == (2, 14)


def test_bad_starts_and_files_are_refused_with_the_reason_and_the_file(tmp_path):
    with pytest.raises(ValueError, match="needs weights"):
        build_classifier("vit_tiny_patch16", init="mae", **VIT)
    with pytest.raises(ValueError, match="not a ViT"):
        build_classifier("densenet121", init="mae", weights=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="takes no weights"):
        build_classifier("resnet50", weights=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="no stochastic depth"):
        build_classifier("densenet121", drop_path=0.1)
    with pytest.raises(ValueError, match="unknown classifier"):
        build_classifier("vit_huge_patch14")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_classifier("vit_tiny_patch16", init="mae", weights=tmp_path / "missing.pt", **VIT)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt: cannot read weights"):
        build_classifier("vit_tiny_patch16", init="mae", weights=garbage, **VIT)
    torch.manual_seed(0)
    narrow = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=1,
                               embed_dim=96, num_heads=3, depth=2)
    wrong = tmp_path / "vit_narrow.pt"
    torch.save({"model": narrow.state_dict()}, wrong)
    with pytest.raises(ValueError, match=r"vit_narrow.pt: tensors of another shape.*blocks\.0"):
        build_classifier("vit_tiny_patch16", init="mae", weights=wrong, **VIT)


HIERA_HEAD = ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]


def test_hiera_random_start_is_timms_hiera_shaped_for_the_image_size():
    net, report = build_classifier("hiera_tiny", img_size=64, drop_path=0.1)
    assert isinstance(net, Hiera) and report.loaded == []
    assert net.patch_embed.proj.weight.shape == (96, 1, 7, 7)
    assert net.mask_spatial_shape == [4, 4] and net.q_pool == 2  # hiera_kwargs(64)
    assert net.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert forward(net, 64).shape == (2, 14)
    assert classifier.timm_name("hiera_small") == "hiera_small_224"
    assert classifier.supports_layer_decay("hiera_base_224")
    assert classifier.supports_layer_decay("vit_tiny_patch16")
    assert not classifier.supports_layer_decay("densenet121")
    with pytest.raises(ValueError, match="patch_size must be None or 4"):
        build_classifier("hiera_tiny", img_size=64, patch_size=16)
    with pytest.raises(ValueError, match="divisible by 32"):
        build_classifier("hiera_tiny", img_size=100)


def test_released_hiera_mae_in_the_official_layout_drops_its_decoder_side(tmp_path):
    """facebookresearch/hiera layout: {"model_state": MAE}, RGB, another image size: fusion
    heads, encoder_norm and decoder go; the first conv is summed to one channel and the
    learned position table resampled to the classifier's grid."""
    torch.manual_seed(0)
    mae = build_hiera_mae("hiera_tiny", img_size=128, in_chans=3, decoder_dim=32,
                          decoder_depth=1, decoder_heads=2)
    path = tmp_path / "mae_hiera_tiny_224.pth"
    torch.save({"model_state": mae.state_dict(), "epoch": 400}, path)
    net, report = build_classifier("hiera_tiny", init="mae", weights=path, img_size=64)
    assert sorted(report.adapted) == ["patch_embed.proj.weight", "pos_embed"]
    assert report.unexpected == [] and sorted(report.missing) == HIERA_HEAD
    assert torch.allclose(net.patch_embed.proj.weight, mae.patch_embed.proj.weight.sum(1, True))
    assert net.pos_embed.shape == (1, 16 * 16, 96)
    assert torch.equal(net.blocks[11].attn.proj.weight, mae.blocks[11].attn.proj.weight)


def test_hiera_imagenet_file_in_the_official_layout_is_renamed_by_timms_filter(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("hiera_tiny_224", pretrained=False, img_size=(64, 64),
                               mask_unit_size=(4, 4), q_pool=2, in_chans=1).state_dict()
    official = {k.replace("head.norm.", "norm.").replace("head.fc.", "head.projection."): v
                for k, v in source.items()}
    path = tmp_path / "hiera_tiny_224.pth"
    torch.save({"model_state": official}, path)
    net, report = build_classifier("hiera_tiny", init="imagenet", weights=path, img_size=64)
    assert sorted(report.missing) == ["head.fc.bias", "head.fc.weight"]  # 1000 classes dropped
    assert report.unexpected == [] and report.adapted == []
    assert torch.equal(net.head.norm.weight, source["head.norm.weight"])
    assert forward(net, 64).shape == (2, 14)


# --- the papers' RGB input and their released fine-tuned classifiers --------------------------

def randomise_batch_norm(net: torch.nn.Module) -> None:
    """Running statistics away from (0, 1), so an eval-mode comparison tests them too."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)


def released_vit(path: Path) -> torch.nn.Module:
    """A fine-tuned ViT in the layout of Xiao et al.'s released files, built from its
    description: MAE's `models_vit` is timm's ViT with the final norm replaced by `fc_norm`
    after average pooling (`global_pool`), on RGB input; their script saves `{"model": ...}`
    with the optimizer, epoch, scaler and argparse args. Every weight is random, the position
    table learned (not sin-cos)."""
    torch.manual_seed(3)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=14,
                            in_chans=3, global_pool="avg", **VIT)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    torch.save({"model": net.state_dict(), "optimizer": {}, "epoch": 74, "scaler": {},
                "args": argparse.Namespace(model="vit_small_patch16", nb_classes=14)}, path)
    return net.eval()


def released_densenet(path: Path) -> torch.nn.Module:
    """Their fine-tuned DenseNet-121: torchvision's `densenet121(num_classes=14)` on RGB, in
    the same `{"model": ...}` file."""
    torch.manual_seed(4)
    net = torchvision.models.densenet121(num_classes=14)
    randomise_batch_norm(net)
    torch.save({"model": net.state_dict(), "epoch": 74}, path)
    return net.eval()


@pytest.mark.parametrize("model, release", [("vit_tiny_patch16", released_vit),
                                            ("densenet121", released_densenet)])
def test_a_released_fine_tuned_classifier_loads_whole_with_the_released_logits(
        tmp_path, model, release):
    path = tmp_path / "finetuned.pth"
    theirs = release(path)
    x = torch.randn(2, 1, 32, 32)  # a normalised gray batch
    with torch.no_grad():
        expected = theirs(x.expand(-1, 3, -1, -1))  # [B, 14], their RGB-replicated input
        for in_chans in (3, 1):  # their stem, or the same stem summed to one channel
            net, report = build_classifier(model, in_chans=in_chans, init="finetuned",
                                           weights=path, **(VIT if model != "densenet121" else {}))
            assert report.missing == [] and report.unexpected == []
            assert len(report.loaded) == len(theirs.state_dict())
            got = net.eval()(x.expand(-1, in_chans, -1, -1))
            assert (got - expected).abs().max() < 1e-4, in_chans
        # every earlier start drops the head: the logits are another model's
        init = "mae" if model != "densenet121" else "torchvision"
        headless, report = build_classifier(model, init=init, weights=path,
                                            **(VIT if model != "densenet121" else {}))
        assert {"head.weight", "classifier.weight"} & set(report.missing)
        assert (headless.eval()(x) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("model, make_optimizer", [
    ("vit_tiny_patch16", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0)),
    ("densenet121", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
])
def test_a_three_channel_stem_on_replicated_gray_takes_the_papers_step(model, make_optimizer):
    """One optimizer step from the same weights and batch. The papers: an RGB stem fed the
    gray image three times (PIL's convert("RGB")); what reaches a gray pixel is the stem summed
    over its channels. `in_chans=3` here takes exactly their step; a 1-channel stem holding that
    sum (same forward pass) moves a third as far. (Weight decay, which shrinks the sum alike
    in both, is left out; float64, so batch norm over a 1x1 map of 4 images rounds alike.)"""
    kwargs = {} if model == "densenet121" else VIT
    first = build_classifier(model, in_chans=3, **kwargs)[0].double()
    x, y = torch.randn(4, 1, 32, 32).double(), torch.randint(0, 2, (4, 14)).double()
    stem = first.pretrained_cfg["first_conv"] + ".weight"

    def summed_stem_move(in_chans: int) -> torch.Tensor:
        net = build_classifier(model, in_chans=in_chans, **kwargs)[0].double()
        classifier.load_weights(net, first.state_dict(), "the papers' start")  # summed for 1
        before = net.state_dict()[stem].sum(dim=1)  # [O, k, k], what a gray pixel meets
        net.train()
        torch.manual_seed(0)  # the same drop path / dropout draws
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            net(x.expand(-1, in_chans, -1, -1)), y)
        loss.backward()
        make_optimizer(net.parameters()).step()
        return net.state_dict()[stem].sum(dim=1) - before

    papers = summed_stem_move(3)
    one_channel = summed_stem_move(1)
    assert torch.allclose(papers, 3 * one_channel, rtol=1e-6, atol=1e-9)
    assert papers.norm() / one_channel.norm() == pytest.approx(3.0, rel=1e-6)

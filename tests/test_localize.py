"""Localisation maps and box scores: attention maps and rollout on tiny ViTs (one with a
planted attention pattern), Grad-CAM on a hand-built CNN whose classes live in known regions,
the pointing game and mass inside on hand-made maps, and the NIH boxes scaled from 1024 px."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from samples import SAMPLE_DATA
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cxr_lib.analysis.localize import (
    ALL,
    _attention_weights,
    _cam_layer,
    attention_map,
    attention_rollout,
    box_scores,
    boxes_of,
    grad_cam,
    peak_ratio,
    rollout,
    scale_boxes,
    score_boxes,
    score_image_maps,
)
from cxr_lib.data.core import FINDINGS, DataError
from cxr_lib.data.nih import read_bboxes, shipped_bbox_file

DIM, PATCH, SIZE = 16, 8, 32  # a 4 x 4 patch grid


def tiny_vit(depth: int = 2, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=SIZE, patch_size=PATCH, in_chans=1, num_classes=3,
                             embed_dim=DIM, depth=depth, num_heads=2, **kwargs)


def planted_vit(global_pool: str = "token") -> VisionTransformer:
    """One block whose every query attends the patch holding the bright square.

    The patch embedding sums a patch's pixels into channel 0, position embeddings and the class
    token are zero: the bright patch's token is a scaled one-hot e0, every other token 0. After
    the block's LayerNorm it is u = LN(e0) and the others are 0. Keys are 10 x the token and
    every query is 10 x u, so the bright patch scores 100 |u_h|^2 / sqrt(8) per head and every
    other token 0: softmax puts nearly all weight on the bright patch.
    """
    vit = tiny_vit(depth=1, global_pool=global_pool)
    with torch.no_grad():
        vit.patch_embed.proj.weight.zero_()
        vit.patch_embed.proj.weight[0] = 1.0
        vit.patch_embed.proj.bias.zero_()
        vit.pos_embed.zero_()
        vit.cls_token.zero_()
        attn = vit.blocks[0].attn
        u = F.layer_norm(torch.eye(DIM)[0], (DIM,))
        attn.qkv.weight.zero_()
        attn.qkv.weight[DIM:2 * DIM] = 10 * torch.eye(DIM)  # k = 10 x token
        attn.qkv.bias.zero_()
        attn.qkv.bias[:DIM] = 10 * u  # q = 10 u for every token
    return vit


def bright_patch_images(cells: list[tuple[int, int]]) -> torch.Tensor:
    x = torch.zeros(len(cells), 1, SIZE, SIZE)  # [B, 1, H, W]
    for i, (r, c) in enumerate(cells):
        x[i, 0, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = 1.0
    return x


# ----------------------------------------------------------------------------- attention

def test_recomputed_attention_reproduces_the_modules_output():
    attn = tiny_vit().blocks[0].attn
    x = torch.randn(2, 17, DIM)  # [B, N, D]
    weights = _attention_weights(attn, x)  # [B, h, N, N]
    v = attn.qkv(x).reshape(2, 17, 3, 2, DIM // 2).permute(2, 0, 3, 1, 4)[2]  # [B, h, N, d]
    out = attn.proj((weights @ v).transpose(1, 2).reshape(2, 17, DIM))
    torch.testing.assert_close(out, attn(x))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 17))


@pytest.mark.parametrize("make_map", [attention_map, attention_rollout])
def test_maps_have_the_image_shape_are_non_negative_and_sum_to_one(make_map):
    vit = tiny_vit()
    vit.train()
    x = torch.randn(3, 1, SIZE, SIZE)
    maps = make_map(vit, x)
    assert maps.shape == (3, SIZE, SIZE) and (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(3))
    grid = make_map(vit, x, upsample=False)
    assert grid.shape == (3, 4, 4)
    torch.testing.assert_close(grid.sum(dim=(1, 2)), torch.ones(3))
    assert vit.training  # the model's mode is restored


@pytest.mark.parametrize("global_pool", ["token", "avg"])
@pytest.mark.parametrize("make_map", [attention_map, attention_rollout])
def test_planted_attention_points_at_the_bright_patch(make_map, global_pool):
    vit = planted_vit(global_pool)
    cells = [(0, 3), (2, 1)]
    x = bright_patch_images(cells)
    grid = make_map(vit, x, upsample=False)  # [2, 4, 4]
    # Rollout from the patch queries adds the residual 0.5 I: each of the 16 patch rows puts
    # 1/2 on the bright patch and 1/2 on itself, the bright patch's row all on itself, so the
    # mean row holds (15 x 0.5 + 1) / 16 = 17/32 on it. Otherwise (nearly) all of it.
    share = 17 / 32 if (make_map, global_pool) == (attention_rollout, "avg") else 1.0
    for i, (r, c) in enumerate(cells):
        assert int(grid[i].argmax()) == r * 4 + c
        assert grid[i, r, c] == pytest.approx(share, abs=0.02)
    maps = make_map(vit, x)  # [2, 32, 32]
    boxes = np.array([[c * PATCH, r * PATCH, PATCH, PATCH] for r, c in cells], dtype=float)
    hit, mass = box_scores(maps, boxes)
    assert hit.all() and (mass > 0.25).all()  # the patch is 1/16 of the image


def test_the_query_follows_global_pool_or_is_chosen():
    vit = planted_vit("avg")
    x = bright_patch_images([(1, 1)])
    torch.testing.assert_close(attention_map(vit, x), attention_map(vit, x, query="mean"))
    with pytest.raises(ValueError, match="query must be"):
        attention_map(vit, x, query="first")
    no_cls = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no class token"):
        attention_map(no_cls, x, query="cls")


def test_rollout_by_hand():
    eye = torch.eye(3)[None]
    torch.testing.assert_close(rollout([eye, eye]), eye)  # no mixing: each token stays itself
    swap = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    torch.testing.assert_close(rollout([swap, torch.eye(2)[None]]), torch.full((1, 2, 2), 0.5))
    first = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # everyone attends token 0
    # 0.5 A + 0.5 I = [[1, 0], [.5, .5]]; squared: [[1, 0], [.75, .25]]
    torch.testing.assert_close(rollout([first, first]), torch.tensor([[[1.0, 0.0], [0.75, 0.25]]]))


def test_attention_map_refuses_a_model_that_is_not_a_timm_vit():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(4, 4))

    with pytest.raises(TypeError, match="expected timm ViT blocks"):
        attention_map(Blocks(), torch.zeros(1, 1, 8, 8))


# ----------------------------------------------------------------------------- Grad-CAM

class TwoDetectors(nn.Module):
    """Class 0 is the amount of bright (> 0.75) pixels, class 1 of dark (< 0.25) ones, read
    through the usual conv features -> global average pool -> linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU())
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.features[0].bias.copy_(torch.tensor([-0.75, 0.25]))
            self.head.weight.copy_(torch.eye(2))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_grad_cam_lights_the_region_the_class_depends_on():
    x = torch.full((2, 1, 16, 16), 0.5)
    x[:, :, 2:5, 3:6] = 1.0  # bright square, top left
    x[:, :, 10:14, 9:13] = 0.0  # dark square, bottom right
    cnn = TwoDetectors()
    with torch.no_grad():  # Grad-CAM turns gradients on for itself
        maps = grad_cam(cnn, x, [0, 1], layer="features")  # image 0: bright, 1: dark
    assert maps.shape == (2, 16, 16) and maps.min() >= 0 and maps.amax(dim=(1, 2)).eq(1).all()
    r0, c0 = divmod(int(maps[0].argmax()), 16)
    r1, c1 = divmod(int(maps[1].argmax()), 16)
    assert 2 <= r0 < 5 and 3 <= c0 < 6
    assert 10 <= r1 < 14 and 9 <= c1 < 13
    assert maps[0, 10:14, 9:13].max() == 0  # no evidence for "bright" in the dark square


def test_grad_cam_defaults_to_timm_last_feature_stage():
    resnet = timm.create_model("resnet18", num_classes=3, in_chans=1)
    resnet.train()
    maps = grad_cam(resnet, torch.randn(2, 1, 64, 64), 1)
    assert maps.shape == (2, 64, 64) and maps.min() >= 0 and maps.max() <= 1
    assert resnet.training
    with pytest.raises(ValueError, match="pass layer="):
        grad_cam(TwoDetectors(), torch.zeros(1, 1, 8, 8), 0)
    with pytest.raises(ValueError, match="one per image"):
        grad_cam(TwoDetectors(), torch.zeros(2, 1, 8, 8), [0, 1, 0], layer="features")
    densenet = timm.create_model("densenet121", num_classes=3, in_chans=1)
    assert _cam_layer(densenet, None) is densenet.features.norm5  # after the last BN + ReLU
    assert _cam_layer(resnet, None) is resnet.layer4


# ----------------------------------------------------------------------------- boxes

def test_peak_ratio_tells_flat_and_empty_maps_from_focused_ones():
    maps = torch.zeros(3, 4, 4)
    maps[0] = 1.0  # flat
    maps[1, 0, 0] = 8.0  # all of it on one pixel of 16: peak 8, mean 0.5
    ratios = peak_ratio(maps)  # maps[2] is empty
    np.testing.assert_allclose(ratios[:2], [1.0, 16.0])
    assert np.isnan(ratios[2])


def test_pointing_game_and_mass_inside_by_hand():
    maps = np.zeros((3, 8, 8))
    maps[0, 2, 5] = 0.6  # peak inside the box below
    maps[0, 7, 0] = 0.4
    maps[1, 2, 5] = 0.4
    maps[1, 7, 0] = 0.6  # peak outside
    boxes = np.array([[4, 1, 3, 3]] * 3, dtype=float)  # columns 4..6, rows 1..3 by centre
    hit, mass = box_scores(maps, boxes)
    assert hit[:2].tolist() == [True, False]
    np.testing.assert_allclose(mass[:2], [0.6, 0.4])
    assert np.isnan(mass[2])  # an empty map has no mass to place
    maps[1, 0, 0] = -0.1
    with pytest.raises(ValueError, match="map 1 has negative values"):
        box_scores(maps, boxes)


def test_a_box_counts_the_pixels_whose_centres_it_holds():
    maps = np.ones((1, 4, 4))
    _, mass = box_scores(maps, np.array([[0.6, 0.0, 1.0, 4.0]]))  # holds centre 1.5 only
    assert mass[0] == pytest.approx(0.25)


def boxes_1024() -> pd.DataFrame:
    return pd.DataFrame({"id": ["a.png", "b.png", "b.png"],
                         "finding": ["Infiltration", "Cardiomegaly", "Infiltration"],
                         "x": [512.0, 0.0, 256.0], "y": [256.0, 0.0, 768.0],
                         "w": [128.0, 512.0, 256.0], "h": [64.0, 1024.0, 256.0]})


def test_nih_boxes_scale_from_1024_to_the_map_size():
    np.testing.assert_allclose(scale_boxes(boxes_1024(), 64),
                               [[32, 16, 8, 4], [0, 0, 32, 64], [16, 48, 16, 16]])


def test_score_boxes_aggregates_per_finding_with_the_chance_level():
    table = boxes_1024()
    uniform = np.ones((3, 64, 64))
    out = score_boxes(uniform, table, 64).set_index("finding")
    assert out.index.tolist() == ["Cardiomegaly", "Infiltration", ALL]  # FINDINGS order
    assert out["boxes"].tolist() == [1, 2, 3]
    # a uniform map puts exactly the box's share of the image inside it
    np.testing.assert_allclose(out["mass_inside"], out["box_area"])
    assert out.loc["Cardiomegaly", "box_area"] == pytest.approx(0.5)
    peaked = np.zeros((3, 64, 64))
    peaked[0, 18, 35] = peaked[1, 50, 60] = peaked[2, 56, 20] = 1.0  # in, out, in
    out = score_boxes(peaked, table).set_index("finding")
    assert out.loc["Infiltration", "hit_rate"] == 1.0 and out.loc["Cardiomegaly", "hit_rate"] == 0
    assert out.loc[ALL, "hit_rate"] == pytest.approx(2 / 3)


def test_score_boxes_refuses_unmapped_findings_and_mismatched_maps():
    table = boxes_1024()
    table.loc[1, "finding"] = "Infiltrate"  # the box file's own spelling
    with pytest.raises(ValueError, match="row 1: unknown finding 'Infiltrate'.*read_bboxes"):
        score_boxes(np.ones((3, 64, 64)), table)
    with pytest.raises(ValueError, match="one map per box"):
        score_boxes(np.ones((2, 64, 64)), boxes_1024())
    with pytest.raises(ValueError, match="image_size 32 differs"):
        score_boxes(np.ones((3, 64, 64)), boxes_1024(), image_size=32)


def test_an_image_with_two_boxes_has_its_map_scored_against_each_box():
    """One map per image, as the chapter draws them; b.png carries two boxes (Cardiomegaly at
    [0, 0, 32, 64] and Infiltration at [16, 48, 16, 16] in 64-px pixels), a.png one."""
    maps = np.zeros((3, 64, 64))  # [images, S, S]
    maps[0, 10, 5] = 1.0  # b.png: inside its Cardiomegaly box, outside its Infiltration box
    maps[1] = 1.0  # c.png, which has no box
    maps[2, 18, 35] = 1.0  # a.png: inside its Infiltration box
    with pytest.raises(ValueError, match="one map per box"):
        score_boxes(maps[[0, 2]], boxes_1024())  # maps per image are not maps per box
    out = score_image_maps(maps, ["b.png", "c.png", "a.png"], boxes_1024(), 64)
    out = out.set_index("finding")
    assert out["boxes"].to_dict() == {"Cardiomegaly": 1, "Infiltration": 2, ALL: 3}
    assert out["hit_rate"].to_dict() == {"Cardiomegaly": 1.0, "Infiltration": 0.5, ALL: 2 / 3}
    assert out["mass_inside"].to_dict() == {"Cardiomegaly": 1.0, "Infiltration": 0.5,
                                            ALL: 2 / 3}
    # a uniform map of b.png puts each box's share of the image inside that box
    uniform = score_image_maps(np.ones((1, 64, 64)), ["b.png"], boxes_1024()).set_index("finding")
    assert uniform["mass_inside"].to_dict() == {"Cardiomegaly": 0.5, "Infiltration": 1 / 16,
                                                ALL: (0.5 + 1 / 16) / 2}


def test_boxes_of_groups_the_boxes_by_image_and_points_at_each_ones_map():
    boxes, owner = boxes_of(["b.png", "a.png"], boxes_1024())
    assert boxes["id"].tolist() == ["b.png", "b.png", "a.png"]
    assert boxes["finding"].tolist() == ["Cardiomegaly", "Infiltration", "Infiltration"]
    assert owner.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="image id 'a.png' is given twice"):
        boxes_of(["a.png", "a.png"], boxes_1024())
    with pytest.raises(ValueError, match="one map per image"):
        score_image_maps(np.ones((1, 64, 64)), ["a.png", "b.png"], boxes_1024())
    with pytest.raises(ValueError, match="none of the 1 images has a box"):
        score_image_maps(np.ones((1, 64, 64)), ["c.png"], boxes_1024())


def real_box_file() -> Path:
    box_file = SAMPLE_DATA / "nih-cxr14-sample" / "BBox_List_2017.csv"
    if box_file.is_file():
        return box_file
    try:
        return shipped_bbox_file()
    except DataError as err:
        pytest.skip(f"no real box file: {box_file} is absent (set CXR_SAMPLE_DATA) and {err}")


def test_the_real_nih_boxes_map_onto_the_findings_and_the_image():
    boxes = read_bboxes(real_box_file())
    assert len(boxes) == 984 and set(boxes["finding"]) <= set(FINDINGS)
    assert "Infiltration" in set(boxes["finding"]) and boxes["finding"].nunique() == 8
    scaled = scale_boxes(boxes, 64)
    assert (scaled[:, :2] >= 0).all() and (scaled[:, 0] + scaled[:, 2] <= 64.5).all()
    assert (scaled[:, 1] + scaled[:, 3] <= 64.5).all()
    out = score_boxes(np.ones((len(boxes), 64, 64)), boxes)
    assert out.iloc[-1]["boxes"] == 984 and len(out) == 9

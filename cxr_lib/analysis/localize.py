"""Where does a classifier look? Attention maps of ViTs, Grad-CAM of CNNs, and how well either
agrees with the NIH bounding boxes (chapter 5).

ChestX-ray14 ships 984 boxes drawn by radiologists on 880 test images, 8 findings. A map is
scored against a box in two ways: the pointing game (Zhang et al. 2016: is the map's maximum
inside the box?) and the share of the map's mass inside the box. Both have a chance level, the
box's share of the image, reported beside them: a uniform map puts that much mass inside and a
random point lands inside that often.

All maps are non-negative [B, H, W] at the input's resolution. Pixel (row r, column c) has its
centre at (c + 0.5, r + 0.5); it lies in box (x, y, w, h) when x <= c + 0.5 <= x + w and
y <= r + 0.5 <= y + h.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cxr_lib.data.core import FINDINGS
from cxr_lib.engine.inference import eval_mode

BOX_COLUMNS = ("id", "finding", "x", "y", "w", "h")  # as `cxr_lib.data.nih.read_bboxes` reads
NIH_BOX_SIZE = 1024  # the boxes are in pixels of the 1024 x 1024 originals
ALL = "all"  # the row of `score_boxes` over every box


# ----------------------------------------------------------------------------- ViT attention

def _attention_weights(attn: nn.Module, x: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) of a timm `Attention` for its input tokens x [B, N, D].

    timm computes attention with fused scaled-dot-product kernels that never materialise the
    weights, so they are recomputed here from the module's own qkv projection and q/k norms.
    """
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)  # [B, h, N, d] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, h, N, N]


def _layer_attentions(vit: nn.Module, x: Tensor, last_only: bool) -> list[Tensor]:
    """Head-averaged attention [B, N, N] of every block (or the last), first to last."""
    blocks = list(vit.blocks)[-1:] if last_only else list(vit.blocks)
    needed = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")
    for block in blocks:
        if not all(hasattr(getattr(block, "attn", None), a) for a in needed):
            raise TypeError(f"{type(vit).__name__}: expected timm ViT blocks whose `attn` has "
                            f"{needed}; got {type(getattr(block, 'attn', None)).__name__}")
    found: list[Tensor] = []

    def record(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        tokens = args[0] if args else kwargs["x"]  # [B, N, D]
        found.append(_attention_weights(module, tokens).mean(dim=1))  # [B, N, N]

    handles = [block.attn.register_forward_hook(record, with_kwargs=True) for block in blocks]
    try:
        with torch.no_grad(), eval_mode(vit):
            vit.forward_features(x)
    finally:
        for handle in handles:
            handle.remove()
    return found


def rollout(attentions: Sequence[Tensor]) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of head-averaged attentions [B, N, N], first
    layer to last: the product of (0.5 A + 0.5 I), rows normalised, where the identity stands
    for the residual connection that carries every token past the attention. Rows sum to 1."""
    b, n, _ = attentions[0].shape
    eye = torch.eye(n, dtype=attentions[0].dtype, device=attentions[0].device)
    joint = eye.expand(b, n, n)  # [B, N, N]
    for a in attentions:
        a = 0.5 * a + 0.5 * eye
        joint = (a / a.sum(dim=-1, keepdim=True)) @ joint
    return joint


def _default_query(vit: nn.Module) -> str:
    """The token the head reads: the class token for `global_pool="token"`, else the mean of
    the patch tokens (MAE fine-tunes with average pooling, where the class token's output is
    never used)."""
    return "cls" if getattr(vit, "global_pool", "token") == "token" else "mean"


def _patch_weights(joint: Tensor, vit: nn.Module, query: str | None) -> Tensor:
    """[B, L] attention from the query token(s) to the L patch tokens, summing to 1."""
    query = query or _default_query(vit)
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    if query == "cls":
        if not getattr(vit, "has_class_token", prefix > 0):
            raise ValueError(f"{type(vit).__name__} has no class token; use query='mean'")
        w = joint[:, 0, prefix:]  # [B, L]
    elif query == "mean":
        w = joint[:, prefix:, prefix:].mean(dim=1)  # [B, L]
    else:
        raise ValueError(f"query must be 'cls', 'mean' or None (from global_pool), got {query!r}")
    return w / w.sum(dim=-1, keepdim=True)


def _to_image(weights: Tensor, x: Tensor, vit: nn.Module, upsample: bool) -> Tensor:
    """Patch weights [B, L] as a map on the patch grid, or bilinearly upsampled to the image;
    either way non-negative and summing to 1 per image."""
    ph, pw = vit.patch_embed.patch_size
    gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
    if gh * gw != weights.shape[1]:
        raise ValueError(f"{weights.shape[1]} patch tokens do not form the {gh}x{gw} grid of a "
                         f"{tuple(x.shape[-2:])} input")
    grid = weights.reshape(-1, 1, gh, gw)  # [B, 1, gh, gw]
    if upsample:
        grid = F.interpolate(grid, size=x.shape[-2:], mode="bilinear", align_corners=False)
    maps = grid[:, 0].clamp(min=0)  # [B, H, W]
    return maps / maps.sum(dim=(-2, -1), keepdim=True)


def attention_map(vit: nn.Module, x: Tensor, *, query: str | None = None,
                  upsample: bool = True) -> Tensor:
    """Last-layer attention of a timm ViT from the query token to the patches, heads averaged.

    x: [B, C, H, W] as the model takes it. query: "cls" (the class token's row), "mean" (the
    mean row of the patch tokens) or None, which picks what the head reads (`global_pool`).
    Returns [B, H, W] (or [B, H/p, W/p] with `upsample=False`), summing to 1 per image.
    """
    attn = _layer_attentions(vit, x, last_only=True)[0]  # [B, N, N]
    return _to_image(_patch_weights(attn, vit, query), x, vit, upsample)


def attention_rollout(vit: nn.Module, x: Tensor, *, query: str | None = None,
                      upsample: bool = True) -> Tensor:
    """Attention rollout through every block (see `rollout`), as a map like `attention_map`'s.

    The last layer alone shows what the head mixes, not where those tokens got their content;
    rollout follows the information back through the residual stream to the input patches.
    """
    joint = rollout(_layer_attentions(vit, x, last_only=False))  # [B, N, N]
    return _to_image(_patch_weights(joint, vit, query), x, vit, upsample)


# ----------------------------------------------------------------------------- CNN Grad-CAM

def _cam_layer(cnn: nn.Module, layer: str | nn.Module | None) -> nn.Module:
    """The module whose output Grad-CAM weighs: by default the last feature stage timm lists
    (`features.norm5` of DenseNet-121, after its final batch norm and ReLU; `layer4` of
    ResNet-50)."""
    if isinstance(layer, nn.Module):
        return layer
    if layer is None:
        info = getattr(cnn, "feature_info", None)
        if not info:
            raise ValueError(f"{type(cnn).__name__} lists no feature_info; pass layer= (a name "
                             "or a module)")
        layer = info[-1]["module"]
    return cnn.get_submodule(layer)


def grad_cam(cnn: nn.Module, x: Tensor, target_class: int | Sequence[int] | Tensor,
             layer: str | nn.Module | None = None) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of a CNN classifier, [B, H, W] in [0, 1].

    The feature maps A [B, C, h, w] of `layer` are weighed by the spatial mean of the gradient
    of the target logit, summed over channels, passed through a ReLU (only evidence for the
    class), upsampled bilinearly to the input and divided by each map's maximum.
    target_class: one finding index for all images, or one per image.
    """
    module = _cam_layer(cnn, layer)
    b = x.shape[0]
    target = torch.as_tensor(target_class, device=x.device).long().reshape(-1)
    if len(target) not in (1, b):
        raise ValueError(f"target_class: one class or one per image ({b}), got {len(target)}")
    target = target.expand(b)  # [B]
    store: dict[str, Tensor] = {}
    handle = module.register_forward_hook(lambda m, args, out: store.__setitem__("act", out))
    try:
        with torch.enable_grad(), eval_mode(cnn):
            # the input asks for gradients so a frozen network still builds a graph
            logits = cnn(x.detach().float().requires_grad_(True))  # [B, classes]
            picked = logits.gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, store["act"])  # [B, C, h, w]
    finally:
        handle.remove()
    act = store["act"].detach()  # [B, C, h, w]
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(-2, -1), keepdim=True)  # [B, 1, 1]
    return torch.where(peak > 0, cam / peak.clamp(min=1e-12), cam)


# ----------------------------------------------------------------------------- boxes

def peak_ratio(maps: Tensor | np.ndarray) -> np.ndarray:
    """How much each map [B, H, W] stands out: its peak over its mean, [B]. A flat map (a model
    that looks everywhere alike) gives 1; an empty one (a Grad-CAM with no positive evidence)
    gives NaN. Say so before reading anything into a map's picture."""
    flat = _as_numpy(maps).reshape(len(maps), -1).astype(np.float64)  # [B, H*W]
    mean = flat.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, flat.max(axis=1) / mean, np.nan)


def _as_numpy(maps: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(maps, Tensor):
        maps = maps.detach().float().cpu().numpy()
    return np.asarray(maps, dtype=np.float64)


def box_scores(maps: Tensor | np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pointing game and mass inside for each map [B, H, W] and its box [B, 4] (x, y, w, h in
    map pixels). Returns (hit: bool [B], mass_inside: float [B]); mass is NaN for an all-zero
    map. The maximum is the first one in row-major order when several pixels share it."""
    maps, boxes = _as_numpy(maps), np.asarray(boxes, dtype=np.float64)
    if maps.ndim != 3 or boxes.shape != (len(maps), 4):
        raise ValueError(f"maps {maps.shape} must be [B, H, W] and boxes {boxes.shape} [B, 4]")
    if (maps < 0).any():
        raise ValueError(f"map {int(np.argwhere(maps < 0)[0, 0])} has negative values; box "
                         "scores need non-negative maps")
    inside = _box_masks(boxes, maps.shape[1:])  # [B, H, W]
    flat = maps.reshape(len(maps), -1)
    hit = inside.reshape(len(maps), -1)[np.arange(len(maps)), flat.argmax(axis=1)]
    total = flat.sum(axis=1)
    with np.errstate(invalid="ignore"):
        mass = (maps * inside).sum(axis=(1, 2)) / total
    return hit, mass


def _box_masks(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool [B, H, W]: which pixel centres lie in each box."""
    rows = np.arange(shape[0]) + 0.5  # [H]
    cols = np.arange(shape[1]) + 0.5  # [W]
    x, y, w, h = (boxes[:, i, None] for i in range(4))  # [B, 1] each
    in_rows = (rows >= y) & (rows <= y + h)  # [B, H]
    in_cols = (cols >= x) & (cols <= x + w)  # [B, W]
    return in_rows[:, :, None] & in_cols[:, None, :]


def scale_boxes(box_table: pd.DataFrame, image_size: int,
                orig_size: int = NIH_BOX_SIZE) -> np.ndarray:
    """Boxes [K, 4] (x, y, w, h) moved from `orig_size` pixels to `image_size` pixels: the
    preprocessing cache resizes the square NIH originals without cropping, so it is a scale."""
    _check_box_table(box_table)
    return box_table[["x", "y", "w", "h"]].to_numpy(dtype=np.float64) * (image_size / orig_size)


def _check_box_table(box_table: pd.DataFrame) -> None:
    missing = [c for c in BOX_COLUMNS if c not in box_table.columns]
    if missing:
        raise ValueError(f"box table lacks the columns {missing}; read it with "
                         "cxr_lib.data.nih.read_bboxes")
    unknown = ~box_table["finding"].isin(FINDINGS).to_numpy()
    if unknown.any():
        row = int(np.argmax(unknown))
        raise ValueError(f"box table row {row}: unknown finding "
                         f"{box_table['finding'].iloc[row]!r}; read the box file with "
                         "cxr_lib.data.nih.read_bboxes, which maps 'Infiltrate' to "
                         "'Infiltration'")
    size = box_table[["w", "h"]].to_numpy(dtype=np.float64)
    bad = ~(size > 0).all(axis=1)
    if bad.any():
        raise ValueError(f"box table row {int(np.argmax(bad))}: width and height must be "
                         f"positive, got {size[bad][0].tolist()}")


def score_boxes(maps: Tensor | np.ndarray, box_table: pd.DataFrame, image_size: int | None = None,
                orig_size: int = NIH_BOX_SIZE) -> pd.DataFrame:
    """Pointing game and mass inside per finding, for maps [K, S, S] aligned with the rows of
    `box_table` (map i belongs to box i: its image, and for Grad-CAM its finding; with one map
    per image, use `score_image_maps`).

    image_size: the side S of the maps (checked against them); boxes are scaled from
    `orig_size`. Columns: finding, boxes, hit_rate, mass_inside (mean), box_area (mean share of
    the map inside the box: the chance level of both scores); findings in FINDINGS order, then
    a row "all" over every box.
    """
    maps = _as_numpy(maps)
    if maps.ndim != 3 or maps.shape[1] != maps.shape[2] or len(maps) != len(box_table):
        raise ValueError(f"maps {maps.shape} must be [K, S, S] with one map per box "
                         f"({len(box_table)} boxes); for one map per image, use "
                         "score_image_maps")
    if image_size is not None and image_size != maps.shape[1]:
        raise ValueError(f"image_size {image_size} differs from the maps' side {maps.shape[1]}")
    boxes = scale_boxes(box_table, maps.shape[1], orig_size)  # [K, 4]
    hit, mass = box_scores(maps, boxes)
    area = _box_masks(boxes, maps.shape[1:]).mean(axis=(1, 2))  # [K]
    scores = pd.DataFrame({"finding": box_table["finding"].to_numpy(), "hit": hit,
                           "mass": mass, "area": area})
    order = [f for f in FINDINGS if f in set(scores["finding"])]
    rows = [_aggregate(scores[scores["finding"] == f], f) for f in order]
    return pd.DataFrame([*rows, _aggregate(scores, ALL)])


def score_image_maps(maps: Tensor | np.ndarray, image_ids: Sequence[str],
                     box_table: pd.DataFrame, image_size: int | None = None,
                     orig_size: int = NIH_BOX_SIZE) -> pd.DataFrame:
    """`score_boxes` for maps [B, S, S] of images, map i of image `image_ids[i]`: every box of
    an image is scored against that image's map, which is repeated once per box.

    An attention map (or a Grad-CAM of the predicted finding) belongs to the image, while
    ChestX-ray14 draws several boxes on some images (93 of its 880 boxed images) and the
    pointing game and mass inside count boxes. Boxes of other images are left out; images
    without a box add nothing.
    """
    _check_box_table(box_table)
    maps = _as_numpy(maps)
    if len(maps) != len(image_ids):
        raise ValueError(f"maps {maps.shape} must be [B, S, S] with one map per image "
                         f"({len(image_ids)} image ids)")
    boxes, owner = boxes_of(image_ids, box_table)
    if not len(boxes):
        raise ValueError(f"none of the {len(image_ids)} images has a box in the box table")
    return score_boxes(maps[owner], boxes, image_size, orig_size)  # maps [K, S, S], a box each


def boxes_of(image_ids: Sequence[str], box_table: pd.DataFrame
             ) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows of `box_table` on the given images, grouped in the order of `image_ids`, and
    for each row the position of its image in `image_ids` [K], which picks its map."""
    ids = pd.Index(image_ids)
    if not ids.is_unique:
        raise ValueError(f"image id {ids[ids.duplicated()][0]!r} is given twice")
    position = ids.get_indexer(box_table["id"])  # [rows], -1 for boxes of other images
    rows = np.flatnonzero(position >= 0)
    rows = rows[np.argsort(position[rows], kind="stable")]  # by image, boxes in file order
    return box_table.iloc[rows].reset_index(drop=True), position[rows]


def _aggregate(scores: pd.DataFrame, name: str) -> dict:
    return {"finding": name, "boxes": len(scores), "hit_rate": float(scores["hit"].mean()),
            "mass_inside": float(scores["mass"].mean()), "box_area": float(scores["area"].mean())}

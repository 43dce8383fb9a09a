"""Classifiers to fine-tune: timm ViT-T/S/B, Hiera-T/S/B, DenseNet-121 and ResNet-50, from any
starting point.

`build_classifier` makes the timm model for grayscale X-rays (one input channel, 14 findings) and
loads its starting weights, whatever layout they were saved in:

- "random": timm's own initialisation;
- "imagenet": timm's ImageNet weights, from a local file or the Hugging Face cache (nothing is
  downloaded while the study runs; without them `WeightsUnavailable` says the arm is skipped);
- "mae": an encoder saved by `cxr_lib.methods.mae.save_encoder` or `HieraMae.encoder_state_dict`, a
  whole MAE, or a released MAE checkpoint (facebookresearch/mae or Xiao et al.: `{"model":
  encoder + decoder}`; facebookresearch/hiera: `{"model_state": ...}`); the decoder side goes;
- "moco": a backbone saved with timm keys (`{"model": ...}`), or MoCo's released layout
  (`module.encoder_q.*`, projection head dropped);
- "torchvision": DenseNet-121 / ResNet-50 weights in torchvision's layout, such as the X-ray
  DenseNet-121 Xiao et al. released (torchvision's keys are timm's, bar the pre-0.4 dotted
  `norm.1` names, which timm's filter renames).
- "finetuned": a whole fine-tuned classifier, head included, such as the fine-tuned ViTs and
  DenseNet-121 Xiao et al. released (`{"model": ...}` as their script saves it; a ViT with
  average pooling and `fc_norm`, or torchvision's DenseNet): it loads every key, so its logits
  are the released model's. Only this start keeps the source's classifier.

Whatever the source: the classifier of the source is dropped (but for "finetuned"), a first
convolution of another channel count is adapted (`adapt_input_channels`: 3 summed to one, or 1
split over 3; a Hiera MAE's `decoder_pred` rows follow, `HieraMae.fit_pred_rows`), a ViT's patch
kernel of another size is resampled (FlexiViT, timm) and its position table is regenerated when
it is MAE's fixed sin-cos table, interpolated otherwise (Hiera's learned table too, to the grid
of `hiera_kwargs(img_size)`).
Hiera files in the official layout get timm's `checkpoint_filter_fn` renames. A tensor whose
shape still does not fit is an error naming the file: loading half a model silently is the worst
outcome. ViTs pool the patch tokens (MAE's fine-tuning head: average, then a fresh LayerNorm), so
a pre-trained final `norm` is reported unexpected, as in MAE's own fine-tuning; a loaded ViT's
head starts at N(0, 2e-5), as there (a "finetuned" one keeps its own). Hiera's timm head
(average, `head.norm`, `head.fc`) starts fresh from an MAE, with timm's Hiera initialisation.
ViTs and Hiera take layer-wise LR decay (`supports_layer_decay`: timm's
`param_groups_layer_decay` reads their `group_matcher`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from huggingface_hub import constants, try_to_load_from_cache
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import load_state_dict
from timm.models.densenet import _filter_torchvision_pretrained
from timm.models.hiera import Hiera, checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from cxr_lib.models.families import CNNS, family, timm_name
from cxr_lib.models.hiera_mae import PATCH_STRIDE, HieraMae, hiera_kwargs
from cxr_lib.models.mae import (
    LoadReport,
    adapt_input_channels,
    is_decoder_key,
    sincos_pos_embed,
)

INITS = ("random", "imagenet", "mae", "moco", "torchvision", "finetuned")
NEEDS_FILE = ("mae", "moco", "torchvision", "finetuned")


class WeightsUnavailable(RuntimeError):
    """The starting weights an arm needs are not on this machine; the arm is skipped."""


def is_vit(model: str) -> bool:
    return family(model) == "vit"


def supports_layer_decay(model: str) -> bool:
    """Whether timm's `param_groups_layer_decay` can give `model` one LR per block: ViTs and
    Hiera (a block-wise `group_matcher`); the CNNs are left at one rate."""
    return family(model) in ("vit", "hiera")


def build_classifier(model: str, *, num_classes: int = 14, in_chans: int = 1,
                     img_size: int = 224, patch_size: int | None = None, drop_path: float = 0.0,
                     init: str = "random", weights: str | Path | None = None
                     ) -> tuple[nn.Module, LoadReport]:
    """A timm classifier started from `init` (see the module docstring) and what was loaded.

    `img_size` and `patch_size` (default 16) shape a ViT; `img_size` shapes a Hiera through
    `hiera_kwargs` (its patch stride is 4: `patch_size` None or 4); `drop_path` is the
    stochastic-depth rate (ViT, Hiera and ResNet; timm's DenseNet has none). `weights` is the
    file for "mae", "moco", "torchvision", and optionally "imagenet" (timm layout); "random"
    takes none.
    """
    name = timm_name(model)
    _check_start(name, init, weights, drop_path, patch_size)
    if init == "random":
        return _create(name, num_classes, in_chans, img_size, patch_size, drop_path), LoadReport()
    path = Path(weights) if weights is not None else imagenet_weights(name)
    state = read_state_dict(path)  # before building: a bad file fails fast
    net = _create(name, num_classes, in_chans, img_size, patch_size, drop_path)
    report = load_weights(net, _source_layout(state, init, net), str(path))
    if isinstance(net, VisionTransformer) and init != "finetuned":
        nn.init.trunc_normal_(net.head.weight, std=2e-5)  # MAE's fine-tuning head
    return net, report


def load_start(net: nn.Module, init: str, weights: str | Path) -> LoadReport:
    """Load the starting weights in `weights`, laid out as `init` names them, into a built timm
    `net`: e.g. ImageNet Hiera weights into a `HieraMae` before continued MAE pre-training
    (MedTransformer); the same fitting and checks as `build_classifier`."""
    return load_weights(net, _source_layout(read_state_dict(weights), init, net), str(weights))


def _check_start(name: str, init: str, weights: str | Path | None, drop_path: float,
                 patch_size: int | None) -> None:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    if init in NEEDS_FILE and weights is None:
        raise ValueError(f"init={init!r} needs weights=<file> (the saved encoder or checkpoint)")
    if init == "random" and weights is not None:
        raise ValueError(f"init='random' takes no weights, got {weights}")
    if init == "mae" and family(name) == "cnn":
        raise ValueError(f"init='mae' loads a ViT or Hiera encoder; {name} is not a ViT or Hiera")
    if family(name) == "hiera" and patch_size not in (None, PATCH_STRIDE):
        raise ValueError(f"{name} embeds {PATCH_STRIDE}-pixel patches; patch_size must be None "
                         f"or {PATCH_STRIDE}, got {patch_size}")
    if init == "torchvision" and family(name) != "cnn":
        raise ValueError(f"init='torchvision' loads {CNNS}; {name} is not one of them")
    if drop_path and name == "densenet121":
        raise ValueError("densenet121 has no stochastic depth in timm; set drop_path to 0")


def _create(name: str, num_classes: int, in_chans: int, img_size: int, patch_size: int | None,
            drop_path: float) -> nn.Module:
    kwargs = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans}
    if family(name) == "vit":
        kwargs.update(img_size=img_size, patch_size=patch_size or 16, global_pool="avg",
                      drop_path_rate=drop_path)
    elif family(name) == "hiera":
        kwargs.update(hiera_kwargs(img_size), drop_path_rate=drop_path)
    elif drop_path:
        kwargs["drop_path_rate"] = drop_path
    return timm.create_model(name, **kwargs)


def imagenet_weights(model: str, tag: str | None = None) -> Path:
    """The local file of timm's ImageNet weights for `model` (the Hugging Face cache), or
    `WeightsUnavailable` saying why the ImageNet arm cannot run. Never downloads. `tag` picks
    other weights than timm's default, e.g. "mae" for Hiera's MAE pre-training alone (the
    default, `mae_in1k_ft_in1k`, was fine-tuned on ImageNet's labels after it)."""
    name = timm_name(model) + (f".{tag}" if tag else "")
    if tag and name not in timm.list_pretrained(name):
        raise WeightsUnavailable(f"timm has no weights {name!r}; those of {timm_name(model)}: "
                                 f"{timm.list_pretrained(timm_name(model) + '.*')}")
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    raise WeightsUnavailable(
        f"ImageNet weights for {name} ({repo}) are not in the Hugging Face cache "
        f"({_home_as_tilde(constants.HF_HUB_CACHE)}) and this study downloads nothing while it "
        "runs, so the ImageNet arm is skipped. To include it, fetch them once with "
        f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` on a "
        "machine with network access, or pass a local file of timm-layout weights.")


def _home_as_tilde(path: str | Path) -> str:
    """`path` with the home folder written `~`: the message reaches the book, where this
    machine's home has no business."""
    home = Path.home()
    path = Path(path)
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file: timm's reader (safetensors or torch; `state_dict` or
    `model` unwrapped, DDP's `module.` stripped), loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        # MAE's and MoCo's scripts also save their argparse `args`: allow that plain class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
    if isinstance(state, Mapping) and isinstance(state.get("model_state"), Mapping):
        state = state["model_state"]  # facebookresearch/hiera (and SlowFast) checkpoints
    tensors = ({k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
               if isinstance(state, Mapping) else {})
    if not tensors:
        raise ValueError(f"{path}: holds no state dict of tensors")
    return tensors


def _source_layout(state: dict[str, Tensor], init: str, net: nn.Module) -> dict[str, Tensor]:
    """Keys in timm's layout, without the source's decoder, projection head or classifier."""
    if init == "mae":
        state = {k: v for k, v in state.items() if not is_decoder_key(k)}
    if init == "moco" and any(k.startswith("encoder_q.") for k in state):
        state = {k.removeprefix("encoder_q."): v for k, v in state.items()
                 if k.startswith("encoder_q.")}
    if init == "torchvision" or (init == "finetuned" and net.pretrained_cfg.get(
            "architecture") in CNNS):
        state = _filter_torchvision_pretrained(dict(state))
    if isinstance(net, Hiera):
        state = checkpoint_filter_fn(state, net)  # official names (norm, head.projection)
    if hasattr(net, "encoder_norm"):  # a HieraMae: its own norm, which timm calls head.norm
        state = {f"encoder_norm.{k.removeprefix('head.norm.')}" if k.startswith("head.norm.")
                 else k: v for k, v in state.items()}
    if init == "finetuned":
        return state
    head = net.pretrained_cfg["classifier"] + "."
    return {k: v for k, v in state.items() if not k.startswith(head)}


def load_weights(net: nn.Module, state: Mapping[str, Tensor], source: str) -> LoadReport:
    """Load `state` (timm keys) into `net`, fitting the first conv, patch kernel and position
    table; other keys load as they are (strict=False) and the report lists what happened."""
    own = net.state_dict()
    report = LoadReport()
    usable: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in own and value.shape != own[key].shape:
            value = _fit(net, key, value, report)
        if key in own and value.shape != own[key].shape:
            report.mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            usable[key] = value
    if report.mismatched:
        name = net.pretrained_cfg.get("architecture", type(net).__name__)
        raise ValueError(f"{source}: tensors of another shape than this {name} takes: "
                         f"{'; '.join(report.mismatched)}. Is it the same model?")
    result = net.load_state_dict(usable, strict=False)
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    report.loaded = [k for k in usable if k in own]
    if not report.loaded:
        raise ValueError(f"{source}: no tensor matches the model's keys; file keys start "
                         f"{list(state)[:5]}")
    return report


def _fit(net: nn.Module, key: str, value: Tensor, report: LoadReport) -> Tensor:
    """A source tensor reshaped for `net` where a known rule applies, else unchanged."""
    target = net.state_dict()[key]
    if key == "pos_embed" and isinstance(net, VisionTransformer):
        new_grid = net.patch_embed.grid_size
        table = sincos_pos_embed(value.shape[2], round((value.shape[1] - 1) ** 0.5))
        if table.shape == value.shape and torch.allclose(value.float(), table, atol=1e-5):
            report.regenerated.append(key)
            return sincos_pos_embed(value.shape[2], new_grid[0]).to(value.dtype)
        report.adapted.append(key)
        return resample_abs_pos_embed(value, list(new_grid), num_prefix_tokens=1)
    if key == "pos_embed" and isinstance(net, Hiera) and value.ndim == 3:
        report.adapted.append(key)
        return resample_abs_pos_embed(value, list(net.tokens_spatial_shape), num_prefix_tokens=0)
    if key.startswith("decoder_pred.") and isinstance(net, HieraMae):  # a released RGB MAE
        report.adapted.append(key)
        return net.fit_pred_rows(value)
    if key == net.pretrained_cfg["first_conv"] + ".weight" and value.ndim == 4:
        if value.shape[2:] != target.shape[2:] and isinstance(net, VisionTransformer):
            value = resample_patch_embed(value, list(target.shape[2:]))
        if value.shape[1] != target.shape[1]:
            value = adapt_input_channels(value, target.shape[1])
        report.adapted.append(key)
    return value

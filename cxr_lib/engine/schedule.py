"""The learning-rate schedule (warm-up then cosine, or one-cycle) and the optimizer with its
parameter groups (weight decay, layer-wise lr scales)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from fastai.callback.core import (
    Callback,
)
from fastai.callback.schedule import combined_cos
from fastai.optimizer import OptimWrapper
from timm.optim import param_groups_weight_decay
from torch import nn

from cxr_lib.engine.config import TrainConfig
from cxr_lib.engine.order import ORDER


def schedule_at(config: TrainConfig, step: int, steps_per_epoch: int) -> tuple[float, float | None]:
    """Learning rate (and momentum, for one-cycle) of optimizer step `step`, counted from 0.

    "cosine" follows MAE's `lr_sched`: the fractional epoch t = step / steps_per_epoch, linear
    warm-up from 0 over `warmup_epochs`, then half a cosine down to `min_lr`. "one_cycle" is
    fastai's `fit_one_cycle` (lr from lr/25 up to lr and down to lr/1e5, momentum 0.95-0.85-0.95);
    "torch_one_cycle" is torch's `OneCycleLR` as it comes (`torch_one_cycle`).
    """
    if config.schedule == "torch_one_cycle":
        return torch_one_cycle(config.lr, config.pct_start, step, config.epochs * steps_per_epoch)
    if config.schedule == "one_cycle":
        pct = step / (config.epochs * steps_per_epoch)
        lr = combined_cos(config.pct_start, config.lr / 25, config.lr, config.lr / 1e5)(pct)
        return float(lr), float(combined_cos(config.pct_start, 0.95, 0.85, 0.95)(pct))
    t = step / steps_per_epoch
    if t < config.warmup_epochs:
        return config.lr * t / config.warmup_epochs, None
    progress = (t - config.warmup_epochs) / (config.epochs - config.warmup_epochs)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr + (config.lr - config.min_lr) * cosine, None


def torch_one_cycle(peak: float, pct_start: float, step: int, total: int) -> tuple[float, float]:
    """Learning rate and momentum (Adam's beta1) at `step` of `total` under torch's `OneCycleLR`
    with its defaults (cosine from peak/25 up to peak at step pct_start x total - 1, then down to
    peak/25/1e4 at the last step; momentum 0.95 down to 0.85 and back), which MedTransformer's
    scripts use: fastai's one-cycle ends 2.5x lower and places its phases otherwise. Where torch
    would divide by zero (a rise that ends at step 0), the rise counts as done."""
    rise_end = float(pct_start * total) - 1
    if step <= rise_end:
        pct, lrs, moms = step / rise_end if rise_end > 0 else 1.0, (peak / 25, peak), (0.95, 0.85)
    else:
        pct = (step - rise_end) / (total - 1 - rise_end)
        lrs, moms = (peak, peak / 25 / 1e4), (0.85, 0.95)
    cos = (math.cos(math.pi * pct) + 1) / 2  # 1 at the phase's start, 0 at its end
    return lrs[1] + (lrs[0] - lrs[1]) * cos, moms[1] + (moms[0] - moms[1]) * cos


class _Schedule(Callback):
    """Sets every parameter group's lr to schedule x its `lr_scale` (timm's layer decay)."""

    order, run_valid = ORDER["schedule"], False

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def before_batch(self) -> None:
        lr, mom = schedule_at(self.config, self.learn.train_iter, len(self.learn.dl))
        for group in self.learn.opt.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if mom is not None and "betas" in group:
                group["betas"] = (mom, group["betas"][1])
            elif mom is not None and "momentum" in group:
                group["momentum"] = mom
        self.learn.scheduled_lr = lr


def _optimizer_spec(config: TrainConfig, fused: bool) -> tuple[type, dict]:
    """The torch optimizer class of the config and its keyword arguments; `fused`: its fused
    CUDA kernel (the whole update in one launch) instead of torch's default (foreach)."""
    extra = {"fused": True} if fused else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD, {"momentum": config.momentum,
                                 "weight_decay": config.weight_decay, **extra}
    opt = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return opt, {"betas": tuple(config.betas), "weight_decay": config.weight_decay, **extra}


def _optimizer(config: TrainConfig, device: torch.device) -> Callable:
    """A fastai `opt_func`: the torch optimizer in fastai's OptimWrapper, fused on CUDA."""
    opt, kwargs = _optimizer_spec(config, fused=device.type == "cuda")
    return partial(OptimWrapper, opt=opt, **kwargs)


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device,
                   param_groups: Sequence[dict] | None = None, *,
                   fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer `fit` trains `model` with (same groups and hyper-parameters; fused on
    CUDA unless `fused=False`), each group at the peak lr times its `lr_scale`: for loops
    outside the engine, such as the model step alone of `cxr bench`."""
    opt, kwargs = _optimizer_spec(config, device.type == "cuda" if fused is None else fused)
    groups = [{**g, "lr": config.lr * g.get("lr_scale", 1.0)}
              for g in _param_groups(model, config, param_groups)]
    return opt(groups, lr=config.lr, **kwargs)


def _param_groups(model: torch.nn.Module, config: TrainConfig,
                  groups: Sequence[dict] | None) -> list[dict]:
    """The caller's groups, or timm's: no weight decay on biases, norms and `no_weight_decay()`."""
    if groups is None:
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        groups = param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=skip)
    groups = [{**g, "params": list(g["params"])} for g in groups]
    return [g for g in groups if g["params"]]

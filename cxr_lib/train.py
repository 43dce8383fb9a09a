"""The one training engine of the study: a fastai `Learner`, our callbacks, and a run folder.

Chapters 2, 3, 4 and 6 all train through `fit`. It trains a model in a run folder named by the
hash of its `TrainConfig` (see `cxr_lib.runs`): a finished run is loaded instead of trained, an
unfinished one resumes from its last checkpoint and ends with the same weights, bit for bit, as
a run that was never interrupted (same device and thread count).

How to call it
--------------
MAE pre-training (the model computes its own loss; `forward(imgs) -> (loss, pred, mask)`)::

    cfg = TrainConfig(epochs=400, batch_size=256, base_lr=1.5e-4, warmup_epochs=40,
                      extra={"model": "mae_vit_small", "mask_ratio": 0.9, "data": cache_id})
    res = fit(mae, train_batches, config=cfg, run_root=runs_dir, kind="mae",
              loss_func=model_loss, batch_tfm=augment)

A classifier with BCE and per-epoch validation AUC, keeping the best epoch's weights::

    cfg = TrainConfig(epochs=75, batch_size=256, base_lr=2.5e-4, warmup_epochs=5,
                      keep_best="valid_auc", extra={"model": "vit_small", "init": "mae"})
    res = fit(vit, train_batches, valid_batches, cfg, runs_dir, "finetune",
              loss_func=masked_bce_loss, batch_tfm=augment, valid_tfm=to_float,
              cbs=[ValidAUC()], param_groups=param_groups_layer_decay(vit, 0.05, ...))

Everything that changes the trained weights must be in the config (model name, data, mask
ratio... go in `extra`), or two different experiments would share a run folder.

Batches are `(inputs, targets)` tuples from any iterable with `len()`; if it has
`set_epoch(epoch)` it is called before every pass (a deterministic order per epoch makes exact
resume cheap), and under `torchrun` it must have `shard(rank, world_size)` returning this rank's
share (`batch_size` in the config is the global batch): the same number of training batches on
every rank (checked), while validation batches may end one short on some ranks (a short last
batch need not reach every rank; the metrics are gathered from all of them).

Several GPUs: launch the same script with `torchrun --nproc_per_node N`; `fit` joins the
process group, wraps the model in DistributedDataParallel (gradients are averaged, so every rank
holds the same weights), shards the batches, seeds each rank with seed + rank, and only rank 0
writes files. fastai's own `distrib_ctx` is not used: it needs the `accelerate` package (not a
dependency) and its `DistributedDL` only wraps fastai DataLoaders and broadcasts on CUDA.

Exact resume needs every source of randomness to be the global RNGs (python, numpy, torch;
stored in the checkpoint, per rank) or the loader's own (seed, epoch) order.

Host syncs: fastai's `Recorder` and `ProgressCallback` move the loss to the CPU every batch
(`to_detach`, `smooth_loss.item()`), which stalls a GPU. They are replaced here: losses are summed
on the device and read once per epoch; the only sync the engine itself keeps is the NaN check,
every `nan_check_every` steps (25 by default: one sync in 25 steps costs nothing measurable, one
every step keeps the host from queueing work ahead of the GPU). A model can add its own: Hiera's
MAE places the visible mask units with a boolean index, as timm's masked Hiera does, and each
such index waits for the GPU. bf16 autocast (the default on CUDA)
needs no gradient scaler; fp16's `GradScaler` reads its overflow flag every step, a sync.

Fast path on a GPU (see `cxr bench`): the optimizer runs fused kernels (one launch for all
parameters), a CNN (more than one convolution) runs channels-last with cuDNN's autotuner, and
`TrainConfig.compile=True` puts the training forward and backward through `torch.compile`,
falling back to eager, with a warning, when compiling fails (`compile_or_eager`). These are
operational settings: they change how fast, not what is trained, so they stay out of the run
hash (`OPERATIONAL`). Exact resume holds for them too as long as the kernels are deterministic;
cuDNN's autotuner may pick other convolution algorithms after a restart, so a CNN resumed on a
GPU matches closely rather than bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fastai.callback.core import (
    Callback,
    CancelEpochException,
    TrainEvalCallback,
)
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastai.callback.schedule import combined_cos
from fastai.callback.training import GradientClip
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper
from fastai.torch_core import default_device, find_bs, num_distrib, set_seed
from fastcore.basics import GetAttr
from fastprogress.fastprogress import master_bar, progress_bar
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cxr_lib import runs
from cxr_lib.evaluate import mean_auc

SCHEDULES = ("cosine", "one_cycle", "torch_one_cycle")
OPTIMIZERS = ("adamw", "adam", "sgd")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPERATIONAL = ("checkpoint_every", "checkpoint_minutes", "nan_check_every", "compile",
               "channels_last", "cudnn_benchmark")  # change how, not what: not hashed
# A run whose last epoch's mean train loss exceeds the loss it started from this many times is
# marked diverged: an untrained model's loss is the chance level of its task (BCE's log 2, MAE's
# pixel variance) and training that works stays below it. A model whose first steps score
# below its chance level (MoCo: its queue starts as random keys) states it as `chance_loss`.
DIVERGED_RISE = 4.0


@dataclass
class TrainConfig:
    """Everything that defines a training run; its hash names the run folder.

    `batch_size` is the global batch per optimizer step (all ranks together); the learning
    rate follows the linear scaling rule of MAE and MoCo: lr = base_lr x batch_size / 256.
    """

    epochs: int = 1
    batch_size: int = 256
    base_lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)  # adam / adamw
    momentum: float = 0.9  # sgd (MoCo v2)
    schedule: str = "cosine"  # warm-up then cosine, per step; fastai's or torch's one-cycle
    warmup_epochs: float = 0.0  # cosine only
    min_lr: float = 0.0  # cosine only: the floor the cosine decays to
    pct_start: float = 0.25  # one-cycles only: share of steps spent rising (torch's: 0.3)
    optimizer: str = "adamw"
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 elsewhere
    grad_clip: float | None = None  # max gradient norm
    seed: int = 0
    keep_best: str | None = None  # a history column, e.g. "valid_auc" (max) or "valid_loss" (min)
    checkpoint_every: int = 500  # steps; and always at the end
    checkpoint_minutes: float = 5.0  # also at an epoch's end once this long since the last
    nan_check_every: int = 25  # steps between host syncs that look for a non-finite loss
    compile: bool = False  # torch.compile the training step; eager if compiling fails
    channels_last: bool | None = None  # None: for CNNs on CUDA
    cudnn_benchmark: bool | None = None  # None: for CNNs on CUDA (fixed shapes: autotune pays)
    extra: dict = field(default_factory=dict)  # model- and data-specific values, hashed too

    @property
    def lr(self) -> float:
        """Peak learning rate after linear scaling with the batch size."""
        return self.base_lr * self.batch_size / 256

    def identity(self) -> dict:
        """The values that decide the trained weights: what the run hash is computed from."""
        return {k: v for k, v in runs.canonical(self).items() if k not in OPERATIONAL}

    def check(self) -> None:
        """Refuse values that would fail late or silently train something else."""
        choices = {"schedule": SCHEDULES, "optimizer": OPTIMIZERS, "precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        positive = ("epochs", "batch_size", "base_lr", "checkpoint_every", "checkpoint_minutes",
                "nan_check_every")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.warmup_epochs < 0 or not 0 < self.pct_start < 1:
            raise ValueError("TrainConfig: warmup_epochs must be >= 0 and pct_start in (0, 1)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be positive, got {self.grad_clip}")
        for name in ("compile", "channels_last", "cudnn_benchmark"):
            if getattr(self, name) not in ((False, True) if name == "compile"
                                           else (None, False, True)):
                raise ValueError(f"TrainConfig.{name} must be True or False"
                                 f"{'' if name == 'compile' else ' or None (auto)'}, "
                                 f"got {getattr(self, name)!r}")


@dataclass
class RunResult:
    """What `fit` returns; the model passed in now holds the run's (final or best) weights."""

    path: Path
    history: pd.DataFrame
    metrics: dict
    loaded_from_cache: bool
    resumed_from_step: int | None = None


REMEDY = ("Lower the learning rate (base_lr, --base-lr), lengthen the warm-up or clip the "
          "gradients (grad_clip, --grad-clip); too high a learning rate is the usual cause (MAE "
          "training explodes with it). A changed config trains in a new run folder.")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint on disk is left untouched."""

    def __init__(self, step: int, loss: float, since: int, run: Path | None = None) -> None:
        self.step, self.loss, self.since, self.run = step, loss, since, run
        where = (f"at step {step}" if since >= step - 1
                 else f"between steps {since + 1} and {step} (checked every few steps)")
        kept = ""
        if run is not None:
            kept = (f" The last good checkpoint in {run} is untouched." if
                    (run / runs.CHECKPOINT).exists() else f" No checkpoint of {run} was written "
                    "before it, so a rerun starts from the beginning.")
        super().__init__(
            f"training diverged: non-finite loss {where}; the loss is now {loss}.{kept} {REMEDY}")


def rise_note(start_loss: float | None, last_loss: float) -> str | None:
    """Why a run that ended with finite numbers still diverged, or None: its last epoch's mean
    train loss is more than `DIVERGED_RISE` times the loss it started from (the model's
    `chance_loss`, else its first step's)."""
    if start_loss is None or not start_loss > 0 or not last_loss > DIVERGED_RISE * start_loss:
        return None
    return (f"the run diverged: its train loss rose from {start_loss:.4g} at the start to "
            f"{last_loss:.4g} in the last epoch (more than {DIVERGED_RISE:g}x). {REMEDY}")


# ----------------------------------------------------------------------------- losses, metrics

def model_loss(out: Any, *targets: torch.Tensor) -> torch.Tensor:
    """Loss function for a model that computes its own loss: the first output, e.g. MAE's
    `(loss, pred, mask)`. The targets fastai passes are ignored."""
    return out[0]


def masked_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the findings a source states; NaN targets are left out."""
    known = ~torch.isnan(targets)  # [B, F]
    per_entry = F.binary_cross_entropy_with_logits(
        logits.float(), torch.nan_to_num(targets), reduction="none")  # [B, F]
    return (per_entry * known).sum() / known.sum().clamp(min=1)


class EpochMetric(Callback):
    """A validation metric computed once per epoch; `fit` writes `value` to the history under
    `metric_name` (and `keep_best` may name it)."""

    metric_name = "metric"
    value = math.nan


class ValidAUC(EpochMetric):
    """Mean ROC AUC over findings on the validation set (scikit-learn), once per epoch.

    Logits and targets stay on the device during the pass and are copied once at its end (no
    per-batch sync); under DDP they are gathered from all ranks. `per_class` keeps the AUCs.
    """

    order, run_train, metric_name = 70, False, "valid_auc"

    def before_validate(self) -> None:
        self.scores, self.targets = [], []

    def after_batch(self) -> None:
        self.scores.append(self.learn.pred.detach().float())  # [B, F] logits: AUC is rank-based
        self.targets.append(self.learn.yb[0].detach().float())  # [B, F]

    def after_validate(self) -> None:
        local = None  # a rank the validation batches did not reach still joins the gather
        if self.scores:
            local = (torch.cat(self.scores).cpu().numpy(), torch.cat(self.targets).cpu().numpy())
        parts = [part for part in _gather(local) if part is not None]
        self.scores, self.targets = [], []
        if not parts:
            self.value, self.per_class = math.nan, np.array([])
            return
        scores, targets = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        self.value, self.per_class = mean_auc(scores, targets)  # [N, F] each


# ----------------------------------------------------------------------------- schedule

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

    order, run_valid = 1, False

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


# ----------------------------------------------------------------------------- RNG and DDP

def rng_state() -> dict:
    """Python, numpy, torch CPU (and current CUDA device) RNG states, as values that
    `torch.load(weights_only=True)` accepts."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss),
                       float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group `torchrun` describes in the environment."""
    if num_distrib() <= 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _ddp() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _ddp():
        dist.barrier()


def _gather(obj: Any) -> list:
    """`obj` from every rank, in rank order ([obj] without DDP)."""
    if not _ddp():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _sum_ranks(*values: float) -> list[float]:
    """Each value summed over ranks (one collective for all of them)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if _ddp():
        t = t.to(default_device())
        dist.all_reduce(t)
    return t.tolist()


class _DDP(Callback):
    """Wraps the model in DistributedDataParallel for the fit (as fastai's DistributedTrainer,
    without its `accelerate` dependency and its fastai-DataLoader-only sharding)."""

    order = 11  # after MixedPrecision, like fastai's

    def before_fit(self) -> None:
        device = next(self.learn.model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        self.learn.model = DistributedDataParallel(self.learn.model, device_ids=ids)

    def after_fit(self) -> None:
        self.learn.model = unwrap_model(self.learn.model)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module itself, inside any `torch.compile` and DistributedDataParallel wrappers: its
    state dict has the plain keys that checkpoints use."""
    while True:
        if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------- fast path

def compile_or_eager(model: nn.Module, trial: Callable[[nn.Module], Any]
                     ) -> tuple[nn.Module, str | None]:
    """`torch.compile(model)` and None, or `model` itself and why compiling failed.

    torch.compile fails late: tracing and code generation happen at the first forward (the
    backward's at the first backward), where a missing C++ compiler, an unsupported op or a
    backend bug raises. So `trial` first runs one step (forward and backward) with a compiled
    deep copy, under a forked RNG: the real model, its buffers (batch-norm statistics, a MoCo
    queue) and the random streams are left as they were, and a training run stays exactly
    the run it would have been. The copy's kernels are cached, so the real compile is quick.
    Under DDP the real compile traces the wrapper, which splits the graph at its gradient
    buckets: the trial covers the model's own code, not that split.
    """
    probe = copy.deepcopy(unwrap_model(model))
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            trial(torch.compile(probe))
    except Exception as err:  # any failure of an optional speed-up means: run eagerly
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        return model, f"{type(err).__name__}: {first_line}"
    return torch.compile(model), None


class _Compile(Callback):
    """`TrainConfig.compile`: the training forward and backward through `torch.compile`.

    The first training batch decides (`compile_or_eager`, on that batch, inside autocast so
    the trial compiles the graph training runs); under DDP every rank must succeed. A failure
    warns and the run trains eagerly. Validation stays eager: a second graph (eval mode, no
    grad) would cost another compile for a small share of the time.
    """

    order = 12  # after MixedPrecision (10) entered autocast and _DDP (11) wrapped the model

    def __init__(self) -> None:
        self.outcome: str | None = None  # "compiled", or why not

    def before_fit(self) -> None:
        self.eager, self.compiled = self.learn.model, None

    def before_train(self) -> None:
        if self.compiled is not None:
            self.learn.model = self.compiled

    def before_batch(self) -> None:
        if self.learn.training and self.outcome is None:
            self._decide()

    def _decide(self) -> None:
        def trial(model: nn.Module) -> None:
            self.learn.loss_func(model(*self.learn.xb), *self.learn.yb).backward()

        compiled, error = compile_or_eager(self.eager, trial)
        if all(ok for ok in _gather(error is None)):
            self.outcome, self.compiled, self.learn.model = "compiled", compiled, compiled
            return
        self.outcome = error or "compiling failed on another rank"
        warnings.warn(f"torch.compile failed, training eagerly instead: {self.outcome}",
                      stacklevel=2)

    def before_validate(self) -> None:
        self.learn.model = self.eager

    def after_fit(self) -> None:
        self.learn.model = unwrap_model(self.eager)


def _is_cnn(model: nn.Module) -> bool:
    """More than one convolution: a CNN (a ViT has one, its patch projection)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def cnn_fast_path(setting: bool | None, model: nn.Module, device: torch.device) -> bool:
    """An explicit setting, or auto: on for CNNs on CUDA (channels-last convolutions run on
    tensor cores without layout transposes; autotuning pays when shapes never change)."""
    return setting if setting is not None else device.type == "cuda" and _is_cnn(model)


@contextlib.contextmanager
def cudnn_benchmark(on: bool):
    """cuDNN's autotuner for the fit only; the process-wide flag is restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _channels_last(x: Any) -> Any:
    if torch.is_tensor(x) and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


# ----------------------------------------------------------------------------- batches

@dataclass
class _Replay:
    """How to re-enter an epoch: RNG as the epoch's first batch was drawn, batches done, RNG
    at the checkpoint (None where the world size changed and the states do not apply)."""

    epoch_rng: dict | None
    batches: int
    rng: dict | None


class _EpochBatches(GetAttr):
    """The training batches, seen by fastai; sets the loader's epoch and replays a resumed one.

    On resume the RNG is put back to its state when the epoch began, the batches already done
    are drawn and dropped (so a torch DataLoader's shuffle and worker seeds come out the same),
    then the RNG of the checkpoint is restored: the rest of the epoch is identical. The dropped
    batches are still read (CacheBatches gathers each), so a resume late in a long epoch first
    re-reads what that epoch had read.
    """

    _default = "dl"

    def __init__(self, dl: Iterable, replay: _Replay | None) -> None:
        self.dl, self.replay, self.epoch, self.rng_at_start = dl, replay, 0, None

    def __len__(self) -> int:
        return len(self.dl)

    def __iter__(self):
        if hasattr(self.dl, "set_epoch"):
            self.dl.set_epoch(self.epoch)
        replay, self.replay = self.replay, None
        if replay is not None and replay.epoch_rng is not None:
            set_rng_state(replay.epoch_rng)
        self.rng_at_start = rng_state()
        batches = iter(self.dl)
        if replay is not None:
            for i in range(replay.batches):
                if next(batches, None) is None:
                    raise ValueError(f"cannot resume: the train batches ended after {i} of the "
                                     f"{replay.batches} batches the checkpoint had done")
            if replay.rng is not None and replay.batches > 0:  # at 0 it is `epoch_rng`, and
                set_rng_state(replay.rng)  # a loader may draw lazily, at its first batch
        yield from batches


def _check_batches(dl: Any, name: str) -> None:
    if not (hasattr(dl, "__iter__") and hasattr(dl, "__len__")):
        raise TypeError(f"{name} must be an iterable of (inputs, targets) batches with len(), "
                        f"got {type(dl).__name__}")
    if len(dl) == 0:
        raise ValueError(f"{name} has no batches (len 0): is the data set smaller than one "
                         "batch with drop_last=True?")


def _check_fills_a_batch(dl: Any, batch_size: int) -> None:
    """Refuse a training set smaller than one batch: each epoch would be a single short step
    (the first at warm-up's learning rate 0), a run that trains nothing and says it did. A
    loader tells its images per pass by `draws` (CacheBatches does)."""
    images = getattr(dl, "draws", None)
    if isinstance(images, int) and images < batch_size:
        raise ValueError(f"train_dl: the training images ({images}) do not fill one batch of "
                         f"{batch_size}, so every epoch would be one short step; use a batch "
                         f"size of at most {images}")


def _shard(dl: Any, rank: int, world: int, name: str) -> Any:
    if world == 1:
        return dl
    if not hasattr(dl, "shard"):
        raise TypeError(f"{name} ({type(dl).__name__}) has no shard(rank, world_size): under "
                        "torchrun each rank must read its own share of the batches")
    return dl.shard(rank, world)


def _check_even(dl: Any, name: str) -> None:
    """Every rank must train on as many batches as the others: DDP's gradient all-reduce
    waits for all of them, so a rank with one more batch would hang the job."""
    counts = _gather(len(dl))
    if len(set(counts)) > 1:
        raise ValueError(f"{name} gives the ranks different numbers of batches ({counts}): "
                         "under DDP every rank must train on as many as the others (use "
                         "drop_last=True, or a size that divides into whole global batches)")


class _Inputs(Callback):
    """Checks the first batch and applies the batch transforms (before autocast begins);
    with `channels_last`, image batches are laid out channels-last for the CNN."""

    order = 5  # before MixedPrecision (10): augmentation runs in fp32

    def __init__(self, train_tfm: Callable | None, valid_tfm: Callable | None,
                 batch_size: int, world: int, channels_last: bool = False) -> None:
        self.train_tfm, self.valid_tfm, self.batch_size, self.world = (
            train_tfm, valid_tfm, batch_size, world)
        self.channels_last = channels_last

    def before_batch(self) -> None:
        if self.learn.iter == 0:
            self._check()
        tfm = self.train_tfm if self.learn.training else self.valid_tfm
        if tfm is not None:
            xb = self.learn.xb
            self.learn.xb = (tfm(xb[0]), *xb[1:])
        if self.channels_last:
            self.learn.xb = tuple(_channels_last(x) for x in self.learn.xb)

    def _check(self) -> None:
        if not self.learn.yb:
            raise ValueError("batches must be (inputs, targets) tuples; got a single tensor "
                             "per batch (a model that computes its own loss still needs the "
                             "targets slot: yield (images, labels))")
        got = find_bs(self.learn.xb) * self.world
        if self.learn.training and got != self.batch_size:
            warnings.warn(f"the first train batch holds {got} images over {self.world} rank(s) "
                          f"but TrainConfig.batch_size is {self.batch_size}; the learning rate "
                          "is scaled from the config value", stacklevel=2)


# ----------------------------------------------------------------------------- run state

@dataclass
class _RunState:
    """What a checkpoint carries besides model and optimizer, to continue a run exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress, or next to start
    batch: int = 0  # batches of `epoch` done
    history: list = field(default_factory=list)  # one dict per finished epoch
    elapsed: float = 0.0  # wall seconds of finished epochs
    epoch_loss: float = 0.0  # of the unfinished epoch: train loss x images, summed over ranks
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    best: float | None = None
    best_epoch: int | None = None
    start_loss: float | None = None  # chance_loss, else step 1's (see DIVERGED_RISE)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _NanGuard(Callback):
    """Stops the run at a non-finite loss, before the optimizer applies it (when checked).

    A flag accumulates on the device every step; it is read (one host sync) every `every`
    steps and before every checkpoint, so a broken state is never saved.
    """

    order, run_valid = 20, False  # after MixedPrecision (10) has left autocast

    def __init__(self, every: int) -> None:
        self.every = every

    def before_fit(self) -> None:
        self.flag, self.checked, self.current = None, self.learn.train_iter, self.learn.train_iter

    def after_loss(self) -> None:
        bad = ~torch.isfinite(self.learn.loss.detach()).all()
        self.flag = bad if self.flag is None else self.flag | bad
        self.current = self.learn.train_iter + 1  # 1-based number of this step
        if self.current % self.every == 0:
            self.check()

    def check(self) -> None:
        if self.flag is None:
            return
        if _sum_ranks(self.flag)[0] > 0:
            raise TrainingDiverged(self.current, float(self.learn.loss.detach()), self.checked)
        self.flag, self.checked = None, self.current


def _finite(model: torch.nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


class _Recorder(Callback):
    """Per-epoch history, atomic checkpoints, best weights; replaces fastai's Recorder.

    Train and valid losses are summed on the device and read once per phase; images/s is
    the train phase's images (all ranks) over its wall time.
    """

    order = 80  # after the metrics (70), so an epoch's row has them

    def __init__(self, run_state: _RunState, config: TrainConfig, path: Path,
                 guard: _NanGuard, batches: _EpochBatches, writer: bool) -> None:
        self.run_state, self.config, self.path = run_state, config, path
        self.guard, self.batches, self.writer = guard, batches, writer
        self.start_epoch, self.saved_step = run_state.epoch, run_state.step
        self.saved_at = time.perf_counter()

    def before_train(self) -> None:
        s = self.run_state
        first = not _ddp() or dist.get_rank() == 0  # the restored sums already cover all ranks
        self.train_sum = s.epoch_loss if first else 0.0
        self.images = s.epoch_images if first else 0
        self.seconds_before, self.t0 = s.epoch_seconds, time.perf_counter()

    def before_validate(self) -> None:
        self.valid_sum, self.valid_n = 0.0, 0

    def after_batch(self) -> None:
        bs = find_bs(self.learn.yb)
        loss = self.learn.loss.detach().float() * bs
        if not self.learn.training:
            self.valid_sum, self.valid_n = self.valid_sum + loss, self.valid_n + bs
            return
        self.train_sum, self.images = self.train_sum + loss, self.images + bs
        s = self.run_state
        s.step, s.batch = self.learn.train_iter, self.learn.iter + 1
        if s.start_loss is None:
            s.start_loss = float(self.learn.loss.detach())  # one host sync in the whole run
        if s.step % self.config.checkpoint_every == 0 and s.batch < len(self.learn.dl):
            self._save(end_of_epoch=False)

    def after_train(self) -> None:
        # rank 0's clock decides, in the same collective, whether this epoch's end checkpoints
        due = self.writer and (time.perf_counter() - self.saved_at
                               >= 60 * self.config.checkpoint_minutes)
        total, images, due = _sum_ranks(self.train_sum, self.images, due)
        self.save_due = due > 0
        self.train_loss = total / max(images, 1)
        self.train_seconds = self.seconds_before + time.perf_counter() - self.t0
        self.images_per_s = images / self.train_seconds

    def after_validate(self) -> None:
        total, n = _sum_ranks(self.valid_sum, self.valid_n)
        self.valid_loss = total / n if n else math.nan

    def after_epoch(self) -> None:
        if self.learn.epoch < self.start_epoch:  # finished before this restart
            return
        s = self.run_state
        s.elapsed += self.seconds_before + time.perf_counter() - self.t0  # train + valid
        row = {"epoch": self.learn.epoch, "step": s.step, "train_loss": self.train_loss,
               "valid_loss": self.valid_loss,
               "lr": float(self.learn.scheduled_lr), "images_per_s": self.images_per_s,
               "elapsed_s": s.elapsed}
        for cb in self.learn.cbs:
            if isinstance(cb, EpochMetric):
                row[cb.metric_name] = float(cb.value)
        s.history.append(row)
        s.epoch, s.batch, s.epoch_loss, s.epoch_images, s.epoch_seconds = (
            self.learn.epoch + 1, 0, 0.0, 0, 0.0)
        if self.writer:
            runs.write_history(s.history, self.path)
        self._keep_best(row)
        every = self.config.checkpoint_every
        if (self.learn.epoch == self.learn.n_epoch - 1 or self.save_due
                or s.step // every > self.saved_step // every):
            self._save(end_of_epoch=True)  # the last, one due by time, or one due at this step

    def _keep_best(self, row: dict) -> None:
        name, s = self.config.keep_best, self.run_state
        if name is None or not math.isfinite(row[name]):
            return
        sign = -1.0 if name.endswith("loss") else 1.0
        if s.best is None or sign * row[name] > sign * s.best:
            s.best, s.best_epoch = row[name], row["epoch"]
            if self.writer:
                runs.atomic_save({"model": unwrap_model(self.learn.model).state_dict(),
                                  "epoch": row["epoch"], name: row[name]}, self.path / runs.BEST)

    def _save(self, end_of_epoch: bool) -> None:
        """Checkpoint, unless the state is broken: then the last good one stays on disk."""
        self.guard.check()
        if not _finite(self.learn.model):
            guard = self.guard
            raise TrainingDiverged(guard.current, float(self.learn.loss.detach()), guard.checked)
        s = self.run_state
        if not end_of_epoch:
            s.epoch_loss, s.epoch_images = _sum_ranks(self.train_sum, self.images)
            s.epoch_images = int(s.epoch_images)
            s.epoch_seconds = self.seconds_before + time.perf_counter() - self.t0
        rng = _gather(rng_state())
        epoch_rng = rng if end_of_epoch else _gather(self.batches.rng_at_start)
        if self.writer:
            runs.atomic_save({"model": unwrap_model(self.learn.model).state_dict(),
                              "opt": self.learn.opt.state_dict(), "state": s.to_dict(),
                              "rng": rng, "epoch_rng": epoch_rng}, self.path / runs.CHECKPOINT)
        self.saved_step, self.saved_at = s.step, time.perf_counter()


def progress_columns(metrics: Sequence[str], validates: bool) -> list[str]:
    """The epoch table's columns: epoch, losses, the `metrics` (e.g. valid_auc) and learning
    rate, so that it fits a page; valid_loss only for a run with validation data (else it is
    NaN). Steps, throughput and time stay in the history."""
    return ["epoch", "train_loss", *(["valid_loss"] if validates else []), *metrics, "lr"]


class _Progress(Callback):
    """fastprogress bars (HTML in notebooks) and the epoch table; no per-batch host sync."""

    order = 85  # after the recorder has written the epoch's row

    def __init__(self, run_state: _RunState, validates: bool) -> None:
        self.run_state, self.validates = run_state, validates

    def before_fit(self) -> None:
        self.mbar, self.header, self.pbar = master_bar(range(self.learn.n_epoch)), False, None
        self.mbar.update(0)  # starts its clock: a resumed run enters at a later epoch
        self.columns = progress_columns([cb.metric_name for cb in self.learn.cbs
                                         if isinstance(cb, EpochMetric)], self.validates)

    def before_epoch(self) -> None:
        self.mbar.update(self.learn.epoch)

    def before_train(self) -> None:
        self._launch()

    def before_validate(self) -> None:
        self._launch()

    def _launch(self) -> None:
        n = len(self.learn.dl)
        self.pbar = progress_bar(range(n), parent=self.mbar, leave=False) if n else None
        if self.pbar is not None:
            self.pbar.update(0)

    def after_batch(self) -> None:
        self.pbar.update(self.learn.iter + 1)

    def after_train(self) -> None:
        self._close()

    def after_validate(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.pbar is not None:
            self.pbar.on_iter_end()

    def after_epoch(self) -> None:
        history = self.run_state.history
        if not history or history[-1]["epoch"] != self.learn.epoch:
            return  # an epoch finished before a restart
        if not self.header:
            self.mbar.write(self.columns, table=True)
            self.header = True
        self.mbar.write([f"{v:.6g}" if isinstance(v, float) else str(v)
                         for v in (history[-1][k] for k in self.columns)], table=True)

    def after_fit(self) -> None:
        self.mbar.on_iter_end()


class _Resume(Callback):
    """Skips the epochs a restarted run finished, and restores fastai's counters (global step,
    `pct_train`, batch index) for the epoch it re-enters."""

    order = -5  # after TrainEvalCallback (-10), which zeroes the counters

    def __init__(self, run_state: _RunState, batches: _EpochBatches) -> None:
        self.run_state, self.batches = run_state, batches
        self.epoch0, self.batch0, self.step0 = run_state.epoch, run_state.batch, run_state.step

    def before_fit(self) -> None:
        self.learn.train_iter = self.step0

    def before_epoch(self) -> None:
        if self.learn.epoch < self.epoch0:
            raise CancelEpochException

    def before_train(self) -> None:
        self.batches.epoch = self.learn.epoch
        self.offset = self.batch0 if self.learn.epoch == self.epoch0 else 0
        self.learn.pct_train += self.offset / (len(self.learn.dl) * self.learn.n_epoch)

    def before_batch(self) -> None:
        if self.learn.training:
            self.learn.iter += self.offset


# ----------------------------------------------------------------------------- fit

def _precision_callbacks(precision: str, device: torch.device) -> list[Callback]:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return []
    if device.type != "cuda":
        raise ValueError(f"precision {precision!r} needs a CUDA device, training is on {device}; "
                         "use 'auto' or 'fp32'")
    return [MixedPrecision(amp_mode=AMPMode(precision))]


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


def _read_checkpoint(file: Path, **kwargs) -> dict:
    """A checkpoint file as CPU tensors; a damaged or unsafe one (refused by
    `weights_only=True`, so it runs no code) is a one-line ValueError naming the file."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, **kwargs)
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{file}: unreadable checkpoint ({first_line}); delete the run folder "
                         f"{file.parent} to train it again") from None


def _load(path: Path) -> dict | None:
    """A run's checkpoint (CPU tensors), or None when it has none."""
    file = path / runs.CHECKPOINT
    return _read_checkpoint(file) if file.exists() else None


def _load_weights(model: torch.nn.Module, path: Path, config: TrainConfig) -> None:
    """The run's best weights (with `keep_best`, when an epoch had a finite value) or final."""
    best = path / runs.BEST
    file = best if config.keep_best and best.exists() else path / runs.CHECKPOINT
    state = _read_checkpoint(file, mmap=True)
    unwrap_model(model).load_state_dict(state["model"])


def _replay(ckpt: dict | None, rank: int, world: int) -> _Replay | None:
    if ckpt is None:
        return None
    batches = ckpt["state"]["batch"]
    if len(ckpt["rng"]) != world:
        warnings.warn(f"the checkpoint was written by {len(ckpt['rng'])} rank(s), this run has "
                      f"{world}: it resumes, but not bit-exactly", stacklevel=3)
        return _Replay(None, batches, None)
    return _Replay(ckpt["epoch_rng"][rank], batches, ckpt["rng"][rank])


def _metrics(s: _RunState, config: TrainConfig, path: Path, world: int,
             device: torch.device, compiler: _Compile | None) -> dict:
    last = s.history[-1] if s.history else {}
    diverged = rise_note(s.start_loss, last.get("train_loss", math.nan))
    out = {"status": "diverged" if diverged else "done", "steps": s.step,
           "elapsed_s": s.elapsed, "world_size": world, "device": device.type, "run": path.name,
           **{k: v for k, v in last.items() if k not in ("epoch", "step", "elapsed_s")}}
    if compiler is not None:
        out["compile"] = compiler.outcome
    if config.keep_best:
        out.update({f"best_{config.keep_best}": s.best, "best_epoch": s.best_epoch})
    if diverged:
        out["diverged"] = diverged
    return out


def _warn_if_diverged(metrics: dict, path: Path) -> dict:
    if metrics.get("status") == "diverged":
        warnings.warn(f"{path.name}: {metrics['diverged']}", stacklevel=3)
    return metrics


def fit(model: torch.nn.Module, train_dl: Iterable, valid_dl: Iterable | None = None,
        config: TrainConfig | None = None, run_root: str | Path = "runs", kind: str = "train",
        *, loss_func: Callable | None = None, batch_tfm: Callable | None = None,
        valid_tfm: Callable | None = None, cbs: Sequence[Callback] = (),
        param_groups: Sequence[dict] | None = None, force: bool = False,
        progress: bool = True) -> RunResult:
    """Train `model` in the run folder `run_root/<kind>-<hash of config>`, or load it.

    A finished run loads its final weights (or the best, with `keep_best`) into `model`; an
    unfinished one resumes from its checkpoint; `force=True` trains again from scratch.
    `loss_func(pred, *targets)` is required: `model_loss` for a model that returns its own loss
    first. `batch_tfm` / `valid_tfm` map the input tensor of a train / valid batch on the
    device (uint8 -> augmented float). `param_groups`: dicts with `params` and optionally
    `lr_scale` and `weight_decay` (timm's `param_groups_layer_decay`); the schedule's lr is
    multiplied by each group's `lr_scale`. `cbs` are extra fastai callbacks (e.g. `ValidAUC()`).
    """
    config = config or TrainConfig()
    config.check()
    if loss_func is None:
        raise ValueError("fit needs a loss_func(pred, *targets); pass model_loss for a model "
                         "whose forward returns its own loss first (like MAE)")
    _check_batches(train_dl, "train_dl")
    _check_fills_a_batch(train_dl, config.batch_size)
    if valid_dl is not None:
        _check_batches(valid_dl, "valid_dl")
    metric_names = {cb.metric_name for cb in cbs if isinstance(cb, EpochMetric)}
    if config.keep_best not in {None, "train_loss", "valid_loss", *metric_names}:
        raise ValueError(f"TrainConfig.keep_best={config.keep_best!r} is not a history column; "
                         "pass the callback that computes it in cbs (e.g. ValidAUC())")
    rank, world = _distributed()
    path = runs.run_dir(run_root, kind, config.identity(), create=rank == 0)
    _barrier()
    if force:
        if rank == 0:
            runs.clear_run(path)
        _barrier()
    elif runs.is_finished(path):
        _load_weights(model, path, config)
        metrics = _warn_if_diverged(runs.read_metrics(path), path)
        return RunResult(path, runs.read_history(path), metrics, loaded_from_cache=True)
    if rank == 0:
        runs.remove_stale_temps(path)
    ckpt = _load(path)
    s = _RunState(**ckpt["state"]) if ckpt else _RunState()
    if s.start_loss is None:
        s.start_loss = getattr(unwrap_model(model), "chance_loss", None)
    set_seed(config.seed + rank)
    device = default_device()
    model.to(device)  # before the optimizer state is loaded, so it lands on the same device
    channels_last = cnn_fast_path(config.channels_last, model, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    train_shard = _shard(train_dl, rank, world, "train_dl")
    _check_even(train_shard, "train_dl")
    batches = _EpochBatches(train_shard, _replay(ckpt, rank, world))
    valid = _shard(valid_dl, rank, world, "valid_dl") if valid_dl is not None else []
    guard = _NanGuard(config.nan_check_every)
    engine = [TrainEvalCallback(), _Resume(s, batches), _Schedule(config),
              _Inputs(batch_tfm, valid_tfm, config.batch_size, world, channels_last), guard,
              _Recorder(s, config, path, guard, batches, writer=rank == 0),
              *_precision_callbacks(config.precision, device)]
    if config.grad_clip:
        engine.append(GradientClip(config.grad_clip))
    if world > 1:
        engine.append(_DDP())
    compiler = _Compile() if config.compile else None
    if compiler is not None:
        engine.append(compiler)
    if progress and rank == 0:
        engine.append(_Progress(s, validates=valid_dl is not None))
    groups = _param_groups(model, config, param_groups)
    learn = Learner(DataLoaders(batches, valid), model, loss_func=loss_func,
                    opt_func=_optimizer(config, device), lr=config.lr, splitter=lambda _: groups,
                    wd=None, cbs=[*engine, *cbs], path=path, default_cbs=False)
    learn.create_opt()
    if ckpt:
        unwrap_model(model).load_state_dict(ckpt["model"])
        learn.opt.load_state_dict(ckpt["opt"])
    try:
        with cudnn_benchmark(cnn_fast_path(config.cudnn_benchmark, model, device)):
            learn.fit(config.epochs)
    except TrainingDiverged as err:
        raise TrainingDiverged(err.step, err.loss, err.since, path) from None
    metrics = _warn_if_diverged(_metrics(s, config, path, world, device, compiler), path)
    if rank == 0:
        runs.write_metrics(metrics, path)
    _barrier()
    if config.keep_best:
        _load_weights(model, path, config)
    return RunResult(path, pd.DataFrame(s.history), metrics, loaded_from_cache=False,
                     resumed_from_step=ckpt["state"]["step"] if ckpt else None)

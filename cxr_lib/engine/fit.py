"""The one training engine of the study: a fastai `Learner`, our callbacks, and a run folder.

Chapters 2, 3, 4 and 6 all train through `fit`. It trains a model in a run folder named by the
hash of its `TrainConfig` (see `cxr_lib.engine.runs`): a finished run is loaded instead of
trained, an unfinished one resumes from its last checkpoint and ends with the same weights, bit
for bit, as a run that was never interrupted (same device and thread count).

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

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from fastai.callback.core import (
    Callback,
    TrainEvalCallback,
)
from fastai.callback.training import GradientClip
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.torch_core import default_device, set_seed
from timm.utils import unwrap_model

from cxr_lib.device import barrier, distributed, gather
from cxr_lib.engine import runs
from cxr_lib.engine.callbacks import _DDP, _Inputs, _NanGuard, _Progress, _Recorder
from cxr_lib.engine.config import (
    DivergedWarning,
    RunResult,
    TrainConfig,
    TrainingDiverged,
    rise_note,
)
from cxr_lib.engine.fastpath import _Compile, _precision_callbacks, cnn_fast_path, cudnn_benchmark
from cxr_lib.engine.metrics import EpochMetric
from cxr_lib.engine.resume import (
    _EpochBatches,
    _load,
    _replay,
    _Resume,
    _RunState,
    load_run_weights,
)
from cxr_lib.engine.schedule import _optimizer, _param_groups, _Schedule


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
    counts = gather(len(dl))
    if len(set(counts)) > 1:
        raise ValueError(f"{name} gives the ranks different numbers of batches ({counts}): "
                         "under DDP every rank must train on as many as the others (use "
                         "drop_last=True, or a size that divides into whole global batches)")


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
        warnings.warn(f"{path.name}: {metrics['diverged']}", DivergedWarning, stacklevel=3)
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
    rank, world = distributed()
    path = runs.run_dir(run_root, kind, config.identity(), create=rank == 0)
    barrier()
    if force:
        if rank == 0:
            runs.clear_run(path)
        barrier()
    elif runs.is_finished(path):
        load_run_weights(model, path, keep_best=bool(config.keep_best))
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
    barrier()
    if config.keep_best:
        load_run_weights(model, path)
    return RunResult(path, pd.DataFrame(s.history), metrics, loaded_from_cache=False,
                     resumed_from_step=ckpt["state"]["step"] if ckpt else None)

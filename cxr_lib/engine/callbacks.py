"""The engine's own fastai callbacks: batches onto the device, the NaN guard, the recorder
(history, checkpoints, best weights), the progress display, and DDP."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from fastai.callback.core import (
    Callback,
)
from fastai.torch_core import find_bs
from fastprogress.fastprogress import master_bar, progress_bar
from timm.utils import unwrap_model
from torch.nn.parallel import DistributedDataParallel

from cxr_lib.device import gather, is_ddp, sum_ranks
from cxr_lib.engine import runs
from cxr_lib.engine.config import TrainConfig, TrainingDiverged
from cxr_lib.engine.fastpath import _channels_last
from cxr_lib.engine.metrics import EpochMetric
from cxr_lib.engine.order import ORDER
from cxr_lib.engine.resume import _EpochBatches, _RunState, rng_state


class _DDP(Callback):
    """Wraps the model in DistributedDataParallel for the fit (as fastai's DistributedTrainer,
    without its `accelerate` dependency and its fastai-DataLoader-only sharding)."""

    order = ORDER["ddp"]

    def before_fit(self) -> None:
        device = next(self.learn.model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        self.learn.model = DistributedDataParallel(self.learn.model, device_ids=ids)

    def after_fit(self) -> None:
        self.learn.model = unwrap_model(self.learn.model)


class _Inputs(Callback):
    """Checks the first batch and applies the batch transforms (before autocast begins);
    with `channels_last`, image batches are laid out channels-last for the CNN."""

    order = ORDER["inputs"]

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


class _NanGuard(Callback):
    """Stops the run at a non-finite loss, before the optimizer applies it (when checked).

    A flag accumulates on the device every step; it is read (one host sync) every `every`
    steps and before every checkpoint, so a broken state is never saved.
    """

    order, run_valid = ORDER["nan_guard"], False

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
        if sum_ranks(self.flag)[0] > 0:
            raise TrainingDiverged(self.current, float(self.learn.loss.detach()), self.checked)
        self.flag, self.checked = None, self.current


def _finite(model: torch.nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


class _Recorder(Callback):
    """Per-epoch history, atomic checkpoints, best weights; replaces fastai's Recorder.

    Train and valid losses are summed on the device and read once per phase; images/s is
    the train phase's images (all ranks) over its wall time.
    """

    order = ORDER["recorder"]

    def __init__(self, run_state: _RunState, config: TrainConfig, path: Path,
                 guard: _NanGuard, batches: _EpochBatches, writer: bool) -> None:
        self.run_state, self.config, self.path = run_state, config, path
        self.guard, self.batches, self.writer = guard, batches, writer
        self.start_epoch, self.saved_step = run_state.epoch, run_state.step
        self.saved_at = time.perf_counter()

    def before_train(self) -> None:
        s = self.run_state
        first = not is_ddp() or dist.get_rank() == 0  # the restored sums already cover all ranks
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
        total, images, due = sum_ranks(self.train_sum, self.images, due)
        self.save_due = due > 0
        self.train_loss = total / max(images, 1)
        self.train_seconds = self.seconds_before + time.perf_counter() - self.t0
        self.images_per_s = images / self.train_seconds

    def after_validate(self) -> None:
        total, n = sum_ranks(self.valid_sum, self.valid_n)
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
            s.epoch_loss, s.epoch_images = sum_ranks(self.train_sum, self.images)
            s.epoch_images = int(s.epoch_images)
            s.epoch_seconds = self.seconds_before + time.perf_counter() - self.t0
        rng = gather(rng_state())
        epoch_rng = rng if end_of_epoch else gather(self.batches.rng_at_start)
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

    order = ORDER["progress"]

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

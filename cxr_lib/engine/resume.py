"""Exact resume: the RNG states, the checkpoint, and the replay of an interrupted epoch's
remaining batches."""

from __future__ import annotations

import dataclasses
import random
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import (
    Callback,
    CancelEpochException,
)
from fastcore.basics import GetAttr
from timm.utils import unwrap_model

from cxr_lib.engine import runs
from cxr_lib.engine.order import ORDER


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


class _Resume(Callback):
    """Skips the epochs a restarted run finished, and restores fastai's counters (global step,
    `pct_train`, batch index) for the epoch it re-enters."""

    order = ORDER["resume"]

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


def _read_checkpoint(file: Path, **kwargs) -> dict:
    """A checkpoint file as CPU tensors; a damaged or unsafe one (refused by
    `weights_only=True`, so it runs no code) is a one-line ValueError naming the file."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, **kwargs)
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{file}: unreadable checkpoint ({first_line}); delete the run folder "
                         f"{file.parent} to train it again") from None


def load_run_weights(model: torch.nn.Module, path: str | Path, *, keep_best: bool = True
                     ) -> torch.nn.Module:
    """Load a finished run's kept weights into `model` (its DDP or compile wrapper unwrapped)
    and return it: `best.pt` where the run kept its best epoch (`keep_best`, and an epoch had
    a finite value), else the final `last.pt`. The one loader of a run's weights: the engine
    uses it for a finished run, fine-tuning's `load_finetuned` for a classifier."""
    path = Path(path)
    best = path / runs.BEST
    file = best if keep_best and best.exists() else path / runs.CHECKPOINT
    unwrap_model(model).load_state_dict(_read_checkpoint(file, mmap=True)["model"])
    return model


def _load(path: Path) -> dict | None:
    """A run's checkpoint (CPU tensors), or None when it has none."""
    file = path / runs.CHECKPOINT
    return _read_checkpoint(file) if file.exists() else None


def _replay(ckpt: dict | None, rank: int, world: int) -> _Replay | None:
    if ckpt is None:
        return None
    batches = ckpt["state"]["batch"]
    if len(ckpt["rng"]) != world:
        warnings.warn(f"the checkpoint was written by {len(ckpt['rng'])} rank(s), this run has "
                      f"{world}: it resumes, but not bit-exactly", stacklevel=3)
        return _Replay(None, batches, None)
    return _Replay(ckpt["epoch_rng"][rank], batches, ckpt["rng"][rank])

"""A run's identity and outcome: `TrainConfig` (everything that changes the weights is hashed
into the run folder's name), `RunResult`, and what a diverged run says."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cxr_lib.engine import runs

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


class DivergedWarning(UserWarning):
    """A run ended with finite losses far above the one it started from (`rise_note` says
    what to change); the run folder keeps it, marked diverged."""


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

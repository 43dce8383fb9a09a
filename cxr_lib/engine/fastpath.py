"""The GPU fast path: `torch.compile` with an eager fallback, channels-last CNNs with cuDNN's
autotuner, and mixed precision. Operational settings: they change how fast, not what is
trained."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from fastai.callback.core import (
    Callback,
)
from fastai.callback.fp16 import AMPMode, MixedPrecision
from timm.utils import unwrap_model
from torch import nn

from cxr_lib.device import gather
from cxr_lib.engine.order import ORDER


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

    order = ORDER["compile"]

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
        if all(ok for ok in gather(error is None)):
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


def _precision_callbacks(precision: str, device: torch.device) -> list[Callback]:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return []
    if device.type != "cuda":
        raise ValueError(f"precision {precision!r} needs a CUDA device, training is on {device}; "
                         "use 'auto' or 'fp32'")
    return [MixedPrecision(amp_mode=AMPMode(precision))]

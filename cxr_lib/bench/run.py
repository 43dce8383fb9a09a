"""`cxr bench`: how fast the study trains, against the way the papers' code feeds the same model.

Each task (a model and its recipe) is trained three ways in one process, same model, same batch:

1. reference, the papers' code path: PNG files at ChestX-ray14's 1024 x 1024 decoded by PIL in
   DataLoader worker processes, torchvision transforms per image on the CPU, eager PyTorch with
   fp16 autocast and a gradient scaler, torch's default (foreach) optimizer, and the loss read
   every step (`loss.item()`, as their logging does). On a CPU: fp32.
2. ours, the study's engine: `cxr_lib.engine.fit` on `CacheBatches` over a preprocessing cache of
   the same PNGs (decoded once, before the clock starts), resident on the GPU when it fits in
   half the free memory (else streamed through pinned buffers), the batched augmentation on the
   device, and the engine's defaults (bf16 autocast, fused optimizer, channels-last CNNs...).
3. step, the model step alone: the engine's precision, optimizer and compile setting on a
   synthetic batch already on the device. The ceiling of (2): the gap is data, augmentation and
   engine overhead.

Reported per task and pipeline: images/s over `steps` steps after `warmup` (the device
synchronised at both ends of the clock), speed-up over the reference, share of the step-alone
speed, FLOPs per image of one training step (forward and backward, counted once with
`torch.utils.flop_counter.FlopCounterMode`; only matrix products, convolutions and attention
count), the achieved TFLOP/s and its share of the device's dense bf16/fp16 peak, peak device
memory (for ours it includes the resident cache), and host syncs per step (CUDA: torch's sync
debug mode over warm-up steps 2..warmup). Without real PNGs (`png_dir`) it writes synthetic
phantoms at `png_size`; they decode slightly faster than real NIH files (smaller PNGs), which
flatters the reference. On a CPU it runs with tiny sizes, to check it works.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import random
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from PIL import Image, ImageFilter, UnidentifiedImageError
from timm.models.densenet import DenseNet
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2

from cxr_lib.augment.crops import PAPER_MAE_CROP_SCALE, FinetuneAugment, MaeAugment
from cxr_lib.augment.randaugment import RandAugment, fill_level
from cxr_lib.augment.views import MocoAugment
from cxr_lib.bench.options import TASK_NAMES, BenchSettings, settings_from_args
from cxr_lib.bench.tables import PIPELINES, format_report
from cxr_lib.data.cache import Cache, prepare_cache
from cxr_lib.data.core import FINDINGS, DataError, XrayDataset, read_image_row
from cxr_lib.data.files import replacing
from cxr_lib.data.loaders import CacheBatches
from cxr_lib.data.phantoms import DRAWN, render_phantom
from cxr_lib.device import resolve_device
from cxr_lib.engine.config import TrainConfig
from cxr_lib.engine.fastpath import cnn_fast_path, compile_or_eager, cudnn_benchmark
from cxr_lib.engine.fit import fit
from cxr_lib.engine.metrics import masked_bce_loss, model_loss
from cxr_lib.engine.runs import atomic_write_text
from cxr_lib.engine.schedule import make_optimizer
from cxr_lib.methods.finetune import (
    FinetuneRecipe,
    layer_decay_groups,
    paper_config,
)
from cxr_lib.methods.moco import MocoRecipe, MomentumQueue, moco_config
from cxr_lib.models.classifier import build_classifier, is_vit
from cxr_lib.models.mae import PAPER_MASK_RATIO, build_mae
from cxr_lib.models.moco import MoCo

MEAN, STD = 0.5, 0.25  # normalisation (0..1 units); speed does not depend on it
# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, NVIDIA data sheets; first match
# of the name wins, so the specific names come before "H100".
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("A100", 312.0),
)


@dataclass
class Pipeline:
    """One way of training a task, measured."""

    images_per_s: float
    seconds: float  # of the timed steps
    peak_memory_gib: float | None  # None on a CPU
    syncs_per_step: float | None  # None on a CPU, or with fewer than 2 warm-up steps


@dataclass
class BenchResult:
    """A task's three pipelines and what follows from them."""

    task: str
    description: str
    device: str
    peak_tflops: float | None  # None: no known peak (a CPU, an unlisted GPU)
    batch_size: int
    image_size: int
    flops_per_image: float  # one training step, forward and backward
    pipelines: dict[str, Pipeline]
    notes: list[str] = field(default_factory=list)

    def derived(self, name: str) -> dict:
        """A pipeline's measurements with its speed-ups, TFLOP/s and share of the peak."""
        p = self.pipelines[name]
        tflops = self.flops_per_image * p.images_per_s / 1e12
        return {**dataclasses.asdict(p),
                "speedup_vs_reference": p.images_per_s / self.pipelines["reference"].images_per_s,
                "fraction_of_step": p.images_per_s / self.pipelines["step"].images_per_s,
                "tflops": tflops,
                "peak_fraction": tflops / self.peak_tflops if self.peak_tflops else None}

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "pipelines"}
        out["pipelines"] = {name: self.derived(name) for name in PIPELINES}
        return out


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named `device_name`, or None when it is not listed."""
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of `fn()` as FlopCounterMode counts them (matmul, conv,
    attention; a multiply-add is 2), forward and any backward it runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- PNGs and cache

def _write_png(path: Path, seed: int, size: int) -> None:
    findings = () if seed % 2 else (DRAWN[seed // 2 % len(DRAWN)],)
    with replacing(path, "wb") as f:  # a killed run leaves no half-written PNG
        Image.fromarray(render_phantom(seed, size, findings)).save(f, format="PNG")


def write_phantom_pngs(folder: str | Path, count: int, size: int = 1024,
                       workers: int = 1) -> list[Path]:
    """`count` synthetic chest X-rays (phantoms, half with one drawn finding) as 8-bit
    grayscale PNGs of size x size in `folder`; files already there are kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"phantom_{size}px_{i:04d}.png" for i in range(count)]
    todo = [(p, i) for i, p in enumerate(paths) if not p.exists()]
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(min(workers, len(todo))) as pool:
            list(pool.map(_write_png, [p for p, _ in todo], [i for _, i in todo],
                          [size] * len(todo)))
    else:
        for p, i in todo:
            _write_png(p, i, size)
    return paths


def png_files(settings: BenchSettings, work: Path) -> list[Path]:
    """The PNGs of `settings.png_dir`, or phantoms written under `work`."""
    if settings.png_dir is None:
        return write_phantom_pngs(work / f"png-{settings.png_size}px", settings.png_count,
                                  settings.png_size, settings.workers)
    files = sorted(Path(settings.png_dir).glob("*.png"))
    if not files:
        raise DataError(f"{settings.png_dir}: no .png files to benchmark with")
    return files


def _labels(n: int, seed: int) -> np.ndarray:
    """float32 [n, 14] made-up findings (10% positive): the losses need targets."""
    return (np.random.default_rng([seed, 11]).random((n, len(FINDINGS))) < 0.1).astype(np.float32)


def bench_cache(files: Sequence[Path], settings: BenchSettings, work: Path) -> Cache:
    """A preprocessing cache of the files, repeated to one row per image of the run
    (batch_size x (warmup + steps)), so the timed steps never cross an epoch's end."""
    rows = settings.batch_size * settings.total_steps
    ids = [f"png_{i:07d}" for i in range(rows)]
    meta = pd.DataFrame({"id": ids, "patient": ids, "split": "train", "source": "png",
                         "path": [str(files[i % len(files)]) for i in range(rows)]})
    labels = _labels(len(files), settings.seed)[np.arange(rows) % len(files)]
    dataset = XrayDataset("bench", list(FINDINGS), labels, meta, {"png": read_image_row})
    key = hashlib.sha1("\n".join(map(str, files)).encode()).hexdigest()[:10]
    out = work / f"cache-{settings.cache_px}px-{rows}-{key}"
    return prepare_cache(dataset, out, size=settings.cache_px, workers=max(1, settings.workers),
                         progress=False)


class PngFiles(Dataset):
    """Item i: (transform(file i decoded by PIL as 8-bit gray), labels [14]): the reference's
    per-image work, done in DataLoader worker processes."""

    def __init__(self, files: Sequence[Path], labels: np.ndarray, transform: Callable) -> None:
        self.files, self.labels, self.transform = list(files), torch.from_numpy(labels), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        try:
            with Image.open(self.files[i]) as img:
                gray = img.convert("L")
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"{self.files[i]}: cannot decode image ({err})") from err
        return self.transform(gray), self.labels[i]


# ----------------------------------------------------------------------------- transforms

def _pil_to_tensor() -> list:
    """PIL gray -> float [1, H, W], normalised: the end of every reference pipeline."""
    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([MEAN], [STD])]


@dataclass(frozen=True)
class PilBlur:
    """MoCo v2's blur: PIL's GaussianBlur with a radius drawn uniformly from `sigma`."""

    sigma: tuple[float, float] = (0.1, 2.0)

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


@dataclass(frozen=True)
class TwoViews:
    """Two independent draws of `transform`: [2, C, H, W] per image."""

    transform: Callable

    def __call__(self, img: Image.Image) -> Tensor:
        return torch.stack([self.transform(img), self.transform(img)])


# ----------------------------------------------------------------------------- tasks

class BenchTask(ABC):
    """A model and its recipe, trained three ways; subclasses supply the pieces."""

    name: str
    description: str

    @abstractmethod
    def build(self, s: BenchSettings) -> nn.Module:
        """The model, freshly initialised (the caller seeds torch)."""

    @abstractmethod
    def config(self, s: BenchSettings) -> TrainConfig:
        """The engine's config for one epoch of the run."""

    @abstractmethod
    def reference_transform(self, s: BenchSettings) -> Callable[[Image.Image], Tensor]:
        """PIL gray image -> model input of one image (the papers' per-image pipeline)."""

    @abstractmethod
    def engine_transform(self, s: BenchSettings) -> Callable[[Tensor], Tensor]:
        """uint8 [B, 1, S, S] cache batch on the device -> model input (the engine's)."""

    def loss(self, out: Any, targets: Tensor) -> Tensor:
        return model_loss(out)

    def param_groups(self, model: nn.Module, config: TrainConfig) -> list[dict] | None:
        return None  # the engine's default: no weight decay on biases and norms

    def callbacks(self) -> list[Callback]:
        return []

    def loader_input(self, x: Tensor) -> Tensor:
        """A DataLoader batch of the reference -> the model's input."""
        return x

    def synthetic_input(self, s: BenchSettings, batch: int, device: torch.device) -> Tensor:
        return torch.randn(batch, 1, s.image_size, s.image_size, device=device)

    def flop_batch(self, s: BenchSettings) -> int:
        """Images per FLOP count (the count is per image; a small batch keeps it cheap)."""
        return 2

    def after_step(self, model: nn.Module, out: Any) -> None:  # noqa: B027 (a no-op hook)
        """Work after the optimizer step that is no part of the gradient (MoCo's queue)."""


def _vit(s: BenchSettings) -> str:
    return s.model or ("vit_tiny_patch16" if s.tiny else "vit_small_patch16")


def _tiny_vit(model: nn.Module) -> nn.Module:
    """`tiny`: keep two of the encoder's blocks (timm's layer decay counts what is left)."""
    model.blocks = model.blocks[:2]
    return model


def _tiny_densenet(num_classes: int) -> nn.Module:
    """`tiny`: timm's DenseNet with one layer per dense block, growth rate 8."""
    return DenseNet(growth_rate=8, block_config=(1, 1, 1, 1), num_classes=num_classes,
                    in_chans=1)


@dataclass(frozen=True)
class MaeTask(BenchTask):
    """MAE pre-training: ViT encoder, 512-wide decoder, 90% of the patches masked."""

    name: str
    description: str
    decoder_depth: int

    def build(self, s: BenchSettings) -> nn.Module:
        width, heads = (64, 4) if s.tiny else (512, 16)
        mae = build_mae(_vit(s), img_size=s.image_size, mask_ratio=PAPER_MASK_RATIO,
                        decoder_dim=width, decoder_depth=self.decoder_depth, decoder_heads=heads)
        return _tiny_vit(mae) if s.tiny else mae

    def config(self, s: BenchSettings) -> TrainConfig:
        return TrainConfig(batch_size=s.batch_size, base_lr=1.5e-4, weight_decay=0.05,
                           betas=(0.9, 0.95), seed=s.seed)

    def reference_transform(self, s: BenchSettings) -> Callable:
        crop = v2.RandomResizedCrop(s.image_size, scale=PAPER_MAE_CROP_SCALE,
                                    interpolation=v2.InterpolationMode.BICUBIC)
        return v2.Compose([crop, v2.RandomHorizontalFlip(), *_pil_to_tensor()])

    def engine_transform(self, s: BenchSettings) -> Callable:
        return MaeAugment(s.image_size, scale=PAPER_MAE_CROP_SCALE, mean=MEAN, std=STD)


@dataclass(frozen=True)
class ClassifierTask(BenchTask):
    """Supervised fine-tuning over the 14 findings: chapter 4's recipe
    (`cxr_lib.methods.finetune`)."""

    name: str
    description: str
    recipe: FinetuneRecipe  # model (a ViT follows BenchSettings.model), augmentation, groups

    def _recipe(self, s: BenchSettings) -> FinetuneRecipe:
        model = _vit(s) if is_vit(self.recipe.model) else self.recipe.model
        return dataclasses.replace(self.recipe, model=model, image_size=s.image_size)

    def build(self, s: BenchSettings) -> nn.Module:
        r = self._recipe(s)
        if s.tiny and not is_vit(r.model):
            return _tiny_densenet(len(FINDINGS))
        net = build_classifier(r.model, img_size=r.image_size, drop_path=r.drop_path)[0]
        return _tiny_vit(net) if s.tiny else net

    def config(self, s: BenchSettings) -> TrainConfig:
        return paper_config(epochs=1, batch_size=s.batch_size, seed=s.seed, keep_best=None)

    def param_groups(self, model: nn.Module, config: TrainConfig) -> list[dict] | None:
        return layer_decay_groups(model, self.recipe, config.weight_decay)

    def loss(self, out: Tensor, targets: Tensor) -> Tensor:
        return masked_bce_loss(out, targets)

    def reference_transform(self, s: BenchSettings) -> Callable:
        steps = [v2.RandomResizedCrop(s.image_size, scale=self.recipe.crop_scale,
                                      interpolation=v2.InterpolationMode.BICUBIC),
                 v2.RandomHorizontalFlip()]
        magnitude = self.recipe.randaug_magnitude
        if magnitude is not None:  # torchvision's 31 bins: timm's m6 of 10 is bin 18
            steps.append(v2.RandAugment(num_ops=2, magnitude=round(magnitude * 3),
                                        fill=int(fill_level(MEAN))))
        return v2.Compose([*steps, *_pil_to_tensor()])

    def engine_transform(self, s: BenchSettings) -> Callable:
        magnitude = self.recipe.randaug_magnitude
        randaug = None if magnitude is None else RandAugment(magnitude, fill=fill_level(MEAN))
        return FinetuneAugment(s.image_size, self.recipe.crop_scale, MEAN, STD, randaug)


@dataclass(frozen=True)
class MocoTask(BenchTask):
    """MoCo v2 pre-training: query and momentum key encoders, two views, a 65,536-key queue."""

    name: str
    description: str
    backbone: str = "densenet121"

    def _recipe(self, s: BenchSettings) -> MocoRecipe:
        # 8 batch-norm groups of 32 at batch 256 (MoCo's 8 GPUs); fewer for small batches.
        return MocoRecipe(model=self.backbone, image_size=s.image_size,
                          bn_splits=max(1, min(8, s.batch_size // 32 or s.batch_size // 2)))

    def build(self, s: BenchSettings) -> nn.Module:
        recipe = self._recipe(s)
        if s.tiny:
            return MoCo(_tiny_densenet(0), dim=16, hidden_dim=32, queue_size=64,
                        bn_splits=recipe.bn_splits)
        return recipe.build()

    def config(self, s: BenchSettings) -> TrainConfig:
        return moco_config(1, s.batch_size, seed=s.seed)

    def param_groups(self, model: nn.Module, config: TrainConfig) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def callbacks(self) -> list[Callback]:
        return [MomentumQueue()]

    def reference_transform(self, s: BenchSettings) -> Callable:
        view = v2.Compose([v2.RandomResizedCrop(s.image_size, scale=(0.2, 1.0)),
                           v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                           v2.RandomGrayscale(p=0.2), v2.RandomApply([PilBlur()], p=0.5),
                           v2.RandomHorizontalFlip(), *_pil_to_tensor()])
        return TwoViews(view)

    def engine_transform(self, s: BenchSettings) -> Callable:
        return MocoAugment(s.image_size, mean=MEAN, std=STD)

    def loader_input(self, x: Tensor) -> Tensor:
        return x.transpose(0, 1)  # [B, 2, C, H, W] -> [2, B, C, H, W]

    def synthetic_input(self, s: BenchSettings, batch: int, device: torch.device) -> Tensor:
        return torch.randn(2, batch, 1, s.image_size, s.image_size, device=device)

    def flop_batch(self, s: BenchSettings) -> int:
        return 2 * self._recipe(s).bn_splits  # every batch-norm group needs two images

    def after_step(self, model: nn.Module, out: Any) -> None:
        model.momentum_update()
        model.enqueue(out[2].detach())


TASKS: dict[str, BenchTask] = {task.name: task for task in (
    *(MaeTask(name, f"MAE ViT-S/16, 512-wide {depth}-block decoder, mask {PAPER_MASK_RATIO:g}",
              depth) for name, depth in (("mae_vit_s", 2), ("mae_vit_s_8b", 8))),
    ClassifierTask("finetune_vit_s", "fine-tune ViT-S/16, RandAugment m6, drop path 0.2, "
                   "layer decay 0.55", FinetuneRecipe()),
    ClassifierTask("finetune_densenet121", "fine-tune DenseNet-121, crop and flip",
                   FinetuneRecipe(model="densenet121", layer_decay=None, drop_path=0.0,
                                  randaug_magnitude=None)),
    MocoTask("moco_densenet121", "MoCo v2 DenseNet-121, two views, queue 65,536"),
)}


# ----------------------------------------------------------------------------- timing

class _SyncWatch:
    """Counts host synchronisations through torch's CUDA sync debug mode (each one warns)."""

    def __enter__(self) -> _SyncWatch:
        self._catch = warnings.catch_warnings(record=True)
        self._log = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        self.count = sum("synchroniz" in str(w.message) for w in self._log)


class _Clock:
    """Wall time of steps warmup .. warmup+steps-1 (counted from 0), the device synchronised at
    both ends, so the time covers the steps' data, transfer and compute; on CUDA also the peak
    memory of those steps and the host syncs from the end of step 0 to the end of the warm-up."""

    def __init__(self, device: torch.device, settings: BenchSettings) -> None:
        self.device, self.s = device, settings
        self.t0 = self.t1 = self.syncs = None
        self._watch: _SyncWatch | None = None
        self.cuda = device.type == "cuda"
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def after_step(self, i: int) -> None:
        if i == 0 and self.cuda and self.s.warmup >= 2:
            self._watch = _SyncWatch().__enter__()
        if i == self.s.warmup - 1:
            self.close()
            if self.cuda:  # the peak of the timed steps: not a compile trial's copy
                torch.cuda.reset_peak_memory_stats(self.device)
            self.t0 = self._now()
        if i == self.s.total_steps - 1:
            self.t1 = self._now()

    def close(self) -> None:
        """End the sync count (also on an error, so the debug mode never stays on)."""
        if self._watch is not None:
            self._watch.__exit__(None, None, None)
            self.syncs, self._watch = self._watch.count / (self.s.warmup - 1), None

    def result(self) -> Pipeline:
        if self.t1 is None:
            raise RuntimeError(f"the pipeline stopped before its last timed step "
                               f"({self.s.total_steps} steps were due)")
        seconds = self.t1 - self.t0
        memory = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None
        return Pipeline(self.s.steps * self.s.batch_size / seconds, seconds, memory, self.syncs)


class _EngineClock(Callback):
    """The clock inside `fit`: after every training step."""

    order, run_valid = 90, False  # after the engine's recorder (80) and progress bar (85)

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def after_batch(self) -> None:
        self.clock.after_step(self.learn.train_iter - 1)  # train_iter already counts this step


def _fresh(task: BenchTask, s: BenchSettings) -> nn.Module:
    torch.manual_seed(s.seed)
    return task.build(s)


def _targets(batch: int, device: torch.device) -> Tensor:
    return torch.from_numpy(_labels(batch, 1)).to(device)  # [B, 14]


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA; fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- pipelines

def train_flops_per_image(task: BenchTask, s: BenchSettings, device: torch.device) -> float:
    """FLOPs of one training step's forward and backward, per image."""
    model = _fresh(task, s).to(device).train()
    n = task.flop_batch(s)
    x, y = task.synthetic_input(s, n, device), _targets(n, device)
    return count_flops(lambda: task.loss(model(x), y).backward()) / n


def run_reference(task: BenchTask, s: BenchSettings, device: torch.device,
                  files: Sequence[Path]) -> Pipeline:
    """The papers' loop: PIL and torchvision in DataLoader workers, fp16 autocast, eager."""
    clock = _Clock(device, s)
    model = _fresh(task, s).to(device).train()
    config = task.config(s)
    opt = make_optimizer(model, config, device, task.param_groups(model, config), fused=False)
    cuda = device.type == "cuda"
    sampler = RandomSampler(range(len(files)), replacement=True,
                            num_samples=s.total_steps * s.batch_size,
                            generator=torch.Generator().manual_seed(s.seed))
    loader = DataLoader(PngFiles(files, _labels(len(files), s.seed), task.reference_transform(s)),
                        batch_size=s.batch_size, sampler=sampler, num_workers=s.workers,
                        pin_memory=cuda, drop_last=True)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    try:
        for i, (x, y) in enumerate(loader):
            x = task.loader_input(x.to(device, non_blocking=True))
            y = y.to(device, non_blocking=True)
            with _autocast(device, torch.float16):
                out = model(x)
                loss = task.loss(out, y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            task.after_step(model, out)
            loss.item()  # the loss logged every step, as the papers' loops do
            clock.after_step(i)
    finally:
        clock.close()
    return clock.result()


def run_ours(task: BenchTask, s: BenchSettings, device: torch.device, cache: Cache,
             work: Path) -> tuple[Pipeline, list[str]]:
    """The study's engine on the cache: `fit` for one epoch of warmup + steps batches."""
    clock = _Clock(device, s)
    model = _fresh(task, s)
    config = dataclasses.replace(task.config(s), epochs=1, checkpoint_every=10**9,
                                 compile=s.compile)
    resident = device.type == "cuda" and fits_on_device(cache.images.nbytes, device)
    batches = CacheBatches(cache, None, s.batch_size, shuffle=True, seed=s.seed, drop_last=True,
                           device=device, resident=resident)
    where = "resident on the GPU" if resident else (
        "streamed through pinned buffers" if device.type == "cuda" else "read from the memory map")
    notes = [f"ours: cache of {len(cache)} images at {cache.size} px "
             f"({cache.images.nbytes / 2**30:.2f} GiB) {where}"]
    with tempfile.TemporaryDirectory(dir=work) as runs_dir:
        try:
            result = fit(model, batches, None, config, runs_dir, "bench",
                         loss_func=task.loss, batch_tfm=task.engine_transform(s),
                         cbs=[*task.callbacks(), _EngineClock(clock)],
                         param_groups=task.param_groups(model, config), force=True,
                         progress=False)
        finally:
            clock.close()
    if s.compile:
        notes.append(f"ours: torch.compile -> {result.metrics.get('compile')}")
    return clock.result(), notes


def run_step(task: BenchTask, s: BenchSettings, device: torch.device
             ) -> tuple[Pipeline, list[str]]:
    """The model step alone on a synthetic batch on the device, set up as the engine sets up
    its step: precision, fused optimizer, channels-last and cuDNN autotuning, compile."""
    clock = _Clock(device, s)
    model = _fresh(task, s).to(device).train()
    config = dataclasses.replace(task.config(s), compile=s.compile)
    channels_last = cnn_fast_path(config.channels_last, model, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x = task.synthetic_input(s, s.batch_size, device)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x
    y = _targets(s.batch_size, device)
    opt = make_optimizer(model, config, device, task.param_groups(model, config))
    notes, runner = [], model
    if s.compile:
        def trial(m: nn.Module) -> None:
            with _autocast(device, torch.bfloat16):
                loss = task.loss(m(x), y)
            loss.backward()

        runner, error = compile_or_eager(model, trial)
        notes.append(f"step: torch.compile -> {error or 'compiled'}")
    try:
        with cudnn_benchmark(cnn_fast_path(config.cudnn_benchmark, model, device)):
            for i in range(s.total_steps):
                with _autocast(device, torch.bfloat16):
                    out = runner(x)
                    loss = task.loss(out, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                task.after_step(model, out)
                clock.after_step(i)
    finally:
        clock.close()
    return clock.result(), notes


def fits_on_device(nbytes: int, device: torch.device, share: float = 0.5) -> bool:
    """Whether `nbytes` take at most `share` of the device's free memory (the rest is for
    training)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= share * free


def bench_task(task: BenchTask, s: BenchSettings, device: torch.device, files: Sequence[Path],
               cache: Cache, work: Path) -> BenchResult:
    """One task's three pipelines, FLOPs and notes."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    flops = train_flops_per_image(task, s, device)
    reference = run_reference(task, s, device, files)
    ours, ours_notes = run_ours(task, s, device, cache, work)
    step, step_notes = run_step(task, s, device)
    tiny = ["tiny stand-in model (--tiny): checks the code paths, not the speed"] if s.tiny else []
    notes = [*tiny, *ours_notes, *step_notes]
    return BenchResult(task.name, task.description, name, peak_tflops(name), s.batch_size,
                       s.image_size, float(flops),
                       {"reference": reference, "ours": ours, "step": step}, notes)


@contextlib.contextmanager
def _workspace(work_dir: Path | None) -> Iterator[Path]:
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        yield Path(tmp)


def run_bench(tasks: Sequence[str] = TASK_NAMES, settings: BenchSettings | None = None, *,
              json_out: str | Path | None = None,
              log: Callable[[str], None] | None = print) -> list[BenchResult]:
    """Measure `tasks` (names in `TASKS`) with `settings`; optionally write the JSON report,
    rewritten after every task, so a run that fails or is stopped keeps what it measured."""
    settings = settings or BenchSettings()
    settings.check()
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown bench tasks {unknown}; expected some of {list(TASKS)}")
    device = resolve_device(settings.device)
    results = []
    with _workspace(settings.work_dir) as work:
        files = png_files(settings, work)
        cache = bench_cache(files, settings, work)
        for name in tasks:
            if log:
                log(f"bench: {name} on {device} ...")
            results.append(bench_task(TASKS[name], settings, device, files, cache, work))
            if log:
                log(f"bench: {name}: " + ", ".join(
                    f"{p} {results[-1].pipelines[p].images_per_s:,.0f} img/s" for p in PIPELINES))
            if json_out is not None:
                atomic_write_text(json.dumps(bench_report(results, settings), indent=1),
                                  json_out)
    return results


# ----------------------------------------------------------------------------- reporting

def bench_report(results: Sequence[BenchResult], settings: BenchSettings) -> dict:
    """Everything measured, as plain JSON values."""
    s = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}
    return {"settings": s, "torch": torch.__version__, "tasks": [r.to_dict() for r in results]}


# ----------------------------------------------------------------------------- command line

def main_bench(args: argparse.Namespace) -> list[BenchResult]:
    """`cxr bench`: run, then print the tables (text or Markdown) and the JSON report."""
    settings = settings_from_args(args)
    results = run_bench(args.tasks, settings, json_out=args.json)
    report = bench_report(results, settings)
    print(format_report(report, args.markdown))
    print(json.dumps(report, indent=1))
    return results

"""What every chapter shares: the device, the images it studies, and their cache.

A chapter studies the real ChestX-ray14 images when a data root is given (the full download or
the NIH sample), else synthetic phantoms; all chapters of one profile use the same cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from fastai.torch_core import default_device

from cxr_lib.data import XrayDataset
from cxr_lib.data.cache import Cache, prepare_cache
from cxr_lib.data.nih import read_chestxray14
from cxr_lib.data.phantoms import phantom_dataset


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' takes the GPU when there is one; 'cpu' keeps fastai's engine off the GPU too;
    'cuda:1' makes GPU 1 the current one, which fastai's Learner and the loaders train on.

    fastai keeps the choice process-wide, so each call sets it afresh ('auto' after 'cpu' takes
    the GPU again). Under torchrun each process takes the GPU of its LOCAL_RANK, before any
    batch is placed.
    """
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if name == "auto":
        return default_device(None)
    device = torch.device(name)
    if device.type != "cuda":
        default_device(False)
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but torch sees no CUDA GPU")
    if device.index is not None:
        torch.cuda.set_device(device)
    return default_device(True)


def chapter_dataset(data_root: str | Path | None, *, n_phantoms: int, phantom_size: int,
                    seed: int = 0, val_fraction: float = 0.1) -> XrayDataset:
    """The NIH images under `data_root` (only those present), else `n_phantoms` phantoms."""
    if data_root:
        return read_chestxray14(data_root, val_fraction=val_fraction, seed=seed)
    return phantom_dataset(n_phantoms, size=phantom_size, seed=seed)


def chapter_cache(work_dir: str | Path, dataset: XrayDataset, size: int) -> Cache:
    """The profile's preprocessing cache of `dataset` at `size` px (made once, then reused)."""
    return prepare_cache(dataset, Path(work_dir) / "cache" / f"{dataset.name}-{size}", size=size)

"""What every chapter shares: the device, the images it studies, and their cache.

A chapter studies the real ChestX-ray14 images when a data root is given (the full download or
the NIH sample), else synthetic phantoms; all chapters of one profile use the same cache.
"""

from __future__ import annotations

from pathlib import Path

from cxr_lib.chapters.files import cache_dir
from cxr_lib.data import XrayDataset, open_source
from cxr_lib.data.cache import Cache, prepare_cache


def chapter_dataset(data_root: str | Path | None, *, n_phantoms: int, phantom_size: int,
                    seed: int = 0, val_fraction: float = 0.1) -> XrayDataset:
    """The NIH images under `data_root` (only those present), else `n_phantoms` phantoms."""
    if data_root:
        return open_source("chestxray14", data_root, val_fraction=val_fraction, seed=seed)
    return open_source("phantom", count=n_phantoms, size=phantom_size, seed=seed)


def chapter_cache(work_dir: str | Path, dataset: XrayDataset, size: int) -> Cache:
    """The profile's preprocessing cache of `dataset` at `size` px (made once, then reused)."""
    return prepare_cache(dataset, cache_dir(work_dir, dataset.name, size), size=size)

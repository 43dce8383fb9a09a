"""What every chapter shares: the device, the images it studies, and their cache.

A chapter studies the real ChestX-ray14 images when a data root is given (the full download or
the NIH sample), else synthetic phantoms; all chapters of one profile use the same cache.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from fastai.torch_core import default_device

from cxr_lib.chapters.files import cache_dir
from cxr_lib.chapters.sentences import duration, names
from cxr_lib.data import XrayDataset, open_source
from cxr_lib.data.cache import Cache, prepare_cache
from cxr_lib.data.core import merge
from cxr_lib.data.samples import samples_root
from cxr_lib.data.sources import read_source

DESCRIBED = {  # a source's name -> what it is, as the chapters say it
    "chestxray14": "NIH ChestX-ray14, adult chest X-rays",
    "phantom": "synthetic chest phantoms",
    "phantom-lowres": "synthetic chest phantoms drawn at a quarter of the resolution",
    "pediatric": "pediatric chest X-rays (Kermany et al.)",
    "chexpert": "CheXpert, adult chest X-rays (Stanford)",
    "covid19_radiography": "COVID-19 Radiography Database",
}


def chapter_dataset(data_root: str | Path | None, *, n_phantoms: int, phantom_size: int,
                    seed: int = 0, val_fraction: float = 0.1) -> XrayDataset:
    """The NIH images under `data_root` (only those present), else `n_phantoms` phantoms."""
    if data_root:
        return open_source("chestxray14", data_root, val_fraction=val_fraction, seed=seed)
    return open_source("phantom", count=n_phantoms, size=phantom_size, seed=seed)


def pediatric_dataset(root: str | Path | None, *, seed: int = 0) -> XrayDataset | None:
    """The pediatric pneumonia folders under `root` (their test patients drawn where the root
    has no test/ folder, as the shipped sample), or None without a root."""
    return read_source("folder", root, seed=seed, name="pediatric") if root else None


def pneumonia_cache(work_dir: str | Path, pediatric_root: str | Path | None, size: int,
                    seed: int) -> Cache | None:
    """The pediatric pneumonia task's cache (the patient split `pediatric_dataset` draws, the
    one chapter 2's pooled pre-training holds out too), or None without a pediatric root."""
    dataset = pediatric_dataset(pediatric_root, seed=seed)
    return None if dataset is None else chapter_cache(work_dir, dataset, size)


def pooled_cache(work_dir: str | Path, datasets: list[XrayDataset | None], size: int) -> Cache:
    """One cache of every image of the data sets given (None: not given), for pre-training
    without labels on their training splits: each keeps its own validation and test images,
    which pre-training never sees. One data set alone is its own cache."""
    given = [d for d in datasets if d is not None]
    if not given:
        raise ValueError("pooled_cache: no data set given")
    pooled = given[0] if len(given) == 1 else merge(given, name="+".join(d.name for d in given))
    return chapter_cache(work_dir, pooled, size)


def chapter_cache(work_dir: str | Path, dataset: XrayDataset, size: int) -> Cache:
    """The profile's preprocessing cache of `dataset` at `size` px (made once, then reused)."""
    return prepare_cache(dataset, cache_dir(work_dir, dataset.name, size), size=size)


def images_used(cache: Cache, *roots: str | Path | None) -> str:
    """The images a chapter ran on, for its first lines: how many of each source, whether they
    are the samples shipped with the project, and the size they were cached at."""
    if cache.index.empty:
        raise ValueError(f"cache {cache.name!r} holds no images")
    shipped = [Path(r).resolve() for r in roots if r]
    shipped = shipped and all(r.is_relative_to(samples_root().resolve()) for r in shipped)
    where = " (the samples shipped with the project)" if shipped else ""
    fake = " — drawn, not X-rays" if set(cache.index["source"]) <= PHANTOMS else ""
    return f"{source_counts(cache.index)}{where}, cached at {cache.size} px{fake}"


def source_counts(index: pd.DataFrame) -> str:
    """How many images of each source a cache index (or part of one) holds, in words."""
    counts = index["source"].value_counts(sort=False)
    return names([f"{n:,} {DESCRIBED.get(source, source)}" for source, n in counts.items()])


def images_origin(data_root: str | Path | None) -> str:
    """What the edition's images are: the real X-rays under a data root, or phantoms."""
    return ("real ChestX-ray14 images" if data_root else
            "synthetic phantoms (no data root was given), not real X-rays")


PHANTOMS = {"phantom", "phantom-lowres"}  # the sources that are drawn, not X-rayed


def image_noun(cache: Cache) -> str:
    """What a figure title calls one of the cache's images: "X-ray", "phantom" (when every
    image is drawn), or "image" for a mix of both."""
    sources = set(cache.index["source"])
    return "phantom" if sources <= PHANTOMS else "X-ray" if not sources & PHANTOMS else "image"


class ChapterClock:
    """Started where a chapter's work starts; `words` say how long it ran, and on what."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def words(self, device: torch.device | None = None) -> dict[str, str]:
        """How long since the start, and the device (default: the one fastai trains on)."""
        seconds = time.perf_counter() - self.started
        return {"run_time": duration(seconds), "ran_on": ran_on(device or default_device())}


def ran_on(device: torch.device) -> str:
    """The machine a chapter ran on, as its first lines name it."""
    if device.type == "cuda":
        return f"a GPU ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"the CPU ({threads} thread{'s' if threads != 1 else ''})"

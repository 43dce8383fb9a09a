"""Batches read from a preprocessing cache, with no per-image Python on the hot path.

Design. `CacheBatches` is a plain iterable, not a torch DataLoader. A DataLoader calls
`dataset[i]` once per image and collates in Python; at 256 px that per-item work, not the
copy, is what starves a GPU. Here a batch is one numpy `take` on the memory-mapped uint8
array (rows sorted within the batch, so reads walk the file forward) straight into a pinned
buffer when the target is a GPU, then one non-blocking copy. With `resident=True` the whole
split is copied onto the device once (ChestX-ray14 at 256 px is about 7.3 GB of uint8) and a
batch is an index on the device; that is the GPU fast path (on a CPU, streaming from the page
cache is faster than torch's indexing). Pixels stay uint8 [B, 1, S, S]; scaling to float and
augmentation belong to the GPU side. Labels are float32 [B, F] and keep NaN ("not stated by
this source"), so the loss must mask them.

fastai. `DataLoaders(train, valid)` accepts any object that provides what `Learner` uses:
`len(dl)`, iteration yielding `(x, y)` tuples, a `device` attribute (a torch.device:
`DataLoaders` forwards `dls.device` to the train loader, mixed precision reads `.type`),
`to(device)` (`DataLoaders(device=...)`, `dls.cpu()`) and `new(shuffle=False,
drop_last=False)` (`get_preds` without an explicit loader). `CacheBatches` provides exactly
these; fastai's own DataLoader (per-item transforms) is not used. Not supported:
`learn.export`, `dls.test_dl`, `show_batch` (runs save checkpoints instead). `Learner` needs
an explicit `loss_func`, as there is no fastai dataset to infer one from.

Epochs. The order of a pass depends only on (seed, epoch). Each pass uses the current epoch
and then advances it, so fastai's `fit`, which never calls `set_epoch`, sees a fresh order
every epoch; `set_epoch(e)` makes the next pass epoch e, which is how a resumed run replays
exactly the order it would have had.

`CacheDataset` is the generic per-item map-style view, for code that wants a DataLoader.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch.utils.data import Dataset

from cxr_lib.data.cache import Cache
from cxr_lib.data.core import DataError
from cxr_lib.device import to_device

Indices = np.ndarray | list[int] | str | None  # rows, a split name, or None for all rows


class CacheDataset(Dataset):
    """Item i: (uint8 image [1, S, S], float32 labels [F]) of cache row `indices[i]`."""

    def __init__(self, cache: Cache, indices: Indices = None) -> None:
        self.cache = cache
        self.indices = _check_indices(cache, indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = int(self.indices[i])
        x = torch.from_numpy(np.array(self.cache.images[row]))[None]  # [1, S, S]
        y = torch.from_numpy(self.cache.labels[row].copy())  # [F]
        return x, y


class CacheBatches:
    """Batches (uint8 [B, 1, S, S], float32 [B, F]) of cache rows `indices`, on `device`.

    `indices` are kept sorted (cache order); with shuffle=False a pass yields them in that
    order, so predictions line up with `indices`. Duplicates are refused.

    `sample_weights` (one per row of `indices`, in the order given) make each pass a draw with
    replacement of `draws` rows (default: as many as `indices`), row i with probability
    w_i / sum(w): a data mix with per-source shares (`cxr_lib.methods.cocktail`). Each pass
    draws anew from (seed, epoch).
    """

    def __init__(self, cache: Cache, indices: Indices, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, device: str | torch.device = "cpu",
                 resident: bool = False, sample_weights: np.ndarray | None = None,
                 draws: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.cache = cache
        rows = _check_indices(cache, indices)
        order = np.argsort(rows, kind="stable")
        self.indices = rows[order]
        self.probabilities = (None if sample_weights is None
                              else _probabilities(sample_weights, len(rows), shuffle)[order])
        if draws is not None and (sample_weights is None or draws < 1):
            raise ValueError(f"draws={draws} needs sample_weights and must be positive")
        self.draws = len(rows) if draws is None else int(draws)
        self.batch_size, self.shuffle, self.seed, self.drop_last = (
            batch_size, shuffle, seed, drop_last)
        self.device = torch.device(device)
        self.epoch = 0
        self.rank, self.world = 0, 1  # see shard()
        self._resident = _upload(cache, self.indices, self.device) if resident else None

    def __len__(self) -> int:
        full, last = divmod(self.draws, self.batch_size)
        # a short last batch counts on the ranks that get rows of it (all of it without shard)
        return full + (not self.drop_last and self.rank < last)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the order of `epoch`."""
        self.epoch = epoch

    def batch_positions(self, epoch: int | None = None) -> list[np.ndarray]:
        """Positions into `indices` of each batch of a pass (default: the next one), sorted."""
        epoch = self.epoch if epoch is None else epoch
        n, b = len(self.indices), self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        if self.probabilities is not None:
            order = rng.choice(n, size=self.draws, p=self.probabilities)
        else:
            order = rng.permutation(n) if self.shuffle else np.arange(n)
        return [np.sort(order[i:i + b])[self.rank::self.world] for i in range(0, len(self) * b, b)]

    def batch_indices(self, epoch: int | None = None) -> list[np.ndarray]:
        """Cache rows of each batch of a pass (default: the next one)."""
        return [self.indices[p] for p in self.batch_positions(epoch)]

    def __iter__(self):
        positions = self.batch_positions()
        self.epoch += 1
        return (self._gather(p) for p in positions)

    def _gather(self, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self._resident is not None:
            images, labels = self._resident
            at = to_device(torch.from_numpy(pos), self.device)
            return images[at], labels[at]  # [B, 1, S, S], [B, F]
        rows = self.indices[pos]
        size = self.cache.size
        # gathered straight into pinned memory on a GPU, so to_device copies it without a second
        x = torch.empty((len(rows), 1, size, size), dtype=torch.uint8,
                        pin_memory=self.device.type == "cuda")
        # mode="clip" writes into `out` directly (rows are validated); "raise" would buffer.
        np.take(self.cache.images, rows, axis=0, out=x.numpy()[:, 0], mode="clip")
        y = torch.from_numpy(self.cache.labels[rows])  # [B, F]
        return to_device(x, self.device), to_device(y, self.device)

    def to(self, device: str | torch.device) -> CacheBatches:
        """Move batches (and the resident copy, if any) to `device`."""
        self.device = torch.device(device)
        if self._resident is not None:
            self._resident = tuple(t.to(self.device) for t in self._resident)
        return self

    def shard(self, rank: int, world: int) -> CacheBatches:
        """This rank's share of every batch under DistributedDataParallel.

        `batch_size` stays the global batch: each rank draws the same permutation and takes
        every `world`-th row of each global batch, so together the ranks yield exactly the
        unsharded batches. Full batches give every rank batch_size / world rows; a short last
        batch of fewer rows than ranks leaves the ranks it does not reach one batch fewer
        (fine for evaluation; `fit` refuses training batches that differ in number by rank).
        """
        if not 0 <= rank < world or self.batch_size % world:
            raise ValueError(f"cannot shard a batch of {self.batch_size} as rank {rank} of "
                             f"{world}: the batch must divide evenly over the ranks")
        out = copy.copy(self)
        out.rank, out.world = rank, world
        return out

    def new(self, **changes) -> CacheBatches:
        """A copy with other batch_size/shuffle/seed/drop_last, sharing any resident copy."""
        unknown = set(changes) - {"batch_size", "shuffle", "seed", "drop_last"}
        if unknown:
            raise TypeError(f"CacheBatches.new: unknown settings {sorted(unknown)}")
        out = copy.copy(self)
        out.__dict__.update(changes)
        return out


def _upload(cache: Cache, rows: np.ndarray, device: torch.device,
            step: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the rows onto `device` in slices, so host memory never holds the whole split."""
    size = cache.size
    images = torch.empty((len(rows), 1, size, size), dtype=torch.uint8, device=device)
    for i in range(0, len(rows), step):
        block = np.take(cache.images, rows[i:i + step], axis=0)  # [b, S, S]
        images[i:i + len(block), 0] = torch.from_numpy(block).to(device)
    labels = torch.from_numpy(cache.labels[rows]).to(device)  # [n, F]
    return images, labels


def _probabilities(weights: np.ndarray, n: int, shuffle: bool) -> np.ndarray:
    """Draw probabilities [n] from non-negative weights; refused without shuffle (a fixed
    order cannot follow a draw) or when they do not fit the rows."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if not shuffle:
        raise ValueError("sample_weights draw rows at random: set shuffle=True")
    if len(w) != n:
        raise ValueError(f"sample_weights has {len(w)} values for {n} rows")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("sample_weights must be finite, non-negative and not all zero")
    return w / w.sum()


def _check_indices(cache: Cache, indices: Indices) -> np.ndarray:
    """int64 row numbers: all rows (None), a split's rows (str), or the given ones, checked."""
    if indices is None:
        return np.arange(len(cache))
    if isinstance(indices, str):
        rows = cache.split_indices(indices)
        if len(rows) == 0:
            raise DataError(f"{cache.path}: split {indices!r} is empty")
        return rows
    rows = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(rows) == 0:
        raise DataError(f"{cache.path}: no rows selected")
    if rows.min() < 0 or rows.max() >= len(cache):
        raise DataError(f"{cache.path}: row numbers must lie in [0, {len(cache)}), "
                        f"got {rows.min()}..{rows.max()}")
    if len(np.unique(rows)) != len(rows):
        raise DataError(f"{cache.path}: duplicate row numbers in the selection")
    return rows

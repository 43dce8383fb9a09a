"""The preprocessing cache: decode every image once, then never touch a PNG again.

A cache is a folder holding
- `images.npy`: uint8 [N, S, S], read back as a read-only memory map;
- `index.parquet`: one row per image (id, patient, split, source, path, orig_height,
  orig_width, then one float32 column per finding with NaN kept);
- `meta.json`: findings, size, count, source names, data set name, format version, creation
  time, the content digest (`digest`, by which a run names the data it used) and
  `complete: true`.

Non-square originals are center-cropped to a square on their shorter side, then resized. We
crop rather than squash or pad: squashing changes the aspect ratio of the anatomy (the heart's
width relative to the chest is itself a finding, cardiomegaly), and padding adds black borders
that only one source has, a shortcut a model can learn to tell sources apart. The strip a
center crop removes from a wide pediatric film is mostly arms and background. ChestX-ray14 is
square already, so it is only resized. Resizing uses Lanczos (anti-aliased) on the uint8 image.

Preparation is resumable and atomic. Work happens in `<out>.partial/`: the planned index is
written first, each chunk of images is written straight into the memory map by a worker process
and flushed, and only then does the parent drop a marker file in `done/`. A killed or failed
run keeps its finished chunks; rerunning the same request skips them. `meta.json` with
`complete: true` is written last and the folder is renamed to `out`, so a half-written cache
is never taken for a finished one. One process prepares a folder at a time (an exclusive lock
on `<out>.lock`): a second one asking for the same cache, another chapter or another rank,
says which process it waits for, waits, and then opens the finished cache. The workers never
hold that lock and end with the process that started them, so a killed preparation (even by
kill -9 of the parent alone) frees its folder at once for the rerun that resumes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm  # text bars: they render in the static book without widget JavaScript

from cxr_lib.data.core import DataError, XrayDataset, check_patient_disjoint, check_whole
from cxr_lib.data.files import remove_stale_temps, replacing

try:
    import fcntl  # POSIX; on Windows preparation goes unlocked
except ImportError:  # pragma: no cover
    fcntl = None

FORMAT = 2  # 2: meta.json holds the content digest
KEY_COLUMNS = ("id", "patient", "split", "source", "path")  # what the pixels and rows depend on
_PR_SET_PDEATHSIG = 1  # prctl(2), Linux: a signal the kernel sends when the parent ends
# Record locks do not exclude two threads of one process: this does, around the file lock.
_THREADS = threading.Lock()


@dataclass(eq=False)
class Cache:
    """A finished cache opened for reading; `images` and `labels` are aligned with `index`."""

    path: Path
    name: str
    images: np.ndarray = field(repr=False)  # uint8 [N, S, S], read-only memmap
    index: pd.DataFrame = field(repr=False)
    labels: np.ndarray = field(repr=False)  # float32 [N, F]; 1, 0 or NaN
    findings: list[str]
    size: int
    stored_digest: str | None = field(default=None, repr=False)  # None: made before FORMAT 2

    def __len__(self) -> int:
        return len(self.index)

    @functools.cached_property
    def digest(self) -> str:
        """The content digest made with the cache, or for a cache made before digests existed,
        computed on first use (once per open, with a notice). It is not written back: a finished
        cache never changes, may be read-only, and is read by other processes without a lock."""
        if self.stored_digest is not None:
            return self.stored_digest
        print(f"{self.path}: made before caches kept a content digest; computing it from its "
              f"{len(self)} images and index (prepare it into a fresh folder to keep one)",
              file=sys.stderr, flush=True)
        return content_digest(self.images, self.index, self.findings)

    def __reduce__(self):
        # Pickle by path so DataLoader workers re-map the file instead of copying the pixels.
        return open_cache, (self.path,)

    def split_indices(self, name: str) -> np.ndarray:
        """Row numbers (int64, ascending) of the images in split `name`."""
        return np.flatnonzero(self.index["split"].to_numpy() == name)

    def summary(self) -> str:
        """Counts per split and source, image size and bytes on disk."""
        counts = pd.crosstab(self.index["source"], self.index["split"], margins=True,
                             margins_name="all")
        return (
            f"cache {self.name!r} at {self.path}: {len(self)} images of "
            f"{self.size}x{self.size} uint8 ({self.images.nbytes / 2**20:.1f} MiB), "
            f"{len(self.findings)} findings\n{counts.to_string()}"
        )


@dataclass(frozen=True)
class _Chunk:
    """One unit of work: decode `dataset` (a slice of the full one) into rows from `start`."""

    number: int
    start: int
    dataset: XrayDataset
    folder: Path
    size: int


def content_digest(images: np.ndarray, index: pd.DataFrame, findings: list[str]) -> str:
    """A short SHA-256 of what training sees: the pixels uint8 [N, S, S] and the index but its
    `path` (ids, patients, splits, sources, original sizes, labels). Where the files lay, where
    and when the cache was made are left out, so equal content gives an equal digest. The pixels
    stream in blocks of at most 64 MiB: a full ChestX-ray14 cache at 256 px is 7 GiB."""
    text = {c: index[c].astype(str).tolist() for c in KEY_COLUMNS if c != "path"}
    digest = hashlib.sha256(json.dumps({"shape": images.shape, "findings": findings, **text})
                            .encode())
    digest.update(index[["orig_height", "orig_width"]].to_numpy(np.int64).tobytes())
    labels = index[findings].to_numpy(np.float32)  # [N, F]
    digest.update(np.where(np.isnan(labels), np.float32(np.nan), labels).tobytes())  # one NaN
    step = max(1, 2**26 // images[0].nbytes)
    for i in range(0, len(images), step):
        digest.update(np.ascontiguousarray(images[i:i + step]))  # [step, S, S]
    return digest.hexdigest()[:16]


def to_square(img: np.ndarray, size: int) -> np.ndarray:
    """Center-crop uint8 [H, W] to a square on its shorter side, then resize to [size, size]."""
    h, w = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = np.ascontiguousarray(img[top:top + side, left:left + side])  # [side, side]
    if side == size:
        return img
    resized = Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS,
                                          reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)  # [size, size]


def prepare_cache(dataset: XrayDataset, out: str | Path, *, size: int = 256,
                  workers: int | None = None, chunk: int = 256, progress: bool = True) -> Cache:
    """Decode every image of `dataset` once into a cache folder `out` and open it.

    Runs over `workers` processes (default: all available cores), `chunk` images per task.
    An existing finished cache for the same request is returned without work; a partial one
    is resumed. A finished or partial folder made for a different request (other size, ids,
    metadata or labels) is refused with a DataError saying what differs. Options out of range
    are refused with a ValueError before anything is made.
    """
    out = Path(out)
    size, chunk = check_whole("size", size, 1), check_whole("chunk", chunk, 1)
    workers = _default_workers() if workers is None else check_whole("workers", workers, 1)
    if len(dataset) == 0:
        raise DataError(f"{dataset.name}: nothing to cache, the data set is empty")
    plan = _plan_table(dataset)
    if is_complete(out):  # finished caches never change: no lock needed (nor a writable folder)
        return _open_finished(out, plan, size)
    with _exclusive(out):
        if is_complete(out):  # finished by another process while this one waited
            return _open_finished(out, plan, size)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise DataError(f"{out}: exists and is not a finished cache; remove it or choose "
                            "another output folder")
        partial = out.with_name(out.name + ".partial")
        if not is_complete(partial):
            _fill(partial, dataset, plan, size=size, workers=workers, chunk=chunk,
                  progress=progress)
        else:
            _refuse_if_different(partial, _read_table(partial / "index.parquet"),
                                 _read_json(partial)["size"], plan, size)
        _finish(partial, out)
        return open_cache(out)


def _open_finished(out: Path, plan: pd.DataFrame, size: int) -> Cache:
    _refuse_if_different(out, _read_table(out / "index.parquet"), _read_json(out)["size"],
                         plan, size)
    return open_cache(out)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold the lock of cache folder `out` (`<out>.lock`, kept: removing a lock file races).

    A POSIX record lock (lockf), not flock: an flock belongs to the open file, which the forked
    workers share, so workers orphaned by a kill -9 of this process kept the cache locked. A
    record lock belongs to this process alone, is never inherited and goes when it ends.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with _THREADS, open(out.with_name(out.name + ".lock"), "a+") as handle:
        if fcntl is None:
            yield
            return
        _lock(handle, out)
        try:
            yield
        finally:
            handle.truncate(0)  # no stale holder for the next waiter to name


def _lock(handle: TextIO, out: Path) -> None:
    """Take the lock, saying whom it waits for if another process holds it; then sign it."""
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # held by a live process: a dead one's is gone
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        print(f"{out}: waiting for {holder} (it holds {handle.name})", file=sys.stderr,
              flush=True)
        fcntl.lockf(handle, fcntl.LOCK_EX)
    since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    handle.truncate(0)
    handle.write(f"process {os.getpid()} on {socket.gethostname()}, preparing it since {since}")
    handle.flush()


def open_cache(path: str | Path) -> Cache:
    """Open a finished cache; refuses partial or damaged folders with a DataError."""
    path = Path(path)
    if not is_complete(path):
        partial = path.with_name(path.name + ".partial")
        hint = f" (an unfinished run is in {partial})" if partial.exists() else ""
        raise DataError(f"{path}: not a finished cache (no meta.json with complete: true)"
                        f"{hint}; rerun `cxr data prepare` / prepare_cache to finish it")
    meta = _read_json(path)
    index = _read_table(path / "index.parquet")
    findings, size = list(meta["findings"]), int(meta["size"])
    missing = [c for c in (*KEY_COLUMNS, *findings) if c not in index.columns]
    if missing:
        raise DataError(f"{path / 'index.parquet'}: lacks columns {missing}")
    images = _map_images(path / "images.npy", "r")
    if images.shape != (len(index), size, size) or images.dtype != np.uint8:
        raise DataError(f"{path / 'images.npy'}: holds {images.dtype} {images.shape}, the index "
                        f"says uint8 ({len(index)}, {size}, {size}); rerun prepare into a "
                        "fresh folder")
    labels = index[findings].to_numpy(dtype=np.float32)  # [N, F]
    return Cache(path, meta["name"], images, index, labels, findings, size, meta.get("digest"))


def check_cache(path: str | Path) -> str:
    """Verify a cache in depth and return its summary; raises DataError naming the problem."""
    cache = open_cache(path)
    meta = _read_json(cache.path)
    if meta["count"] != len(cache):
        raise DataError(f"{cache.path}: meta.json counts {meta['count']} images, "
                        f"the index has {len(cache)}")
    dup = cache.index["id"][cache.index["id"].duplicated()]
    if len(dup):
        raise DataError(f"{cache.path}: {len(dup)} duplicate image id(s), e.g. {dup.iloc[0]!r}")
    check_patient_disjoint(cache.index, str(cache.path))
    _check_label_values(cache)
    _check_no_zero_images(cache)
    _check_digest(cache)
    return cache.summary()


def _check_digest(cache: Cache) -> None:
    """Pixels or labels edited after the cache was made would be trained on under its old
    identity: the stored digest must still be the content's."""
    now = content_digest(cache.images, cache.index, cache.findings)
    if cache.stored_digest not in (None, now):
        raise DataError(f"{cache.path}: images or index differ from when it was made (digest "
                        f"{cache.stored_digest}, now {now}); rerun prepare into a fresh folder")


def _check_label_values(cache: Cache) -> None:
    bad = ~(np.isnan(cache.labels) | (cache.labels == 0) | (cache.labels == 1))  # [N, F]
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{cache.path}: row {row} (id {cache.index['id'].iloc[row]!r}) has "
                        f"label {cache.labels[row, col]} for {cache.findings[col]}; "
                        "expected 0, 1 or NaN")


def _check_no_zero_images(cache: Cache, step: int = 4096) -> None:
    """An all-zero image is a chunk that was never written (real X-rays are never all black)."""
    zero = np.concatenate([
        cache.images[i:i + step].reshape(-1, cache.size**2).max(axis=1) == 0
        for i in range(0, len(cache), step)
    ])  # [N]
    if zero.any():
        rows = np.flatnonzero(zero)
        raise DataError(f"{cache.path}: {len(rows)} image(s) are all zero (never written), "
                        f"e.g. row {rows[0]} (id {cache.index['id'].iloc[rows[0]]!r}); "
                        "rerun prepare into a fresh folder")


def _fill(partial: Path, dataset: XrayDataset, plan: pd.DataFrame, *, size: int,
          workers: int, chunk: int, progress: bool) -> None:
    """Decode every chunk not yet done into `partial`, then write index and meta."""
    chunk = _start_or_resume(partial, plan, size, chunk)
    done_dir = partial / "done"
    done = {int(p.name) for p in done_dir.iterdir()}
    starts = range(0, len(dataset), chunk)
    tasks = [
        _Chunk(k, s, dataset.select(np.arange(s, min(s + chunk, len(dataset)))), partial, size)
        for k, s in enumerate(starts) if k not in done
    ]
    left = sum(len(t.dataset) for t in tasks)
    with tqdm(total=len(dataset), initial=len(dataset) - left, unit="img",
              desc=f"cache {dataset.name}", disable=not progress) as bar:
        try:
            for task in _run(tasks, workers):
                (done_dir / f"{task.number:06d}").touch()
                bar.update(len(task.dataset))
        except DataError as err:
            kept = len(list(done_dir.iterdir()))
            raise DataError(f"{err}\nstopped: {kept} of {len(starts)} chunks are kept in "
                            f"{partial}; fix the input and rerun to resume") from err
    _write_index_and_meta(partial, dataset, plan, size)


def _start_or_resume(partial: Path, plan: pd.DataFrame, size: int, chunk: int) -> int:
    """Create the partial folder, or check it was planned for this request; returns the
    chunk length to use (the one the folder was planned with)."""
    if (partial / "plan.json").exists():
        planned = _read_json(partial, "plan.json")
        _refuse_if_different(partial, _read_table(partial / "plan.parquet"), planned["size"],
                             plan, size)
        chunk = int(planned["chunk"])
    else:  # never initialised (or killed while planning): holds nothing finished
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with replacing(partial / "plan.parquet", "wb") as f:
            plan.to_parquet(f, index=False)
        _write_json(partial / "plan.json", {"format": FORMAT, "size": size, "chunk": chunk})
    if not (partial / "done").is_dir():  # `done/` exists only once both arrays are allocated
        n = len(plan)
        np.lib.format.open_memmap(partial / "images.npy", "w+", np.uint8, (n, size, size)).flush()
        np.lib.format.open_memmap(partial / "orig_hw.npy", "w+", np.int32, (n, 2)).flush()
        (partial / "done").mkdir()
    return chunk


def _run(tasks: list[_Chunk], workers: int) -> Iterator[_Chunk]:
    """Yield each task once its pixels are on disk; in-process when workers == 1."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            _decode_chunk(task)
            yield task
        return
    _check_picklable(tasks[0].dataset)
    # Each task carries only its slice of the data set, so no per-worker global state is needed.
    pool = _pool(min(workers, len(tasks)))
    try:
        futures = {pool.submit(_decode_chunk, t, os.getpid()): t for t in tasks}
        for fut in as_completed(futures):
            fut.result()
            yield futures[fut]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes that end with this one. On Linux they are forked, whatever Python's
    default (a fork server from 3.14): children of this process, so the kernel can end them
    with it, started in milliseconds, with loaders that a notebook defines itself."""
    context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(os.getpid(),))


def _start_worker(parent: int) -> None:
    """Pool initializer: be killed when `parent` dies, rather than decode on for minutes as an
    orphan. The kernel does it on Linux (it watches the thread that forked the worker: the one
    running prepare_cache, alive as long as the pool); elsewhere `_decode_chunk` checks
    between images."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def _check_picklable(dataset: XrayDataset) -> None:
    try:
        pickle.dumps(dataset.loaders)
    except Exception as err:
        raise DataError(f"{dataset.name}: the image loaders of sources {sorted(dataset.loaders)} "
                        f"cannot be sent to worker processes ({err}); make them module-level "
                        "functions, or pass workers=1") from err


def _decode_chunk(task: _Chunk, parent: int | None = None) -> None:
    """Decode, crop and resize one chunk straight into the memory maps, then flush them.
    In a worker of process `parent`, stop as soon as that process is gone."""
    images = _map_images(task.folder / "images.npy", "r+")  # [N, S, S]
    orig_hw = np.load(task.folder / "orig_hw.npy", mmap_mode="r+")  # [N, 2]
    for j in range(len(task.dataset)):
        if parent is not None and os.getppid() != parent:  # an orphan: its work is lost anyway
            os._exit(1)
        img = _load(task.dataset, j, task.start + j)  # [H, W]
        orig_hw[task.start + j] = img.shape
        images[task.start + j] = to_square(img, task.size)
    images.flush()
    orig_hw.flush()


def _load(dataset: XrayDataset, j: int, row: int) -> np.ndarray:
    """Image j of a chunk, as uint8 [H, W]; any failure names the row, the id and the file."""
    meta = dataset.meta.iloc[j]
    where = f"{dataset.name}: row {row} (id {meta['id']!r})"
    try:
        img = np.asarray(dataset.load_image(j))
    except Exception as err:
        raise DataError(f"{where}: {err}") from err
    if img.dtype != np.uint8 or img.ndim != 2 or min(img.shape) == 0:
        raise DataError(f"{where}: the loader for source {meta['source']!r} returned "
                        f"{img.dtype} {img.shape}, expected uint8 [H, W]")
    return img


def _write_index_and_meta(partial: Path, dataset: XrayDataset, plan: pd.DataFrame,
                          size: int) -> None:
    orig_hw = np.load(partial / "orig_hw.npy")  # [N, 2]
    index = plan.copy()
    index.insert(len(KEY_COLUMNS), "orig_height", orig_hw[:, 0])
    index.insert(len(KEY_COLUMNS) + 1, "orig_width", orig_hw[:, 1])
    with replacing(partial / "index.parquet", "wb") as f:
        index.to_parquet(f, index=False)
    digest = content_digest(_map_images(partial / "images.npy", "r"), index,
                            list(dataset.findings))
    _write_json(partial / "meta.json", {
        "format": FORMAT,
        "name": dataset.name,
        "findings": list(dataset.findings),
        "size": size,
        "count": len(dataset),
        "sources": sorted(dataset.meta["source"].unique().tolist()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "digest": digest,
        "complete": True,
    })


def _finish(partial: Path, out: Path) -> None:
    """Drop the bookkeeping of a complete partial folder and rename it into place."""
    for name in ("plan.parquet", "plan.json", "orig_hw.npy"):
        (partial / name).unlink(missing_ok=True)
    remove_stale_temps(partial)  # a killed writer's, which the finished cache must not carry
    shutil.rmtree(partial / "done", ignore_errors=True)
    if out.is_dir():
        out.rmdir()  # an empty folder made by the user
    partial.rename(out)


def _plan_table(dataset: XrayDataset) -> pd.DataFrame:
    """The request: key metadata and labels, the index without the original sizes."""
    # Strings throughout: merged sources may mix int and str patient ids, which parquet refuses.
    table = dataset.meta[list(KEY_COLUMNS)].reset_index(drop=True).astype(str)
    for j, f in enumerate(dataset.findings):
        table[f] = dataset.labels[:, j]
    return table


def _refuse_if_different(folder: Path, stored: pd.DataFrame, stored_size: int,
                         plan: pd.DataFrame, size: int) -> None:
    diffs = _differences(stored, int(stored_size), plan, size)
    if diffs:
        raise DataError(f"{folder}: was made for a different request ({'; '.join(diffs)}). "
                        f"Delete {folder} to start fresh, or write to another folder.")


def _differences(stored: pd.DataFrame, stored_size: int, plan: pd.DataFrame,
                 size: int) -> list[str]:
    diffs = []
    if stored_size != size:
        diffs.append(f"size {stored_size}, requested {size}")
    if len(stored) != len(plan):
        return [*diffs, f"{len(stored)} images, requested {len(plan)}"]
    findings = [c for c in plan.columns if c not in KEY_COLUMNS]
    stored_findings = [c for c in stored.columns if c not in (*KEY_COLUMNS, "orig_height",
                                                              "orig_width")]
    if stored_findings != findings:
        diffs.append(f"findings {stored_findings}, requested {findings}")
    for col in KEY_COLUMNS:
        old, new = stored[col].astype(str).to_numpy(), plan[col].astype(str).to_numpy()
        if (old != new).any():
            row = int(np.argmax(old != new))
            diffs.append(f"{col} at row {row} is {old[row]!r}, requested {new[row]!r}")
    if stored_findings == findings:
        old = stored[findings].to_numpy(np.float32)
        new = plan[findings].to_numpy(np.float32)
        differs = ~((old == new) | (np.isnan(old) & np.isnan(new))).all(axis=1)
        if differs.any():
            diffs.append(f"labels differ, first at row {int(np.argmax(differs))}")
    return diffs


def _map_images(path: Path, mode: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode=mode)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot map the image array ({err}); the file is missing, "
                        "truncated or corrupt; rerun prepare into a fresh folder") from err


def is_complete(folder: str | Path) -> bool:
    """Whether `folder` holds a finished cache (a partial or damaged one is not)."""
    try:
        return _read_json(Path(folder)).get("complete") is True
    except (OSError, ValueError):
        return False


def _read_json(folder: Path, name: str = "meta.json") -> dict:
    return json.loads((folder / name).read_text())


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the index ({err})") from err


def _write_json(path: Path, obj: dict) -> None:
    with replacing(path, "w") as f:
        f.write(json.dumps(obj, indent=1))


def _default_workers() -> int:
    """Cores this process may use (respects CPU affinity, e.g. in containers)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

"""The preprocessing cache: contents, center crop, resume, atomicity and the integrity check."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_lib.data.cache import (
    check_cache,
    is_complete,
    open_cache,
    prepare_cache,
    to_square,
)
from cxr_lib.data.core import DataError, XrayDataset, read_image_row

FINDINGS = ["A", "B", "C"]
SPLIT_OF_PATIENT = ("train", "train", "train", "val", "test")


# Loaders are module-level functions so that datasets pickle into worker processes.
def draw_image(row: pd.Series) -> np.ndarray:
    """A deterministic image of the row's size, never all zero."""
    rng = np.random.default_rng(int(row["seed"]))
    return rng.integers(1, 256, size=(int(row["h"]), int(row["w"])), dtype=np.uint8)


def slow_draw(row: pd.Series) -> np.ndarray:
    time.sleep(0.05)
    return draw_image(row)


def sleepy_draw(row: pd.Series) -> np.ndarray:
    time.sleep(2.0)  # a chunk of 8 takes 16 s: a worker outlives a killed parent by that much
    return draw_image(row)


def flaky_draw(row: pd.Series) -> np.ndarray:
    if row["fail"]:
        raise DataError(f"{row['path']}: cannot decode image (simulated)")
    return draw_image(row)


def float_image(row: pd.Series) -> np.ndarray:
    return draw_image(row).astype(np.float32)


def explode(row: pd.Series) -> np.ndarray:
    raise AssertionError(f"{row['id']} was decoded again")


LOADERS = {"drawn": draw_image, "slow": slow_draw, "sleepy": sleepy_draw, "flaky": flaky_draw,
           "float": float_image}


def make_dataset(n: int = 20, *, h: int = 24, w: int = 24, source: str = "drawn",
                 fail_at: int | None = None) -> XrayDataset:
    """n images, two per patient, patient-disjoint splits, labels with NaN in finding C."""
    patient = np.arange(n) // 2
    meta = pd.DataFrame({
        "id": [f"img{i:03d}" for i in range(n)],
        "patient": [f"p{p}" for p in patient],
        "split": [SPLIT_OF_PATIENT[p % 5] for p in patient],
        "source": source,
        "path": [f"/nowhere/img{i:03d}.png" for i in range(n)],
        "seed": np.arange(n) + 100,
        "h": h,
        "w": w,
        "fail": np.arange(n) == fail_at,
    })
    labels = np.stack([np.arange(n) % 2, np.arange(n) % 3 == 0,
                       np.where(np.arange(n) % 4 == 0, np.nan, 1.0)], axis=1)
    return XrayDataset("toy", FINDINGS, labels, meta, {source: LOADERS[source]})


def png_dataset(folder: Path, n: int = 16) -> XrayDataset:
    """Real PNG files read through core.read_image_row."""
    ds = make_dataset(n)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{ds.meta['id'][i]}.png"
        Image.fromarray(ds.load_image(i)).save(path)
        paths.append(str(path))
    meta = ds.meta.assign(path=paths, source="png")
    return XrayDataset("pngs", FINDINGS, ds.labels, meta, {"png": read_image_row})


def done_chunks(out: Path) -> set[int]:
    done = out.with_name(out.name + ".partial") / "done"
    return {int(p.name) for p in done.iterdir()} if done.is_dir() else set()


def test_prepare_writes_images_index_and_meta(tmp_path):
    ds = make_dataset(10, h=30, w=20)
    cache = prepare_cache(ds, tmp_path / "c", size=16, workers=1, chunk=4, progress=False)
    assert sorted(p.name for p in cache.path.iterdir()) == [
        "images.npy", "index.parquet", "meta.json"]
    assert not (tmp_path / "c.partial").exists()
    assert cache.images.shape == (10, 16, 16) and cache.images.dtype == np.uint8
    assert not cache.images.flags.writeable
    for i in range(10):
        np.testing.assert_array_equal(cache.images[i], to_square(ds.load_image(i), 16))
    assert list(cache.index.columns) == ["id", "patient", "split", "source", "path",
                                         "orig_height", "orig_width", *FINDINGS]
    assert (cache.index["orig_height"] == 30).all() and (cache.index["orig_width"] == 20).all()
    assert cache.labels.dtype == np.float32
    np.testing.assert_array_equal(cache.labels, ds.labels)  # NaN kept
    assert np.isnan(cache.labels[:, 2]).sum() == 3
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["complete"] is True and meta["count"] == 10 and meta["size"] == 16
    assert meta["findings"] == FINDINGS and meta["sources"] == ["drawn"]
    assert len(cache) == 10 and cache.findings == FINDINGS and cache.size == 16
    np.testing.assert_array_equal(cache.split_indices("val"), [6, 7])
    summary = cache.summary()
    assert "10 images of 16x16" in summary and "train" in summary and "drawn" in summary
    again = pickle.loads(pickle.dumps(cache))  # by path: workers re-map, nothing copied
    assert again.path == cache.path and isinstance(again.images, np.memmap)


def test_prepare_in_worker_processes_equals_in_process(tmp_path):
    ds = make_dataset(24, h=20, w=28)
    one = prepare_cache(ds, tmp_path / "one", size=12, workers=1, chunk=5, progress=False)
    two = prepare_cache(ds, tmp_path / "two", size=12, workers=2, chunk=5, progress=False)
    np.testing.assert_array_equal(one.images, two.images)
    pd.testing.assert_frame_equal(one.index, two.index)


def test_non_square_image_is_center_cropped_then_resized(tmp_path):
    wide = np.full((20, 40), 50, np.uint8)
    wide[:, 10:30] = 200  # the central square; the side strips must vanish
    np.testing.assert_array_equal(to_square(wide, 20), wide[:, 10:30])
    assert (to_square(wide, 10) == 200).all()
    assert (to_square(wide.T, 10) == 200).all()
    ds = make_dataset(4, h=12, w=36)
    cache = prepare_cache(ds, tmp_path / "c", size=8, workers=1, progress=False)
    crop = ds.load_image(1)[:, 12:24]
    expected = Image.fromarray(crop).resize((8, 8), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(cache.images[1], np.asarray(expected))


def test_finished_cache_for_same_request_is_returned_without_work(tmp_path):
    ds = make_dataset(8)
    first = prepare_cache(ds, tmp_path / "c", size=8, workers=1, progress=False)
    ds.loaders = {"drawn": explode}
    second = prepare_cache(ds, tmp_path / "c", size=8, workers=1, progress=False)
    np.testing.assert_array_equal(first.images, second.images)


def test_identical_content_gives_the_identical_digest_and_other_labels_another(tmp_path):
    """The digest names what training sees: made at two times, into two folders, from copies
    of the files in two places, in other chunks, the same pixels and labels give one digest."""
    first = prepare_cache(png_dataset(tmp_path / "a", 8), tmp_path / "one", size=8, workers=1,
                          progress=False)
    time.sleep(1.1)  # another creation time in meta.json
    second = prepare_cache(png_dataset(tmp_path / "b", 8), tmp_path / "two", size=8, workers=2,
                           chunk=3, progress=False)
    metas = [json.loads((c.path / "meta.json").read_text()) for c in (first, second)]
    assert metas[0]["created"] != metas[1]["created"]
    assert metas[0]["digest"] == first.digest == second.digest and len(first.digest) == 16
    relabelled = png_dataset(tmp_path / "b", 8)
    relabelled.labels[6, 0] = 1 - relabelled.labels[6, 0]  # one label of a test image
    third = prepare_cache(relabelled, tmp_path / "three", size=8, workers=1, progress=False)
    assert third.images.tobytes() == first.images.tobytes() and third.digest != first.digest


def test_a_cache_made_before_digests_gets_its_digest_computed_with_a_notice(tmp_path, capsys):
    made = prepare_cache(make_dataset(8), tmp_path / "c", size=8, workers=1, progress=False)
    meta = json.loads((made.path / "meta.json").read_text())
    del meta["digest"]
    (made.path / "meta.json").write_text(json.dumps(meta))
    old = open_cache(made.path)
    assert [old.digest, old.digest] == [made.digest] * 2  # computed once, on first use
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and notice[0].startswith(f"{made.path}: made before caches kept")


def test_finished_cache_for_other_request_is_refused(tmp_path):
    prepare_cache(make_dataset(8), tmp_path / "c", size=8, workers=1, progress=False)
    with pytest.raises(DataError, match=r"different request \(size 8, requested 16\)"):
        prepare_cache(make_dataset(8), tmp_path / "c", size=16, workers=1, progress=False)
    with pytest.raises(DataError, match="8 images, requested 9"):
        prepare_cache(make_dataset(9), tmp_path / "c", size=8, workers=1, progress=False)


def test_folder_that_is_not_a_cache_is_refused_and_empty_one_used(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="junk: exists and is not a finished cache"):
        prepare_cache(make_dataset(4), tmp_path / "junk", size=8, workers=1, progress=False)
    (tmp_path / "empty").mkdir()
    cache = prepare_cache(make_dataset(4), tmp_path / "empty", size=8, workers=1,
                          progress=False)
    assert len(cache) == 4


def test_only_a_finished_cache_is_complete(tmp_path):
    ds = png_dataset(tmp_path / "png", 8)
    Path(ds.meta["path"][5]).write_bytes(b"not a png")
    assert not is_complete(tmp_path / "c") and not is_complete(str(tmp_path / "png"))
    with pytest.raises(DataError):
        prepare_cache(ds, tmp_path / "c", size=8, workers=1, chunk=4, progress=False)
    assert not is_complete(tmp_path / "c.partial")  # chunk 0 is done, the cache is not
    ok = make_dataset(4)
    prepare_cache(ok, tmp_path / "ok", size=8, workers=1, progress=False)
    assert is_complete(tmp_path / "ok") and is_complete(str(tmp_path / "ok"))
    (tmp_path / "ok" / "meta.json").write_text("{not json")
    assert not is_complete(tmp_path / "ok")


@pytest.mark.parametrize("workers", [1, 2])
def test_decode_error_names_file_keeps_chunks_and_resumes(tmp_path, workers):
    ds = png_dataset(tmp_path / "png", 16)
    reference = prepare_cache(ds, tmp_path / "ref", size=8, workers=1, progress=False)
    bad = Path(ds.meta["path"][13])  # in chunk 3 of 4
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"not a png")
    out = tmp_path / "c"
    with pytest.raises(DataError) as err:
        prepare_cache(ds, out, size=8, workers=workers, chunk=4, progress=False)
    message = str(err.value)
    assert str(bad) in message and "row 13" in message and "rerun to resume" in message
    assert not out.exists()
    with pytest.raises(DataError, match="not a finished cache.*unfinished run"):
        open_cache(out)  # a partial cache never opens
    done = done_chunks(out)
    assert 3 not in done and len(done) >= 1
    if workers == 1:
        assert done == {0, 1, 2}
    for k in done:  # finished chunks must not be read again
        for path in ds.meta["path"][4 * k:4 * k + 4]:
            Path(path).unlink()
    bad.write_bytes(good_bytes)
    cache = prepare_cache(ds, out, size=8, workers=workers, chunk=4, progress=False)
    np.testing.assert_array_equal(cache.images, reference.images)
    pd.testing.assert_frame_equal(cache.index, reference.index)
    assert check_cache(out)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    out = tmp_path / "c"
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_cache import make_dataset\n"
        "from cxr_lib.data.cache import prepare_cache\n"
        f"prepare_cache(make_dataset(48, source='slow'), {str(out)!r}, size=8, workers=2,"
        " chunk=4, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 60
    try:
        while len(done_chunks(out)) < 2:
            assert proc.poll() is None, "the preparing process ended before it was killed"
            assert time.monotonic() < deadline, "no chunk finished within 60 s"
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already if it ended by itself
            os.killpg(proc.pid, signal.SIGKILL)  # the process and its workers, as a crash would
        proc.wait()
    finished = done_chunks(out)
    assert not out.exists() and 2 <= len(finished) < 12
    ds = make_dataset(48, source="slow")
    ds.loaders = {"slow": draw_image}  # same request, fast
    reference = prepare_cache(ds, tmp_path / "ref", size=8, workers=1, progress=False)
    cache = prepare_cache(ds, out, size=8, workers=2, chunk=4, progress=False)
    assert cache.images.tobytes() == reference.images.tobytes()
    pd.testing.assert_frame_equal(cache.index, reference.index)


def live_members(group: int) -> list[int]:
    """The processes of process group `group` that have not ended (zombies left out)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if state != "Z" and int(pgrp) == group:
                pids.append(int(stat.parent.name))
    return pids


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in the main thread if the block takes longer (a lock wait too)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    before = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def start_preparing(out: Path, n: int, source: str, workers: int, chunk: int,
                    **popen) -> subprocess.Popen:
    """`prepare_cache` of make_dataset(n, source=source) into `out`, in a new session."""
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_cache import make_dataset\n"
        "from cxr_lib.data.cache import prepare_cache\n"
        f"prepare_cache(make_dataset({n}, source={source!r}), {str(out)!r}, size=8, "
        f"workers={workers}, chunk={chunk}, progress=False)\n"
    )
    return subprocess.Popen([sys.executable, "-c", script], start_new_session=True, **popen)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes in /proc")
def test_kill_of_the_parent_alone_stops_its_workers_and_the_rerun_does_not_wait(tmp_path):
    """kill -9 of the preparing process only (an OOM kill, a closed terminal): its workers used
    to live on holding the lock, and a rerun waited in it for minutes without a word."""
    out = tmp_path / "c"
    proc = start_preparing(out, 32, "sleepy", workers=2, chunk=8)
    try:
        limit = time.monotonic() + 60
        while len(live_members(proc.pid)) < 3:  # the parent and its two workers
            assert proc.poll() is None, "the preparing process ended before it was killed"
            assert time.monotonic() < limit, "no two workers within 60 s"
            time.sleep(0.05)
        time.sleep(0.5)  # the workers are decoding their first chunks
        os.kill(proc.pid, signal.SIGKILL)  # the parent alone, not its process group
        proc.wait()
        ds = make_dataset(32, source="sleepy")
        ds.loaders = {"sleepy": draw_image}  # same request, fast
        with deadline(30):
            cache = prepare_cache(ds, out, size=8, workers=2, chunk=8, progress=False)
        limit = time.monotonic() + 10
        while live_members(proc.pid):
            assert time.monotonic() < limit, "orphaned workers still run 10 s after the rerun"
            time.sleep(0.05)
    finally:
        for pid in live_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    reference = prepare_cache(ds, tmp_path / "ref", size=8, workers=1, progress=False)
    assert cache.images.tobytes() == reference.images.tobytes()
    pd.testing.assert_frame_equal(cache.index, reference.index)
    assert check_cache(out)


def test_a_process_waiting_for_the_lock_says_which_process_holds_it(tmp_path, capsys):
    """It used to wait without a word: now one line names the holder and the lock file."""
    out = tmp_path / "c"
    proc = start_preparing(out, 80, "slow", workers=1, chunk=4)  # 4 s: this one must wait
    try:
        limit = time.monotonic() + 60
        while not done_chunks(out):
            assert proc.poll() is None and time.monotonic() < limit, "no chunk within 60 s"
            time.sleep(0.01)
        ds = make_dataset(80, source="slow")
        ds.loaders = {"slow": explode}  # the other process makes it, this one only waits
        cache = prepare_cache(ds, out, size=8, workers=1, progress=False)
    finally:
        proc.wait(timeout=60)
    waited = capsys.readouterr().err.strip().splitlines()
    assert len(waited) == 1 and waited[0].startswith(f"{out}: waiting for process {proc.pid} on ")
    assert "preparing it since" in waited[0] and "c.lock" in waited[0]
    assert len(cache) == 80 and proc.returncode == 0


def test_resume_into_partial_of_other_request_is_refused(tmp_path):
    out = tmp_path / "c"
    with pytest.raises(DataError, match="simulated"):
        prepare_cache(make_dataset(12, source="flaky", fail_at=9), out, size=8, workers=1,
                      chunk=4, progress=False)
    assert done_chunks(out) == {0, 1}
    fixed = make_dataset(12, source="flaky")
    with pytest.raises(DataError, match=r"c\.partial: was made for a different request "
                                        r"\(size 8, requested 16\)\. Delete"):
        prepare_cache(fixed, out, size=16, workers=1, chunk=4, progress=False)
    renamed = make_dataset(12, source="flaky")
    renamed.meta.loc[5, "id"] = "other"
    with pytest.raises(DataError, match="id at row 5 is 'img005', requested 'other'"):
        prepare_cache(renamed, out, size=8, workers=1, chunk=4, progress=False)
    relabelled = make_dataset(12, source="flaky")
    relabelled.labels[7, 0] = 1 - relabelled.labels[7, 0]
    with pytest.raises(DataError, match="labels differ, first at row 7"):
        prepare_cache(relabelled, out, size=8, workers=1, chunk=4, progress=False)
    cache = prepare_cache(fixed, out, size=8, workers=1, chunk=6, progress=False)  # planned 4
    assert len(cache) == 12 and check_cache(out)


def test_loader_returning_wrong_type_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"row 0 \(id 'img000'\).*float32 \(8, 8\)"):
        prepare_cache(make_dataset(3, h=8, w=8, source="float"), tmp_path / "c", size=8,
                      workers=1, progress=False)


def test_unpicklable_loader_is_refused_for_workers_but_fine_in_process(tmp_path):
    ds = make_dataset(8)
    ds.loaders = {"drawn": lambda row: draw_image(row)}
    with pytest.raises(DataError, match="cannot be sent to worker processes.*workers=1"):
        prepare_cache(ds, tmp_path / "c", size=8, workers=2, chunk=4, progress=False)
    assert len(prepare_cache(ds, tmp_path / "c", size=8, workers=1, chunk=4,
                             progress=False)) == 8


def test_open_cache_refuses_incomplete_meta(tmp_path):
    cache = prepare_cache(make_dataset(4), tmp_path / "c", size=8, workers=1, progress=False)
    meta = json.loads((cache.path / "meta.json").read_text())
    (cache.path / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(DataError, match=r"c: not a finished cache.*rerun"):
        open_cache(cache.path)


def _truncate(path: Path) -> None:
    images = path / "images.npy"
    images.write_bytes(images.read_bytes()[:-100])


def _edit_index(path: Path, row: int, column: str, value) -> None:
    index = pd.read_parquet(path / "index.parquet")
    index.loc[row, column] = value
    index.to_parquet(path / "index.parquet", index=False)


def _duplicate_id(path: Path) -> None:
    _edit_index(path, 1, "id", "img000")


def _leak_patient(path: Path) -> None:
    _edit_index(path, 9, "patient", "p0")  # row 9 is a test image, p0 a train patient


def _bad_label(path: Path) -> None:
    _edit_index(path, 2, "B", 2.0)


def _changed_label(path: Path) -> None:
    _edit_index(path, 3, "A", 1.0 - pd.read_parquet(path / "index.parquet")["A"][3])


def _zero_image(path: Path) -> None:
    images = np.load(path / "images.npy", mmap_mode="r+")
    images[5] = 0  # as if its chunk had never been written
    images.flush()


CORRUPTIONS = {
    "truncated": (_truncate, "images.npy: cannot map"),
    "duplicate id": (_duplicate_id, "1 duplicate image id.*'img000'"),
    "leaked patient": (_leak_patient, r"patient 'p0'.* in \['test', 'train'\]"),
    "zeroed image": (_zero_image, r"1 image\(s\) are all zero.*row 5 \(id 'img005'\)"),
    "label value": (_bad_label, "row 2 .* label 2.0 for B"),
    "changed label": (_changed_label, "images or index differ from when it was made"),
}


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "c"
    return prepare_cache(make_dataset(10), out, size=8, workers=1, progress=False).path


def test_check_cache_passes_a_good_cache(good_cache):
    assert "10 images of 8x8" in check_cache(good_cache)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_check_cache_catches_corruption(good_cache, tmp_path, kind):
    corrupt, message = CORRUPTIONS[kind]
    broken = tmp_path / "broken"
    shutil.copytree(good_cache, broken)
    corrupt(broken)
    with pytest.raises(DataError, match=message):
        check_cache(broken)


def test_cli_check_prints_summary_or_one_line_error(good_cache, tmp_path, capsys):
    from cxr_lib.cli import main

    main(["data", "check", str(good_cache)])
    assert "10 images of 8x8" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cxr: error: .*missing: not a finished cache"):
        main(["data", "check", str(tmp_path / "missing")])


def test_two_processes_preparing_one_cache_both_get_it_and_it_is_made_once(tmp_path):
    """Two chapters, or two ranks, asking for the same cache at once: the second waits for the
    first and opens its result instead of writing into the same folder."""
    out = tmp_path / "c"
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_cache import make_dataset\n"
        "from cxr_lib.data.cache import prepare_cache\n"
        f"cache = prepare_cache(make_dataset(24, source='slow'), {str(out)!r}, size=8, "
        "workers=1, chunk=4, progress=False)\n"
        "print(len(cache))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [proc.communicate(timeout=120) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr[-2000:]
        assert stdout.strip() == "24"
    ds = make_dataset(24)
    reference = prepare_cache(ds, tmp_path / "ref", size=8, workers=1, progress=False)
    assert open_cache(out).images.tobytes() == reference.images.tobytes()
    assert not (tmp_path / "c.partial").exists()

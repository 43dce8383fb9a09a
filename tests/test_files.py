"""The library's one atomic writer (cxr_lib.data.files): whole files or none, even after kill -9."""

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cxr_lib.data import cache, files
from cxr_lib.engine import runs

LIBRARY = Path(files.__file__).resolve().parents[1]


def test_a_writer_killed_mid_write_leaves_the_old_file_and_a_temp_that_is_swept(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    script = ("import sys, time\n"
              "from cxr_lib.data.files import replacing\n"
              f"with replacing({str(target)!r}, 'wb') as f:\n"
              "    f.write(b'new' * 100000)\n"
              "    f.flush()\n"
              "    print('writing', flush=True)\n"
              "    time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": str(LIBRARY.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert target.read_bytes() == b"old"
    temps = list(tmp_path.glob(files.TEMP_GLOB))
    assert len(temps) == 1 and temps[0].stat().st_size == 300000  # the half-written new file
    files.remove_stale_temps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_failed_write_leaves_no_temp_file_and_a_finished_one_replaces(tmp_path):
    target = tmp_path / "t.txt"
    with pytest.raises(OSError, match="disk full"), files.replacing(target, "w") as f:
        f.write("half")
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []
    with files.replacing(target, "w") as f:
        f.write("whole")
    assert target.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["t.txt"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_the_cache_and_the_run_folders_write_through_the_one_writer():
    assert cache.replacing is files.replacing and runs.replacing is files.replacing
    assert runs.remove_stale_temps is files.remove_stale_temps
    writers = []
    for path in LIBRARY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            name = getattr(called, "attr", getattr(called, "id", None))
            if name in ("mkstemp", "NamedTemporaryFile", "_write_atomic"):
                writers.append(f"{path.relative_to(LIBRARY)}:{node.lineno} {name}")
    assert writers == ["data/files.py:" + str(_mkstemp_line()) + " mkstemp"], writers


def _mkstemp_line() -> int:
    lines = Path(files.__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if "mkstemp(" in line)


def test_a_finished_cache_carries_no_temp_file_a_killed_writer_left(tmp_path):
    partial, out = tmp_path / "c.partial", tmp_path / "c"
    (partial / "done").mkdir(parents=True)
    pd.DataFrame({"a": [1]}).to_parquet(partial / "index.parquet")
    (partial / ".meta.json.x1y2.tmp").write_text('{"half": ')
    (partial / "plan.json").write_text("{}")
    cache._finish(partial, out)
    assert sorted(p.name for p in out.iterdir()) == ["index.parquet"]

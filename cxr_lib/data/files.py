"""The library's one atomic writer: files are replaced, never rewritten in place.

`replacing` writes into a temp file in the same folder, fsyncs it, then `os.replace`s it over
the target, so a crash (even SIGKILL) leaves either the old file or the new one. What a killed
writer leaves behind is only its temp file, `.<name>.<random>.tmp`, which `remove_stale_temps`
deletes. It lives in data/, the lowest stage that writes files (the preprocessing cache); the
run folders of engine/ and the reports of bench/ write through it too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

TEMP_GLOB = ".*.tmp"


@contextmanager
def replacing(path: str | Path, mode: str) -> Iterator[IO]:
    """Open a temp file beside `path`; on success fsync it and move it over `path`. On an
    error the temp file is removed and `path` keeps what it held."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; results are meant to be shared
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(folder: str | Path) -> None:
    """Delete the temp files a killed writer left in `folder`."""
    for tmp in Path(folder).glob(TEMP_GLOB):
        tmp.unlink(missing_ok=True)

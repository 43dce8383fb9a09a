"""The real sample data beside the project: `CXR_SAMPLE_DATA`, else `../shared/data`. A test
that reads a sample is skipped, with this message, where the sample is absent."""

import os
from pathlib import Path

import pytest

SAMPLE_DATA = Path(os.environ.get("CXR_SAMPLE_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))


def sample(name: str) -> Path:
    """The sample folder `name` (e.g. "nih-cxr14-sample"), or a skip saying where it was looked
    for."""
    root = SAMPLE_DATA / name
    if not root.is_dir():
        pytest.skip(f"real sample {root} absent (set CXR_SAMPLE_DATA to the samples' folder)")
    return root

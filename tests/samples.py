"""The real samples: those shipped in `cxr_lib/data/samples`, or the copy `CXR_SAMPLE_DATA`
names. A test that reads a sample is skipped, with this message, where the sample is absent."""

import pytest

from cxr_lib.data.samples import sample_path, samples_root

SAMPLE_DATA = samples_root()


def sample(name: str):
    """The sample folder `name` (e.g. "nih-cxr14-sample"), or a skip saying where it was looked
    for."""
    root = sample_path(name)
    if not root.is_dir():
        pytest.skip(f"real sample {root} absent (CXR_SAMPLE_DATA names another samples folder)")
    return root

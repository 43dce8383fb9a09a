"""The real samples: those shipped in `cxr_lib/data/samples`, or the copy `CXR_SAMPLE_DATA`
names. A test that reads a sample is skipped, with this message, where the sample is absent."""

from pathlib import Path

import pytest

from cxr_lib.data import open_source
from cxr_lib.data.samples import sample_path, samples_root

SAMPLE_DATA = samples_root()


def sample(name: str):
    """The sample folder `name` (e.g. "nih-cxr14-sample"), or a skip saying where it was looked
    for."""
    root = sample_path(name)
    if not root.is_dir():
        pytest.skip(f"real sample {root} absent (CXR_SAMPLE_DATA names another samples folder)")
    return root


def patient_share(name: str, source: str, folder: Path, every: int) -> Path:
    """Sample `name` (read as `source`) cut to every `every`-th of its patients (sorted by id),
    built in `folder` from links: its files at the top (label files, split lists) whole, and the
    kept patients' images at their place, so that the same readers and data branches run on
    fewer images."""
    root = sample(name).resolve()
    meta = open_source(source, root).meta
    kept = meta["patient"].isin(sorted(meta["patient"].unique())[::every])
    for image in (Path(p).resolve() for p in meta.loc[kept, "path"]):
        link = folder / image.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(image)
    for entry in root.iterdir():
        if entry.is_file():
            (folder / entry.name).symlink_to(entry)
    return folder

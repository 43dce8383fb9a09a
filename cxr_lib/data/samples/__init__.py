"""The small real X-ray samples shipped with the package, so a fresh clone or a `pip install`
studies real chest X-rays (sources, licences and citations: README.md beside this file).

Each folder is laid out as its full data set's official release, so the same readers load a
sample and the whole set: `nih-cxr14-sample/` (621 ChestX-ray14 images at 256 px, one per
patient, with the official label file, boxes and split lists of all 112,120 images),
`nih-cxr14-fullres/` (16 of them at the original 1024 px, for the decoding path and `cxr
bench`; its label files link to the sample's) and `pediatric-pneumonia-sample/` (806 pediatric
images of Kermany et al., `train/NORMAL` and `train/PNEUMONIA`).
"""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent
NAMES = ("nih-cxr14-sample", "nih-cxr14-fullres", "pediatric-pneumonia-sample")


def samples_root() -> Path:
    """The folder holding the samples: `CXR_SAMPLE_DATA` when set (another copy, e.g. a
    larger subset in the same layout), else the shipped one."""
    return Path(os.environ.get("CXR_SAMPLE_DATA") or SHIPPED)


def sample_path(name: str) -> Path:
    """The sample folder `name` (one of NAMES) under `samples_root()`."""
    if name not in NAMES:
        raise ValueError(f"no sample {name!r}; samples: {', '.join(NAMES)}")
    return samples_root() / name

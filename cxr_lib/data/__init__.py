"""Data layer: one dataset interface, readers for real layouts, phantoms and the cache."""

from cxr_lib.data.core import (
    FINDINGS,
    SPLITS,
    DataError,
    XrayDataset,
    check_patient_disjoint,
    merge,
    read_image,
)
from cxr_lib.data.sources import SOURCES, open_source, read_source

__all__ = [
    "FINDINGS",
    "SOURCES",
    "SPLITS",
    "DataError",
    "XrayDataset",
    "check_patient_disjoint",
    "merge",
    "open_source",
    "read_image",
    "read_source",
]


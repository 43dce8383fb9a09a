"""Data layer: one dataset interface, readers for real layouts, phantoms and the cache."""

from cxr_lib.data.core import (
    FINDINGS,
    SPLITS,
    DataError,
    XrayDataset,
    check_patient_disjoint,
    check_whole,
    merge,
    read_image,
)

__all__ = [
    "FINDINGS",
    "SPLITS",
    "DataError",
    "XrayDataset",
    "check_patient_disjoint",
    "merge",
    "open_source",
    "read_image",
]


def open_source(source: str, root=None, *, val_fraction: float = 0.1, seed: int = 0,
                count: int = 1000, size: int = 128, split_lists=None) -> XrayDataset:
    """Open a data source by name: 'chestxray14', 'folder', 'chexpert' or 'covid19_radiography'
    (read from `root`), or 'phantom' (`count` synthetic images of `size` pixels; `root` unused).
    `split_lists` (train, val, test files; ChestX-ray14 only) replace the drawn validation.

    Every option is checked first, for every source: a value out of range is a mistake even
    where this source ignores it, and refusing it here leaves nothing half-made.
    """
    check_whole("count", count, 1)
    check_whole("size", size, 1)
    check_whole("seed", seed, 0)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split_lists is not None and source != "chestxray14":
        raise DataError(f"split lists are read for chestxray14 only, not {source!r}")
    if source == "chestxray14":
        from cxr_lib.data.nih import read_chestxray14

        return read_chestxray14(root, val_fraction=val_fraction, seed=seed,
                                split_lists=split_lists)
    if source == "folder":
        from cxr_lib.data.folder import read_class_folders

        return read_class_folders(root, val_fraction=val_fraction, seed=seed)
    if source == "chexpert":
        from cxr_lib.data.chexpert import read_chexpert

        return read_chexpert(root, val_fraction=val_fraction, seed=seed)
    if source == "covid19_radiography":
        from cxr_lib.data.covid import read_covid_radiography

        return read_covid_radiography(root, val_fraction=val_fraction, seed=seed)
    if source == "phantom":
        from cxr_lib.data.phantoms import phantom_dataset

        return phantom_dataset(count, size=size, seed=seed)
    raise DataError(f"unknown source {source!r}: expected chestxray14, folder, chexpert, "
                    "covid19_radiography or phantom")

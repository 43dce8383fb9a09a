"""Patient-level validation (and test) splits.

Images of one patient are strongly correlated (follow-ups, the same anatomy), so a validation
set drawn by image would leak patients from training into validation and flatter every metric.
Readers therefore draw validation *patients*, then check the result with
`check_patient_disjoint` rather than trusting it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cxr_lib.data.core import DataError

if TYPE_CHECKING:
    from cxr_lib.data.cache import Cache


def patient_split(patients: pd.Series, val_fraction: float, seed: int) -> np.ndarray:
    """'train' or 'val' for each row, drawing `val_fraction` of the distinct patients for val.

    Deterministic for a given seed and independent of row order (patients are sorted before
    the seeded shuffle). The count is round(val_fraction * patients), but at least one val and
    one train patient when val_fraction > 0 and there are two or more patients, so a small
    data set still gets a usable validation split. val_fraction = 0 puts everyone in train.
    Returns a str array [N] aligned with `patients`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    codes, unique = pd.factorize(patients.astype(str), sort=True)  # codes [N] into sorted ids
    is_val = np.zeros(len(unique), dtype=bool)
    order = np.random.default_rng(seed).permutation(len(unique))
    is_val[order[:_val_count(len(unique), val_fraction)]] = True
    return np.where(is_val[codes], "val", "train")


def _val_count(n_patients: int, val_fraction: float) -> int:
    if val_fraction == 0.0 or n_patients < 2:
        return 0
    return min(max(round(val_fraction * n_patients), 1), n_patients - 1)


def three_way_split(patients: pd.Series, val_fraction: float, test_fraction: float,
                    seed: int) -> np.ndarray:
    """'train', 'val' or 'test' for each row: `test_fraction` of the distinct patients drawn
    for test, then `val_fraction` of all of them drawn from the rest for val (two draws of
    `patient_split`, so the same guarantees hold). Returns a str array [N]."""
    if min(val_fraction, test_fraction) < 0.0 or val_fraction + test_fraction >= 1.0:
        raise DataError(f"val_fraction and test_fraction must be >= 0 with a sum below 1, got "
                        f"{val_fraction} and {test_fraction}")
    split = patient_split(patients, test_fraction, seed).astype(object)  # [N] train/val
    split[split == "val"] = "test"
    rest = split == "train"
    split[rest] = patient_split(patients[rest], val_fraction / (1.0 - test_fraction), seed)
    return split.astype(str)


def label_subset(cache: Cache, fraction: float, seed: int, split: str = "train") -> np.ndarray:
    """Cache rows of `split` from a seeded random `fraction` of its patients (at least one).

    Patients, not images, are drawn, so a patient's films come together; the draw for 1% is
    the start of the one for 10% (same seed), so smaller shares are nested in larger ones.
    """
    rows = cache.split_indices(split)
    if fraction >= 1:
        return rows
    patients = cache.index["patient"].to_numpy()[rows]
    unique = np.unique(patients)
    order = np.random.default_rng([seed, 4]).permutation(len(unique))
    chosen = unique[order[:max(1, round(fraction * len(unique)))]]
    return rows[np.isin(patients, chosen)]

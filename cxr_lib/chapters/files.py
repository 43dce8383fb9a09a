"""The files one chapter leaves for the next, in the profile's work folder.

Chapter 1 makes the preprocessing cache under `cache/`, which every chapter reads.
Chapter 2 saves the MAE encoder and chapter 3 the MoCo backbone under `encoders/`; chapter 4
fine-tunes from them and writes its tables of runs as `runs/ch4_<name>.parquet` (its pneumonia
runs' as `runs/pneumonia_finetunes.parquet` and `runs/pneumonia_<setting>.parquet`); chapter 5
reads the `ch4_` tables and each run's test scores; chapter 6 saves its cocktail encoders
beside them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxr_lib.methods.finetune import TEST_SCORES

SAVED_BY = {"mae": 2, "moco": 3, "cocktail": 6}  # pre-training method -> chapter that saves it
CHAPTER4_TABLES = "ch4_"  # prefix of chapter 4's tables of runs (on the 14 findings)
# chapter 4's tables of pneumonia runs: another task, so not among the tables chapter 5 reads
PNEUMONIA_FINETUNES = "pneumonia_finetunes"
PNEUMONIA_SWEEPS = "pneumonia_"  # prefix of its sweeps' tables, `pneumonia_<setting>`


def cache_dir(work: str | Path, dataset: str, size: int) -> Path:
    """`work/cache/<dataset>-<size>`: the preprocessing cache of a data set (its name, e.g.
    "chestxray14" or "phantoms") at `size` px, made by chapter 1 and read by every chapter."""
    return Path(work) / "cache" / f"{dataset}-{size}"


def runs_dir(work: str | Path) -> Path:
    """Where every chapter's training runs live."""
    return Path(work) / "runs"


def encoder_path(work: str | Path, method: str, model: str) -> Path:
    """`work/encoders/<method>_<model>.pt`: where a chapter saves its pre-trained encoder
    (method "mae", "moco", or "cocktail<share>" for chapter 6's mixes)."""
    if method.rstrip("0123456789.") not in SAVED_BY:
        raise ValueError(f"unknown pre-training method {method!r}; expected one of "
                         f"{sorted(SAVED_BY)}")
    return Path(work) / "encoders" / f"{method}_{model}.pt"


def encoder_file(work: str | Path, method: str, model: str) -> Path:
    """The encoder an earlier chapter saved; a missing one is an error that says which chapter
    to run first."""
    path = encoder_path(work, method, model)
    if not path.is_file():
        n = SAVED_BY[method.rstrip("0123456789.")]
        raise FileNotFoundError(
            f"{path} is missing: chapter {n} saves it. Run chapter {n} of this profile first "
            f"(for example `cxr book run --profile <profile> --chapters {n} 4`; a full book run "
            f"runs the chapters in order), with the same model ({model}).")
    return path


def chapter4_table_name(name: str) -> str:
    """The name chapter 4 gives one of its tables of runs (`run_points(..., name=...)`)."""
    return CHAPTER4_TABLES + name


def chapter4_tables(work: str | Path) -> dict[str, pd.DataFrame]:
    """Chapter 4's tables of fine-tuned runs, by name without the prefix; an error that says to
    run chapter 4 first when there is none."""
    found = sorted(runs_dir(work).glob(f"{CHAPTER4_TABLES}*.parquet"))
    if not found:
        raise FileNotFoundError(
            f"no {CHAPTER4_TABLES}*.parquet in {runs_dir(work)}: chapter 4 writes them; run "
            "chapter 4 of this profile first (cxr book run runs the chapters in order)")
    return {p.stem.removeprefix(CHAPTER4_TABLES): pd.read_parquet(p) for p in found}


def test_scores(work: str | Path, run: str) -> pd.DataFrame:
    """One fine-tuned run's test scores (id, patient, one logit per finding), indexed by id."""
    return pd.read_parquet(runs_dir(work) / run / TEST_SCORES).set_index("id")


def chapter4_table_paths(work: str | Path) -> list[Path]:
    """The files of chapter 4's tables of runs (`runs/ch4_<name>.parquet`), in name order;
    none yet is an empty list."""
    return sorted(runs_dir(work).glob(f"{CHAPTER4_TABLES}*.parquet"))

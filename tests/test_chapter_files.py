"""The files one chapter leaves for the next (cxr_lib.chapters.files)."""

from pathlib import Path

import pandas as pd
import pytest

from cxr_lib.chapters.files import (
    cache_dir,
    chapter4_table_name,
    chapter4_table_paths,
    chapter4_tables,
    encoder_file,
    encoder_path,
    runs_dir,
)


def test_chapter4_table_paths_lists_only_chapter_4s_tables_in_name_order(tmp_path):
    assert chapter4_table_paths(tmp_path) == []  # no runs folder yet
    runs = runs_dir(tmp_path)
    runs.mkdir()
    for name in ("starts", "drop_path"):
        pd.DataFrame({"run": [name]}).to_parquet(runs / f"{chapter4_table_name(name)}.parquet")
    (runs / "ch6_cocktail.parquet").write_bytes(b"")
    (runs / "ch4_notes.txt").write_text("not a table")
    assert chapter4_table_paths(tmp_path) == [runs / "ch4_drop_path.parquet",
                                              runs / "ch4_starts.parquet"]
    assert list(chapter4_tables(tmp_path)) == ["drop_path", "starts"]


def test_without_chapter_4s_tables_the_error_says_to_run_chapter_4(tmp_path):
    with pytest.raises(FileNotFoundError, match="run chapter 4 of this profile first"):
        chapter4_tables(tmp_path)


def test_the_cache_lives_under_cache_named_by_data_set_and_size(tmp_path):
    assert cache_dir(tmp_path, "phantoms", 64) == tmp_path / "cache" / "phantoms-64"
    assert cache_dir("../build/lab", "chestxray14", 256) == Path(
        "../build/lab/cache/chestxray14-256")


def test_chapter_2_saves_its_encoder_under_encoders(tmp_path):
    assert encoder_path(tmp_path, "mae", "vit_tiny_patch16") == (
        tmp_path / "encoders" / "mae_vit_tiny_patch16.pt")
    assert encoder_path(tmp_path, "cocktail0.5", "vit_tiny_patch16").name == (
        "cocktail0.5_vit_tiny_patch16.pt")
    with pytest.raises(ValueError, match="unknown pre-training method 'simclr'"):
        encoder_path(tmp_path, "simclr", "resnet50")


def test_a_missing_encoder_names_the_chapter_that_saves_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mae_vit_small_patch16.pt is missing: chapter 2"):
        encoder_file(tmp_path, "mae", "vit_small_patch16")
    with pytest.raises(FileNotFoundError, match=r"moco_densenet121.pt is missing: chapter 3"):
        encoder_file(tmp_path, "moco", "densenet121")
    saved = encoder_path(tmp_path, "moco", "densenet121")
    saved.parent.mkdir()
    saved.write_bytes(b"weights")
    assert encoder_file(tmp_path, "moco", "densenet121") == saved

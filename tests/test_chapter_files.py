"""The file contracts between chapters (cxr_lib.chapters.files)."""

from pathlib import Path

from cxr_lib.chapters.files import cache_dir, encoder_path


def test_the_cache_lives_under_cache_named_by_data_set_and_size(tmp_path):
    assert cache_dir(tmp_path, "phantoms", 64) == tmp_path / "cache" / "phantoms-64"
    assert cache_dir("../build/lab", "chestxray14", 256) == Path(
        "../build/lab/cache/chestxray14-256")


def test_chapter_2_saves_its_encoder_under_encoders(tmp_path):
    assert encoder_path(tmp_path, "mae", "vit_tiny_patch16") == (
        tmp_path / "encoders" / "mae_vit_tiny_patch16.pt")

"""The files one chapter leaves for the next (cxr_lib.chapters.files)."""

import pandas as pd

from cxr_lib.chapters.files import chapter4_table_name, chapter4_table_paths, runs_dir


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

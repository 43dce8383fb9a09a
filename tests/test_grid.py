"""Grids of fine-tuning runs: one row per run, written as parquet, loaded from the run cache."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from cxr_lib.chapters.setup import chapter_cache
from cxr_lib.data.phantoms import phantom_dataset
from cxr_lib.methods.finetune import FinetuneRecipe, paper_config
from cxr_lib.methods.grid import (
    describe,
    grid_points,
    run_grid,
    run_points,
    run_recipes,
    seed_summary,
)

BASE = FinetuneRecipe(model="vit_tiny_patch16", image_size=32, patch_size=8,
                      randaug_magnitude=None)
CONFIG = paper_config(epochs=1, warmup_epochs=0, batch_size=16, base_lr=1e-3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    return chapter_cache(work, phantom_dataset(48, size=32, seed=5), 32)


def test_a_2x2_grid_gives_4_rows_and_a_rerun_loads_all_4(cache, tmp_path):
    axes = {"layer_decay": [0.55, 1.0], "drop_path": [0.0, 0.2]}
    table = run_grid(BASE, axes, cache, CONFIG, tmp_path, progress=False)
    assert len(table) == 4 and not table["loaded"].any()
    assert list(zip(table["layer_decay"], table["drop_path"], strict=True)) == [
        (0.55, 0.0), (0.55, 0.2), (1.0, 0.0), (1.0, 0.2)]
    assert table["run"].nunique() == 4
    for column in ("valid_auc", "test_auc", "train_s", "images_per_s",
                   f"test_auc.{cache.findings[0]}"):
        assert table[column].notna().all(), column
    written = sorted(tmp_path.glob("grid-*.parquet"))
    assert len(written) == 1
    pd.testing.assert_frame_equal(pd.read_parquet(written[0]), table)

    again = run_grid(BASE, axes, cache, CONFIG, tmp_path, progress=False)
    assert again["loaded"].all()
    pd.testing.assert_frame_equal(again.drop(columns="loaded"), table.drop(columns="loaded"))


def test_axes_may_name_config_fields_and_named_tables_keep_their_name(cache, tmp_path, capsys):
    points = grid_points(BASE, CONFIG, {"seed": [0, 1], "train_fraction": [0.5]})
    assert [(c.seed, r.train_fraction) for r, c in points] == [(0, 0.5), (1, 0.5)]
    recipes = [BASE, dataclasses.replace(BASE, layer_decay=None)]
    table = run_recipes(recipes, cache, CONFIG, tmp_path, name="starts",
                        labels=["with decay", "without"], progress=False)
    assert capsys.readouterr().out.splitlines() == ["with decay", "without"]  # before each run
    assert (tmp_path / "starts.parquet").is_file()
    assert len(table) == 2 and table["layer_decay"].isna().tolist() == [False, True]
    assert table.columns[0] == "label" and table["label"].tolist() == ["with decay", "without"]
    assert pd.read_parquet(tmp_path / "starts.parquet")["label"].tolist() == table["label"].tolist()
    with pytest.raises(ValueError, match="1 labels for 2 points"):
        run_recipes(recipes, cache, CONFIG, tmp_path, labels=["one"], progress=False)


def test_with_progress_each_run_is_named_before_it_trains(cache, tmp_path, capsys):
    points = grid_points(BASE, CONFIG, {"train_fraction": [0.5], "seed": [3]})
    run_points(points, cache, tmp_path, name="shares")
    said = capsys.readouterr().out
    assert said.startswith(f"shares, run 1 of 1: {BASE.model} from random, ")
    assert "50% of the labels, seed 3\n" in said
    assert describe(dataclasses.replace(BASE, layer_decay=0.55, randaug_magnitude=None),
                    CONFIG).split(", ")[1:4] == ["layer decay 0.55", f"drop path "
                                                 f"{BASE.drop_path:g}", "no RandAugment"]


def test_unknown_or_empty_axes_are_refused():
    with pytest.raises(ValueError, match="'mask_ratio' must name a field"):
        grid_points(BASE, CONFIG, {"mask_ratio": [0.75]})
    with pytest.raises(ValueError, match="has no values"):
        grid_points(BASE, CONFIG, {"drop_path": []})


def test_seed_summary_gives_mean_spread_and_count_per_setting_in_order():
    table = pd.DataFrame({"init": ["mae", "random", "mae", "random"], "layer_decay": [None] * 4,
                          "valid_auc": [0.7, 0.6, 0.8, 0.6], "test_auc": [0.5] * 4})
    summary = seed_summary(table, ["init", "layer_decay"])
    assert summary["init"].tolist() == ["mae", "random"]
    assert summary["valid_auc_mean"].tolist() == pytest.approx([0.75, 0.6])
    assert summary["valid_auc_count"].tolist() == [2, 2]
    assert summary["valid_auc_std"].iloc[0] == pytest.approx(np.std([0.7, 0.8], ddof=1))

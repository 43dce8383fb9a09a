"""Grids of fine-tuning runs: one table row per run, every run through the run cache.

Chapter 4's ablations are small grids: the product of a few values of one or two settings
around a base recipe. Each point is a `finetune` run, so a grid asked for again loads its
finished runs and resumes an interrupted one; the table is written as parquet beside the runs,
for chapter 5's analysis.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_lib.data.cache import Cache
from cxr_lib.engine import runs
from cxr_lib.engine.config import TrainConfig
from cxr_lib.methods.finetune import FinetuneRecipe, FinetuneResult, finetune

RECIPE_FIELDS = frozenset(f.name for f in dataclasses.fields(FinetuneRecipe))
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def grid_points(base_recipe: FinetuneRecipe, config: TrainConfig,
                axes: Mapping[str, Sequence]) -> list[tuple[FinetuneRecipe, TrainConfig]]:
    """The cartesian product of `axes` around the base, in axis order. An axis names a field of
    the recipe (e.g. layer_decay) or of the TrainConfig (e.g. seed, base_lr)."""
    for key, values in axes.items():
        if (key in RECIPE_FIELDS) == (key in CONFIG_FIELDS):
            raise ValueError(f"grid axis {key!r} must name a field of FinetuneRecipe "
                             f"{sorted(RECIPE_FIELDS)} or of TrainConfig {sorted(CONFIG_FIELDS)}")
        if not len(values):
            raise ValueError(f"grid axis {key!r} has no values")
    points = []
    for values in itertools.product(*axes.values()):
        setting = dict(zip(axes, values, strict=True))
        recipe = dataclasses.replace(
            base_recipe, **{k: v for k, v in setting.items() if k in RECIPE_FIELDS})
        points.append((recipe, dataclasses.replace(
            config, **{k: v for k, v in setting.items() if k in CONFIG_FIELDS})))
    return points


def run_grid(base_recipe: FinetuneRecipe, axes: Mapping[str, Sequence], cache: Cache,
             config: TrainConfig, run_root: str | Path, *, name: str | None = None,
             **finetune_kwargs: Any) -> pd.DataFrame:
    """Fine-tune every point of the grid (or load it) and return one row per run; the table is
    also written to `run_root/<name>.parquet` (default name: grid-<hash of the request>)."""
    points = grid_points(base_recipe, config, axes)
    name = name or "grid-" + runs.config_hash(
        {"base": base_recipe, "config": config.identity(), "axes": dict(axes)})
    return run_points(points, cache, run_root, name=name, **finetune_kwargs)


def run_recipes(recipes: Sequence[FinetuneRecipe], cache: Cache, config: TrainConfig,
                run_root: str | Path, *, name: str | None = None,
                **finetune_kwargs: Any) -> pd.DataFrame:
    """`run_grid` over a list of recipes that are not a product (e.g. starts that each need
    their own weights file)."""
    name = name or "recipes-" + runs.config_hash(
        {"recipes": list(recipes), "config": config.identity()})
    return run_points([(r, config) for r in recipes], cache, run_root, name=name,
                      **finetune_kwargs)


def run_points(points: Sequence[tuple[FinetuneRecipe, TrainConfig]], cache: Cache,
               run_root: str | Path, *, name: str, labels: Sequence[str] | None = None,
               **finetune_kwargs: Any) -> pd.DataFrame:
    """Fine-tune each (recipe, config) in turn; the table of their rows, also saved as parquet.

    Each run is named before its epoch table, so that the table says whose it is: by its
    `labels` entry, which the table keeps as its first column, `label`; without labels (and
    with progress, the default) by its recipe in words (`describe`).
    """
    if labels is not None and len(labels) != len(points):
        raise ValueError(f"{len(labels)} labels for {len(points)} points")
    rows = []
    for i, (recipe, cfg) in enumerate(points):
        if labels is not None:
            print(labels[i], flush=True)
        elif finetune_kwargs.get("progress", True):
            print(f"{name}, run {i + 1} of {len(points)}: {describe(recipe, cfg)}", flush=True)
        rows.append(result_row(finetune(cache, recipe, cfg, run_root, **finetune_kwargs)))
    table = pd.DataFrame(rows)
    if labels is not None:
        table.insert(0, "label", list(labels))
    runs.atomic_write_parquet(table, Path(run_root) / f"{name}.parquet")
    return table


def describe(recipe: FinetuneRecipe, config: TrainConfig) -> str:
    """A run in words: model, start, regularisation, label share and seed."""
    parts = [f"{recipe.model} from {recipe.init}"]
    if recipe.layer_decay is not None:
        parts.append(f"layer decay {recipe.layer_decay:g}")
    parts.append(f"drop path {recipe.drop_path:g}")
    parts.append("no RandAugment" if recipe.randaug_magnitude is None
                 else f"RandAugment {recipe.randaug_magnitude:g}")
    if recipe.train_fraction < 1:
        parts.append(f"{recipe.train_fraction:.0%} of the labels")
    return ", ".join([*parts, f"seed {config.seed}"])


def result_row(result: FinetuneResult) -> dict:
    """One table row: the recipe, the config values that vary in studies, validation and test
    AUC (mean and per finding), time, throughput and whether the run was loaded."""
    recipe = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(result.recipe).items()}
    cfg, metrics = result.config, result.run.metrics
    return {**recipe, "seed": cfg.seed, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "base_lr": cfg.base_lr, "valid_auc": result.valid_auc, "test_auc": result.test_auc,
            **{f"test_auc.{k}": v for k, v in result.test_per_finding.items()},
            "train_images": result.train_images, "test_images": metrics.get("test_images"),
            "train_s": metrics.get("elapsed_s"),
            "images_per_s": float(result.run.history["images_per_s"].mean()),
            "loaded": result.run.loaded_from_cache, "run": result.run.path.name}


def seed_summary(table: pd.DataFrame, by: str | Sequence[str],
                 metrics: Sequence[str] = ("valid_auc", "test_auc")) -> pd.DataFrame:
    """Per setting (`by`), each metric's mean, standard deviation and count over seeds; the
    settings keep their order of first appearance. One seed gives a NaN deviation."""
    by = [by] if isinstance(by, str) else list(by)
    summary = table.groupby(by, sort=False, dropna=False)[list(metrics)].agg(
        ["mean", "std", "count"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    return summary.reset_index()

"""Run folders: stable config hashes, atomic files, finished-run detection, the runs table."""

import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxr_lib.engine import runs


@dataclass
class _Cfg:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.95)
    extra: dict = field(default_factory=dict)


def test_config_hash_is_canonical():
    a = {"lr": 0.001, "betas": [0.9, 0.95], "extra": {"x": 1, "y": "z"}}
    b = {"extra": {"y": "z", "x": 1}, "betas": (0.9, 0.95), "lr": 1e-3}
    assert runs.config_hash(a) == runs.config_hash(b)
    assert runs.config_hash(_Cfg(extra={"x": 1, "y": "z"})) == runs.config_hash(a)
    assert runs.config_hash({"v": np.float64(0.5), "p": Path("a/b")}) == runs.config_hash(
        {"v": 0.5, "p": "a/b"})
    h = runs.config_hash(a)
    assert len(h) == 12 and int(h, 16) >= 0


def test_config_hash_is_stable_across_sessions():
    # A fixed value: a change here would orphan every finished run folder.
    assert runs.config_hash({"a": 1, "b": [0.1, "x"], "c": {"d": None}}) == "c02a6461ba58"


def test_config_hash_separates_values():
    base = {"lr": 1e-3, "extra": {"mask_ratio": 0.9}}
    others = [{"lr": 1.0000001e-3, "extra": {"mask_ratio": 0.9}},
              {"lr": 1e-3, "extra": {"mask_ratio": 0.75}},
              {"lr": 1e-3, "extra": {"mask_ratio": 0.9, "crop": 0.5}},
              {"lr": 1e-3}]
    hashes = {runs.config_hash(c) for c in [base, *others]}
    assert len(hashes) == 5
    assert runs.config_hash({"e": 1}) != runs.config_hash({"e": 1.0})  # types are kept


def test_config_hash_rejects_unserialisable_values():
    with pytest.raises(TypeError, match="'model'.*object"):
        runs.config_hash({"lr": 1.0, "model": object()})


def test_run_dir_writes_config_once_and_refuses_a_mismatch(tmp_path):
    cfg = {"lr": 0.1, "extra": {"k": [1, 2]}}
    path = runs.run_dir(tmp_path, "mae", cfg)
    assert path == tmp_path / f"mae-{runs.config_hash(cfg)}"
    assert json.loads((path / "config.json").read_text()) == cfg
    assert runs.run_dir(tmp_path, "mae", cfg) == path  # second use: same folder, no error
    (path / "config.json").write_text(json.dumps({"lr": 0.2, "extra": {"k": [1, 2]}}))
    with pytest.raises(ValueError, match="config.json: stored config differs"):
        runs.run_dir(tmp_path, "mae", cfg)
    with pytest.raises(ValueError, match="run kind"):
        runs.run_dir(tmp_path, "mae-v2", cfg)
    assert not runs.run_dir(tmp_path, "moco", cfg, create=False).exists()


def test_atomic_save_round_trips_with_weights_only(tmp_path):
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 7, "rng": (3, (1, 2), None)}
    runs.atomic_save(obj, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert torch.equal(back["w"], obj["w"]) and back["step"] == 7 and back["rng"] == obj["rng"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644


def test_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    runs.atomic_save({"v": torch.ones(3)}, tmp_path / "c.pt")

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(runs.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        runs.atomic_save({"v": torch.zeros(3)}, tmp_path / "c.pt")
    monkeypatch.undo()
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_a_parquet_table_is_written_whole_into_a_new_folder(tmp_path, monkeypatch):
    table = pd.DataFrame({"run": ["a", "b"], "auc": [0.61, 0.7]}, index=[5, 9])
    path = tmp_path / "new" / "t.parquet"
    runs.atomic_write_parquet(table, path)
    assert pd.read_parquet(path).equals(table.reset_index(drop=True))  # the index is not kept

    def broken(self, f, **kwargs):
        f.write(b"PAR1 half a table")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        runs.atomic_write_parquet(table.head(1), path)
    monkeypatch.undo()
    assert len(pd.read_parquet(path)) == 2 and [p.name for p in path.parent.iterdir()] == [
        "t.parquet"]


def test_metrics_history_and_finished(tmp_path):
    assert not runs.is_finished(tmp_path) and runs.read_metrics(tmp_path) == {}
    assert runs.read_history(tmp_path).empty
    runs.write_metrics({"status": "running", "auc": math.nan}, tmp_path)
    assert not runs.is_finished(tmp_path)
    assert runs.read_metrics(tmp_path)["auc"] is None  # NaN is written as JSON null
    runs.write_metrics({"status": "done", "auc": 0.75}, tmp_path)
    assert runs.is_finished(tmp_path)
    rows = [{"epoch": 0, "train_loss": 1.5}, {"epoch": 1, "train_loss": 0.5}]
    runs.write_history(rows, tmp_path)
    assert runs.read_history(tmp_path).to_dict("records") == rows
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="metrics.json: not valid JSON"):
        runs.is_finished(tmp_path)


def test_clear_run_keeps_the_config(tmp_path):
    path = runs.run_dir(tmp_path, "ft", {"a": 1})
    for name in ("last.pt", "best.pt", "history.csv", "metrics.json", ".last.pt.x.tmp"):
        (path / name).write_text("x")
    runs.clear_run(path)
    assert [p.name for p in path.iterdir()] == ["config.json"]


def test_list_runs_tables_finished_runs(tmp_path):
    for ratio, auc in [(0.75, 0.7), (0.9, 0.8)]:
        path = runs.run_dir(tmp_path, "mae", {"epochs": 2, "extra": {"mask_ratio": ratio}})
        runs.write_metrics({"status": "done", "valid_auc": auc}, path)
    runs.run_dir(tmp_path, "mae", {"epochs": 3, "extra": {"mask_ratio": 0.5}})  # unfinished
    moco = runs.run_dir(tmp_path, "moco", {"epochs": 2, "betas": [0.9, 0.99]})
    runs.write_metrics({"status": "done", "valid_auc": 0.6}, moco)

    table = runs.list_runs(tmp_path, "mae").sort_values("extra.mask_ratio")
    assert table["extra.mask_ratio"].tolist() == [0.75, 0.9]
    assert table["valid_auc"].tolist() == [0.7, 0.8]
    assert set(table["kind"]) == {"mae"} and table["hash"].str.len().eq(12).all()
    everything = runs.list_runs(tmp_path)
    assert len(everything) == 3
    assert everything.set_index("kind").loc["moco", "betas"] == (0.9, 0.99)
    assert runs.list_runs(tmp_path / "missing").empty


def test_saved_weights_keep_the_layout_load_start_reads_byte_for_byte(tmp_path):
    from cxr_lib.models.classifier import read_state_dict

    state = torch.nn.Linear(3, 2).state_dict()
    meta = {"backbone": "resnet50", "recipe": {"model": "resnet50"}, "normalise": [0.5, 0.25],
            "run": "moco-0123456789ab"}
    runs.atomic_save({"model": state, **meta}, tmp_path / "by_hand.pt")  # the layout as written
    saved = runs.save_weights(tmp_path / "new" / "saver.pt", state, **meta)
    assert saved == tmp_path / "new" / "saver.pt"
    assert saved.read_bytes() == (tmp_path / "by_hand.pt").read_bytes()
    assert list(torch.load(saved, weights_only=True)) == ["model", *meta]
    read = read_state_dict(saved)
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)


def test_one_loader_gives_a_finished_runs_kept_weights(tmp_path):
    from cxr_lib.engine.resume import load_run_weights
    from cxr_lib.methods import finetune

    last, best = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    runs.atomic_save({"model": last.state_dict()}, tmp_path / runs.CHECKPOINT)
    net = torch.nn.Linear(2, 1)
    assert load_run_weights(net, tmp_path) is net and torch.equal(net.weight, last.weight)
    runs.atomic_save({"model": best.state_dict()}, tmp_path / runs.BEST)
    assert torch.equal(load_run_weights(net, tmp_path).weight, best.weight)
    assert torch.equal(load_run_weights(net, tmp_path, keep_best=False).weight, last.weight)
    (tmp_path / runs.BEST).write_bytes(b"half a checkpoint")
    with pytest.raises(ValueError, match=r"best\.pt: unreadable checkpoint"):
        load_run_weights(net, tmp_path)
    assert "load_run_weights(" in inspect.getsource(finetune.load_finetuned)

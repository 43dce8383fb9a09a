"""Run folders named by a hash of their config, and the files inside them, written atomically.

Every experiment of the study is a run: `root/<kind>-<hash>/` holds `config.json` (what was
asked), `last.pt` (the checkpoint to resume from, and the final weights), `history.csv` (one
row per epoch), `metrics.json` (written once, at the end, with `status: done`, or `diverged`
when the loss ended far above where it began) and optionally `best.pt`. The folder name comes
from the config alone, so asking for the same experiment again finds the finished run instead
of training it again, and an interrupted one resumes.

Files are replaced, never rewritten in place, by the library's one atomic writer
(`cxr_lib.data.files.replacing`): a crash (even SIGKILL) leaves either the old file or the new
one.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cxr_lib.data.files import remove_stale_temps, replacing

CONFIG, CHECKPOINT, BEST, HISTORY, METRICS = (
    "config.json", "last.pt", "best.pt", "history.csv", "metrics.json")
HASH_CHARS = 12


def canonical(config: Any) -> Any:
    """`config` as plain JSON values: dataclasses and mappings become dicts, tuples lists.

    Floats are kept as floats (JSON writes them with Python's shortest round-trip repr, which
    is stable across runs and platforms), so 1e-3 and 0.001 hash the same but 1 and 1.0 do not.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {str(k): _canonical_at(v, k) for k, v in config.items()}
    return _canonical_at(config, "")


def _canonical_at(value: Any, key: Any) -> Any:
    if dataclasses.is_dataclass(value) or isinstance(value, dict):
        return canonical(value)
    if isinstance(value, (list, tuple)):
        return [_canonical_at(v, key) for v in value]
    if isinstance(value, enum.Enum):
        return _canonical_at(value.value, key)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"config value {key!r} = {value!r} ({type(value).__name__}) cannot be "
                    "written as JSON; use numbers, strings, lists or dicts")


def config_json(config: Any) -> str:
    """The canonical JSON text of `config`: sorted keys, no whitespace."""
    return json.dumps(canonical(config), sort_keys=True, separators=(",", ":"))


def config_hash(config: Any) -> str:
    """A stable 12-hex-character name for `config` (a dataclass or a dict)."""
    return hashlib.sha256(config_json(config).encode()).hexdigest()[:HASH_CHARS]


def weights_digest(path: str | Path | None) -> str | None:
    """A short SHA-256 of a weights file: a run's identity follows the file's content, so an
    encoder saved again with other weights trains a new run, and a moved one does not."""
    if path is None:
        return None
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def run_dir(root: str | Path, kind: str, config: Any, *, create: bool = True) -> Path:
    """`root/<kind>-<hash>`; on first use creates it and writes `config.json`.

    An existing `config.json` that differs from `config` (a hash collision, or a hand-edited
    file) is an error: the folder would otherwise silently mix two experiments.
    """
    if not kind or "-" in kind or "/" in kind:
        raise ValueError(f"run kind must be a non-empty name without '-' or '/', got {kind!r}")
    path = Path(root) / f"{kind}-{config_hash(config)}"
    file = path / CONFIG
    if file.exists():
        stored = canonical(json.loads(file.read_text()))
        if stored != canonical(config):
            raise ValueError(f"{file}: stored config differs from the requested one "
                             f"(stored {stored}, requested {canonical(config)})")
    elif create:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(canonical(config), sort_keys=True, indent=2) + "\n", file)
    return path


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)` that never leaves a half-written file at `path`."""
    with replacing(path, "wb") as f:
        torch.save(obj, f)


def save_weights(path: str | Path, state: dict[str, torch.Tensor], **meta: Any) -> Path:
    """Write pre-trained weights for fine-tuning: `{"model": state, **meta}` (meta in the
    order given), atomically, making the folder; returns `path`. The one layout of the MAE
    encoder and MoCo backbone files: `models.classifier.read_state_dict` takes the tensors under
    "model", and the rest (recipe, normalisation, run) is read by `torch.load`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": state, **meta}, path)
    return path


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write `text` to `path` atomically."""
    with replacing(path, "w") as f:
        f.write(text)


def atomic_write_parquet(table: pd.DataFrame, path: str | Path) -> None:
    """Write `table` (without its index) as parquet to `path` atomically, making its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, "wb") as f:
        table.to_parquet(f, index=False)


def atomic_write_json(obj: Any, path: str | Path) -> None:
    """Write `obj` as indented JSON to `path` atomically (NaN becomes null)."""
    atomic_write_text(json.dumps(_nan_to_none(obj), indent=2, sort_keys=True) + "\n", path)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def clear_run(path: str | Path) -> None:
    """Remove a run's results (checkpoints, history, metrics), keeping its config."""
    for name in (CHECKPOINT, BEST, HISTORY, METRICS):
        (Path(path) / name).unlink(missing_ok=True)
    remove_stale_temps(path)


def read_metrics(path: str | Path) -> dict:
    """The run's `metrics.json`, or {} when it has none yet."""
    file = Path(path) / METRICS
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None


def write_metrics(metrics: dict, path: str | Path) -> None:
    """Write the run's `metrics.json` atomically."""
    atomic_write_json(metrics, Path(path) / METRICS)


FINISHED = ("done", "diverged")  # a diverged run finished too: training it again repeats it


def is_finished(path: str | Path) -> bool:
    """Whether the run in folder `path` completed: its metrics say `status: done` (or
    `diverged`, kept with its note so that every reader can say so)."""
    return read_metrics(path).get("status") in FINISHED


def read_history(path: str | Path) -> pd.DataFrame:
    """The run's per-epoch history table (empty when none was written)."""
    file = Path(path) / HISTORY
    return pd.read_csv(file) if file.exists() else pd.DataFrame()


def write_history(rows: list[dict], path: str | Path) -> None:
    """Write the per-epoch rows as the run's `history.csv`, atomically."""
    atomic_write_text(pd.DataFrame(rows).to_csv(index=False), Path(path) / HISTORY)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def list_runs(root: str | Path, kind: str | None = None) -> pd.DataFrame:
    """One row per finished run under `root` (of `kind`, if given): config values + metrics.

    Nested config values are flattened with dots (`extra.mask_ratio`); metric columns keep
    their names, so the tables of the later chapters are a `groupby` away.
    """
    rows = []
    for path in sorted(Path(root).glob(f"{kind or '*'}-*")):
        if not (path / CONFIG).exists() or not is_finished(path):
            continue
        config = json.loads((path / CONFIG).read_text())
        run_kind, _, run_hash = path.name.rpartition("-")
        rows.append({"run": path.name, "kind": run_kind, "hash": run_hash, "path": str(path),
                     **_flatten(config), **_flatten(read_metrics(path))})
    return pd.DataFrame(rows)

"""A quick downstream probe: frozen features, one logistic regression per finding, ROC AUC.

Chapter 2 uses it to compare encoders cheaply, without fine-tuning them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from cxr_lib.data.cache import Cache
from cxr_lib.engine.inference import eval_mode
from cxr_lib.models.mae import MaskedAutoencoder


class MaePooledFeatures(nn.Module):
    """The MAE encoder without masking, patch tokens averaged after the final norm: the
    global-pool features MAE's linear probing reads."""

    def __init__(self, mae: MaskedAutoencoder) -> None:
        super().__init__()
        self.mae = mae

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.mae.forward_features(x)  # [B, 1+L, D]
        return tokens[:, 1:].mean(dim=1)  # [B, D]


def mae_features(mae: MaskedAutoencoder) -> MaePooledFeatures:
    """An encoder_fn for `extract_features`: float [B, C, H, W] -> [B, D]."""
    return MaePooledFeatures(mae)


def extract_features(encoder_fn: Callable[[Tensor], Tensor], images_u8: np.ndarray | Tensor,
                     batch_size: int, transform: Callable[[Tensor], Tensor], *,
                     device: torch.device | str | None = None) -> np.ndarray:
    """Features [N, D] for uint8 images [N, 1, S, S] (numpy, memmap or tensor).

    Each batch goes uint8 to `device`, through `transform` (e.g. `MaeAugment.plain`) and
    `encoder_fn`, without gradients; a module encoder runs in eval mode and gets its mode back.
    `device` defaults to where a module's parameters are, else the CPU.
    """
    if images_u8.ndim != 4 or images_u8.shape[1] != 1:
        raise ValueError(f"expected uint8 images [N, 1, S, S], got {tuple(images_u8.shape)}")
    module = encoder_fn if isinstance(encoder_fn, nn.Module) else None
    if device is None:
        param = next(module.parameters(), None) if module is not None else None
        device = param.device if param is not None else torch.device("cpu")
    feats: list[Tensor] = []
    with torch.inference_mode(), eval_mode(module) if module is not None else nullcontext():
        for start in range(0, len(images_u8), batch_size):
            xb = _batch(images_u8, start, start + batch_size).to(device)  # [b, 1, S, S]
            feats.append(encoder_fn(transform(xb)).float().cpu())  # [b, D]
    return torch.cat(feats).numpy()  # [N, D]


def _batch(images: np.ndarray | Tensor, start: int, stop: int) -> Tensor:
    if torch.is_tensor(images):
        return images[start:stop]
    return torch.from_numpy(np.array(images[start:stop]))  # a copy: memmaps are read-only


@dataclass
class ProbeResult:
    """Validation ROC AUC per finding and their mean; `skipped` lists findings that could not
    be scored (one class only among the labelled train or val rows)."""

    mean_auc: float
    per_finding: dict[str, float]
    n_train: int
    n_val: int
    skipped: list[str] = field(default_factory=list)


def linear_probe(train_feats: np.ndarray, train_labels: np.ndarray, val_feats: np.ndarray,
                 val_labels: np.ndarray, findings: Sequence[str], *, c: float = 1.0,
                 max_iter: int = 2000) -> ProbeResult:
    """Fit a standardised logistic regression per finding on train, score AUC on val.

    Labels are [N, F] with 1, 0 or NaN (unknown); NaN rows are dropped per finding. The
    solver (lbfgs) is deterministic, so the same features give the same numbers. `c` is
    scikit-learn's inverse regularisation strength C.
    """
    train_labels = np.asarray(train_labels, dtype=np.float64)  # [N, F]
    val_labels = np.asarray(val_labels, dtype=np.float64)  # [M, F]
    _check_pair(train_feats, train_labels, findings, "train")
    _check_pair(val_feats, val_labels, findings, "val")
    scaler = StandardScaler().fit(train_feats)
    xt = scaler.transform(train_feats)  # [N, D]
    xv = scaler.transform(val_feats)  # [M, D]
    per_finding: dict[str, float] = {}
    skipped: list[str] = []
    for j, name in enumerate(findings):
        yt, yv = train_labels[:, j], val_labels[:, j]  # [N], [M]
        kt, kv = ~np.isnan(yt), ~np.isnan(yv)  # [N], [M]
        if len(np.unique(yt[kt])) < 2 or len(np.unique(yv[kv])) < 2:
            skipped.append(name)
            continue
        clf = LogisticRegression(C=c, max_iter=max_iter).fit(xt[kt], yt[kt])
        per_finding[name] = float(roc_auc_score(yv[kv], clf.decision_function(xv[kv])))
    mean_auc = float(np.mean(list(per_finding.values()))) if per_finding else float("nan")
    return ProbeResult(mean_auc, per_finding, len(train_feats), len(val_feats), skipped)


def probe_cache(encoder_fn: Callable[[Tensor], Tensor], transform: Callable[[Tensor], Tensor],
                cache: Cache, train_rows: np.ndarray, eval_splits: Sequence[str] = ("val",), *,
                max_images: int = 20_000, batch_size: int = 128,
                device: torch.device | str | None = None) -> dict[str, ProbeResult]:
    """The linear probe fitted on the cache rows `train_rows` and scored on each of
    `eval_splits`: {split: ProbeResult}. Features go through `transform` (the evaluation view)
    and `encoder_fn`, as `extract_features` does; `max_images` caps every split (its first
    rows), so the probe stays quick on full data."""
    def features(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = rows[:max_images]
        images = np.asarray(cache.images[rows])[:, None]  # [N, 1, S, S] uint8
        return (extract_features(encoder_fn, images, batch_size, transform, device=device),
                cache.labels[rows])

    train = features(np.asarray(train_rows))
    return {split: linear_probe(*train, *features(cache.split_indices(split)), cache.findings)
            for split in eval_splits}


def _check_pair(feats: np.ndarray, labels: np.ndarray, findings: Sequence[str],
                name: str) -> None:
    if feats.ndim != 2 or labels.ndim != 2:
        raise ValueError(f"{name}: features [N, D] and labels [N, F] must be 2-D, got "
                         f"{feats.shape} and {labels.shape}")
    if len(feats) != len(labels):
        raise ValueError(f"{name}: {len(feats)} feature rows but {len(labels)} label rows")
    if labels.shape[1] != len(findings):
        raise ValueError(f"{name}: {labels.shape[1]} label columns but {len(findings)} findings")

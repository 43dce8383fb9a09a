"""A quick downstream probe: frozen features, one logistic regression per finding, ROC AUC.

Chapter 2 uses it to compare encoders cheaply, without fine-tuning them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from cxr_lib.analysis.stats import paired_comparison
from cxr_lib.data.cache import Cache
from cxr_lib.data.splits import label_subset
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


def probe_scores(train_feats: np.ndarray, train_labels: np.ndarray, eval_feats: np.ndarray,
                 *, c: float = 1.0, max_iter: int = 2000) -> np.ndarray:
    """Decision scores [M, F] of a standardised logistic regression per finding, fitted on the
    train rows whose label is known; a finding with one class only among them scores NaN.

    The solver (lbfgs) is deterministic, so the same features give the same scores. `c` is
    scikit-learn's inverse regularisation strength C.
    """
    train_labels = np.asarray(train_labels, dtype=np.float64)  # [N, F]
    scaler = StandardScaler().fit(train_feats)
    xt = scaler.transform(train_feats)  # [N, D]
    xe = scaler.transform(eval_feats)  # [M, D]
    scores = np.full((len(eval_feats), train_labels.shape[1]), np.nan)  # [M, F]
    for j in range(train_labels.shape[1]):
        yt = train_labels[:, j]  # [N]
        known = ~np.isnan(yt)
        if len(np.unique(yt[known])) == 2:
            clf = LogisticRegression(C=c, max_iter=max_iter).fit(xt[known], yt[known])
            scores[:, j] = clf.decision_function(xe)
    return scores


def linear_probe(train_feats: np.ndarray, train_labels: np.ndarray, val_feats: np.ndarray,
                 val_labels: np.ndarray, findings: Sequence[str], *, c: float = 1.0,
                 max_iter: int = 2000) -> ProbeResult:
    """Fit `probe_scores` on train, score ROC AUC per finding on val.

    Labels are [N, F] with 1, 0 or NaN (unknown); NaN rows are dropped per finding.
    """
    train_labels = np.asarray(train_labels, dtype=np.float64)  # [N, F]
    val_labels = np.asarray(val_labels, dtype=np.float64)  # [M, F]
    _check_pair(train_feats, train_labels, findings, "train")
    _check_pair(val_feats, val_labels, findings, "val")
    scores = probe_scores(train_feats, train_labels, val_feats, c=c, max_iter=max_iter)
    per_finding: dict[str, float] = {}
    skipped: list[str] = []
    for j, name in enumerate(findings):
        yv = val_labels[:, j]  # [M]
        kv = ~np.isnan(yv)
        if np.isnan(scores[:, j]).all() or len(np.unique(yv[kv])) < 2:
            skipped.append(name)
            continue
        per_finding[name] = float(roc_auc_score(yv[kv], scores[kv, j]))
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
        return (cache_features(encoder_fn, transform, cache, rows, batch_size=batch_size,
                               device=device), cache.labels[rows])

    train = features(np.asarray(train_rows))
    return {split: linear_probe(*train, *features(cache.split_indices(split)), cache.findings)
            for split in eval_splits}


def cache_features(encoder_fn: Callable[[Tensor], Tensor], transform: Callable[[Tensor], Tensor],
                   cache: Cache, rows: np.ndarray, *, batch_size: int = 128,
                   device: torch.device | str | None = None) -> np.ndarray:
    """`extract_features` [N, D] of the cache's images at `rows`."""
    images = np.asarray(cache.images[np.asarray(rows)])[:, None]  # [N, 1, S, S] uint8
    return extract_features(encoder_fn, images, batch_size, transform, device=device)


# Features of the cache's train split and of the split a comparison scores, for one seed:
# seed -> ([N_train, D], [N_eval, D]). A pre-trained encoder returns the same for every seed;
# a random one draws its weights from the seed.
SeedFeatures = Callable[[int], tuple[np.ndarray, np.ndarray]]


def compare_on_label_shares(cache: Cache, features_a: SeedFeatures, features_b: SeedFeatures,
                            shares: Sequence[float], seeds: Sequence[int], *,
                            split: str = "test", n_boot: int = 1000) -> pd.DataFrame:
    """Probe b against probe a, each fitted on the same labelled training rows (a seeded share
    of the training patients, `label_subset`) and scored on the same `split` images: one row a
    (share, seed) with both mean AUCs and the difference b - a with its paired patient-bootstrap
    95% interval, over the findings both probes could fit (both classes among the labelled
    rows); a share where none could be fitted gives NaN."""
    train_rows, eval_rows = cache.split_indices("train"), cache.split_indices(split)
    targets = cache.labels[eval_rows]  # [M, F]
    patients = cache.index["patient"].to_numpy()[eval_rows]
    rows = []
    for seed in seeds:
        (train_a, eval_a), (train_b, eval_b) = features_a(seed), features_b(seed)
        for share in shares:
            kept = np.isin(train_rows, label_subset(cache, share, seed))  # [N_train]
            labels = cache.labels[train_rows[kept]]
            a = probe_scores(train_a[kept], labels, eval_a)  # [M, F]
            b = probe_scores(train_b[kept], labels, eval_b)
            row = {"share": share, "seed": seed, "labelled images": int(kept.sum())}
            fitted = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)  # [F]
            if not fitted.any():
                rows.append({**row, **dict.fromkeys(COMPARED, np.nan)})
                continue
            r = paired_comparison(a[:, fitted], b[:, fitted], targets[:, fitted], patients,
                                  list(np.asarray(cache.findings)[fitted]), n_boot=n_boot,
                                  seed=seed)
            rows.append({**row, "auc_a": r.mean_auc_a, "auc_b": r.mean_auc_b, "diff": r.diff,
                         "lower": r.lower, "upper": r.upper})
    return pd.DataFrame(rows, columns=SHARE_COMPARISON)


COMPARED = ["auc_a", "auc_b", "diff", "lower", "upper"]  # compare_on_label_shares' measures
SHARE_COMPARISON = ["share", "seed", "labelled images", *COMPARED]  # and its columns


def _check_pair(feats: np.ndarray, labels: np.ndarray, findings: Sequence[str],
                name: str) -> None:
    if feats.ndim != 2 or labels.ndim != 2:
        raise ValueError(f"{name}: features [N, D] and labels [N, F] must be 2-D, got "
                         f"{feats.shape} and {labels.shape}")
    if len(feats) != len(labels):
        raise ValueError(f"{name}: {len(feats)} feature rows but {len(labels)} label rows")
    if labels.shape[1] != len(findings):
        raise ValueError(f"{name}: {labels.shape[1]} label columns but {len(findings)} findings")

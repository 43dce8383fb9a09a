"""Losses and the per-epoch metrics the engine records (validation AUC)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import (
    Callback,
)
from sklearn.metrics import roc_auc_score

from cxr_lib.device import gather
from cxr_lib.engine.order import ORDER


def mean_auc(scores: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean ROC AUC over findings, and per finding (NaN where a finding has one class only).

    scores, targets: [N, F]; NaN targets (finding not stated) are left out of that finding.
    """
    per_class = np.full(scores.shape[1], np.nan)
    for j in range(scores.shape[1]):
        known = ~np.isnan(targets[:, j])
        y = targets[known, j]
        if len(np.unique(y)) == 2:
            per_class[j] = roc_auc_score(y, scores[known, j])
    mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else math.nan
    return mean, per_class



def model_loss(out: Any, *targets: torch.Tensor) -> torch.Tensor:
    """Loss function for a model that computes its own loss: the first output, e.g. MAE's
    `(loss, pred, mask)`. The targets fastai passes are ignored."""
    return out[0]


def masked_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the findings a source states; NaN targets are left out."""
    known = ~torch.isnan(targets)  # [B, F]
    per_entry = F.binary_cross_entropy_with_logits(
        logits.float(), torch.nan_to_num(targets), reduction="none")  # [B, F]
    return (per_entry * known).sum() / known.sum().clamp(min=1)


class EpochMetric(Callback):
    """A validation metric computed once per epoch; `fit` writes `value` to the history under
    `metric_name` (and `keep_best` may name it)."""

    metric_name = "metric"
    value = math.nan


class ValidAUC(EpochMetric):
    """Mean ROC AUC over findings on the validation set (scikit-learn), once per epoch.

    Logits and targets stay on the device during the pass and are copied once at its end (no
    per-batch sync); under DDP they are gathered from all ranks. `per_class` keeps the AUCs.
    """

    order, run_train, metric_name = ORDER["metrics"], False, "valid_auc"

    def before_validate(self) -> None:
        self.scores, self.targets = [], []

    def after_batch(self) -> None:
        self.scores.append(self.learn.pred.detach().float())  # [B, F] logits: AUC is rank-based
        self.targets.append(self.learn.yb[0].detach().float())  # [B, F]

    def after_validate(self) -> None:
        local = None  # a rank the validation batches did not reach still joins the gather
        if self.scores:
            local = (torch.cat(self.scores).cpu().numpy(), torch.cat(self.targets).cpu().numpy())
        parts = [part for part in gather(local) if part is not None]
        self.scores, self.targets = [], []
        if not parts:
            self.value, self.per_class = math.nan, np.array([])
            return
        scores, targets = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        self.value, self.per_class = mean_auc(scores, targets)  # [N, F] each

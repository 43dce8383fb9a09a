"""The downstream probe: feature extraction from a MAE and per-finding logistic regression."""

import numpy as np
import pytest
import torch

from cxr_lib.augment.crops import MaeAugment
from cxr_lib.methods.probe import extract_features, linear_probe, mae_features
from cxr_lib.models import build_mae

FINDINGS = ("A", "B", "C")


def linear_data(n: int, seed: int, signal: bool = True):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, 16))
    weights = np.random.default_rng(99).normal(size=(16, 3))  # the same rule for every split
    scores = feats @ weights if signal else rng.normal(size=(n, 3))
    labels = (scores + 0.3 * rng.normal(size=(n, 3)) > 0).astype(float)
    return feats, labels


def test_linear_signal_is_found():
    result = linear_probe(*linear_data(300, 0), *linear_data(200, 1), FINDINGS)
    assert result.mean_auc > 0.9
    assert set(result.per_finding) == set(FINDINGS) and result.skipped == []
    assert (result.n_train, result.n_val) == (300, 200)


def test_random_features_score_chance():
    result = linear_probe(*linear_data(300, 0, signal=False), *linear_data(400, 1, signal=False),
                          FINDINGS)
    assert result.mean_auc == pytest.approx(0.5, abs=0.08)


def test_unknown_labels_dropped_single_class_skipped_and_deterministic():
    train_x, train_y = linear_data(300, 0)
    val_x, val_y = linear_data(200, 1)
    train_y[::3, 0] = np.nan  # NaN = the source says nothing about finding A
    val_y[::4, 0] = np.nan
    val_y[:, 1] = 0.0  # no positive B in val: no AUC
    first = linear_probe(train_x, train_y, val_x, val_y, FINDINGS)
    assert first.skipped == ["B"] and set(first.per_finding) == {"A", "C"}
    assert first.per_finding["A"] > 0.9
    again = linear_probe(train_x, train_y, val_x, val_y, FINDINGS)
    assert again.per_finding == first.per_finding


def test_probe_rejects_misaligned_inputs():
    train_x, train_y = linear_data(50, 0)
    with pytest.raises(ValueError, match="train: 3 label columns but 2 findings"):
        linear_probe(train_x, train_y, train_x, train_y, ("A", "B"))
    with pytest.raises(ValueError, match="val: 50 feature rows but 49 label rows"):
        linear_probe(train_x, train_y, train_x, train_y[:49], FINDINGS)


def test_extract_mae_features():
    torch.manual_seed(0)
    mae = build_mae("vit_tiny_patch16", img_size=32, patch_size=16, decoder_dim=32,
                    decoder_depth=1, decoder_heads=2)
    mae.train()
    images = np.random.default_rng(0).integers(0, 256, (7, 1, 40, 40), dtype=np.uint8)
    transform = MaeAugment(32).plain
    encoder = mae_features(mae)
    feats = extract_features(encoder, images, batch_size=3, transform=transform)
    assert feats.shape == (7, 192) and feats.dtype == np.float32
    assert mae.training  # its mode is given back
    same = extract_features(encoder, torch.from_numpy(images), batch_size=7, transform=transform)
    np.testing.assert_allclose(feats, same, atol=1e-5)  # batching does not change features
    with torch.no_grad():
        tokens = mae.forward_features(transform(torch.from_numpy(images[:2])))
    np.testing.assert_allclose(feats[:2], tokens[:, 1:].mean(1).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, 1, S, S\]"):
        extract_features(encoder, images[:, 0], batch_size=3, transform=transform)

"""Synthetic phantoms: deterministic, labelled as configured, findings drawn where they belong,
and learnable by a small CNN but not by a linear model on raw pixels.

Rendering speed is not timed here (tests share busy CPUs); `cxr bench` is where it belongs.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits
from torch import nn

from cxr_lib.data.core import FINDINGS, DataError, merge
from cxr_lib.data.phantoms import (
    DEFAULT_PREVALENCE,
    DRAWN,
    VISIT_BITS,
    PhantomConfig,
    draw_labels,
    load_phantom_row,
    phantom_dataset,
    render_phantom,
)

SEEDS = range(100, 116)
SIZE = 64


def _rows_cols() -> tuple[np.ndarray, np.ndarray]:
    """Row and column position of every pixel as a fraction of the image, [S, S] each."""
    t = (np.arange(SIZE) + 0.5) / SIZE
    return np.meshgrid(t, t, indexing="ij")


def _change(finding: str) -> tuple[np.ndarray, np.ndarray]:
    """Signed and absolute change a finding makes, per seed: float [n_seeds, S, S] each."""
    diff = np.stack([
        render_phantom(s, SIZE, [finding]).astype(np.float64) - render_phantom(s, SIZE, [])
        for s in SEEDS
    ])
    return diff, np.abs(diff)


def _share(absdiff: np.ndarray, region: np.ndarray) -> float:
    """Fraction of the total absolute change that falls inside region [S, S]."""
    return float(absdiff[:, region].sum() / absdiff.sum())


# --- rendering ---------------------------------------------------------------------------------


def test_render_is_deterministic_uint8_and_seed_dependent():
    a = render_phantom(7, SIZE, ["Nodule", "Effusion"])
    assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE)
    assert np.array_equal(a, render_phantom(7, SIZE, ["Effusion", "Nodule"]))  # order-free
    assert not np.array_equal(a, render_phantom(8, SIZE, ["Nodule", "Effusion"]))
    assert render_phantom(7, 96, []).shape == (96, 96)
    assert 30 < a.std() and a.min() < 40 and a.max() > 200  # dark air, bright body: contrast


def test_render_rejects_unknown_findings_and_tiny_sizes():
    with pytest.raises(ValueError, match="Tumour"):
        render_phantom(0, SIZE, ["Tumour"])
    with pytest.raises(ValueError, match="size"):
        render_phantom(0, 8, [])


# --- findings drawn where they belong -----------------------------------------------------------


@pytest.mark.parametrize("finding", DRAWN)
def test_every_finding_changes_every_image(finding):
    _, absdiff = _change(finding)
    assert (absdiff.max(axis=(1, 2)) > 0).all()


def test_cardiomegaly_changes_the_heart_not_the_apices():
    rows, cols = _rows_cols()
    _, absdiff = _change("Cardiomegaly")
    heart = (rows > 0.5) & (rows < 0.85) & (cols > 0.4) & (cols < 0.75)
    assert _share(absdiff, heart) > 0.6
    assert _share(absdiff, rows < 0.35) < 0.05


def test_effusion_fills_the_lower_zones():
    rows, _ = _rows_cols()
    diff, absdiff = _change("Effusion")
    assert _share(absdiff, rows > 0.6) > 0.8
    assert diff.sum() > 0  # fluid is denser than air


def test_pneumothorax_darkens_the_apex_and_side():
    rows, cols = _rows_cols()
    diff, absdiff = _change("Pneumothorax")
    assert diff.sum() < -0.5 * absdiff.sum()
    assert _share(absdiff, rows < 0.35) > 0.5
    assert _share(absdiff, np.abs(cols - 0.5) > 0.25) > 0.35  # lateral, not central
    assert _share(absdiff, np.abs(cols - 0.5) < 0.15) < 0.2


def test_nodule_is_small_and_local_mass_is_larger():
    _, nodule = _change("Nodule")
    _, mass = _change("Mass")
    nodule_area = (nodule > 10).mean()
    assert 0 < nodule_area < 0.01
    assert (mass > 10).mean() > 3 * nodule_area


def test_emphysema_darkens_the_lungs():
    diff, absdiff = _change("Emphysema")
    assert diff.sum() < -0.5 * absdiff.sum()


def test_edema_is_bilateral_and_perihilar():
    rows, cols = _rows_cols()
    _, absdiff = _change("Edema")
    assert _share(absdiff, (rows > 0.35) & (rows < 0.6)) > 0.5
    left, right = _share(absdiff, cols < 0.5), _share(absdiff, cols >= 0.5)
    assert 0.25 < left / right < 4


@pytest.mark.parametrize("finding", ["Consolidation", "Pneumonia", "Infiltration", "Fibrosis",
                                     "Pleural_Thickening", "Atelectasis", "Mass"])
def test_opacities_brighten(finding):
    diff, absdiff = _change(finding)
    assert diff.sum() > 0.5 * absdiff.sum()


def test_atelectasis_and_hernia_sit_low():
    rows, cols = _rows_cols()
    _, atelectasis = _change("Atelectasis")
    assert _share(atelectasis, rows > 0.35) > 0.8
    _, hernia = _change("Hernia")
    assert _share(hernia, (rows > 0.6) & (np.abs(cols - 0.5) < 0.15)) > 0.9


# --- labels -----------------------------------------------------------------------------------


def test_prevalence_and_co_occurrence():
    config = PhantomConfig()
    labels = draw_labels(40_000, config, np.random.default_rng(0))
    assert set(np.unique(labels)) == {0.0, 1.0}
    for j, name in enumerate(FINDINGS):
        assert abs(labels[:, j].mean() - DEFAULT_PREVALENCE[name]) < 0.012, name

    def lift(a: str, b: str) -> float:
        ya, yb = labels[:, FINDINGS.index(a)], labels[:, FINDINGS.index(b)]
        return float((ya * yb).mean() / (ya.mean() * yb.mean()))

    for a, b, configured in config.co_occurrence:
        assert lift(a, b) > 1 + 0.5 * (configured - 1), (a, b)
    assert 0.8 < lift("Hernia", "Pneumothorax") < 1.25  # not paired: independent


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="Tumour"):
        PhantomConfig(prevalence={"Tumour": 0.1})
    with pytest.raises(ValueError, match="Mass"):
        PhantomConfig(prevalence={"Mass": 1.5})
    with pytest.raises(ValueError, match="fraction"):
        PhantomConfig(val_fraction=0.5, test_fraction=0.5)


# --- the data set -------------------------------------------------------------------------------


def test_dataset_meta_labels_and_images_agree():
    ds = phantom_dataset(60, size=48, seed=3)
    assert ds.name == "phantom" and ds.findings == list(FINDINGS)
    assert not np.isnan(ds.labels).any()  # phantoms know what is absent: 0, never NaN
    meta = ds.meta
    assert meta["id"].is_unique and meta["id"].iloc[5] == "phantom_000005"
    assert (meta["source"] == "phantom").all() and (meta["path"] == "").all()
    assert (meta["size"] == 48).all()
    for i in (0, 17, 59):
        row = meta.iloc[i]
        names = [f for f, y in zip(FINDINGS, ds.labels[i], strict=True) if y]
        assert row["finding_labels"] == ("|".join(names) or "No Finding")
        expected = render_phantom(int(row["phantom_seed"]), 48, names)
        assert np.array_equal(ds.load_image(i), expected)
    again = phantom_dataset(60, size=48, seed=3)
    assert again.meta.equals(meta) and np.array_equal(again.labels, ds.labels)
    assert not phantom_dataset(60, size=48, seed=4).meta["phantom_seed"].isin(
        meta["phantom_seed"]).any()


def test_dataset_splits_by_patient_with_follow_ups():
    ds = phantom_dataset(400, seed=1)
    ds.check_patient_disjoint()
    counts = ds.meta["split"].value_counts(normalize=True)
    assert set(counts.index) == {"train", "val", "test"}
    assert 0.1 < counts["test"] < 0.3 and 0.04 < counts["val"] < 0.17
    per_patient = ds.meta.groupby("patient").size()
    assert per_patient.max() > 1 and len(per_patient) < len(ds)
    # a patient's follow-ups share the seed bits that draw the anatomy, no one else has them
    anatomy = ds.meta["phantom_seed"] // 2**VISIT_BITS
    assert (anatomy.groupby(ds.meta["patient"]).nunique() == 1).all()
    assert anatomy.nunique() == len(per_patient)


def test_dataset_pickles_for_worker_processes():
    ds = phantom_dataset(10, size=32, seed=2)
    back = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(back.load_image(4), ds.load_image(4))


def test_bad_row_names_the_row():
    row = phantom_dataset(3, size=32).meta.iloc[1].copy()
    row["finding_labels"] = "Mass|Tumour"
    with pytest.raises(DataError, match="phantom_000001.*Tumour"):
        load_phantom_row(row)
    with pytest.raises(ValueError, match="seed"):
        phantom_dataset(3, seed=-1)


# --- learnable, but not by a linear model -------------------------------------------------------


def _standardise(images: np.ndarray) -> np.ndarray:
    """Per-image zero mean and unit variance (both models get the same input)."""
    x = images.astype(np.float32)
    return (x - x.mean((1, 2), keepdims=True)) / (x.std((1, 2), keepdims=True) + 1e-3)


def _mean_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(np.mean([roc_auc_score(y, s) for y, s in zip(labels.T, scores.T, strict=True)]))


def _linear_scores(x_train, y_train, x_test) -> list[np.ndarray]:
    """Logistic regression on raw pixels, one per finding, for a few strengths of L2."""
    out = []
    with threadpool_limits(1):
        for c in (1e-3, 1e-2, 1e-1):
            models = [LogisticRegression(C=c, max_iter=1000).fit(x_train, y) for y in y_train.T]
            out.append(np.stack([m.decision_function(x_test) for m in models], 1))
    return out


def _small_cnn(width: int, n_out: int) -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        nn.Conv2d(1, width, 4, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        *block(width, 2 * width), nn.MaxPool2d(2),
        *block(2 * width, 2 * width), nn.MaxPool2d(2),
        *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
        nn.Linear(36 * width, n_out),
    )


def _cnn_scores(x_train, y_train, x_test, epochs: int = 12, batch: int = 32) -> np.ndarray:
    torch.manual_seed(0)
    net = _small_cnn(16, y_train.shape[1])
    xt = torch.from_numpy(x_train)[:, None]  # [N, 1, S, S]
    yt = torch.from_numpy(y_train)  # [N, F]
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    steps = epochs * -(-len(xt) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.25)
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=order).split(batch):
            loss = nn.functional.binary_cross_entropy_with_logits(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        return net(torch.from_numpy(x_test)[:, None]).numpy()  # [M, F]


def test_learnable_by_a_small_cnn_but_not_by_a_linear_model(one_thread):
    """Findings vary in place, size and contrast on varying anatomy, pose and exposure, so a
    linear model on pixels cannot average them out; a small CNN trained for seconds can."""
    config = PhantomConfig(prevalence={f: 0.2 for f in DRAWN}, co_occurrence=(),
                           val_fraction=0.0, test_fraction=0.3, followups=0.0)
    ds = phantom_dataset(1200, size=48, seed=1, config=config)
    x = _standardise(np.stack([ds.load_image(i) for i in range(len(ds))]))  # [N, 48, 48]
    cols = [FINDINGS.index(f) for f in DRAWN]
    y = ds.labels[:, cols]
    train = (ds.meta["split"] == "train").to_numpy()
    flat = x.reshape(len(x), -1)
    linear = max(_mean_auc(y[~train], s)
                 for s in _linear_scores(flat[train], y[train], flat[~train]))
    cnn = _mean_auc(y[~train], _cnn_scores(x[train], y[train], x[~train]))
    assert cnn > 0.72, f"the CNN does not learn the phantoms (mean AUC {cnn:.3f})"
    assert linear > 0.55, f"not even a linear model finds any signal ({linear:.3f})"
    assert cnn - linear > 0.07, f"linear {linear:.3f} is as good as the CNN {cnn:.3f}"


def test_two_phantom_sets_of_other_names_merge_and_render_their_own_sizes():
    sharp = phantom_dataset(6, size=32, seed=1)
    blurry = phantom_dataset(4, size=16, seed=2, name="phantom-lowres")
    both = merge([sharp, blurry], name="two makes")
    assert sorted(both.meta["source"].unique()) == ["phantom", "phantom-lowres"]
    assert both.meta["id"].is_unique and len(both) == 10
    assert both.load_image(0).shape == (32, 32)
    assert both.load_image(9).shape == (16, 16)
    both.check_patient_disjoint()

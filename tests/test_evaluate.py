"""Chapter 5's statistics against hand-computed cases: AUC, the patient bootstrap (exactness,
coverage, resampling by patient), the paired comparison, DeLong's test and sweep importance."""

import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from cxr_lib.analysis.stats import (
    MEAN,
    _placements,
    _weighted_auc,
    bootstrap_auc,
    delong_test,
    holm_adjust,
    hyperparameter_importance,
    paired_comparison,
    per_finding_auc,
)


def binormal(n_pos: int, n_neg: int, d: float, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """Scores [N, 1] and targets [N, 1] of a model whose population AUC is Phi(d / sqrt(2))."""
    scores = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)][:, None]
    targets = np.r_[np.ones(n_pos), np.zeros(n_neg)][:, None]
    return scores, targets


def width(table: pd.DataFrame, row: str = MEAN) -> float:
    r = table.set_index("finding").loc[row]
    return float(r["upper"] - r["lower"])


# ----------------------------------------------------------------------------- AUC

def test_per_finding_auc_on_a_hand_case():
    scores = np.array([[0.1, 0.5, 0.3], [0.4, 0.5, 0.2], [0.35, 0.2, 0.9], [0.8, 0.9, 0.1]])
    targets = np.array([[0, 1, 0], [0, 0, 0], [1, 0, np.nan], [1, 1, 0]])
    table = per_finding_auc(scores, targets, ["a", "b", "c"])
    # a: positives 0.35, 0.8 against negatives 0.1, 0.4 -> 3 of 4 pairs won
    # b: positives 0.5, 0.9 against 0.5, 0.2 -> tie (1/2) + win + 2 wins = 3.5 of 4
    assert table["auc"].iloc[:2].tolist() == [0.75, 0.875]
    assert table["positives"].tolist()[:3] == [2, 2, 0]
    assert table["negatives"].tolist()[:3] == [2, 2, 3]  # the NaN target is left out
    assert np.isnan(table["auc"].iloc[2])  # one class: listed, no AUC
    assert table["finding"].iloc[-1] == MEAN and table["auc"].iloc[-1] == pytest.approx(0.8125)


def test_weighted_auc_equals_the_auc_of_the_replicated_images():
    rng = np.random.default_rng(1)
    n, patients = 300, 60
    codes = rng.integers(0, patients, n)
    y = (rng.random(n) < 0.3).astype(float)
    y[rng.random(n) < 0.1] = np.nan  # unknown labels are left out
    s = np.round(rng.normal(size=n) + np.nan_to_num(y), 1)  # many ties
    f = _placements(s, y, codes, patients)
    counts = rng.multinomial(patients, np.full(patients, 1 / patients), size=5).T  # [P, 5]
    got = _weighted_auc(f, counts.astype(float))
    for r in range(5):
        idx = np.repeat(np.arange(n), counts[codes, r])
        idx = idx[~np.isnan(y[idx])]
        assert got[r] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)


def test_a_replicate_with_one_class_is_skipped_and_counted():
    # 1 positive among 10 patients: a replicate misses it with probability (0.9)^10 ~ 0.35
    scores, targets = np.arange(10.0)[:, None], np.r_[1.0, np.zeros(9)][:, None]
    table = bootstrap_auc(scores, targets, np.arange(10), ["x"], n_boot=200, seed=0)
    row = table.iloc[0]
    assert 40 < row["skipped"] < 100 and row["replicates"] + row["skipped"] == 200
    assert table.iloc[1]["skipped"] == row["skipped"]  # the mean skips the same replicates


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_intervals_cover_the_population_auc_at_about_the_nominal_rate():
    d = 1.0
    true_auc = stats.norm.cdf(d / np.sqrt(2))  # 0.760
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(40):
        scores, targets = binormal(100, 200, d, rng)
        table = bootstrap_auc(scores, targets, np.arange(300), ["x"], n_boot=300, seed=trial)
        covered += table["lower"].iloc[0] <= true_auc <= table["upper"].iloc[0]
    assert covered >= 34  # 95% nominal: 38 expected, P(<= 33 | p = 0.95) < 1%


def test_bootstrap_interval_shrinks_with_the_number_of_patients():
    rng = np.random.default_rng(2)
    small = bootstrap_auc(*binormal(50, 150, 1.0, rng), np.arange(200), ["x"], n_boot=300)
    large = bootstrap_auc(*binormal(800, 2400, 1.0, rng), np.arange(3200), ["x"], n_boot=300)
    assert width(large) < 0.4 * width(small)  # sqrt(16) = 4 times narrower in theory
    assert small["lower"].iloc[0] < small["auc"].iloc[0] < small["upper"].iloc[0]


def test_bootstrap_resamples_patients_not_images():
    # every patient has 5 identical images: they carry the information of one image
    rng = np.random.default_rng(3)
    scores, targets = binormal(60, 140, 1.0, rng)
    copies = 5
    many_s, many_t = np.repeat(scores, copies, axis=0), np.repeat(targets, copies, axis=0)
    patients = np.repeat(np.arange(200), copies)
    by_patient = bootstrap_auc(many_s, many_t, patients, ["x"], n_boot=400, seed=1)
    by_image = bootstrap_auc(many_s, many_t, np.arange(1000), ["x"], n_boot=400, seed=1)
    one_each = bootstrap_auc(scores, targets, np.arange(200), ["x"], n_boot=400, seed=1)
    assert width(by_patient) > 1.8 * width(by_image)  # sqrt(5) = 2.2 in theory
    assert 0.8 < width(by_patient) / width(one_each) < 1.25  # copies add nothing


def test_bootstrap_table_holds_every_finding_and_the_mean():
    rng = np.random.default_rng(4)
    s1, t1 = binormal(40, 60, 1.0, rng)
    s2, t2 = binormal(30, 70, 2.0, rng)
    scores, targets = np.c_[s1, s2], np.c_[t1, t2]
    table = bootstrap_auc(scores, targets, np.arange(100) // 2, ["a", "b"], n_boot=100)
    assert table["finding"].tolist() == ["a", "b", MEAN]
    assert (table["lower"] <= table["auc"]).all() and (table["auc"] <= table["upper"]).all()
    assert (table["replicates"] == 100).all() and (table["se"] > 0).all()
    assert table["auc"].iloc[-1] == pytest.approx(table["auc"].iloc[:2].mean())


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    scores, targets = binormal(30, 30, 1.0, rng)
    a = bootstrap_auc(scores, targets, np.arange(60), ["x"], n_boot=50, seed=7)
    b = bootstrap_auc(scores, targets, np.arange(60), ["x"], n_boot=50, seed=7)
    c = bootstrap_auc(scores, targets, np.arange(60), ["x"], n_boot=50, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


@pytest.mark.parametrize("change, message", [
    (lambda s, t, p: (s, np.where(t == 1, 2.0, t), p), "targets row 0, finding 'x': 2.0"),
    (lambda s, t, p: (np.where(t == 0, np.nan, s), t, p), "scores row 3, finding 'x'"),
    (lambda s, t, p: (s, t, p[:-1]), "5 patients for 6 rows"),
    (lambda s, t, p: (s, t, np.array([1, 2, None, 3, 4, 5], dtype=object)), "patients row 2"),
    (lambda s, t, p: (s, np.c_[t, t], p), "must both be [N, F]"),
])
def test_bad_input_is_refused_with_the_row(change, message):
    scores = np.arange(6.0)[:, None]
    targets = np.array([1.0, 1, 1, 0, 0, 0])[:, None]
    s, t, p = change(scores, targets, np.arange(6))
    with pytest.raises(ValueError, match=re.escape(message)):
        bootstrap_auc(s, t, p, ["x"], n_boot=5)


# ----------------------------------------------------------------------------- paired

def test_holm_adjustment_on_a_hand_case():
    # sorted 0.01, 0.02, 0.04, 0.30 times 4, 3, 2, 1: 0.04, 0.06, 0.08, 0.30 (already monotone)
    adjusted = holm_adjust([0.04, 0.30, 0.01, np.nan, 0.02])
    np.testing.assert_allclose(adjusted, [0.08, 0.30, 0.04, np.nan, 0.06])
    # monotone: 0.011 x 2 = 0.022 would undercut the smaller p's 0.01 x 3 = 0.03; capped at 1
    np.testing.assert_allclose(holm_adjust([0.011, 0.01, 0.5]), [0.03, 0.03, 0.5])
    np.testing.assert_allclose(holm_adjust([0.5, 0.6]), [1.0, 1.0])
    assert holm_adjust([]).shape == (0,)


def test_paired_comparison_finds_a_planted_difference():
    rng = np.random.default_rng(6)
    n = 600
    targets = (rng.random((n, 3)) < 0.3).astype(float)
    a = targets * 0.5 + rng.normal(size=(n, 3))  # AUC about 0.64
    b = targets * 1.5 + rng.normal(size=(n, 3))  # AUC about 0.86
    result = paired_comparison(a, b, targets, np.arange(n) // 3, ["f", "g", "h"], n_boot=400)
    assert result.diff > 0.15 and result.lower > 0 and result.p_value < 0.01
    assert result.mean_auc_a == pytest.approx(per_finding_auc(a, targets, "fgh")["auc"].iloc[-1])
    assert result.replicates == 400 and result.skipped == 0
    assert (result.per_finding["lower"].iloc[:3] > 0).all()


def test_paired_comparison_finds_no_difference_where_there_is_none():
    rng = np.random.default_rng(7)
    n = 600
    targets = (rng.random((n, 3)) < 0.3).astype(float)
    a = targets + rng.normal(size=(n, 3))
    b = a + rng.normal(scale=0.05, size=(n, 3))  # the same model, slightly perturbed
    result = paired_comparison(a, b, targets, np.arange(n) // 3, ["f", "g", "h"], n_boot=400)
    assert result.lower < 0 < result.upper and result.p_value > 0.05
    assert abs(result.diff) < 0.01


def test_paired_comparison_uses_the_same_patients_for_both_models():
    # a monotone transform ranks identically: the same replicate gives both models the same
    # AUC, so every difference is 0 (an unpaired bootstrap would spread it around 0)
    rng = np.random.default_rng(8)
    targets = (rng.random((200, 1)) < 0.4).astype(float)
    a = targets + rng.normal(size=(200, 1))
    result = paired_comparison(a, 3 * a + 1, targets, np.arange(200) // 2, ["f"], n_boot=100)
    assert result.diff == 0 and result.lower == 0 == result.upper and result.p_value == 1


# ----------------------------------------------------------------------------- DeLong

def test_delong_matches_a_hand_computed_case():
    y = np.array([1, 1, 1, 0, 0, 0])
    a = np.array([0.9, 0.6, 0.4, 0.7, 0.3, 0.2])
    b = np.array([0.8, 0.7, 0.5, 0.6, 0.5, 0.1])  # a positive and a negative tie at 0.5
    # Structural components: V10 = share of negatives a positive beats (ties 1/2),
    # V01 = share of positives that beat a negative.
    #   a: V10 = [3/3, 2/3, 2/3]   V01 = [1/3, 3/3, 3/3]   AUC = 7/9
    #   b: V10 = [3/3, 3/3, 1.5/3] V01 = [2/3, 2.5/3, 3/3] AUC = 5/6
    # b - a: V10 = [0, 1/3, -1/6], V01 = [1/3, -1/6, 0]: both sample variances are 7/108, so
    # var(diff) = 7/108 / 3 + 7/108 / 3 = 7/162.
    result = delong_test(a, b, y)
    assert result.auc_a == pytest.approx(7 / 9) and result.auc_b == pytest.approx(5 / 6)
    assert result.diff == pytest.approx(1 / 18)
    assert result.se == pytest.approx(np.sqrt(7 / 162))
    z = (1 / 18) / np.sqrt(7 / 162)
    assert result.z == pytest.approx(z)
    assert result.p_value == pytest.approx(2 * (1 - stats.norm.cdf(z)))  # 0.789


def brute_force_delong(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """DeLong's definitions with explicit loops over every (positive, negative) pair."""
    def components(s):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # [m, n]
        return psi.mean(axis=1), psi.mean(axis=0)
    (v10a, v01a), (v10b, v01b) = components(a), components(b)
    var = (np.var(v10b - v10a, ddof=1) / len(v10a) + np.var(v01b - v01a, ddof=1) / len(v01a))
    return v10b.mean() - v10a.mean(), float(np.sqrt(var))


def test_delong_fast_algorithm_matches_the_definition_with_ties():
    rng = np.random.default_rng(9)
    y = (rng.random(150) < 0.4).astype(int)
    a = np.round(y + rng.normal(size=150), 1)
    b = np.round(y * 1.5 + rng.normal(size=150), 1)
    result = delong_test(a, b, y)
    diff, se = brute_force_delong(a, b, y)
    assert result.diff == pytest.approx(diff) and result.se == pytest.approx(se)
    assert result.auc_a == pytest.approx(roc_auc_score(y, a))


def test_delong_refuses_bad_labels_and_agrees_with_itself():
    y = np.array([1, 1, 0, 0])
    s = np.array([0.9, 0.4, 0.5, 0.1])
    assert delong_test(s, s, y).p_value == 1.0
    with pytest.raises(ValueError, match="y row 2: 2.0 is not 0 or 1"):
        delong_test(s, s, np.array([1, 1, 2, 0]))
    with pytest.raises(ValueError, match="at least 2 positives"):
        delong_test(s, s, np.array([1, 0, 0, 0]))


# ----------------------------------------------------------------------------- importance

def sweep(n: int = 24, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    lr = rng.choice([1e-4, 3e-4, 1e-3, 3e-3], n)
    table = pd.DataFrame({
        "extra.lr": lr,
        "extra.drop_path": rng.choice([0.0, 0.1, 0.2], n),
        "extra.init": rng.choice(["mae", "moco", "random"], n),
        "extra.flip": rng.choice([True, False], n),
    })
    table["valid_auc"] = 0.6 + 0.05 * np.log10(lr / 1e-4) + rng.normal(scale=0.003, size=n)
    return table


PARAMS = ["extra.lr", "extra.drop_path", "extra.init", "extra.flip"]


def test_importance_ranks_a_planted_numeric_parameter_first():
    table = hyperparameter_importance(sweep(), PARAMS, seed=0)
    assert table["parameter"].iloc[0] == "extra.lr"
    assert table.set_index("parameter")["impurity_importance"].idxmax() == "extra.lr"
    assert table["impurity_importance"].sum() == pytest.approx(1.0)
    by = table.set_index("parameter")
    assert by.loc["extra.lr", "spearman"] > 0.9 and by.loc["extra.lr", "spearman_p"] < 1e-6
    assert np.isnan(by.loc["extra.init", "spearman"]) and by.loc["extra.init", "kind"] == (
        "categorical")
    assert by.loc["extra.init", "values"] == 3


def test_importance_ranks_a_planted_categorical_parameter_first():
    table = sweep(seed=1)
    effect = table["extra.init"].map({"mae": 0.1, "moco": 0.05, "random": 0.0})
    table["valid_auc"] = 0.7 + effect + np.random.default_rng(1).normal(scale=0.003,
                                                                         size=len(table))
    out = hyperparameter_importance(table, PARAMS, seed=0)
    assert out["parameter"].iloc[0] == "extra.init"
    assert out.set_index("parameter")["impurity_importance"].idxmax() == "extra.init"


def test_importance_needs_enough_finished_runs_and_known_columns():
    table = sweep(6)
    table.loc[[0, 1, 2], "valid_auc"] = np.nan  # unfinished runs are left out: 3 remain
    with pytest.raises(ValueError, match="at least 4 runs with a finite 'valid_auc', got 3"):
        hyperparameter_importance(table, PARAMS)
    with pytest.raises(ValueError, match=r"lacks the columns \['extra.mask_ratio'\]"):
        hyperparameter_importance(sweep(), ["extra.mask_ratio"])

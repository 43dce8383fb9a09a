"""Statistics of chapter 5: per-finding AUC, patient-bootstrap intervals, paired comparisons
with Holm's correction for several at once, DeLong's test and hyper-parameter importance.

ChestX-ray14 holds many images per patient (25,596 test images from 2,797 patients), and images
of one patient are far from independent. An image-level bootstrap treats them as independent
and gives intervals that are too narrow, so every interval here resamples *patients*: a
replicate draws the patients with replacement and takes all of their images. Scores are fixed,
so a replicate is a vector of integer weights over images (how often its patient was drawn);
the AUC of a weighted sample is the Mann-Whitney statistic with those weights. Sorting and
binning the scores happen once per finding (`_placements`); a replicate is then two sparse
products with its patient counts, so 1,000 replicates of 25k images x 14 findings take seconds.

Scores are whatever the model ranks by (logits or probabilities: AUC depends on the order
only); targets are 1, 0 or NaN (finding not stated), as in `cxr_lib.data.core`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse, stats
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import RandomForestRegressor
from sklearn.inspection import permutation_importance
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

from cxr_lib.engine.metrics import mean_auc

MEAN = "mean"  # the row of a table that holds the mean over findings
MIN_RUNS = 4  # fewer runs than this cannot say anything about importance
_CHUNK_ELEMENTS = 4_000_000  # replicates x bins held at once (bounds memory to ~100 MB)


# ----------------------------------------------------------------------------- inputs

def _check_inputs(scores: np.ndarray, targets: np.ndarray, findings: Sequence[str],
                  patients: Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores and targets [N, F], after checks that name the offending row."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be [N, F]")
    if scores.shape[1] != len(findings):
        raise ValueError(f"{scores.shape[1]} score columns but {len(findings)} findings")
    if patients is not None and len(patients) != len(scores):
        raise ValueError(f"{len(patients)} patients for {len(scores)} rows of scores")
    bad = ~np.isfinite(scores)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"scores row {row}, finding {findings[col]!r}: {scores[row, col]} is "
                         "not a finite number")
    bad = ~(np.isnan(targets) | (targets == 0) | (targets == 1))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"targets row {row}, finding {findings[col]!r}: {targets[row, col]} is "
                         "not 0, 1 or NaN")
    return scores, targets


# ----------------------------------------------------------------------------- AUC

def per_finding_auc(scores: np.ndarray, targets: np.ndarray,
                    findings: Sequence[str]) -> pd.DataFrame:
    """ROC AUC of every finding (scikit-learn) and their mean, as a table.

    scores, targets: [N, F]; NaN targets are left out of that finding. Columns: finding, auc,
    positives, negatives; a finding with one class only has a NaN auc (and stays listed), and
    the last row, finding == "mean", is the mean over the findings that have an AUC.
    """
    scores, targets = _check_inputs(scores, targets, findings)
    mean, per_class = mean_auc(scores, targets)
    rows = []
    for j, name in enumerate(findings):
        y = targets[~np.isnan(targets[:, j]), j]
        rows.append({"finding": name, "auc": float(per_class[j]), "positives": int(y.sum()),
                     "negatives": int(len(y) - y.sum())})
    return _with_mean_row(pd.DataFrame(rows), {"auc": mean})


def _with_mean_row(table: pd.DataFrame, values: dict) -> pd.DataFrame:
    out = pd.concat([table, pd.DataFrame([{"finding": MEAN, **values}])], ignore_index=True)
    for col in ("positives", "negatives"):
        if col in out:
            out[col] = out[col].astype("Int64")  # NA on the mean row
    return out


@dataclass(frozen=True)
class _Placements:
    """One finding's known images as two bin-by-patient count matrices, so that a replicate's
    weighted AUC is two sparse products with its patient counts.

    The bins are the U distinct scores of the positives. `pos[k, p]`: positives of patient p
    scored u[k]. A negative counts in full against the positives from some bin on, and half
    against the one it ties with: `neg[k, p]` (k <= U) counts patient p's negatives that count
    in full from bin k on (k = U: against none), `neg[U + 1 + k, p]` those tied with u[k].
    """

    pos: sparse.csr_matrix  # [U, P]
    neg: sparse.csr_matrix  # [2U + 1, P]


def _placements(scores: np.ndarray, targets: np.ndarray, codes: np.ndarray,
                n_patients: int) -> _Placements | None:
    """None when the finding has one class only (no replicate can have an AUC)."""
    known = ~np.isnan(targets)
    s, positive, p = scores[known], targets[known] == 1, codes[known]
    if positive.all() or not positive.any():
        return None
    u, bin_of_pos = np.unique(s[positive], return_inverse=True)  # [U], [m]
    s_neg, p_neg = s[~positive], p[~positive]  # [n]
    lo = np.searchsorted(u, s_neg, side="left")  # [n] positive values strictly below
    tied = u[np.minimum(lo, len(u) - 1)] == s_neg  # [n]
    bins = np.r_[lo + tied, len(u) + 1 + lo[tied]]
    return _Placements(_count_matrix(bin_of_pos, p[positive], (len(u), n_patients)),
                       _count_matrix(bins, np.r_[p_neg, p_neg[tied]],
                                     (2 * len(u) + 1, n_patients)))


def _count_matrix(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]
                  ) -> sparse.csr_matrix:
    """How many (row, col) pairs fall in each cell (duplicates are summed)."""
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=shape)


def _weighted_auc(f: _Placements | None, counts: np.ndarray) -> np.ndarray:
    """AUC of each replicate [R] from patient counts [P, R]; NaN where a class is missing.

    Mann-Whitney with weights: every (positive, negative) pair counts w_pos x w_neg, ties half.
    """
    if f is None:
        return np.full(counts.shape[1], np.nan)
    n_bins = f.pos.shape[0]
    pos = f.pos @ counts  # [U, R] positive weight per score value
    neg = f.neg @ counts  # [2U + 1, R]
    beaten = np.cumsum(neg[:n_bins], axis=0) + 0.5 * neg[n_bins + 1:]  # [U, R]
    wins = (pos * beaten).sum(axis=0)  # [R]
    n_pos, n_neg = pos.sum(axis=0), neg[:n_bins + 1].sum(axis=0)  # [R]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), wins / (n_pos * n_neg), np.nan)


def _patient_counts(n_patients: int, n_boot: int, chunk: int, seed: int) -> Iterator[np.ndarray]:
    """How often each patient is drawn [P, r] in each of `chunk` replicates at a time: drawing
    P patients with replacement is one multinomial draw per replicate."""
    rng = np.random.default_rng(seed)
    p = np.full(n_patients, 1.0 / n_patients)
    for start in range(0, n_boot, chunk):
        counts = rng.multinomial(n_patients, p, size=min(chunk, n_boot - start))  # [r, P]
        yield np.ascontiguousarray(counts.T, dtype=np.float64)


def _replicate_aucs(score_sets: Sequence[np.ndarray], targets: np.ndarray, patients: Sequence,
                    n_boot: int, seed: int) -> list[np.ndarray]:
    """Patient-bootstrap AUCs [R, F] for each score array, all on the same replicates."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    codes, uniques = pd.factorize(pd.Series(patients, dtype=object))
    if (codes < 0).any():
        raise ValueError(f"patients row {int(np.argmax(codes < 0))} is missing (None or NaN)")
    n_images, n_findings = targets.shape
    chunk = max(1, _CHUNK_ELEMENTS // (2 * n_images + 2))  # bound on the [r, 2U + 1] arrays
    sets = [[_placements(s[:, j], targets[:, j], codes, len(uniques)) for j in range(n_findings)]
            for s in score_sets]
    out = [np.empty((n_boot, n_findings)) for _ in score_sets]
    done = 0
    for counts in _patient_counts(len(uniques), n_boot, chunk, seed):  # [P, r]
        r = counts.shape[1]
        for k, placements in enumerate(sets):
            for j, f in enumerate(placements):
                out[k][done:done + r, j] = _weighted_auc(f, counts)
        done += r
    return out


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the finite replicate values."""
    values = values[np.isfinite(values)]
    if not len(values):
        return np.nan, np.nan
    tail = (1 - level) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return float(lo), float(hi)


def _replicate_means(aucs: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Mean AUC of each replicate over the findings valid on the full data; NaN (skipped) when
    one of them has a single class in that replicate, so every mean averages the same set."""
    if not valid.any():
        return np.full(len(aucs), np.nan)
    return aucs[:, valid].mean(axis=1)  # NaN propagates: the replicate is skipped


def bootstrap_auc(scores: np.ndarray, targets: np.ndarray, patients: Sequence,
                  findings: Sequence[str], *, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> pd.DataFrame:
    """AUC of every finding and of their mean with patient-bootstrap percentile intervals.

    patients: [N] patient id of each image. Returns the table of `per_finding_auc` plus
    lower, upper (the `level` percentile interval), se (the bootstrap standard deviation),
    replicates (used) and skipped (replicates in which the finding had one class; they are
    left out of that finding's interval; for the mean, a replicate is skipped when any of its
    findings is).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    scores, targets = _check_inputs(scores, targets, findings, patients)
    table = per_finding_auc(scores, targets, findings)
    aucs = _replicate_aucs([scores], targets, patients, n_boot, seed)[0]  # [R, F]
    valid = table["auc"].iloc[:-1].notna().to_numpy()  # [F]
    columns = [*aucs.T, _replicate_means(aucs, valid)]  # F + 1 arrays of [R]
    extra = pd.DataFrame([_summary(c, level) for c in columns])
    return pd.concat([table, extra], axis=1)


def _summary(values: np.ndarray, level: float) -> dict:
    lo, hi = _interval(values, level)
    used = int(np.isfinite(values).sum())
    se = float(np.std(values[np.isfinite(values)], ddof=1)) if used > 1 else np.nan
    return {"lower": lo, "upper": hi, "se": se, "replicates": used,
            "skipped": len(values) - used}


# ----------------------------------------------------------------------------- comparisons

@dataclass(frozen=True)
class PairedResult:
    """Model b against model a on the same images: mean AUCs, the difference b - a with its
    patient-bootstrap interval and p-value, and the same per finding (`per_finding`)."""

    mean_auc_a: float
    mean_auc_b: float
    diff: float
    lower: float
    upper: float
    p_value: float
    replicates: int
    skipped: int
    per_finding: pd.DataFrame


def _bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "no difference": twice the smaller share of replicates on
    either side of 0, each share counted as (k + 1) / (R + 1) so that it is never exactly 0
    (Davison & Hinkley 1997). It agrees with the percentile interval: p < 1 - level about when
    the interval excludes 0."""
    diffs = diffs[np.isfinite(diffs)]
    if not len(diffs):
        return np.nan
    share = [(np.sum(side) + 1) / (len(diffs) + 1) for side in (diffs <= 0, diffs >= 0)]
    return float(min(1.0, 2 * min(share)))


def paired_comparison(scores_a: np.ndarray, scores_b: np.ndarray, targets: np.ndarray,
                      patients: Sequence, findings: Sequence[str], *, n_boot: int = 1000,
                      seed: int = 0, level: float = 0.95) -> PairedResult:
    """Is model b better than model a on the same test images? Paired patient bootstrap.

    Both models are scored on the same resampled patients in every replicate, so what the two
    share (hard patients, easy patients) cancels in the difference. The p-value is the
    bootstrap one of `_bootstrap_p`; for a single finding `delong_test` is the classical
    alternative (but it treats images as independent).
    """
    scores_a, targets = _check_inputs(scores_a, targets, findings, patients)
    scores_b, _ = _check_inputs(scores_b, targets, findings, patients)
    table_a = per_finding_auc(scores_a, targets, findings)
    table_b = per_finding_auc(scores_b, targets, findings)
    aucs_a, aucs_b = _replicate_aucs([scores_a, scores_b], targets, patients, n_boot, seed)
    valid = table_a["auc"].iloc[:-1].notna().to_numpy()  # same targets: same for b
    diffs = [*(aucs_b - aucs_a).T,
             _replicate_means(aucs_b, valid) - _replicate_means(aucs_a, valid)]  # F + 1 x [R]
    rows = [{"finding": name, "auc_a": a, "auc_b": b, "diff": b - a,
             **dict(zip(("lower", "upper"), _interval(d, level), strict=True)),
             "p_value": _bootstrap_p(d)}
            for name, a, b, d in zip(table_a["finding"], table_a["auc"], table_b["auc"], diffs,
                                     strict=True)]
    per_finding = pd.DataFrame(rows)
    mean = per_finding.iloc[-1]
    used = int(np.isfinite(diffs[-1]).sum())
    return PairedResult(float(mean["auc_a"]), float(mean["auc_b"]), float(mean["diff"]),
                        float(mean["lower"]), float(mean["upper"]), float(mean["p_value"]),
                        used, n_boot - used, per_finding)


def holm_adjust(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment (Holm 1979) of p-values tested as one family: the k-th
    smallest of m is multiplied by m - k + 1, and the results are made monotone. Rejecting
    where the adjusted p < alpha keeps the chance of any false rejection at most alpha.
    NaN p-values stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=np.float64)  # [m]
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    factors = len(order) - np.arange(len(order))  # m, m - 1, ..., 1
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * factors))
    return adjusted


@dataclass(frozen=True)
class DelongResult:
    """DeLong's test of two correlated AUCs on the same images: diff = auc_b - auc_a."""

    auc_a: float
    auc_b: float
    diff: float
    se: float
    z: float
    p_value: float


def _midrank(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x [n], ties sharing the average of their ranks."""
    return stats.rankdata(x, method="average")


def _structural_components(scores: np.ndarray, positive: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placement values from midranks (Sun & Xu 2014), O(n log n).

    V10[i] = share of negatives that positive i beats (ties half); V01[j] = share of positives
    that beat negative j. Both have mean AUC.
    """
    x, y = scores[positive], scores[~positive]  # [m], [n]
    m, n = len(x), len(y)
    tz = _midrank(np.r_[x, y])  # [m + n] ranks among all
    v10 = (tz[:m] - _midrank(x)) / n  # rank among all minus rank among positives = negatives below
    v01 = 1 - (tz[m:] - _midrank(y)) / m  # positives below negative j, turned around
    return v10, v01


def delong_test(scores_a: np.ndarray, scores_b: np.ndarray, y: np.ndarray) -> DelongResult:
    """DeLong et al. (1988) test of AUC(b) - AUC(a) for one finding, with the fast algorithm of
    Sun & Xu (2014). y: [N] 0/1 labels (leave unknown ones out first); scores: [N] each.

    var(diff) = var(V10_b - V10_a) / m + var(V01_b - V01_a) / n over the structural components
    (sample variances), and z = diff / se is compared with the standard normal.
    """
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if not a.shape == b.shape == y.shape or a.ndim != 1:
        raise ValueError(f"scores_a {a.shape}, scores_b {b.shape} and y {y.shape} must be "
                         "1-D of the same length")
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        raise ValueError(f"y row {int(np.argmax(bad))}: {y[bad][0]} is not 0 or 1")
    positive = y == 1
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least 2 positives and 2 negatives, got {m} "
                         f"and {n}")
    v10_a, v01_a = _structural_components(a, positive)
    v10_b, v01_b = _structural_components(b, positive)
    auc_a, auc_b = float(v10_a.mean()), float(v10_b.mean())
    var = np.var(v10_b - v10_a, ddof=1) / m + np.var(v01_b - v01_a, ddof=1) / n
    diff, se = auc_b - auc_a, float(np.sqrt(max(var, 0.0)))
    if se == 0:  # the two rankings agree on every pair's structure
        return DelongResult(auc_a, auc_b, diff, 0.0, np.nan, 1.0 if diff == 0 else 0.0)
    z = diff / se
    return DelongResult(auc_a, auc_b, diff, se, z, float(2 * stats.norm.sf(abs(z))))


# ----------------------------------------------------------------------------- sweeps

def hyperparameter_importance(table: pd.DataFrame, params: list[str],
                              target: str = "valid_auc", *, seed: int = 0) -> pd.DataFrame:
    """Which configuration values drive `target` across runs (one row per run, e.g.
    `runs.list_runs`)? The sweep analysis of the MedTransformer report: a random forest from the
    parameters (categoricals one-hot) to the target, with

    - impurity importance: the forest's mean decrease in impurity, summed over a parameter's
      one-hot columns (sums to 1; favours parameters with many distinct values);
    - permutation importance: the drop in the forest's R^2 when one parameter's values are
      shuffled across runs (all its one-hot columns together), mean and std of 10 shuffles;
      computed on the runs the forest was fitted on, since a sweep has too few runs to hold
      some out, so it says what the forest uses, not what generalises;
    - Spearman's rank correlation of each numeric parameter with the target (and its p-value).

    Runs with a missing target (unfinished) are left out. Rows sorted by permutation importance.
    """
    x, y = _sweep_table(table, params, target)
    numeric = [p for p in params if pd.api.types.is_numeric_dtype(x[p])]
    categorical = [p for p in params if p not in numeric]
    encode = ColumnTransformer(
        [("cat", OneHotEncoder(handle_unknown="ignore"), categorical)] if categorical else [],
        remainder="passthrough", verbose_feature_names_out=False)
    forest = RandomForestRegressor(n_estimators=200, random_state=seed)
    model = Pipeline([("encode", encode), ("forest", forest)]).fit(x, y)
    impurity = _impurity_by_param(model, params, categorical)
    perm = permutation_importance(model, x, y, n_repeats=10, random_state=seed)
    rows = [{"parameter": p, "kind": "numeric" if p in numeric else "categorical",
             "values": int(x[p].nunique()), "impurity_importance": impurity[p],
             "permutation_importance": float(perm.importances_mean[i]),
             "permutation_std": float(perm.importances_std[i]),
             **_spearman(x[p], y, p in numeric)}
            for i, p in enumerate(params)]
    out = pd.DataFrame(rows).sort_values("permutation_importance", ascending=False)
    return out.reset_index(drop=True)


def _sweep_table(table: pd.DataFrame, params: list[str], target: str
                 ) -> tuple[pd.DataFrame, np.ndarray]:
    """The parameter columns (tuples and None as text, booleans as 0/1) and the finite target
    of the runs that have one."""
    missing = [c for c in [*params, target] if c not in table.columns]
    if missing:
        raise ValueError(f"hyperparameter_importance: the run table lacks the columns {missing}; "
                         f"it has {list(table.columns)}")
    if not params or len(set(params)) != len(params):
        raise ValueError(f"params must name distinct columns, got {params}")
    y = pd.to_numeric(table[target], errors="coerce")
    keep = np.isfinite(y.to_numpy(dtype=np.float64))
    if keep.sum() < MIN_RUNS:
        raise ValueError(f"hyperparameter_importance needs at least {MIN_RUNS} runs with a "
                         f"finite {target!r}, got {int(keep.sum())}")
    x = table.loc[keep, params].copy()
    for p in params:
        if pd.api.types.is_bool_dtype(x[p]):
            x[p] = x[p].astype(np.int64)
        elif not pd.api.types.is_numeric_dtype(x[p]) or x[p].isna().any():
            x[p] = x[p].astype(str)  # a numeric column with gaps: its values become categories
    return x.reset_index(drop=True), y[keep].to_numpy(dtype=np.float64)


def _impurity_by_param(model: Pipeline, params: list[str], categorical: list[str]
                       ) -> dict[str, float]:
    """The forest's impurity importances summed back from one-hot columns to parameters."""
    names = model.named_steps["encode"].get_feature_names_out()
    encoder = model.named_steps["encode"].named_transformers_.get("cat")
    owner = {}
    if encoder is not None and categorical:
        for p, cats in zip(categorical, encoder.categories_, strict=True):
            owner.update({f"{p}_{c}": p for c in cats})
    total = dict.fromkeys(params, 0.0)
    for name, value in zip(names, model.named_steps["forest"].feature_importances_, strict=True):
        total[owner.get(name, name)] += float(value)
    return total


def _spearman(values: pd.Series, y: np.ndarray, numeric: bool) -> dict:
    if not numeric or values.nunique() < 2:
        return {"spearman": np.nan, "spearman_p": np.nan}
    rho, p = stats.spearmanr(values.to_numpy(dtype=np.float64), y)
    return {"spearman": float(rho), "spearman_p": float(p)}


def seed_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of one measure over seeds (e.g. a paired AUC difference per seed) and its Student-t
    interval: what another seed could move, which a bootstrap over test images does not see.
    NaN values are left out; fewer than two give a NaN interval (none at all: a NaN mean)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return np.nan, np.nan, np.nan
    mean = float(v.mean())
    if len(v) < 2:
        return mean, np.nan, np.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return mean, mean - half, mean + half

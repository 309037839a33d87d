"""The statistics stage: pure statistical methods, and the reports over trained runs that use them.

Pure methods (arrays in, numbers out; no files), every one checked against an independent
computation in tests/test_stats.py:

- ``weighted_roc``/``roc_auc``/``sensitivity_at_specificity``: the empirical ROC, with case
  weights so a bootstrap resample is a weight vector (ties move together: the trapezoidal
  area is the Mann-Whitney AUC with ties counted 1/2);
- ``cluster_bootstrap``: percentile confidence intervals by resampling *patients* with
  replacement (``scipy.stats.bootstrap`` over patient indices, seeded), so nodules of one
  patient stay together; ``classification_cis`` applies it to accuracy, sensitivity,
  specificity, AUC and sensitivity at 90 % specificity;
- ``calibration``: Brier score and expected calibration error over equal-width bins;
- ``delong_test``: DeLong, DeLong & Clarke-Pearson (1988) for two correlated AUCs;
- ``obuchowski_test``: Obuchowski (1997) clustered ROC, the same comparison with a patient's
  nodules as one cluster (the default test of ``wilcoxon``);
- ``equivalence_test``: two one-sided tests (TOST) of |difference| < a margin fixed in advance;
- ``seed_patient_bootstrap``: a hierarchical bootstrap of an AUC difference over patients and
  training seeds, so retraining variance enters the interval;
- ``cluster_sign_flip_test``: a paired permutation test of a per-nodule difference that
  flips the sign of all of one patient's differences together (``scipy.stats.permutation_test``);
- ``holm``: Holm's step-down adjustment for one run compared with several.

Reports: ``wilcoxon_runs`` compares the first arm (one run, or several seeds of one configuration)
with each other arm on the same nodules, paired by nodule id;
``reader_comparison`` is Table 6 (readers vs the model).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit.constants import predict_label
from nodulekit.errors import NodulekitError
from nodulekit.run import Run

# --------------------------------------------------------------------------------------
# Pure statistical methods.

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000  # patient resamples per interval (stated in every report)
BOOTSTRAP_METHOD = "percentile"
ECE_BINS = 10  # equal-width bins of the predicted probability on [0, 1]
SPECIFICITY_TARGET = 0.90
CLASSIFICATION_STATISTICS = ("accuracy", "sensitivity", "specificity", "auc", "sensitivity_at_90_specificity")


def _weights(weights, n: int) -> np.ndarray:
    return np.ones((1, n)) if weights is None else np.atleast_2d(np.asarray(weights, np.float64))


def weighted_roc(y, score, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Empirical ROC points (fpr, tpr), each [B, m + 1], for B case-weight vectors.

    One point per distinct score from the highest down (tied cases move together), starting at
    (0, 0). ``weights`` [B, n] or [n] (default: 1 each) are case multiplicities, as one
    bootstrap resample gives them. Rates are NaN where a class has no weight.
    """
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, np.float64)
    if len(y) == 0:
        raise NodulekitError("no cases to compute a ROC curve from")
    w = _weights(weights, len(y))
    order = np.argsort(-score, kind="stable")
    ends = np.r_[np.flatnonzero(np.diff(score[order]) != 0), len(y) - 1]  # last case of each tie group
    w, y = w[:, order], y[order]
    zero = np.zeros((len(w), 1))
    tp = np.hstack([zero, np.cumsum(w * y, axis=1)[:, ends]])
    fp = np.hstack([zero, np.cumsum(w * ~y, axis=1)[:, ends]])
    with np.errstate(invalid="ignore", divide="ignore"):
        return fp / fp[:, -1:], tp / tp[:, -1:]


def roc_auc(y, score, weights=None) -> np.ndarray:
    """Area under the empirical ROC [B] (= Mann-Whitney U / (n1 n0), ties 1/2)."""
    fpr, tpr = weighted_roc(y, score, weights)
    return np.trapezoid(tpr, fpr, axis=1)


def sensitivity_at_specificity(y, score, specificity: float = SPECIFICITY_TARGET, weights=None) -> np.ndarray:
    """Highest sensitivity of any score threshold whose specificity is >= ``specificity`` [B].

    A descriptive point of the empirical ROC: the threshold it implies is read off these very
    cases, so on a test set it is not a validated operating point.
    """
    fpr, tpr = weighted_roc(y, score, weights)
    allowed = fpr <= (1.0 - specificity) + 1e-12
    best = np.where(allowed, tpr, -np.inf).max(axis=1)
    return np.where(np.isnan(fpr[:, -1]) | np.isnan(tpr[:, -1]), np.nan, best)


def threshold_rates(y, pred, weights=None) -> dict[str, np.ndarray]:
    """Accuracy, sensitivity, specificity of fixed calls ``pred`` (0/1), each [B]."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(pred).astype(bool)
    w = _weights(weights, len(y))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "accuracy": (w * (pred == y)).sum(1) / w.sum(1),
            "sensitivity": (w * (pred & y)).sum(1) / (w * y).sum(1),
            "specificity": (w * (~pred & ~y)).sum(1) / (w * ~y).sum(1),
        }


def classification_statistics(y, prob, pred, weights=None) -> np.ndarray:
    """``CLASSIFICATION_STATISTICS`` as rows of a [5, B] array (calls ``pred`` made by the caller's rule)."""
    rates = threshold_rates(y, pred, weights)
    return np.stack(
        [
            rates["accuracy"],
            rates["sensitivity"],
            rates["specificity"],
            roc_auc(y, prob, weights),
            sensitivity_at_specificity(y, prob, SPECIFICITY_TARGET, weights),
        ]
    )


def cluster_bootstrap(
    groups,
    statistic,
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, np.ndarray]:
    """Percentile intervals of ``statistic`` by resampling clusters (patients) with replacement.

    ``groups`` [n] names each case's cluster; ``statistic(weights)`` gets case weights [B, n]
    (how often each case's cluster was drawn) and returns [k, B]. ``scipy.stats.bootstrap``
    draws the clusters (seeded). Returns ``estimate`` (on the data as they are), ``low``,
    ``high`` [k] and ``n_invalid`` [k], the resamples where the statistic was undefined (any
    makes that interval NaN rather than quietly conditional; with one cluster, all of them).
    """
    import warnings

    from scipy.stats import DegenerateDataWarning, bootstrap

    if n_resamples < 1:
        raise NodulekitError(f"the number of bootstrap resamples must be at least 1, got {n_resamples}")
    codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]
    n_clusters = int(codes.max()) + 1

    def on_clusters(idx, axis=-1):
        idx = np.moveaxis(np.asarray(idx), axis, -1).astype(np.int64)
        flat = idx.reshape(-1, n_clusters)
        offsets = (np.arange(len(flat)) * n_clusters)[:, None]
        counts = np.bincount((flat + offsets).ravel(), minlength=flat.size).reshape(flat.shape)
        out = np.asarray(statistic(counts[:, codes].astype(np.float64)))
        return out.reshape(out.shape[:-1] + idx.shape[:-1])

    estimate = np.asarray(statistic(np.ones((1, len(codes)))))[..., 0]
    if n_clusters < 2:  # one patient: no spread between patients to resample (scipy refuses it)
        nan = np.full(estimate.shape, np.nan)
        return {"estimate": estimate, "low": nan, "high": nan.copy(), "n_invalid": np.full(estimate.shape, n_resamples)}
    with warnings.catch_warnings():  # undefined resamples are counted and reported below instead
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap(
            (np.arange(n_clusters),),
            on_clusters,
            n_resamples=n_resamples,
            batch=min(n_resamples, 500),
            confidence_level=confidence,
            method=BOOTSTRAP_METHOD,
            rng=np.random.default_rng(seed),
        )
    invalid = np.isnan(res.bootstrap_distribution).sum(axis=-1)
    low, high = np.asarray(res.confidence_interval.low, float), np.asarray(res.confidence_interval.high, float)
    return {
        "estimate": estimate,
        "low": np.where(invalid > 0, np.nan, low),
        "high": np.where(invalid > 0, np.nan, high),
        "n_invalid": invalid,
    }


def bootstrap_note(n_resamples: int, seed: int, unit: str = "patients") -> str:
    return (
        f"{100 * CONFIDENCE:g} % intervals: {BOOTSTRAP_METHOD} bootstrap, {n_resamples} resamples of {unit} "
        f"with replacement (all of a patient's nodules together), seed {seed}"
    )


def classification_cis(
    y, prob, pred, groups, *, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Each of ``CLASSIFICATION_STATISTICS`` with its patient-bootstrap interval: {name: {estimate, low, high}}."""
    y, prob, pred = np.asarray(y), np.asarray(prob, np.float64), np.asarray(pred)
    res = cluster_bootstrap(
        groups, lambda w: classification_statistics(y, prob, pred, w), n_resamples=n_resamples, seed=seed
    )
    return {
        name: {
            "estimate": float(res["estimate"][i]),
            "low": float(res["low"][i]),
            "high": float(res["high"][i]),
            "n_invalid_resamples": int(res["n_invalid"][i]),
        }
        for i, name in enumerate(CLASSIFICATION_STATISTICS)
    }


def calibration(y, prob, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Brier score, expected calibration error and the reliability table (equal-width bins).

    Bin b holds probabilities in [b/n_bins, (b+1)/n_bins) (the last bin includes 1).
    ECE = sum_b (n_b / n) |observed malignant fraction_b - mean probability_b|.
    """
    from sklearn.metrics import brier_score_loss

    y = np.asarray(y, np.int64)
    prob = np.asarray(prob, np.float64)
    if len(y) == 0:
        raise NodulekitError("no predictions to assess calibration on")
    which = np.minimum((prob * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(which, weights=prob, minlength=n_bins) / count
        observed = np.bincount(which, weights=y, minlength=n_bins) / count
    gap = np.where(count > 0, np.abs(observed - mean_prob), 0.0)
    return {
        "brier": float(brier_score_loss(y, prob, pos_label=1)),
        "ece": float((count * gap).sum() / len(y)),
        "n_bins": n_bins,
        "binning": f"{n_bins} equal-width bins of the predicted malignant probability on [0, 1]",
        "bins": [
            {
                "low": b / n_bins,
                "high": (b + 1) / n_bins,
                "n": int(count[b]),
                "mean_prob": float(mean_prob[b]) if count[b] else None,
                "observed": float(observed[b]) if count[b] else None,
            }
            for b in range(n_bins)
        ],
    }


def delong_test(y, score_a, score_b, confidence: float = CONFIDENCE) -> dict[str, float]:
    """DeLong, DeLong & Clarke-Pearson (1988): are two AUCs on the same cases different?

    Structural components from midranks (Sun & Xu 2014): for positive i, V10_i = fraction of
    negatives it outscores (ties 1/2); for negative j, V01_j = fraction of positives that
    outscore it. AUC = mean V10 = mean V01; Cov(AUC) = S10 / m + S01 / n with S the 2x2
    sample covariances of the components over the m positives and n negatives. Two-sided
    z test of AUC_a - AUC_b and its normal interval. Cases are treated as independent.
    """
    y, scores, m, n = _two_classes(y, (score_a, score_b))
    comps = [_structural_components(y, s) for s in scores]
    v10, v01 = np.stack([c[0] for c in comps]), np.stack([c[1] for c in comps])
    auc = v10.mean(axis=1)
    cov = np.cov(v10) / m + np.cov(v01) / n
    diff = float(auc[0] - auc[1])
    se = float(np.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)))
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "auc_diff": diff} | _normal_test(diff, se, confidence)


def _structural_components(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components from midranks (Sun & Xu 2014): V10 [m] for each positive
    (the fraction of all negatives it outscores, ties 1/2), V01 [n] for each negative (the
    fraction of all positives that outscore it)."""
    from scipy.stats import rankdata

    m, n = int(y.sum()), int((~y).sum())
    ranks = rankdata(score)
    v10 = (ranks[y] - rankdata(score[y])) / n
    v01 = 1.0 - (ranks[~y] - rankdata(score[~y])) / m
    return v10, v01


def _normal_test(diff: float, se: float, confidence: float) -> dict[str, float]:
    from scipy.stats import norm

    z = diff / se if se > 0 else 0.0
    half = norm.ppf(0.5 + confidence / 2) * se
    return {
        "se": se,
        "z": float(z),
        "p_value": float(2 * norm.sf(abs(z))) if se > 0 else 1.0,
        "diff_low": float(diff - half),
        "diff_high": float(diff + half),
    }


def _two_classes(y, scores) -> tuple[np.ndarray, np.ndarray, int, int]:
    y = np.asarray(y).astype(bool)
    scores = np.stack([np.asarray(s, np.float64) for s in scores])
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise NodulekitError(
            f"a paired AUC test needs at least 2 cases of each class, got {m} positive and {n} negative"
        )
    return y, scores, m, n


def cluster_codes(groups) -> np.ndarray:
    """Integer codes 0..k-1 of the clusters (patients) named in ``groups``."""
    return np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]


def obuchowski_test(y, score_a, score_b, groups, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Obuchowski (1997, Biometrics 53:567) clustered ROC: are two AUCs on the same cases different,
    when cases come in clusters (a patient's nodules) that are not independent?

    With DeLong's components V10/V01 summed per cluster i (V10_i over its m_i positives, V01_i
    over its n_i negatives), M, N all positives/negatives, I clusters (I10, I01 those holding
    a positive/negative) and D the difference of the two scores' components:
    S10 = I10 / ((I10 - 1) M) sum_i (D10_i - m_i dAUC)^2, S01 likewise over negatives,
    S11 = I / (I - 1) sum_i (D10_i - m_i dAUC)(D01_i - n_i dAUC), and
    Var(dAUC) = S10 / M + S01 / N + 2 S11 / (M N). With one case per cluster this is DeLong's
    variance exactly; with each case repeated k times in its own cluster it is DeLong's on the
    unrepeated cases (repeating a patient's nodule adds no information).
    """
    y, scores, m, n = _two_classes(y, (score_a, score_b))
    codes = cluster_codes(groups)
    if len(codes) != len(y):
        raise NodulekitError(f"{len(codes)} cluster names for {len(y)} cases")
    comps = [_structural_components(y, s) for s in scores]
    d10, d01 = comps[0][0] - comps[1][0], comps[0][1] - comps[1][1]
    auc = np.array([c[0].mean() for c in comps])
    diff = float(auc[0] - auc[1])
    k = int(codes.max()) + 1
    m_i = np.bincount(codes[y], minlength=k)
    n_i = np.bincount(codes[~y], minlength=k)
    r10 = np.bincount(codes[y], weights=d10, minlength=k) - m_i * diff
    r01 = np.bincount(codes[~y], weights=d01, minlength=k) - n_i * diff
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    if i10 < 2 or i01 < 2:
        raise NodulekitError("the clustered AUC test needs positives and negatives in at least 2 patients each")
    s10 = i10 / ((i10 - 1) * m) * np.sum(r10**2)
    s01 = i01 / ((i01 - 1) * n) * np.sum(r01**2)
    s11 = k / (k - 1) * np.sum(r10 * r01)
    var = s10 / m + s01 / n + 2 * s11 / (m * n)
    test = _normal_test(diff, float(np.sqrt(max(var, 0.0))), confidence)
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "auc_diff": diff, "n_clusters": k} | test


def equivalence_test(estimate: float, se: float, margin: float, alpha: float = 0.05) -> dict[str, Any]:
    """Schuirmann's two one-sided tests (TOST) of |difference| < ``margin`` on a normal estimate.

    H0-: difference <= -margin, rejected by p- = P(Z >= (estimate + margin) / se);
    H0+: difference >= +margin, rejected by p+ = P(Z <= (estimate - margin) / se).
    The TOST p is max(p-, p+): equivalence is shown at level alpha when it is below alpha,
    which is the same as the (1 - 2 alpha) interval lying inside (-margin, +margin).
    """
    from scipy.stats import norm

    if not margin > 0:
        raise NodulekitError(f"the equivalence margin must be positive, got {margin}")
    if not se >= 0:
        raise NodulekitError(f"the equivalence test needs a standard error >= 0, got {se}")
    if se == 0:  # no variability at all: each one-sided test is decided by the estimate alone
        p_low, p_high = float(estimate + margin <= 0), float(estimate - margin >= 0)
    else:
        p_low = float(norm.sf((estimate + margin) / se))
        p_high = float(norm.cdf((estimate - margin) / se))
    z = norm.ppf(1 - alpha)
    return {
        "margin": float(margin),
        "p_value": max(p_low, p_high),
        "p_lower": p_low,
        "p_upper": p_high,
        "low": float(estimate - z * se),
        "high": float(estimate + z * se),
        "equivalent": bool(max(p_low, p_high) < alpha),
    }


def seed_patient_bootstrap(
    y,
    probs_a,
    probs_b,
    groups,
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Hierarchical bootstrap of the mean-over-seeds AUC difference, seeds and patients both resampled.

    ``probs_a`` [S_a, n] and ``probs_b`` [S_b, n] hold one row per training seed of each arm
    (the same nodules in the same order). Each resample draws patients with replacement (all
    of a patient's nodules together), and, independently for each arm, S seeds with
    replacement from its S trained models (seed k of one arm has nothing to do with seed k of
    the other); the statistic is mean AUC of the drawn seeds of a minus that of b on the drawn
    patients. So the interval carries both the sampling of patients and the spread between
    retrainings. With one seed per arm it is the patient bootstrap (training variance not
    measured). Returns the estimate, the percentile interval, the resamples' SD and the seeds'
    AUCs.
    """
    pa = np.atleast_2d(np.asarray(probs_a, np.float64))
    pb = np.atleast_2d(np.asarray(probs_b, np.float64))
    y = np.asarray(y).astype(bool)
    codes = cluster_codes(groups)
    k = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    auc_a, auc_b = ([roc_auc(y, p)[0] for p in arm] for arm in (pa, pb))
    draws = []
    for start in range(0, n_resamples, 500):
        b = min(500, n_resamples - start)
        patients = rng.integers(0, k, size=(b, k))
        w = np.stack([np.bincount(row, minlength=k) for row in patients])[:, codes].astype(np.float64)
        seeds_a = rng.integers(0, len(pa), size=(b, len(pa)))
        seeds_b = rng.integers(0, len(pb), size=(b, len(pb)))
        per_a = np.stack([roc_auc(y, p, w) for p in pa], axis=1)  # [b, S_a]
        per_b = np.stack([roc_auc(y, p, w) for p in pb], axis=1)
        draws.append(np.take_along_axis(per_a, seeds_a, 1).mean(1) - np.take_along_axis(per_b, seeds_b, 1).mean(1))
    dist = np.concatenate(draws)
    tail = 100 * (1 - confidence) / 2
    valid = ~np.isnan(dist)
    low, high = np.percentile(dist[valid], [tail, 100 - tail]) if valid.all() else (np.nan, np.nan)
    return {
        "estimate": float(np.mean(auc_a) - np.mean(auc_b)),
        "low": float(low),
        "high": float(high),
        "se": float(np.std(dist[valid], ddof=1)),
        "n_invalid": int((~valid).sum()),
        "auc_seeds_a": [float(v) for v in auc_a],
        "auc_seeds_b": [float(v) for v in auc_b],
        "distribution": dist,
    }


def cluster_sign_flip_test(diff, groups, *, n_resamples: int = 9999, seed: int = 0) -> dict[str, float]:
    """Two-sided paired permutation test of mean(diff) = 0 that keeps each patient's nodules together.

    Under the null the two paired quantities are exchangeable within a patient, so the sign of
    all of a patient's differences may flip at once: the test statistic is the mean nodule
    difference, sum_p s_p D_p / n over patient sums D_p and signs s_p = +-1
    (``scipy.stats.permutation_test``, ``permutation_type="samples"``; exact when 2^patients
    <= ``n_resamples``, else ``n_resamples`` random sign patterns, seeded).
    """
    from scipy.stats import permutation_test

    diff = np.asarray(diff, np.float64)
    if len(diff) == 0:
        raise NodulekitError("no paired differences to test")
    codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]
    sums = np.bincount(codes, weights=diff)
    n = len(diff)
    if np.all(sums == 0):
        return {"mean_diff": float(diff.mean()), "p_value": 1.0, "n_patients": len(sums)}
    res = permutation_test(
        (sums, np.zeros_like(sums)),
        lambda a, b, axis=-1: (a - b).sum(axis=axis) / n,
        permutation_type="samples",
        n_resamples=n_resamples,
        rng=np.random.default_rng(seed),
    )
    return {"mean_diff": float(diff.mean()), "p_value": float(res.pvalue), "n_patients": len(sums)}


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error); NaN entries stay NaN and do not count."""
    p = np.asarray(p_values, np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order]) if m else np.array([])
    out[order] = np.minimum(adjusted, 1.0)
    return out


def run_predictions(rundir: str | Path):
    """Test-set predictions of every fold of a run: DataFrame nodule_id, patient_id, index, fold, prob, y."""
    import pandas as pd

    run = Run(rundir)
    frames = [
        pd.DataFrame(
            {
                "nodule_id": r.test_nodule_id,
                "patient_id": r.test_patient_id,
                "index": r.test_index,
                "fold": r.fold,
                "prob": r.test_prob,
                "y": r.test_y.astype(int),
            }
        )
        for r in run.fold_results()
    ]
    df = pd.concat(frames, ignore_index=True)
    dup = df["nodule_id"][df["nodule_id"].duplicated()]
    if len(dup):
        raise NodulekitError(f"{rundir}: nodule {dup.iloc[0]} is in the test set of more than one fold")
    df.attrs.update(
        rundir=str(rundir),
        arch=run.arch,
        fingerprint=run.dataset_fingerprint,
        label=run.path.name or str(rundir),
    )
    return df


def _wilcoxon(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import wilcoxon

    if np.array_equal(a, b):
        return float("nan"), 1.0  # no differences at all: nothing to test, clearly not different
    res = wilcoxon(a, b, alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


MIN_OVERLAP = 0.9  # share of each run's test nodules that must be paired (by nodule id)
# Equivalence margin of an AUC difference, fixed before any comparison was run with it: smaller
# than the smallest gap between architectures this project has called a difference (ResNet18 vs
# HESAM, 0.019-0.025) and about twice the AUC spread between retrainings of one model (up to
# 0.009), so "equivalent" rules out a gap of the size that separates architectures.
EQUIVALENCE_MARGIN = 0.02
ALPHA = 0.05


def arm_predictions(rundirs: Sequence[str | Path]):
    """One arm of a comparison: the same configuration trained with one or more seeds.

    DataFrame nodule_id, patient_id, y and one probability column per seed (``p0``, ``p1``, ...);
    refuses seeds that did not test the same nodules with the same labels.
    """
    if isinstance(rundirs, (str, Path)):
        rundirs = [rundirs]
    frames = [run_predictions(r) for r in rundirs]
    first = frames[0].sort_values("nodule_id", ignore_index=True)
    probs = [first["prob"].to_numpy()]
    for frame, rundir in zip(frames[1:], rundirs[1:], strict=True):
        frame = frame.sort_values("nodule_id", ignore_index=True)
        if not np.array_equal(frame["nodule_id"].to_numpy(), first["nodule_id"].to_numpy()) or not np.array_equal(
            frame["y"].to_numpy(), first["y"].to_numpy()
        ):
            raise NodulekitError(
                f"{rundir} and {rundirs[0]} are given as seeds of one configuration but did not test the same "
                "nodules with the same labels"
            )
        probs.append(frame["prob"].to_numpy())
    arm = first[["nodule_id", "patient_id", "y"]].copy()
    for k, p in enumerate(probs):
        arm[f"p{k}"] = p
    arm.attrs.update(
        arch="/".join(sorted({f.attrs["arch"] for f in frames})),
        label=",".join(str(r) for r in rundirs),
        n_seeds=len(frames),
    )
    return arm


def _paired_predictions(ref, other, name_a, name_b, min_overlap: float = MIN_OVERLAP):
    """Two arms merged by nodule id (runs on different datasets of the same nodules pair too);
    refuses arms that share too few nodules, or disagree on a shared nodule's label or patient."""
    ids_a, ids_b = set(ref["nodule_id"]), set(other["nodule_id"])
    shared = len(ids_a & ids_b)
    if shared < min_overlap * max(len(ids_a), len(ids_b)):
        raise NodulekitError(
            f"{name_a} and {name_b} share {shared} test nodules of {len(ids_a)} and {len(ids_b)} "
            f"(at least {min_overlap:.0%} of each needed); paired tests pair nodules by id"
        )
    seeds_a, seeds_b = ref.attrs["n_seeds"], other.attrs["n_seeds"]
    a = ref.rename(columns={f"p{k}": f"pa{k}" for k in range(seeds_a)})
    b = other.rename(columns={f"p{k}": f"pb{k}" for k in range(seeds_b)})
    merged = a.merge(b, on="nodule_id", suffixes=("_a", "_b"))
    if (merged["y_a"] != merged["y_b"]).any():
        raise NodulekitError(f"{name_a} and {name_b} give some shared nodules different labels (another label rule?)")
    if (merged["patient_id_a"].astype(str) != merged["patient_id_b"].astype(str)).any():
        raise NodulekitError(f"{name_a} and {name_b} give some shared nodules different patients")
    merged.attrs.update(n_only_a=len(ids_a) - shared, n_only_b=len(ids_b) - shared)
    return merged, [f"pa{k}" for k in range(seeds_a)], [f"pb{k}" for k in range(seeds_b)]


def _auc_comparison(y, probs_a, probs_b, patients, *, margin, n_resamples, seed) -> dict[str, Any]:
    """AUC of arm a vs arm b: the seed x patient bootstrap interval, Obuchowski's clustered test
    (the default p), DeLong beside it, and TOST of |difference| < margin on the bootstrap SE."""
    mean_a, mean_b = probs_a.mean(0), probs_b.mean(0)
    clustered = obuchowski_test(y, mean_a, mean_b, patients)
    delong = delong_test(y, mean_a, mean_b)
    boot = seed_patient_bootstrap(y, probs_a, probs_b, patients, n_resamples=n_resamples, seed=seed)
    tost = equivalence_test(boot["estimate"], boot["se"], margin, ALPHA)
    return {
        "n_seeds_a": len(probs_a),
        "n_seeds_b": len(probs_b),
        "auc_a": float(np.mean(boot["auc_seeds_a"])),
        "auc_b": float(np.mean(boot["auc_seeds_b"])),
        "auc_sd_seeds_a": float(np.std(boot["auc_seeds_a"], ddof=1)) if len(probs_a) > 1 else float("nan"),
        "auc_sd_seeds_b": float(np.std(boot["auc_seeds_b"], ddof=1)) if len(probs_b) > 1 else float("nan"),
        "auc_diff": boot["estimate"],
        "auc_diff_low": boot["low"],
        "auc_diff_high": boot["high"],
        "auc_diff_se": boot["se"],
        "auc_diff_averaged": clustered["auc_diff"],
        "auc_se_clustered": clustered["se"],
        "auc_p": clustered["p_value"],
        "delong_se": delong["se"],
        "delong_z": delong["z"],
        "delong_p": delong["p_value"],
        "equivalence_margin": margin,
        "equivalence_low": tost["low"],
        "equivalence_high": tost["high"],
        "tost_p": tost["p_value"],
    }


def compare_predictions(
    y,
    prob_a,
    prob_b,
    patients,
    *,
    margin: float = EQUIVALENCE_MARGIN,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    n_permutations: int = 9999,
) -> dict[str, float]:
    """Two arms' probabilities for the same nodules (``prob_a`` [n] or [S_a, n], one row per seed).

    - AUC (``_auc_comparison``): mean-over-seeds AUCs, their difference with the seed x patient
      bootstrap interval; ``auc_p``: Obuchowski's clustered test (patients as clusters) and
      ``delong_p``: DeLong's (nodules as independent cases), both on the seed-averaged
      probabilities; ``tost_p``: two one-sided tests of |difference| < ``margin``;
    - ``error_p_patients``: patient sign-flip test of mean |p_a - y| - |p_b - y| = 0 (seed-averaged
      probabilities), with its patient-bootstrap interval ``error_diff_low/high``;
    - ``prob_p_value`` / ``error_p_value``: the paper's nodule-level Wilcoxon signed-rank tests
      on the probabilities / the absolute errors (they treat nodules of one patient as independent).
    """
    y = np.asarray(y)
    probs_a = np.atleast_2d(np.asarray(prob_a, np.float64))
    probs_b = np.atleast_2d(np.asarray(prob_b, np.float64))
    pa, pb = probs_a.mean(0), probs_b.mean(0)
    ea, eb = np.abs(pa - y), np.abs(pb - y)
    auc = _auc_comparison(y, probs_a, probs_b, patients, margin=margin, n_resamples=n_resamples, seed=seed)
    boot = cluster_bootstrap(patients, lambda w: ((w @ (ea - eb)) / w.sum(1))[None], n_resamples=n_resamples, seed=seed)
    flip = cluster_sign_flip_test(ea - eb, patients, n_resamples=n_permutations, seed=seed)
    stat_p, p_p = _wilcoxon(pa, pb)
    stat_e, p_e = _wilcoxon(ea, eb)
    return (
        {"n": len(y), "n_patients": flip["n_patients"]}
        | auc
        | {
            "mean_abs_error_a": float(ea.mean()),
            "mean_abs_error_b": float(eb.mean()),
            "mean_error_diff": flip["mean_diff"],
            "error_diff_low": float(boot["low"][0]),
            "error_diff_high": float(boot["high"][0]),
            "error_p_patients": flip["p_value"],
            "median_prob_diff": float(np.median(pa - pb)),
            "prob_statistic": stat_p,
            "prob_p_value": p_p,
            "median_error_diff": float(np.median(ea - eb)),
            "error_statistic": stat_e,
            "error_p_value": p_e,
        }
    )


HOLM_COLUMNS = ("auc_p", "delong_p", "tost_p", "error_p_patients", "prob_p_value", "error_p_value")


def auc_verdict(row) -> str:
    """What one comparison's AUC tests support, after Holm: a difference needs the clustered test
    AND the seed x patient interval; equivalence needs TOST; anything else is undecided."""
    different = row["auc_p_holm"] < ALPHA and (row["auc_diff_low"] > 0 or row["auc_diff_high"] < 0)
    equivalent = row["tost_p_holm"] < ALPHA
    margin = f"within ±{row['equivalence_margin']:g}"
    if different:
        side = "a higher" if row["auc_diff"] > 0 else "b higher"
        return f"{side}, yet {margin}" if equivalent else side
    return f"equivalent {margin}" if equivalent else "undecided"


def _arm_list(arms) -> list[list[str | Path]]:
    return [[a] if isinstance(a, (str, Path)) else list(a) for a in arms]


def wilcoxon_runs(
    arms: Sequence,
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    n_permutations: int = 9999,
    margin: float = EQUIVALENCE_MARGIN,
    min_overlap: float = MIN_OVERLAP,
):
    """The first arm against each other arm on the same nodules (``compare_predictions``), Holm-adjusted.

    An arm is a RUNDIR or a sequence of RUNDIRs (one configuration trained with several seeds).
    Arms are paired by nodule id, so runs on different datasets built from the same nodules
    compare (nodules in only one arm are left out and counted; below ``min_overlap`` refused).
    Every p-value column in ``HOLM_COLUMNS`` gets a ``<column>_holm`` twin: Holm's adjustment
    over the comparisons of the first arm; ``auc_verdict`` says what they support.
    """
    import pandas as pd

    arms = _arm_list(arms)
    if len(arms) < 2:
        raise NodulekitError("give at least two RUNDIRs: the first is compared with each of the others")
    preds = [arm_predictions(a) for a in arms]
    records = []
    for other in preds[1:]:
        name_a, name_b = preds[0].attrs["label"], other.attrs["label"]
        merged, cols_a, cols_b = _paired_predictions(preds[0], other, name_a, name_b, min_overlap)
        result = compare_predictions(
            merged["y_a"].to_numpy(),
            merged[cols_a].to_numpy().T,
            merged[cols_b].to_numpy().T,
            merged["patient_id_a"].astype(str).to_numpy(),
            margin=margin,
            n_resamples=n_resamples,
            seed=seed,
            n_permutations=n_permutations,
        )
        head = {"run_a": name_a, "arch_a": preds[0].attrs["arch"], "run_b": name_b, "arch_b": other.attrs["arch"]}
        records.append(head | {"n_only_a": merged.attrs["n_only_a"], "n_only_b": merged.attrs["n_only_b"]} | result)
    table = pd.DataFrame.from_records(records)
    for column in HOLM_COLUMNS:
        table.insert(table.columns.get_loc(column) + 1, f"{column}_holm", holm(table[column].to_numpy()))
    table.insert(table.columns.get_loc("auc_diff"), "auc_verdict", [auc_verdict(r) for _, r in table.iterrows()])
    table.attrs.update(n_resamples=n_resamples, seed=seed, n_permutations=n_permutations, margin=margin)
    return table


def comparison_markdown_table(table):
    """The columns of a ``wilcoxon_runs`` table worth reading, intervals in brackets."""
    import pandas as pd

    def ci(est, low, high, digits=4):
        return f"{est:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"

    seeds = [f"{a} / {b}" for a, b in zip(table["n_seeds_a"], table["n_seeds_b"], strict=True)]
    return pd.DataFrame(
        {
            "run_b": table["run_b"],
            "arch_b": table["arch_b"],
            "nodules / patients": [f"{n} / {p}" for n, p in zip(table["n"], table["n_patients"], strict=True)],
            "seeds a / b": seeds,
            "auc_a": table["auc_a"],
            "auc_b": table["auc_b"],
            "auc_diff [95 % CI]": [
                ci(*r) for r in zip(table["auc_diff"], table["auc_diff_low"], table["auc_diff_high"], strict=True)
            ],
            "auc_p (clustered)": table["auc_p"],
            "auc_p_holm": table["auc_p_holm"],
            "delong_p": table["delong_p"],
            "delong_p_holm": table["delong_p_holm"],
            "tost_p_holm": table["tost_p_holm"],
            "auc_verdict": table["auc_verdict"],
            "mean_error_diff [95 % CI]": [
                ci(*r)
                for r in zip(table["mean_error_diff"], table["error_diff_low"], table["error_diff_high"], strict=True)
            ],
            "error_p_patients_holm": table["error_p_patients_holm"],
            "prob_p_value_holm": table["prob_p_value_holm"],
        }
    )


NOT_RATED, ABSTAINED = -2, -1  # reader call codes besides 0 benign / 1 malignant
TOO_FEW_OTHERS, INDETERMINATE = -2, -1  # leave-one-reader-out reference codes besides 0 / 1


def _rule_thresholds(label_rule: Any) -> tuple[float, float, int]:
    rule = json.loads(label_rule) if isinstance(label_rule, str) else dict(label_rule or {})
    return (
        float(rule.get("malignant_above", 3.0)),
        float(rule.get("benign_below", 3.0)),
        int(rule.get("min_readers", 1)),
    )


def reader_calls(ratings: np.ndarray, malignant_above: float = 3.0, benign_below: float = 3.0) -> np.ndarray:
    """Per-reader calls from malignancy ratings by the label rule's thresholds applied to one rating:
    1 (> malignant_above), 0 (< benign_below), -1 abstain (between, e.g. 3), -2 not rated (NaN)."""
    r = np.asarray(ratings, float)
    call = np.where(r > malignant_above, 1, np.where(r < benign_below, 0, ABSTAINED))
    return np.where(np.isnan(r), NOT_RATED, call).astype(int)


def leave_one_reader_out(
    ratings, *, malignant_above: float = 3.0, benign_below: float = 3.0, min_others: int = 1
) -> np.ndarray:
    """Reference label of each (nodule, reader position) from the OTHER readers only [N, R].

    The label rule applied to the mean of the other readers' ratings: 1 (mean > malignant_above),
    0 (mean < benign_below), -1 indeterminate (in between), -2 fewer than ``min_others`` other
    readers. A reader is then never scored against a label their own rating helped make.
    """
    r = np.asarray(ratings, float)
    rated = ~np.isnan(r)
    others = rated.sum(axis=1, keepdims=True) - rated
    total = np.nansum(r, axis=1, keepdims=True) - np.where(rated, r, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / others
    label = np.where(mean > malignant_above, 1, np.where(mean < benign_below, 0, INDETERMINATE))
    return np.where(others < max(1, min_others), TOO_FEW_OTHERS, label).astype(int)


def _paired_accuracy(reader_right, model_right, patients, n_resamples: int, seed: int) -> dict[str, float]:
    """Reader and model accuracy on the same cases, their difference, patient intervals and sign-flip p."""
    rr, mr = np.asarray(reader_right, float), np.asarray(model_right, float)
    if len(rr) == 0:
        return {}
    boot = cluster_bootstrap(
        patients, lambda w: np.stack([w @ rr, w @ mr, w @ (rr - mr)]) / w.sum(1), n_resamples=n_resamples, seed=seed
    )
    out = {"n_patients": len(set(patients))}
    for i, name in enumerate(("reader_accuracy", "model_accuracy", "accuracy_diff")):
        out[name] = float(boot["estimate"][i])
        out[f"{name}_low"], out[f"{name}_high"] = float(boot["low"][i]), float(boot["high"][i])
    out["p_patients"] = cluster_sign_flip_test(rr - mr, patients, seed=seed)["p_value"]
    return out


def _reader_row(who, call, ref, model_call, y, patients, n_resamples, seed) -> dict[str, Any]:
    compared = (call >= 0) & (ref >= 0)
    c, r, m = call[compared], ref[compared], model_call[compared]
    return {
        "who": who,
        "n_rated": int((call != NOT_RATED).sum()),
        "n_abstained": int((call == ABSTAINED).sum()),
        "n_too_few_others": int(((call >= 0) & (ref == TOO_FEW_OTHERS)).sum()),
        "n_indeterminate_others": int(((call >= 0) & (ref == INDETERMINATE)).sum()),
        "n_compared": int(compared.sum()),
        "fp": int(((c == 1) & (r == 0)).sum()),
        "fn": int(((c == 0) & (r == 1)).sum()),
        "model_fp": int(((m == 1) & (r == 0)).sum()),
        "model_fn": int(((m == 0) & (r == 1)).sum()),
        **_paired_accuracy(c == r, m == r, patients[compared], n_resamples, seed),
        "model_accuracy_vs_label": float((m == y[compared]).mean()) if compared.any() else float("nan"),
    }


def reader_comparison(
    rundir: str | Path, dataset: str | Path | None = None, *, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
):
    """Table 6 without circularity: each reader position against the consensus of the OTHER readers,
    beside the model on the same nodules against the same reference (DataFrame; per-nodule detail
    in ``attrs["per_nodule"]``).

    Rows: reader positions 1..4 (pylidc order; not persons), ``all readers`` (every (nodule,
    reader) pair pooled) and ``model`` (all test nodules against the dataset label). Accuracies
    carry patient-bootstrap intervals; ``p_patients`` is a patient sign-flip test of reader minus
    model correctness, Holm-adjusted over the reader positions in ``p_patients_holm``.
    """
    import pandas as pd

    run = Run(rundir)
    preds = run_predictions(rundir)
    ds = run.load_dataset(dataset)
    row_of = {nid: i for i, nid in enumerate(ds.nodule_id.tolist())}
    unknown = [n for n in preds["nodule_id"] if n not in row_of]
    if unknown:
        raise NodulekitError(f"{len(unknown)} test nodule(s) of {rundir} are not in {ds.path}, e.g. {unknown[0]}")
    rows = np.array([row_of[n] for n in preds["nodule_id"]])
    y, patients, ratings = ds.y[rows], np.asarray(ds.patient_id[rows]).astype(str), ds.reader_malignancy[rows]
    above, below, min_readers = _rule_thresholds(ds.label_rule)
    calls = reader_calls(ratings, above, below)
    ref = leave_one_reader_out(ratings, malignant_above=above, benign_below=below, min_others=min_readers - 1)
    model_call = predict_label(preds["prob"].to_numpy())
    boot = {"n_resamples": n_resamples, "seed": seed}
    records = [
        _reader_row(f"reader {j + 1}", calls[:, j], ref[:, j], model_call, y, patients, **boot)
        for j in range(calls.shape[1])
    ]
    n_readers = calls.shape[1]
    records.append(
        _reader_row(
            "all readers",
            calls.T.ravel(),
            ref.T.ravel(),
            np.tile(model_call, n_readers),
            np.tile(y, n_readers),
            np.tile(patients, n_readers),
            **boot,
        )
    )
    records.append(_model_row(model_call, y, patients, **boot))
    out = pd.DataFrame.from_records(records)
    out.insert(out.columns.get_loc("p_patients") + 1, "p_patients_holm", np.nan)
    out.loc[: n_readers - 1, "p_patients_holm"] = holm(out["p_patients"].to_numpy()[:n_readers])
    out.attrs.update(
        rundir=str(rundir),
        dataset=str(ds.path),
        n=len(rows),
        arch=preds.attrs["arch"],
        rule=(above, below, max(1, min_readers - 1)),
        per_nodule=_readers_per_nodule(preds, ds, rows, calls, ref, model_call),
        **boot,
    )
    return out


def _model_row(model_call, y, patients, **boot) -> dict[str, Any]:
    """The ``model`` row of Table 6: its calls against the dataset label, on every test nodule."""
    model = cluster_bootstrap(patients, lambda w: (w @ (model_call == y)) / w.sum(1)[None], **boot)
    return {
        "who": "model",
        "n_compared": len(y),
        "n_patients": len(set(patients)),
        "model_accuracy": float(model["estimate"][0]),
        "model_accuracy_low": float(model["low"][0]),
        "model_accuracy_high": float(model["high"][0]),
        "model_fp": int(((model_call == 1) & (y == 0)).sum()),
        "model_fn": int(((model_call == 0) & (y == 1)).sum()),
        "model_accuracy_vs_label": float((model_call == y).mean()),
    }


def _readers_per_nodule(preds, ds, rows, calls, ref, model_call):
    import pandas as pd

    per_nodule = pd.DataFrame(
        {
            "nodule_id": preds["nodule_id"],
            "patient_id": preds["patient_id"],
            "fold": preds["fold"],
            "y": ds.y[rows],
            "malignancy_mean": ds.malignancy_mean[rows],
        }
    )
    call_names = np.array(["not rated", "abstain", "benign", "malignant"])
    ref_names = np.array(["too few other readers", "indeterminate", "benign", "malignant"])
    for j in range(calls.shape[1]):
        per_nodule[f"reader{j + 1}_rating"] = ds.reader_malignancy[rows, j]
        per_nodule[f"reader{j + 1}_call"] = call_names[calls[:, j] + 2]
        per_nodule[f"reader{j + 1}_others_label"] = ref_names[ref[:, j] + 2]
    per_nodule["model_prob"] = preds["prob"].to_numpy()
    per_nodule["model_call"] = np.where(model_call == 1, "malignant", "benign")
    return per_nodule


READERS_COLUMNS = (
    "who",
    "n_compared",
    "n_abstained",
    "n_indeterminate_others",
    "n_too_few_others",
    "reader_accuracy [95 % CI]",
    "model_accuracy [95 % CI]",
    "accuracy_diff [95 % CI]",
    "p_patients",
    "p_patients_holm",
    "fp",
    "fn",
    "model_fp",
    "model_fn",
)


def readers_markdown_table(table):
    """The reader table with intervals in brackets (the CSV keeps every column)."""
    import pandas as pd

    df = table.copy()
    for name in ("reader_accuracy", "model_accuracy", "accuracy_diff"):
        df[f"{name} [95 % CI]"] = [
            "–" if pd.isna(e) else f"{e:.3f} [{lo:.3f}, {hi:.3f}]"
            for e, lo, hi in zip(df[name], df[f"{name}_low"], df[f"{name}_high"], strict=True)
        ]
    shown = df[[c for c in READERS_COLUMNS if c in df.columns]]
    return shown.astype(object).where(shown.notna(), "–")


def _markdown_table(df, floatfmt: str = "{:.4g}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(floatfmt.format(v) if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(table, *, title: str, notes: str, md_table=None) -> str:
    """The Markdown of a report: ``md_table`` when given (a shorter view), else the whole ``table``."""
    shown = table if md_table is None else md_table
    return f"# {title}\n\n{_markdown_table(shown)}\n{notes}\n"


def report_record(table, record: dict[str, Any]) -> dict[str, Any]:
    """The JSON record of a report: provenance and every row of ``table``."""
    from nodulekit.artifacts import provenance

    return {"provenance": provenance(**record), "rows": json.loads(table.to_json(orient="records"))}


def write_report(
    table,
    out_md: str | Path,
    *,
    title: str,
    notes: str,
    record: dict[str, Any],
    overwrite: bool = False,
    per_nodule=None,
    md_table=None,
) -> dict[str, Path]:
    """Markdown table + CSV + JSON with the same stem (+ ``<stem>_nodules.csv`` when
    ``per_nodule`` is given); they appear together or not at all, existing files refused.
    The Markdown shows ``md_table`` when given (a shorter view), CSV and JSON the whole ``table``."""
    from nodulekit.outputs import atomic_paths, check_output_path

    out_md = Path(out_md)
    paths = {"md": out_md, "csv": out_md.with_suffix(".csv"), "json": out_md.with_suffix(".json")}
    if per_nodule is not None:
        paths["nodules"] = out_md.with_name(out_md.stem + "_nodules.csv")
    if paths["md"] in (paths["csv"], paths["json"]):
        raise NodulekitError(f"{out_md}: give the report a .md name (CSV and JSON go beside it)")
    for p in paths.values():
        check_output_path(p, overwrite)
    record = report_record(table, record)
    with atomic_paths(paths, overwrite=overwrite) as tmp:
        tmp["md"].write_text(report_markdown(table, title=title, notes=notes, md_table=md_table))
        table.to_csv(tmp["csv"], index=False)
        tmp["json"].write_text(json.dumps(record, indent=2, default=str))
        if per_nodule is not None:
            per_nodule.to_csv(tmp["nodules"], index=False)
    return paths


def wilcoxon_notes(n_resamples: int, seed: int, n_permutations: int, margin: float = EQUIVALENCE_MARGIN) -> str:
    return (
        "The first arm (a) against each other arm (b), paired by nodule id over the whole cross-validated test "
        "set (each probability comes from the fold model that did not train on that nodule; nodules in only one "
        "arm are left out and counted in `n_only_a`/`n_only_b`); differences are a minus b. An arm is one run or "
        "several seeds of one configuration (`n_seeds_a`/`n_seeds_b`). `auc_a`/`auc_b`: mean AUC over the arm's "
        "seeds; `auc_diff [95 % CI]`: their difference with a hierarchical bootstrap interval that resamples "
        "patients and, per arm, seeds (with one seed per arm the retraining spread is not measured and the "
        "interval is the patient bootstrap). `auc_p`: Obuchowski's (1997) clustered test of the AUC difference, "
        "patients as clusters, the default; `delong_p`: DeLong's test (DeLong et al. 1988; nodules as independent "
        "cases) beside it; both on the seed-averaged probabilities. `tost_p`: two one-sided tests that "
        f"|AUC_a - AUC_b| < {margin:g} (margin fixed in advance, docs/statistics.md), with the bootstrap's "
        "standard error. `auc_verdict`: 'a higher'/'b higher' needs Holm-adjusted `auc_p` < 0.05 and the interval "
        "to exclude 0; 'equivalent' needs Holm-adjusted `tost_p` < 0.05; otherwise 'undecided' (a non-significant "
        "difference is not equivalence). `mean_error_diff`: mean of |p_a - y| - |p_b - y| (negative: a is "
        "closer to the labels); `error_p_patients`: two-sided permutation test that flips the sign of all of a "
        f"patient's differences together ({n_permutations} random sign patterns, or all when fewer; seed {seed}). "
        f"{bootstrap_note(n_resamples, seed)}. `prob_p_value`: the paper's Table 5 test, a Wilcoxon "
        "signed-rank test of the probabilities (a small p says the output distributions differ, not that either "
        "run is better; nodule level, patients not accounted for). `*_holm`: Holm's adjustment over the "
        "comparisons of the first arm with the others. The CSV/JSON also hold the nodule-level Wilcoxon test of "
        "the absolute errors (`error_p_value`), the seeds' AUC spread and both standard errors."
    )


def readers_notes(rule: tuple[float, float, int], n_resamples: int, seed: int) -> str:
    above, below, min_others = rule
    return (
        f"Table 6 without circularity. Each reader's call (own rating > {above:g} malignant, < {below:g} benign, "
        "in between abstains) is scored against the consensus of the OTHER readers of that nodule: the dataset's "
        f"label rule applied to the mean of the remaining ratings (> {above:g} malignant, < {below:g} benign), "
        f"needing at least {min_others} other reader(s). Nodules where the others' mean is indeterminate "
        "(`n_indeterminate_others`) or too few others rated (`n_too_few_others`) are left out and counted. The "
        "model (malignant if p > 0.5, cross-validated test predictions) is scored against the same reference on "
        "exactly the same nodules. Reader positions follow pylidc's annotation order, so 'reader 1' is not the "
        "same person across nodules; 'all readers' pools every (nodule, reader) pair. `accuracy_diff` = reader "
        "minus model; `p_patients`: two-sided permutation test flipping all of a patient's differences together; "
        f"`p_patients_holm`: Holm over the reader positions. {bootstrap_note(n_resamples, seed)}. "
        "The last row is the model against the dataset's label on every test nodule. Per-nodule ratings, calls "
        "and leave-one-out labels: `<stem>_nodules.csv`."
    )

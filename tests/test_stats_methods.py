"""The pure statistical methods of nodulekit.stats, each against an independent computation.

- ROC/AUC/sensitivity at 90 % specificity: scikit-learn, and a brute-force threshold scan;
- patient bootstrap: the binomial normal approximation on a large sample, and the widening
  that duplicated nodules of one patient must cause;
- DeLong: the O(n^2) structural components written out here from the 1988 paper;
- patient sign-flip permutation test: exact enumeration of all sign patterns, and data where
  the null holds / fails by construction;
- Holm and calibration: hand-computed values.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

from nodulekit import stats as St
from nodulekit.errors import NodulekitError


@pytest.fixture
def scored():
    """600 cases, scores rounded to 2 decimals (many ties), a real but imperfect separation."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    score = np.round(np.clip(0.3 * y + rng.normal(0.4, 0.25, 600), 0, 1), 2)
    return y, score


def test_auc_with_ties_and_weights_matches_sklearn(scored):
    y, score = scored
    w = np.random.default_rng(1).integers(0, 4, (3, len(y))).astype(float)
    assert St.roc_auc(y, score)[0] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    for row in w:
        ref = roc_auc_score(y, score, sample_weight=row)
        assert St.roc_auc(y, score, row)[0] == pytest.approx(ref, abs=1e-12)
    np.testing.assert_allclose(St.roc_auc(y, score, w), [roc_auc_score(y, score, sample_weight=r) for r in w])
    fpr, tpr = St.weighted_roc(y, score)
    ref_fpr, ref_tpr, _ = roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr[0], ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr[0], ref_tpr, atol=1e-12)


def test_sensitivity_at_specificity_is_the_best_allowed_threshold(scored):
    y, score = scored
    best = 0.0
    for t in np.r_[np.unique(score), np.inf]:  # call positive when score >= t
        call = score >= t
        spec = np.mean(~call[y == 0])
        if spec >= 0.9:
            best = max(best, np.mean(call[y == 1]))
    assert St.sensitivity_at_specificity(y, score, 0.9)[0] == pytest.approx(best)
    assert 0 < best < 1  # the fixture is neither trivial nor perfect
    assert np.isnan(St.sensitivity_at_specificity(np.ones(5), np.arange(5.0))[0])  # no negatives


def test_threshold_rates_known_answer():
    r = St.threshold_rates([1, 1, 1, 0, 0], [1, 0, 0, 0, 1], weights=[2, 1, 1, 1, 1])
    assert r["accuracy"][0] == pytest.approx(3 / 6)
    assert r["sensitivity"][0] == pytest.approx(2 / 4) and r["specificity"][0] == pytest.approx(1 / 2)


def test_bootstrap_ci_of_a_proportion_matches_the_binomial_normal_approximation():
    rng = np.random.default_rng(2)
    n, p = 5000, 0.8
    correct = (rng.random(n) < p).astype(float)
    res = St.cluster_bootstrap(np.arange(n), lambda w: (w @ correct / w.sum(1))[None], n_resamples=2000, seed=0)
    phat = correct.mean()
    half = norm.ppf(0.975) * np.sqrt(phat * (1 - phat) / n)
    assert res["estimate"][0] == pytest.approx(phat)
    assert res["low"][0] == pytest.approx(phat - half, abs=0.15 * half)
    assert res["high"][0] == pytest.approx(phat + half, abs=0.15 * half)


def test_bootstrap_resamples_patients_not_nodules():
    """4 identical nodules per patient carry the information of one: the interval must be as
    wide as a binomial one over the 1000 patients, twice that of 4000 independent nodules."""
    rng = np.random.default_rng(3)
    per_patient = (rng.random(1000) < 0.7).astype(float)
    correct = np.repeat(per_patient, 4)
    groups = np.repeat([f"P{i}" for i in range(1000)], 4)
    res = St.cluster_bootstrap(groups, lambda w: (w @ correct / w.sum(1))[None], n_resamples=2000, seed=1)
    phat = per_patient.mean()
    half_patients = norm.ppf(0.975) * np.sqrt(phat * (1 - phat) / 1000)
    width = res["high"][0] - res["low"][0]
    assert width == pytest.approx(2 * half_patients, rel=0.15)


def test_bootstrap_is_seeded_and_states_undefined_resamples():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, 60)
    prob = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 60), 0, 1)
    groups = np.arange(60) // 2
    a = St.classification_cis(y, prob, prob > 0.5, groups, n_resamples=200, seed=7)
    b = St.classification_cis(y, prob, prob > 0.5, groups, n_resamples=200, seed=7)
    c = St.classification_cis(y, prob, prob > 0.5, groups, n_resamples=200, seed=8)
    assert a == b and a != c
    assert a["auc"]["estimate"] == pytest.approx(roc_auc_score(y, prob))
    for name in St.CLASSIFICATION_STATISTICS:
        assert a[name]["low"] < a[name]["high"] and a[name]["n_invalid_resamples"] == 0
    # 3 patients, one of them the only malignant one: many resamples have no malignant case
    res = St.cluster_bootstrap(
        ["A", "B", "C"], lambda w: St.threshold_rates([1, 0, 0], [1, 0, 1], w)["sensitivity"][None], n_resamples=50
    )
    assert res["n_invalid"][0] > 0 and np.isnan(res["low"][0]) and res["estimate"][0] == 1.0
    with pytest.raises(NodulekitError, match="at least 1"):
        St.cluster_bootstrap([0, 1], lambda w: w.sum(1)[None], n_resamples=0)


def delong_by_definition(y, a, b):
    """DeLong et al. (1988) written out: psi kernels over every positive-negative pair."""
    pos, neg = y == 1, y == 0
    comps10, comps01 = [], []
    for s in (a, b):
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        comps10.append(psi.mean(axis=1))  # V10(X_i): over negatives
        comps01.append(psi.mean(axis=0))  # V01(Y_j): over positives
    m, n = pos.sum(), neg.sum()
    s10 = np.array([[np.sum((u - u.mean()) * (v - v.mean())) / (m - 1) for v in comps10] for u in comps10])
    s01 = np.array([[np.sum((u - u.mean()) * (v - v.mean())) / (n - 1) for v in comps01] for u in comps01])
    cov = s10 / m + s01 / n
    aucs = [c.mean() for c in comps10]
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (aucs[0] - aucs[1]) / np.sqrt(var)
    return aucs, np.sqrt(var), 2 * norm.sf(abs(z))


def test_delong_matches_the_structural_components_by_definition(scored):
    y, a = scored
    rng = np.random.default_rng(4)
    b = np.round(np.clip(a + rng.normal(0, 0.15, len(a)), 0, 1), 2)  # correlated with a, ties too
    res = St.delong_test(y, a, b)
    aucs, se, p = delong_by_definition(y, a, b)
    assert res["auc_a"] == pytest.approx(aucs[0]) and res["auc_b"] == pytest.approx(aucs[1])
    assert res["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert res["se"] == pytest.approx(se, rel=1e-9) and res["p_value"] == pytest.approx(p, rel=1e-9)
    assert res["diff_low"] < res["auc_diff"] < res["diff_high"]
    assert res["diff_high"] - res["diff_low"] == pytest.approx(2 * norm.ppf(0.975) * se)
    same = St.delong_test(y, a, a)
    assert same["p_value"] == 1.0 and same["auc_diff"] == 0


def test_delong_detects_a_better_scorer_and_not_an_equal_one():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 400)
    good = y + rng.normal(0, 0.6, 400)
    poor = y + rng.normal(0, 2.0, 400)
    assert St.delong_test(y, good, poor)["p_value"] < 1e-4
    # two noisy copies of one score: the null holds by construction
    base = y + rng.normal(0, 1.0, 400)
    p = [St.delong_test(y, base + rng.normal(0, 0.3, 400), base + rng.normal(0, 0.3, 400))["p_value"] for _ in range(5)]
    assert min(p) > 0.01
    with pytest.raises(NodulekitError, match="at least 2 cases of each class"):
        St.delong_test([1, 1, 0], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


def test_cluster_sign_flip_test_is_exact_over_patient_sign_patterns():
    diff = np.array([0.3, 0.1, -0.2, 0.5, 0.4, 0.05, -0.1, 0.2, 0.3, 0.6])
    groups = np.array(["a", "a", "b", "c", "c", "c", "d", "e", "f", "f"])
    sums = np.array([diff[groups == g].sum() for g in sorted(set(groups))])
    observed = abs(sums.sum())
    null = [abs(np.dot(s, sums)) for s in itertools.product((-1, 1), repeat=len(sums))]
    exact = np.mean(np.array(null) >= observed - 1e-12)
    res = St.cluster_sign_flip_test(diff, groups)
    assert res["p_value"] == pytest.approx(exact) and res["mean_diff"] == pytest.approx(diff.mean())
    assert res["n_patients"] == 6


def test_cluster_sign_flip_test_null_holds_and_fails_by_construction():
    rng = np.random.default_rng(6)
    groups = np.repeat(np.arange(60), 3)
    shifted = rng.normal(0.5, 1.0, 180)
    assert St.cluster_sign_flip_test(shifted, groups, seed=0)["p_value"] < 1e-3
    symmetric = rng.normal(0.0, 1.0, 180)
    assert St.cluster_sign_flip_test(symmetric, groups, seed=0)["p_value"] > 0.05
    # one patient with 40 identical positive differences, 40 patients with null ones: a
    # nodule-level test would call this significant, the patient-level test must not
    one = np.r_[np.full(40, 1.0), rng.normal(0, 1.0, 40)]
    who = np.r_[np.zeros(40, int), np.arange(1, 41)]
    assert St.cluster_sign_flip_test(one, who, seed=0)["p_value"] > 0.05
    assert St.cluster_sign_flip_test(np.zeros(5), np.arange(5))["p_value"] == 1.0


def test_holm_known_values():
    np.testing.assert_allclose(St.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(St.holm([0.5, np.nan, 0.01]), [0.5, np.nan, 0.02])
    np.testing.assert_allclose(St.holm([0.6, 0.7]), [1.0, 1.0])
    assert St.holm([]).shape == (0,)


def test_calibration_known_values():
    # bins [0.2, 0.3) and [0.8, 0.9): observed 1/4 and 3/4 vs mean probability 0.25 and 0.85
    prob = np.array([0.25] * 4 + [0.85] * 4)
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    cal = St.calibration(y, prob)
    assert cal["ece"] == pytest.approx(0.5 * 0 + 0.5 * 0.1)
    assert cal["brier"] == pytest.approx(np.mean((prob - y) ** 2))
    bins = {b["low"]: b for b in cal["bins"] if b["n"]}
    assert set(bins) == {0.2, 0.8} and bins[0.8]["observed"] == pytest.approx(0.75)
    assert St.calibration([0, 0], [1.0, 1.0])["ece"] == pytest.approx(1.0)  # p = 1 falls in the last bin


# --------------------------------------------------------------------------------------
# Clustered AUC (Obuchowski 1997), TOST, and the seed x patient bootstrap.


def test_obuchowski_known_answer_by_hand():
    """Four patients; score b is constant, so Var(AUC_a - AUC_b) is Var(AUC_a) and every term is
    small fractions (worked out in the comments).

    Positives 0.8 (P1), 0.6 (P2), 0.9 (P4); negatives 0.3 (P1), 0.7, 0.1 (P3), 0.5 (P4).
    V10 = 1, 3/4, 1; V01 = 1, 2/3, 1, 1; AUC = 11/12. Cluster residuals V10_i - m_i AUC:
    1/12, -1/6, 0, 1/12; V01_i - n_i AUC: 1/12, 0, 5/3 - 22/12 = -1/6, 1/12.
    S10 = 3/(2*3) * 6/144 = 1/48; S01 = 3/(2*4) * 6/144 = 1/64; S11 = 4/3 * 2/144 = 1/54.
    Var = S10/3 + S01/4 + 2 S11/12 = 1/144 + 1/256 + 1/324.
    """
    y = np.array([1, 0, 1, 0, 0, 1, 0])
    a = np.array([0.8, 0.3, 0.6, 0.7, 0.1, 0.9, 0.5])
    groups = ["P1", "P1", "P2", "P3", "P3", "P4", "P4"]
    res = St.obuchowski_test(y, a, np.full(7, 0.5), groups)
    assert res["auc_a"] == pytest.approx(11 / 12) and res["auc_b"] == pytest.approx(0.5)
    assert res["se"] ** 2 == pytest.approx(1 / 144 + 1 / 256 + 1 / 324, rel=1e-12)
    assert res["n_clusters"] == 4
    # DeLong on the same cases: S10 = 1/48 over 3 positives, S01 = 1/36 over 4 negatives
    assert St.delong_test(y, a, np.full(7, 0.5))["se"] ** 2 == pytest.approx(2 / 144, rel=1e-12)


def obuchowski_by_definition(y, a, b, groups):
    """Obuchowski (1997) written out with loops over patients and psi kernels over all pairs."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    M, N = len(pos), len(neg)

    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    d10 = {i: sum(psi(a[i], a[j]) - psi(b[i], b[j]) for j in neg) / N for i in pos}
    d01 = {j: sum(psi(a[i], a[j]) - psi(b[i], b[j]) for i in pos) / M for j in neg}
    theta = sum(d10.values()) / M
    clusters = sorted(set(groups))
    r10, r01 = [], []
    for c in clusters:
        members = [k for k in range(len(y)) if groups[k] == c]
        r10.append(sum(d10[k] for k in members if k in d10) - theta * sum(1 for k in members if y[k] == 1))
        r01.append(sum(d01[k] for k in members if k in d01) - theta * sum(1 for k in members if y[k] == 0))
    i10 = sum(1 for c in clusters if any(y[k] == 1 for k in range(len(y)) if groups[k] == c))
    i01 = sum(1 for c in clusters if any(y[k] == 0 for k in range(len(y)) if groups[k] == c))
    big_i = len(clusters)
    s10 = i10 / ((i10 - 1) * M) * sum(r * r for r in r10)
    s01 = i01 / ((i01 - 1) * N) * sum(r * r for r in r01)
    s11 = big_i / (big_i - 1) * sum(u * v for u, v in zip(r10, r01, strict=True))
    return theta, np.sqrt(s10 / M + s01 / N + 2 * s11 / (M * N))


def test_obuchowski_matches_the_definition_and_reduces_to_delong():
    rng = np.random.default_rng(11)
    groups = np.repeat(np.arange(25), rng.integers(1, 5, 25))
    n = len(groups)
    y = (rng.uniform(size=n) < 0.3 + 0.4 * (groups % 2)).astype(int)
    a = np.round(y + rng.normal(0, 1, n), 1)  # ties within and across clusters
    b = np.round(a + rng.normal(0, 0.7, n), 1)
    res = St.obuchowski_test(y, a, b, groups)
    diff, se = obuchowski_by_definition(y, a, b, list(groups))
    assert res["auc_diff"] == pytest.approx(diff) and res["se"] == pytest.approx(se, rel=1e-10)
    # one nodule per patient: exactly DeLong
    single = St.obuchowski_test(y, a, b, np.arange(n))
    delong = St.delong_test(y, a, b)
    assert single["se"] == pytest.approx(delong["se"], rel=1e-12)
    assert single["p_value"] == pytest.approx(delong["p_value"], rel=1e-10)
    # every case repeated 4 times within its own patient: no new information, so the clustered
    # SE stays DeLong's on the unrepeated cases, while DeLong (nodules independent) shrinks by 2
    rep = np.repeat(np.arange(n), 4)
    repeated = St.obuchowski_test(y[rep], a[rep], b[rep], rep)
    assert repeated["se"] == pytest.approx(delong["se"], rel=1e-10)
    assert St.delong_test(y[rep], a[rep], b[rep])["se"] == pytest.approx(delong["se"] / 2, rel=0.02)
    with pytest.raises(NodulekitError, match="at least 2 patients"):
        St.obuchowski_test([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.3, 0.4], ["p", "p", "q", "q"])


def test_delong_is_liberal_under_clustering_and_the_clustered_test_is_not():
    """Null by construction: two scores of equal skill, each with its own patient-level offset
    (30 patients x 4 nodules of one class, patient effect SD 1 vs nodule noise 0.3). DeLong counts
    120 independent nodules and rejects far too often; Obuchowski's test holds its level.
    300 simulations: the binomial SE of a 5 % rate is 1.26 points, so the clustered rate must lie
    within 5 % +- 3.8 points (3 SE) and DeLong's must exceed 15 % (observed here: about 30 %)."""
    rng = np.random.default_rng(2026)
    n_patients, k, sims = 30, 4, 300
    groups = np.repeat(np.arange(n_patients), k)
    rejected = {"delong": 0, "clustered": 0}
    for _ in range(sims):
        y = np.repeat(rng.permutation(np.arange(n_patients) % 2), k)
        a = y + np.repeat(rng.normal(0, 1, n_patients), k) + rng.normal(0, 0.3, n_patients * k)
        b = y + np.repeat(rng.normal(0, 1, n_patients), k) + rng.normal(0, 0.3, n_patients * k)
        rejected["delong"] += St.delong_test(y, a, b)["p_value"] < 0.05
        rejected["clustered"] += St.obuchowski_test(y, a, b, groups)["p_value"] < 0.05
    se = np.sqrt(0.05 * 0.95 / sims)
    assert abs(rejected["clustered"] / sims - 0.05) < 3 * se
    assert rejected["delong"] / sims > 0.15


def test_tost_known_answers():
    # estimate 0, SE 0.01, margin 0.02: both one-sided z are 2, p = P(Z > 2) = 0.02275
    res = St.equivalence_test(0.0, 0.01, 0.02)
    assert res["p_value"] == pytest.approx(0.0227501319, rel=1e-8) and res["equivalent"]
    assert (res["low"], res["high"]) == pytest.approx((-0.0164485363, 0.0164485363), rel=1e-8)  # 90 % interval
    # estimate +0.005: p+ = Phi(-1.5) = 0.0668 decides, p- = P(Z > 2.5) = 0.00621; not shown
    res = St.equivalence_test(0.005, 0.01, 0.02)
    assert res["p_upper"] == pytest.approx(0.0668072013, rel=1e-8)
    assert res["p_lower"] == pytest.approx(0.0062096653, rel=1e-8)
    assert res["p_value"] == res["p_upper"] and not res["equivalent"]
    # the README's CAM - HESAM: -0.011 with a 95 % interval [-0.027, +0.004] (SE ~ 0.0079) is
    # not equivalent within 0.02: a non-significant difference is not equivalence
    cam = St.equivalence_test(-0.011, 0.031 / (2 * 1.959964), 0.02)
    assert not cam["equivalent"] and cam["p_value"] == pytest.approx(norm.sf(0.009 / (0.031 / 3.919928)))
    # TOST at 5 % <=> the 90 % interval inside the margin
    for est in np.linspace(-0.03, 0.03, 13):
        r = St.equivalence_test(est, 0.008, 0.02)
        assert r["equivalent"] == (r["low"] > -0.02 and r["high"] < 0.02)
    assert St.equivalence_test(0.0, 0.0, 0.02)["p_value"] == 0.0
    assert St.equivalence_test(0.03, 0.0, 0.02)["p_value"] == 1.0
    with pytest.raises(NodulekitError, match="margin must be positive"):
        St.equivalence_test(0.0, 0.01, 0.0)


def test_seed_patient_bootstrap_adds_the_spread_between_seeds():
    rng = np.random.default_rng(12)
    groups = np.repeat(np.arange(60), 2)
    y = np.repeat(np.arange(60) % 2, 2)
    base = y + rng.normal(0, 1, 120)
    copies = np.stack([base] * 3)
    b = base + rng.normal(0, 1, 120)
    one = St.seed_patient_bootstrap(y, base, b, groups, n_resamples=400, seed=1)
    # copies of one model: resampling seeds changes nothing (same patient draws in one batch)
    same = St.seed_patient_bootstrap(y, copies, b, groups, n_resamples=400, seed=1)
    assert (same["low"], same["high"]) == pytest.approx((one["low"], one["high"]))
    assert one["estimate"] == pytest.approx(roc_auc_score(y, base) - roc_auc_score(y, b))
    # seeds that really differ: a wider interval, estimate = mean over seeds
    spread = np.stack([base + rng.normal(0, s, 120) for s in (0.2, 1.0, 2.0)])
    wide = St.seed_patient_bootstrap(y, spread, b, groups, n_resamples=400, seed=1)
    aucs = [roc_auc_score(y, p) for p in spread]
    assert wide["estimate"] == pytest.approx(np.mean(aucs) - roc_auc_score(y, b))
    assert wide["auc_seeds_a"] == pytest.approx(aucs)
    assert wide["high"] - wide["low"] > one["high"] - one["low"]
    # one seed each: the patient bootstrap's SE is close to Obuchowski's clustered SE
    assert one["se"] == pytest.approx(St.obuchowski_test(y, base, b, groups)["se"], rel=0.2)

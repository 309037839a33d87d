"""The pure methods of nodulekit.stats at their edges, each against a hand computation or an
independent library call: ROC points with ties and weights, the 90 % specificity point exactly at
its boundary, the patient bootstrap against ``scipy.stats.bootstrap`` with the same seed, the
hierarchical seed x patient bootstrap against its algorithm written out with a vectorised
Mann-Whitney AUC, calibration bins at their edges, TOST exactly at the margin, Holm by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import bootstrap, norm, permutation_test
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from nodulekit import stats as St
from nodulekit.errors import NodulekitError

# 4 patients, 9 nodules (several per patient), tied scores across classes
Y9 = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0])
S9 = np.array([0.9, 0.9, 0.7, 0.4, 0.4, 0.2, 0.8, 0.1, 0.4])
G9 = np.array(["P1", "P1", "P1", "P2", "P2", "P3", "P4", "P4", "P4"])


def test_weighted_roc_points_with_ties_and_weights_match_sklearn():
    w = np.array([2, 1, 1, 3, 1, 2, 1, 1, 2], float)
    fpr, tpr = St.weighted_roc(Y9, S9, w)
    ref_fpr, ref_tpr, _ = roc_curve(Y9, S9, sample_weight=w, drop_intermediate=False)
    # sklearn starts at (0, 0) as well and has one point per distinct score
    assert fpr.shape == (1, len(np.unique(S9)) + 1)
    np.testing.assert_allclose(fpr[0], ref_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr[0], ref_tpr, atol=1e-15)
    # unweighted = weight 1 each: the shape [1, m + 1] of a single weight vector
    fpr1, tpr1 = St.weighted_roc(Y9, S9)
    ref_fpr, ref_tpr, _ = roc_curve(Y9, S9, drop_intermediate=False)
    np.testing.assert_allclose(fpr1[0], ref_fpr)
    np.testing.assert_allclose(tpr1[0], ref_tpr)
    assert St.roc_auc(Y9, S9).shape == (1,)
    # yes/no calls as the score (booleans): the AUC of a binary test, (sensitivity + specificity) / 2
    calls = S9 > 0.5
    assert St.roc_auc(Y9, calls)[0] == pytest.approx(roc_auc_score(Y9, calls))
    assert St.roc_auc(Y9, S9)[0] == pytest.approx(roc_auc_score(Y9, S9), abs=1e-15)
    # two weight vectors at once: one row each, each as sklearn weighs it
    both = St.roc_auc(Y9, S9, np.stack([w, np.ones(9)]))
    np.testing.assert_allclose(both, [roc_auc_score(Y9, S9, sample_weight=w), roc_auc_score(Y9, S9)], atol=1e-15)
    with pytest.raises(NodulekitError, match="^no cases to compute a ROC curve from$"):
        St.weighted_roc([], [])


def test_roc_of_one_class_is_undefined_in_the_missing_rate():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the 0 / 0 rates are expected: no RuntimeWarning
        fpr, tpr = St.weighted_roc([1, 1, 1], [0.2, 0.5, 0.9])
        rates = St.threshold_rates([1, 1], [1, 0])
    assert np.isnan(rates["specificity"]).all() and rates["sensitivity"].tolist() == [0.5]
    assert np.isnan(fpr).all() and tpr[0].tolist() == [0, 1 / 3, 2 / 3, 1]
    # a weight vector that drops every positive: that row's tpr is NaN, the other row is fine
    fpr, tpr = St.weighted_roc([1, 0, 0], [0.9, 0.5, 0.2], [[0, 1, 1], [1, 1, 1]])
    assert np.isnan(tpr[0]).all() and tpr[1].tolist() == [0, 1, 1, 1]
    assert fpr[0].tolist() == [0, 0, 0.5, 1]


def test_sensitivity_at_exactly_90_percent_specificity_counts_that_threshold():
    # 10 negatives, one scored above every positive but one: at the threshold that lets it in,
    # specificity is exactly 9/10 (fpr 0.1, above 1 - 0.9 in floating point without the tolerance)
    y = np.array([1] * 5 + [0] * 10)
    s = np.array([0.95, 0.85, 0.8, 0.75, 0.3, 0.9] + [0.1] * 9)
    assert St.sensitivity_at_specificity(y, s)[0] == 1.0  # threshold 0.3: every positive, 1 negative
    assert St.sensitivity_at_specificity(y, s, 0.95)[0] == pytest.approx(1 / 5)  # fpr 0.1 not allowed
    # the brute-force scan: the best tpr over thresholds with specificity >= 0.9
    best = max(((s >= t) & (y == 1)).sum() / 5 for t in np.unique(s) if ((s >= t) & (y == 0)).sum() / 10 <= 0.1 + 1e-12)
    assert best == 1.0
    # a class missing: undefined, whichever it is
    assert np.isnan(St.sensitivity_at_specificity([1, 1], [0.2, 0.4])[0])
    assert np.isnan(St.sensitivity_at_specificity([0, 0], [0.2, 0.4])[0])
    res = St.sensitivity_at_specificity([1, 0, 0], [0.9, 0.5, 0.2], weights=[[0, 1, 1], [1, 1, 1]])
    assert np.isnan(res[0]) and res[1] == 1.0


def test_classification_statistics_rows_in_their_named_order():
    pred = (S9 > 0.5).astype(int)
    w = np.array([1, 2, 1, 1, 1, 3, 1, 2, 1], float)
    rows = St.classification_statistics(Y9, S9, pred, w)
    assert rows.shape == (5, 1)
    tp = (w * ((pred == 1) & (Y9 == 1))).sum()
    tn = (w * ((pred == 0) & (Y9 == 0))).sum()
    expected = [
        (tp + tn) / w.sum(),
        tp / (w * Y9).sum(),
        tn / (w * (1 - Y9)).sum(),
        roc_auc_score(Y9, S9, sample_weight=w),
        St.sensitivity_at_specificity(Y9, S9, 0.9, w)[0],
    ]
    np.testing.assert_allclose(rows[:, 0], expected)
    two = St.threshold_rates([1, 0, 0], [1, 0, 1], [[1, 1, 0], [1, 3, 1]])  # each row its own rates
    assert two["specificity"].tolist() == [1.0, 0.75] and two["accuracy"].tolist() == [1.0, 0.8]
    rates = St.threshold_rates([1, 0], [1, 1], [[1, 0], [0, 1]])  # a class without weight: NaN
    assert rates["accuracy"].tolist() == [1, 0] and rates["sensitivity"][0] == 1 and np.isnan(rates["sensitivity"][1])
    assert np.isnan(rates["specificity"][0]) and rates["specificity"][1] == 0


def _patient_mean_by_hand(values, groups):
    """The statistic of a bootstrap over patient indices, computed without nodulekit: the mean
    over the nodules of the drawn patients (a patient drawn twice counts twice)."""
    names = sorted(set(groups))
    members = [np.flatnonzero(groups == g) for g in names]

    def stat(idx, axis=-1):
        idx = np.moveaxis(np.asarray(idx), axis, -1)
        flat = idx.reshape(-1, idx.shape[-1])
        out = [np.concatenate([values[members[i]] for i in row]).mean() for row in flat]
        return np.asarray(out).reshape(idx.shape[:-1])

    return stat, len(names)


@pytest.mark.parametrize(("seed", "confidence", "n_resamples"), [(0, 0.95, 700), (11, 0.8, 300)])
def test_cluster_bootstrap_matches_scipy_bootstrap_over_patients(seed, confidence, n_resamples):
    values = np.array([0.2, 0.9, 0.4, 0.0, 1.0, 0.3, 0.8, 0.5, 0.6, 0.7, 0.1])
    groups = np.array(["A", "A", "B", "C", "C", "C", "D", "E", "E", "F", "F"])
    stat, k = _patient_mean_by_hand(values, groups)
    ref = bootstrap(
        (np.arange(k),),
        stat,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
        vectorized=True,
    )
    res = St.cluster_bootstrap(
        groups, lambda w: (w @ values / w.sum(1))[None], n_resamples=n_resamples, seed=seed, confidence=confidence
    )
    assert res["estimate"][0] == pytest.approx(values.mean())
    assert res["low"][0] == pytest.approx(ref.confidence_interval.low, rel=1e-12)
    assert res["high"][0] == pytest.approx(ref.confidence_interval.high, rel=1e-12)
    assert res["n_invalid"].tolist() == [0]


def test_cluster_bootstrap_default_seed_and_warnings_other_than_degenerate_data():
    values = np.array([0.2, 0.9, 0.4, 0.0, 1.0])
    groups = np.array(["A", "A", "B", "C", "D"])

    def mean(w):
        return (w @ values / w.sum(1))[None]

    default = St.cluster_bootstrap(groups, mean, n_resamples=50)
    seeded = St.cluster_bootstrap(groups, mean, n_resamples=50, seed=0)
    assert (default["low"], default["high"]) == (seeded["low"], seeded["high"])
    assert St.cluster_bootstrap(groups, mean, n_resamples=50, seed=1)["low"] != default["low"]

    def noisy(w):
        if len(w) > 1:  # only on the resamples (the estimate is computed before scipy's bootstrap)
            warnings.warn("a statistic's own warning", UserWarning, stacklevel=1)
        return mean(w)

    with pytest.warns(UserWarning, match="a statistic's own warning"):
        St.cluster_bootstrap(groups, noisy, n_resamples=20)


def test_cluster_bootstrap_of_one_patient_and_of_one_resample():
    one = St.cluster_bootstrap(["P"] * 3, lambda w: (w @ np.array([1.0, 0, 1]) / w.sum(1))[None], n_resamples=7)
    assert one["estimate"].tolist() == [pytest.approx(2 / 3)]
    assert np.isnan(one["low"]).all() and np.isnan(one["high"]).all() and one["n_invalid"].tolist() == [7]
    assert one["low"] is not one["high"]
    single = St.cluster_bootstrap(["P", "Q"], lambda w: w.sum(1)[None], n_resamples=1)
    assert single["n_invalid"].tolist() == [0] and single["low"][0] == single["high"][0] == 2
    with pytest.raises(NodulekitError, match=r"^the number of bootstrap resamples must be at least 1, got 0$"):
        St.cluster_bootstrap(["P", "Q"], lambda w: w.sum(1)[None], n_resamples=0)


def test_bootstrap_note_states_every_setting():
    assert St.bootstrap_note(123, 7) == (
        "95 % intervals: percentile bootstrap, 123 resamples of patients with replacement "
        "(all of a patient's nodules together), seed 7"
    )
    assert St.bootstrap_note(5, 0, unit="patients and seeds").startswith(
        "95 % intervals: percentile bootstrap, 5 resamples of patients and seeds "
    )


def test_classification_cis_are_the_patient_bootstrap_of_each_statistic():
    pred = (S9 > 0.5).astype(int)
    cis = St.classification_cis(Y9, S9, pred, G9, n_resamples=300, seed=4)
    res = St.cluster_bootstrap(G9, lambda w: St.classification_statistics(Y9, S9, pred, w), n_resamples=300, seed=4)
    assert list(cis) == list(St.CLASSIFICATION_STATISTICS)
    for i, name in enumerate(St.CLASSIFICATION_STATISTICS):
        got = cis[name]
        assert list(got) == ["estimate", "low", "high", "n_invalid_resamples"]
        assert got["estimate"] == pytest.approx(res["estimate"][i])
        assert got["n_invalid_resamples"] == int(res["n_invalid"][i]) and type(got["n_invalid_resamples"]) is int
        np.testing.assert_equal([got["low"], got["high"]], [res["low"][i], res["high"][i]])
    # 4 patients: some resamples lack a class, so the rates' intervals are undefined and counted
    assert cis["sensitivity"]["n_invalid_resamples"] > 0 and np.isnan(cis["sensitivity"]["low"])
    assert cis["accuracy"]["n_invalid_resamples"] == 0 and cis["accuracy"]["low"] <= cis["accuracy"]["high"]
    # the seed reaches the draws, and the default seed is 0 (accuracy's interval is defined in every resample)
    default = St.classification_cis(Y9, S9, pred, G9, n_resamples=300)
    assert default["accuracy"] == St.classification_cis(Y9, S9, pred, G9, n_resamples=300, seed=0)["accuracy"]
    assert default["accuracy"] != cis["accuracy"]


def test_calibration_bins_at_their_edges_and_a_coarser_binning():
    prob = np.array([0.0, 0.1, 0.1, 0.35, 0.5, 0.99, 1.0])
    y = np.array([0, 0, 1, 0, 1, 1, 1])
    cal = St.calibration(y, prob)
    counts = [b["n"] for b in cal["bins"]]
    assert counts == [1, 2, 0, 1, 0, 1, 0, 0, 0, 2]  # 0.1 opens bin 1; 1.0 joins the last bin
    assert [(b["low"], b["high"]) for b in cal["bins"]][:2] == [(0.0, 0.1), (0.1, 0.2)]
    assert cal["bins"][9]["high"] == 1.0 and cal["n_bins"] == 10
    assert cal["bins"][2]["mean_prob"] is None and cal["bins"][2]["observed"] is None
    assert cal["bins"][1]["mean_prob"] == pytest.approx(0.1) and cal["bins"][1]["observed"] == 0.5
    assert cal["binning"] == "10 equal-width bins of the predicted malignant probability on [0, 1]"
    # ECE by hand: |0 - 0| + 2 |0.5 - 0.1| + |0 - 0.35| + |1 - 0.5| + 2 |1 - 0.995|, over 7
    assert cal["ece"] == pytest.approx((0 + 0.8 + 0.35 + 0.5 + 0.01) / 7)
    assert cal["brier"] == pytest.approx(brier_score_loss(y, prob)) and cal["brier"] == pytest.approx(
        np.mean((prob - y) ** 2)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # empty bins are expected: no RuntimeWarning for their 0 / 0
        low = St.calibration([0, 1, 0], [0.05, 0.3, 0.32])  # the upper bins are all empty
    assert [b["n"] for b in low["bins"]] == [1, 0, 0, 2, 0, 0, 0, 0, 0, 0]
    assert low["bins"][9]["mean_prob"] is None and low["bins"][3]["observed"] == 0.5
    assert low["ece"] == pytest.approx((0.05 + 2 * abs(0.5 - 0.31)) / 3)
    four = St.calibration(y, prob, n_bins=4)
    assert [b["n"] for b in four["bins"]] == [3, 1, 1, 2] and four["n_bins"] == 4
    assert [b["high"] for b in four["bins"]] == [0.25, 0.5, 0.75, 1.0]
    assert four["binning"].startswith("4 equal-width bins")
    assert four["ece"] == pytest.approx((3 * abs(1 / 3 - 0.2 / 3) + 0.35 + 0.5 + 2 * 0.005) / 7)
    with pytest.raises(NodulekitError, match="^no predictions to assess calibration on$"):
        St.calibration([], [])


def test_delong_and_its_normal_interval_on_a_hand_example():
    """3 positives, 3 negatives. a: V10 = (1, 1, 2/3), V01 = (2/3, 1, 1); b: V10 = (2/3, 1/3, 1/3),
    V01 = (1, 1/3, 0). AUC 8/9 and 4/9. V10: variances 1/27 and 1/27, covariance 1/54; V01: 1/27,
    7/27 and -5/54. Var(diff) = (1/27 + 1/27 - 1/27) / 3 + (1/27 + 7/27 + 5/27) / 3 = 14/81."""
    y = np.array([1, 1, 1, 0, 0, 0])
    a = np.array([0.9, 0.8, 0.5, 0.6, 0.3, 0.2])
    b = np.array([0.9, 0.4, 0.4, 0.3, 0.5, 0.95])
    res = St.delong_test(y, a, b, confidence=0.9)
    assert (res["auc_a"], res["auc_b"]) == (pytest.approx(8 / 9), pytest.approx(4 / 9))
    assert res["auc_a"] == pytest.approx(roc_auc_score(y, a)) and res["auc_b"] == pytest.approx(roc_auc_score(y, b))
    se = np.sqrt(14 / 81)
    assert res["auc_diff"] == pytest.approx(4 / 9)
    assert res["se"] == pytest.approx(se) and res["z"] == pytest.approx((4 / 9) / se)
    assert res["p_value"] == pytest.approx(2 * norm.sf((4 / 9) / se))
    half = norm.ppf(0.95) * se  # a 90 % interval
    assert (res["diff_low"], res["diff_high"]) == (pytest.approx(4 / 9 - half), pytest.approx(4 / 9 + half))
    default = St.delong_test(y, b, a)  # the other way round: a negative difference, the same p
    assert default["z"] == pytest.approx(-(4 / 9) / se) and default["p_value"] == pytest.approx(res["p_value"])
    assert default["diff_low"] == pytest.approx(-4 / 9 - norm.ppf(0.975) * se)
    same = St.delong_test(y, a, a)  # no difference at all: se 0, z 0, p 1, a zero-width interval
    assert (same["se"], same["z"], same["p_value"], same["diff_low"], same["diff_high"]) == (0, 0, 1, 0, 0)


def test_paired_auc_tests_need_two_cases_of_each_class():
    ok = St.delong_test([1, 1, 0, 0], [0.9, 0.2, 0.5, 0.1], [0.3, 0.8, 0.2, 0.6])
    assert ok["auc_a"] == 0.75
    with pytest.raises(
        NodulekitError, match=r"^a paired AUC test needs at least 2 cases of each class, got 1 positive and 3 negative$"
    ):
        St.delong_test([1, 0, 0, 0], [0.9, 0.2, 0.5, 0.1], [0.3, 0.8, 0.2, 0.6])
    with pytest.raises(NodulekitError, match="got 3 positive and 1 negative"):
        St.obuchowski_test([1, 1, 1, 0], [0.9, 0.2, 0.5, 0.1], [0.3, 0.8, 0.2, 0.6], ["a", "b", "c", "d"])


def test_obuchowski_refusals_and_its_cluster_count():
    y, a, b = [1, 1, 0, 0], [0.9, 0.2, 0.5, 0.1], [0.3, 0.8, 0.2, 0.6]
    with pytest.raises(NodulekitError, match=r"^3 cluster names for 4 cases$"):
        St.obuchowski_test(y, a, b, ["p", "q", "r"])
    with pytest.raises(
        NodulekitError, match="^the clustered AUC test needs positives and negatives in at least 2 patients each$"
    ):
        St.obuchowski_test(y, a, b, ["p", "p", "q", "r"])  # both positives in one patient
    with pytest.raises(NodulekitError, match="at least 2 patients each"):
        St.obuchowski_test(y, a, b, ["p", "q", "r", "r"])  # both negatives in one patient
    two = St.obuchowski_test(y, a, b, ["p", "q", "p", "q"])
    assert two["n_clusters"] == 2 and two["auc_a"] == two["auc_b"] == 0.75 and two["auc_diff"] == 0
    # one nodule per patient: DeLong's variance exactly, at a non-default confidence too
    ob, dl = St.obuchowski_test(Y9, S9, S9[::-1], list("abcdefghi"), 0.8), St.delong_test(Y9, S9, S9[::-1], 0.8)
    for key in ("se", "z", "p_value", "diff_low", "diff_high"):
        assert ob[key] == pytest.approx(dl[key], rel=1e-12)


def test_obuchowski_when_the_last_patient_holds_no_negative():
    """The hand example of test_stats_methods.py (Var = 1/144 + 1/256 + 1/324) with the patient of
    a single positive named so that it sorts last: its cluster has a positive sum and no negative."""
    y = np.array([1, 0, 1, 0, 0, 1, 0])
    a = np.array([0.8, 0.3, 0.6, 0.7, 0.1, 0.9, 0.5])
    groups = ["P1", "P1", "P9", "P3", "P3", "P4", "P4"]
    res = St.obuchowski_test(y, a, np.full(7, 0.5), groups)
    assert res["se"] ** 2 == pytest.approx(1 / 144 + 1 / 256 + 1 / 324, rel=1e-12)
    assert res["auc_diff"] == pytest.approx(11 / 12 - 0.5) and res["n_clusters"] == 4
    assert (res["auc_a"], res["auc_b"]) == (pytest.approx(11 / 12), 0.5)
    assert res["z"] == pytest.approx(res["auc_diff"] / res["se"])


def test_tost_exactly_at_the_margin_and_its_refusals():
    # an estimate exactly at +margin or -margin: one of the one-sided tests has p = 1/2
    at = St.equivalence_test(0.02, 0.01, 0.02)
    assert at["p_upper"] == 0.5 and at["p_value"] == 0.5 and not at["equivalent"]
    assert at["p_lower"] == pytest.approx(norm.sf(4.0))
    low = St.equivalence_test(-0.02, 0.01, 0.02)
    assert low["p_lower"] == 0.5 and low["p_upper"] == pytest.approx(norm.cdf(-4.0))
    # no variability: an estimate exactly at the margin is not inside it
    # at the margin with alpha = 1/2: p = alpha exactly, and equivalence needs p below alpha
    assert not St.equivalence_test(0.02, 0.01, 0.02, alpha=0.5)["equivalent"]
    assert St.equivalence_test(0.0199, 0.01, 0.02, alpha=0.5)["equivalent"]
    assert St.equivalence_test(0.02, 0.0, 0.02)["p_value"] == 1.0
    assert St.equivalence_test(-0.02, 0.0, 0.02)["p_value"] == 1.0
    inside = St.equivalence_test(0.019, 0.0, 0.02)
    assert (inside["p_lower"], inside["p_upper"], inside["equivalent"]) == (0.0, 0.0, True)
    assert inside["low"] == inside["high"] == 0.019 and inside["margin"] == 0.02
    # alpha sets the interval (1 - 2 alpha) and the verdict
    res = St.equivalence_test(0.0, 0.01, 0.02, alpha=0.01)
    assert not res["equivalent"] and res["high"] == pytest.approx(norm.ppf(0.99) * 0.01)
    assert res["low"] == pytest.approx(-norm.ppf(0.99) * 0.01)
    assert St.equivalence_test(0.0, 0.01, 0.02, alpha=0.025)["equivalent"]
    assert type(res["equivalent"]) is bool and type(res["margin"]) is float
    with pytest.raises(NodulekitError, match=r"^the equivalence margin must be positive, got -0.1$"):
        St.equivalence_test(0.0, 0.01, -0.1)
    with pytest.raises(NodulekitError, match=r"^the equivalence test needs a standard error >= 0, got -0.01$"):
        St.equivalence_test(0.0, -0.01, 0.02)
    with pytest.raises(NodulekitError, match="standard error >= 0, got nan"):
        St.equivalence_test(0.0, float("nan"), 0.02)
    with pytest.raises(NodulekitError, match="margin must be positive, got 0.0"):
        St.equivalence_test(0.0, 0.01, 0.0)
    assert St.equivalence_test(0.0, 0.0, 0.02)["equivalent"]  # se exactly 0 is allowed
    with pytest.raises(NodulekitError, match="margin must be positive, got nan"):
        St.equivalence_test(0.0, 0.01, float("nan"))


def _auc_by_pairs(y, p, w):
    """Weighted Mann-Whitney AUC [B] of weight rows w [B, n], pairs counted with ties 1/2."""
    pos, neg = y == 1, y == 0
    kernel = (p[pos][:, None] > p[neg][None, :]) + 0.5 * (p[pos][:, None] == p[neg][None, :])
    wp, wn = w[:, pos], w[:, neg]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("bi,ij,bj->b", wp, kernel, wn) / (wp.sum(1) * wn.sum(1))


def _seed_patient_by_hand(y, pa, pb, groups, n_resamples, seed):
    """The documented algorithm written out: per batch of at most 500, patients drawn with
    replacement, then seeds of arm a, then seeds of arm b, from one generator seeded ``seed``."""
    names = np.unique(groups)
    codes = np.searchsorted(names, groups)
    k = len(names)
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n_resamples, 500):
        b = min(500, n_resamples - start)
        drawn = rng.integers(0, k, size=(b, k))
        w = np.array([[np.sum(row == c) for c in codes] for row in drawn], float)
        sa = rng.integers(0, len(pa), size=(b, len(pa)))
        sb = rng.integers(0, len(pb), size=(b, len(pb)))
        per_a = np.stack([_auc_by_pairs(y, p, w) for p in pa], axis=1)
        per_b = np.stack([_auc_by_pairs(y, p, w) for p in pb], axis=1)
        out.append(np.take_along_axis(per_a, sa, 1).mean(1) - np.take_along_axis(per_b, sb, 1).mean(1))
    return np.concatenate(out)


def test_seed_patient_bootstrap_follows_its_algorithm_across_batches():
    rng = np.random.default_rng(5)
    groups = np.repeat([f"P{i}" for i in range(12)], 2)
    y = np.tile([1, 0], 12)
    pa = np.stack([np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, s, 24), 0, 1) for s in (0.2, 0.4)])
    pb = np.stack([np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.3, 24), 0, 1) for _ in range(3)])
    res = St.seed_patient_bootstrap(y, pa, pb, groups, n_resamples=503, seed=9, confidence=0.8)
    dist = _seed_patient_by_hand(y, pa, pb, groups, 503, 9)
    assert len(res["distribution"]) == 503
    np.testing.assert_allclose(res["distribution"], dist, rtol=1e-12)
    assert (res["low"], res["high"]) == (
        pytest.approx(np.percentile(dist, 10), rel=1e-12),
        pytest.approx(np.percentile(dist, 90), rel=1e-12),
    )
    assert res["se"] == pytest.approx(np.std(dist, ddof=1), rel=1e-12) and res["n_invalid"] == 0
    aucs_a, aucs_b = [roc_auc_score(y, p) for p in pa], [roc_auc_score(y, p) for p in pb]
    assert res["auc_seeds_a"] == pytest.approx(aucs_a) and res["auc_seeds_b"] == pytest.approx(aucs_b)
    assert res["estimate"] == pytest.approx(np.mean(aucs_a) - np.mean(aucs_b))
    default = St.seed_patient_bootstrap(y, pa, pb, groups, n_resamples=40)
    np.testing.assert_allclose(default["distribution"], _seed_patient_by_hand(y, pa, pb, groups, 40, 0), rtol=1e-12)
    assert default["low"] == pytest.approx(np.percentile(default["distribution"], 2.5), rel=1e-12)


def test_seed_patient_bootstrap_counts_resamples_without_a_class():
    # 3 patients, only one holds a malignant nodule: many resamples have no positive
    y = np.array([1, 0, 0, 0, 0, 0])
    groups = ["A", "A", "B", "B", "C", "C"]
    p = np.array([0.9, 0.1, 0.3, 0.2, 0.6, 0.4])
    res = St.seed_patient_bootstrap(y, p, p[::-1], groups, n_resamples=60, seed=2)
    nan = np.isnan(res["distribution"])
    assert res["n_invalid"] == nan.sum() > 0 and np.isnan(res["low"]) and np.isnan(res["high"])
    assert res["se"] == pytest.approx(np.std(res["distribution"][~nan], ddof=1))


def test_cluster_sign_flip_test_against_scipy_over_patient_sums():
    rng = np.random.default_rng(4)
    groups = np.repeat([f"P{i:02d}" for i in range(20)], 3)  # 2^20 sign patterns: a random 9999 of them
    diff = rng.normal(0.1, 1, 60)
    res = St.cluster_sign_flip_test(diff, groups, seed=3)
    sums = diff.reshape(20, 3).sum(1)  # patients in name order
    ref = permutation_test(
        (sums, np.zeros(20)), lambda a, b, axis=-1: (a - b).sum(axis=axis), permutation_type="samples", n_resamples=9999,
        rng=np.random.default_rng(3),
    )  # fmt: skip
    assert res["p_value"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert res["mean_diff"] == pytest.approx(diff.mean()) and res["n_patients"] == 20
    fewer = St.cluster_sign_flip_test(diff, groups, n_resamples=99, seed=3)
    assert round(fewer["p_value"] * 100, 9) == round(fewer["p_value"] * 100)  # (count + 1) / 100
    # 3 patients whose differences each sum to 1: the 8 sign patterns give |mean| = 1 twice, p = 1/4
    ones = St.cluster_sign_flip_test([1.0, 0.5, 0.5, 2.0, -1.0], ["a", "b", "b", "c", "c"])
    assert ones["p_value"] == pytest.approx(0.25) and ones["mean_diff"] == pytest.approx(0.6)
    # the default seed 0: the same random sign patterns as seed=0
    assert (
        St.cluster_sign_flip_test(diff, groups)["p_value"]
        == St.cluster_sign_flip_test(diff, groups, seed=0)["p_value"]
        != res["p_value"]
    )
    # every patient's differences sum to zero: nothing to test, p = 1
    zero = St.cluster_sign_flip_test([0.5, -0.5, 0.2, -0.2], ["a", "a", "b", "b"])
    assert zero == {"mean_diff": 0.0, "p_value": 1.0, "n_patients": 2}
    with pytest.raises(NodulekitError, match="^no paired differences to test$"):
        St.cluster_sign_flip_test([], [])


def test_holm_by_hand_with_missing_ties_and_the_cap():
    # sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.02 (x2 = 0.04 -> 0.06 monotone), 0.3 (x1)
    np.testing.assert_allclose(St.holm([0.02, 0.3, None, 0.01, 0.02]), [0.06, 0.3, np.nan, 0.04, 0.06])
    np.testing.assert_allclose(St.holm([0.4, 0.3]), [0.6, 0.6])
    np.testing.assert_allclose(St.holm([0.9, 0.001, 0.2]), [0.9, 0.003, 0.4])
    np.testing.assert_allclose(St.holm([0.45, 0.001, 0.3]), [0.6, 0.003, 0.6])
    assert np.isnan(St.holm([np.nan, np.nan])).all() and St.holm([0.05]).tolist() == [0.05]

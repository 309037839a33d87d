#!/usr/bin/env python
"""A hand-made baseline: logistic regression on nine shape and intensity features, same folds.

What a deep model adds is what it does beyond this. The features come from the dataset
artifact alone (the readers' consensus mask and the HU of each nodule's 32 x 32 input):

  diameter_mm      equivalent diameter of the consensus outline (the size the ROI window was cut at)
  height_mm        slices (1 mm apart) of the input whose mask is not empty
  compactness      4 pi area / perimeter^2 of the centre-slice mask (1 = a disc)
  elongation       ratio of the mask's second-moment axes (1 = round)
  extent           mask area / its bounding box area
  hu_mean, hu_sd   HU inside the centre-slice mask
  hu_band          mean HU in the 2-pixel band around the outline (margin)
  hu_outside       mean HU outside the outline

Each test fold's predictions come from a model fitted on the other folds (standardised
features, L2 logistic regression, C = 1 fixed in advance). Prints the pooled accuracy,
AUC, Brier and ECE with 95 % patient-bootstrap intervals; ``--predictions CSV`` writes
nodule_id, patient_id, fold, y, prob (for DeLong against deep runs, ``recipe_compare.py``).

    python benchmarks/feature_baseline.py /work/data/d11c.h5 --predictions features.csv
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

FEATURES = (
    "diameter_mm",
    "height_mm",
    "compactness",
    "elongation",
    "extent",
    "hu_mean",
    "hu_sd",
    "hu_band",
    "hu_outside",
)


def _perimeter(mask: np.ndarray) -> int:
    """Edges between mask and background pixels (4-connected), the image border counting as background."""
    m = np.pad(mask.astype(np.int8), 1)
    return int(np.abs(np.diff(m, axis=0)).sum() + np.abs(np.diff(m, axis=1)).sum())


def _elongation(mask: np.ndarray) -> float:
    yy, xx = np.nonzero(mask)
    if len(yy) < 3:
        return 1.0
    ev = np.linalg.eigvalsh(np.cov(np.stack([yy, xx]).astype(float)) + 1e-6 * np.eye(2))
    return float(np.sqrt(ev[1] / ev[0]))


def nodule_features(x: np.ndarray, mask: np.ndarray, diameter_mm: float) -> np.ndarray:
    """The nine features of one nodule from its input [C, 32, 32] in [0, 1] and mask [C, 32, 32]."""
    from scipy.ndimage import binary_dilation, binary_erosion

    centre = x.shape[0] // 2
    hu = x[centre].astype(np.float64) * 1400.0 - 1000.0  # the dataset's HU window, -1000..400
    m = mask[centre] > 0
    if not m.any():  # no outline on the centre slice: a disc of the recorded size
        yy, xx = np.mgrid[: m.shape[0], : m.shape[1]]
        m = np.hypot(yy - m.shape[0] / 2 + 0.5, xx - m.shape[1] / 2 + 0.5) < m.shape[0] / 4
    area = m.sum()
    band = binary_dilation(m, iterations=2) & ~binary_erosion(m, iterations=2)
    ys, xs = np.nonzero(m)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return np.array(
        [
            diameter_mm,
            float((mask.reshape(mask.shape[0], -1) > 0).any(axis=1).sum()),
            4 * np.pi * area / max(_perimeter(m), 1) ** 2,
            _elongation(m),
            area / box,
            hu[m].mean(),
            hu[m].std(),
            hu[band].mean(),
            hu[~m].mean() if (~m).any() else -1000.0,
        ]
    )


def feature_table(ds) -> np.ndarray:
    """[N, 9] features of every nodule of a dataset."""
    return np.stack([nodule_features(ds.x[i], ds.mask[i], float(ds.diameter_mm[i])) for i in range(len(ds.y))])


def cross_validated(features: np.ndarray, y: np.ndarray, fold: np.ndarray, *, model: str = "logistic", seed: int = 0):
    """Out-of-fold malignant probabilities: each fold predicted by a model fitted on the other folds."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    prob = np.full(len(y), np.nan)
    for k in np.unique(fold):
        train, test = fold != k, fold == k
        if model == "logistic":
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        else:
            clf = RandomForestClassifier(n_estimators=300, random_state=seed, n_jobs=1)
        clf.fit(features[train], y[train])
        prob[test] = clf.predict_proba(features[test])[:, 1]
    return prob


def summary(y, prob, patients, *, n_resamples: int = 2000, seed: int = 0, threshold: float = 0.5) -> dict:
    """Accuracy, sensitivity, specificity, AUC with patient-bootstrap intervals; Brier and ECE."""
    from nodulekit.stats import calibration, classification_cis

    cis = classification_cis(y, prob, prob >= threshold, patients, n_resamples=n_resamples, seed=seed)
    cal = calibration(y, prob)
    return {**cis, "brier": cal["brier"], "ece": cal["ece"]}


def ci_text(stat: dict, scale: float = 1.0, digits: int = 3) -> str:
    e, lo, hi = (scale * stat[k] for k in ("estimate", "low", "high"))
    return f"{e:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def main(argv=None) -> int:
    from nodulekit.datasets import load_dataset
    from nodulekit.errors import NodulekitError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", help="dataset artifact (nodulekit build)")
    p.add_argument("--predictions", help="write the out-of-fold predictions to this CSV")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    try:
        ds = load_dataset(args.dataset)
    except NodulekitError as exc:
        print(f"feature_baseline: error: {exc}", file=sys.stderr)
        return 2
    feats = feature_table(ds)
    prob = cross_validated(feats, ds.y, ds.fold)
    s = summary(ds.y, prob, ds.patient_id, n_resamples=args.bootstrap)
    if args.predictions:
        import pandas as pd

        pd.DataFrame(
            {"nodule_id": ds.nodule_id, "patient_id": ds.patient_id, "fold": ds.fold, "y": ds.y, "prob": prob}
        ).to_csv(args.predictions, index=False)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"logistic regression on {len(FEATURES)} features ({', '.join(FEATURES)}), {ds.name}, {len(ds.y)} nodules")
    print(f"folds: the dataset's {ds.n_folds} ({ds.split} split)")
    print("| accuracy % | sensitivity | specificity | AUC | Brier | ECE |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {ci_text(s['accuracy'], 100, 2)} | {ci_text(s['sensitivity'])} | {ci_text(s['specificity'])} "
        f"| {ci_text(s['auc'])} | {s['brier']:.3f} | {s['ece']:.3f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""How far can the paper's protocol inflate accuracy on these data? One table, same nodules.

The paper reports 95-99 % accuracy with "5-fold cross-validation" and nothing more about
its protocol. Each row below measures one way its number could be higher than an honest
patient-level CV, on the same dataset artifact (e.g. the real VOIs' D11C):

- folds by nodule instead of by patient (several seeds; a patient's nodules on both sides);
- the decision threshold chosen on each test fold (highest accuracy there);
- the best fold reported instead of all five;
- augmentation or class resampling done before splitting (copies of one nodule in the
  training and the test part), measured with a learner that can memorise (random forest);
- size alone: the ROI window is twice the equivalent diameter, so the diameter is known to
  whoever cuts the crop; how far does it go, alone and with the selection effects above;
- less data than the paper (656 vs 1145 nodules): CV with 50 / 75 / 100 % of the patients;
- with ``--runs RUNDIR...`` (deep runs on the same dataset): the best test epoch of each
  fold, the one epoch best on average over the test folds, the best fold at its best
  epoch, and the threshold chosen on the test fold, from the runs' own test curves.

The fast rows use the hand-made features of ``feature_baseline.py`` (a logistic regression,
or a random forest where memorising matters), so the whole table runs in minutes on a CPU.
Intervals: 95 % percentile bootstrap over patients (pooled numbers) or the range over seeds.

    python benchmarks/paper_gap.py /work/data/d11c.h5 --runs runs/hesam-d11c -o paper_gap.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feature_baseline import cross_validated, feature_table, summary  # noqa: E402


def patient_folds(y, patients, n_folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold

    fold = np.empty(len(y), np.int64)
    for k, (_, test) in enumerate(
        StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, patients)
    ):
        fold[test] = k
    return fold


def nodule_folds(y, n_folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold

    fold = np.empty(len(y), np.int64)
    for k, (_, test) in enumerate(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)):
        fold[test] = k
    return fold


def accuracy(y, prob, threshold=0.5) -> float:
    return float(np.mean((np.asarray(prob) >= threshold) == np.asarray(y).astype(bool)))


def best_threshold_accuracy(y, prob, fold) -> float:
    """Pooled accuracy when each test fold gets the threshold that is best on that test fold."""
    right = 0
    for k in np.unique(fold):
        yk, pk = y[fold == k], prob[fold == k]
        cuts = np.concatenate([[0.0], np.unique(pk), [1.0 + 1e-9]])
        right += max(int(np.sum((pk >= c) == yk.astype(bool))) for c in cuts)
    return right / len(y)


def fold_accuracies(y, prob, fold) -> np.ndarray:
    return np.array([accuracy(y[fold == k], prob[fold == k]) for k in np.unique(fold)])


def row(label: str, acc: str, auc: str, note: str = "") -> dict:
    return {"label": label, "acc": acc, "auc": auc, "note": note}


def _ci(s: dict, scale=1.0, digits=3) -> str:
    return f"{scale * s['estimate']:.{digits}f} [{scale * s['low']:.{digits}f}, {scale * s['high']:.{digits}f}]"


def _range(values, scale=1.0, digits=2) -> str:
    v = scale * np.asarray(values)
    return f"{v.mean():.{digits}f} (range {v.min():.{digits}f}–{v.max():.{digits}f})"


def split_rows(feats, ds, seeds, boot) -> list[dict]:
    """Patient- vs nodule-level folds, threshold on the test fold, best fold: features and size alone."""
    from nodulekit.stats import roc_auc

    rows = []
    y, patients = ds.y, ds.patient_id
    for name, cols in (("9 features", slice(None)), ("size alone (diameter)", slice(0, 1))):
        f = feats[:, cols]
        ref = cross_validated(f, y, ds.fold)
        s = summary(y, ref, patients, n_resamples=boot)
        rows.append(row(f"{name}, LR, the dataset's patient folds", _ci(s["accuracy"], 100, 2), _ci(s["auc"])))
        per = {"patient": [], "nodule": []}
        for seed in seeds:
            for kind, fold in (
                ("patient", patient_folds(y, patients, ds.n_folds, seed)),
                ("nodule", nodule_folds(y, ds.n_folds, seed)),
            ):
                prob = cross_validated(f, y, fold)
                per[kind].append(
                    (
                        accuracy(y, prob),
                        float(roc_auc(y, prob)[0]),
                        best_threshold_accuracy(y, prob, fold),
                        fold_accuracies(y, prob, fold).max(),
                    )
                )
        for kind in ("patient", "nodule"):
            a = np.array(per[kind])
            n = len(seeds)
            rows.append(row(f"{name}, {kind}-level folds ({n} seeds)", _range(a[:, 0], 100), _range(a[:, 1], 1, 3)))
        a = np.array(per["nodule"])
        rows.append(row(f"{name}, nodule folds + threshold on the test fold", _range(a[:, 2], 100), "", "same AUC"))
        rows.append(
            row(f"{name}, nodule folds + threshold on test + best fold", _range(_best_fold_thr(f, ds, seeds), 100), "")
        )
        rows.append(row(f"{name}, nodule folds, best fold at 0.5", _range(a[:, 3], 100), ""))
    return rows


def _best_fold_thr(f, ds, seeds) -> list[float]:
    out = []
    for seed in seeds:
        fold = nodule_folds(ds.y, ds.n_folds, seed)
        prob = cross_validated(f, ds.y, fold)
        out.append(
            max(best_threshold_accuracy(ds.y[fold == k], prob[fold == k], fold[fold == k]) for k in np.unique(fold))
        )
    return out


def augmented_features(ds, copies: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features of ``copies`` augmented versions of every nodule (flip/rotation + up to 2-pixel shift)
    and the row each copy came from."""
    from feature_baseline import nodule_features

    rng = np.random.default_rng(seed)
    feats, origin = [], []
    for i in range(len(ds.y)):
        for c in range(copies):
            k, flip = c % 4, (c // 4) % 2 == 1
            sy, sx = rng.integers(-2, 3, 2)
            x = np.roll(np.rot90(ds.x[i], k, axes=(-2, -1)), (sy, sx), axis=(-2, -1))
            m = np.roll(np.rot90(ds.mask[i], k, axes=(-2, -1)), (sy, sx), axis=(-2, -1))
            if flip:
                x, m = x[..., ::-1], m[..., ::-1]
            noise = rng.normal(0, 0.01, x.shape).astype(np.float32)  # the copies are not bit-identical
            feats.append(nodule_features(np.clip(x + noise, 0, 1), m, float(ds.diameter_mm[i])))
            origin.append(i)
    return np.asarray(feats), np.asarray(origin)


def leakage_rows(feats, ds, seeds, boot, copies: int) -> list[dict]:
    """Augmentation and class oversampling before vs after splitting (random forest on the features)."""
    from nodulekit.stats import roc_auc

    y = ds.y
    rows = []
    rf = cross_validated(feats, y, ds.fold, model="forest")
    s = summary(y, rf, ds.patient_id, n_resamples=boot)
    rows.append(row("9 features, random forest, patient folds", _ci(s["accuracy"], 100, 2), _ci(s["auc"])))
    aug, origin = augmented_features(ds, copies, 0)
    before, after = [], []
    for seed in seeds:
        # before splitting: the copies are shuffled into folds one by one
        fold = nodule_folds(y[origin], ds.n_folds, seed)
        prob = cross_validated(aug, y[origin], fold, model="forest")
        before.append((accuracy(y[origin], prob), float(roc_auc(y[origin], prob)[0])))
        # after splitting: every copy of a nodule goes with its patient's fold
        fold = patient_folds(y, ds.patient_id, ds.n_folds, seed)[origin]
        prob = cross_validated(aug, y[origin], fold, model="forest")
        after.append((accuracy(y[origin], prob), float(roc_auc(y[origin], prob)[0])))
    b, a = np.array(before), np.array(after)
    rows.append(
        row(f"RF, {copies} augmented copies, split after (patient folds)", _range(a[:, 0], 100), _range(a[:, 1], 1, 3))
    )
    rows.append(row(f"RF, {copies} augmented copies, split before", _range(b[:, 0], 100), _range(b[:, 1], 1, 3)))
    over = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        minority = int(np.argmin(np.bincount(y)))
        extra = rng.choice(np.flatnonzero(y == minority), abs(int(np.diff(np.bincount(y))[0])), replace=True)
        idx = np.concatenate([np.arange(len(y)), extra])
        fold = nodule_folds(y[idx], ds.n_folds, seed)
        prob = cross_validated(feats[idx], y[idx], fold, model="forest")
        over.append((accuracy(y[idx], prob), float(roc_auc(y[idx], prob)[0])))
    o = np.array(over)
    rows.append(row("RF, minority class oversampled before splitting", _range(o[:, 0], 100), _range(o[:, 1], 1, 3)))
    return rows


def data_size_rows(feats, ds, seeds) -> list[dict]:
    """CV AUC when only a share of the training patients is used (same test folds)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from nodulekit.stats import roc_auc

    rows = []
    for share in (0.5, 0.75, 1.0):
        accs, aucs = [], []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            prob = np.full(len(ds.y), np.nan)
            for k in range(ds.n_folds):
                train_pat = np.unique(ds.patient_id[ds.fold != k])
                keep = set(rng.choice(train_pat, int(round(share * len(train_pat))), replace=False))
                tr = (ds.fold != k) & np.array([p in keep for p in ds.patient_id])
                clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(feats[tr], ds.y[tr])
                prob[ds.fold == k] = clf.predict_proba(feats[ds.fold == k])[:, 1]
            accs.append(accuracy(ds.y, prob))
            aucs.append(float(roc_auc(ds.y, prob)[0]))
        rows.append(
            row(f"9 features, LR, {int(share * 100)} % of training patients", _range(accs, 100), _range(aucs, 1, 3))
        )
    return rows


def deep_rows(rundir: Path, ds, boot) -> list[dict]:
    """Epoch, fold and threshold chosen on the test folds, from a finished run's test curves."""
    from nodulekit.run import HISTORY_COLUMNS, Run
    from nodulekit.stats import run_predictions

    results = Run(rundir).fold_results()
    name = Path(rundir).name
    col = HISTORY_COLUMNS.index("test_acc")
    acc = np.stack([r.history[:, col] for r in results])  # [folds, epochs]
    n = np.array([len(r.test_index) for r in results], float)
    pooled = (acc * n[:, None]).sum(0) / n.sum()
    pred = run_predictions(rundir)
    s = summary(pred["y"].to_numpy(), pred["prob"].to_numpy(), pred["patient_id"].to_numpy(), n_resamples=boot)
    y, prob, fold = pred["y"].to_numpy(), pred["prob"].to_numpy(), pred["fold"].to_numpy()
    best_each = float((acc.max(1) * n).sum() / n.sum())
    e = int(np.argmax(pooled))
    return [
        row(f"{name}: last epoch, threshold 0.5 (honest)", _ci(s["accuracy"], 100, 2), _ci(s["auc"])),
        row(
            f"{name}: best test epoch of each fold",
            f"{100 * best_each:.2f}",
            "",
            f"+{100 * (best_each - pooled[-1]):.2f} points over the curve's last epoch",
        ),
        row(f"{name}: one common epoch, best on the test folds (epoch {e + 1})", f"{100 * pooled[e]:.2f}", ""),
        row(f"{name}: best fold at its best epoch", f"{100 * acc.max():.2f}", "", f"of {acc.size} fold-epochs"),
        row(
            f"{name}: threshold chosen on each test fold (last epoch)",
            f"{100 * best_threshold_accuracy(y, prob, fold):.2f}",
            "",
        ),
        row(
            f"{name}: best test epoch + threshold on test + best fold",
            "",
            "",
            "not computable: per-epoch probabilities are not kept",
        ),
    ]


def markdown(rows: list[dict]) -> str:
    lines = ["| protocol | accuracy % | AUC | note |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['acc']} | {r['auc']} | {r['note']} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    from nodulekit.datasets import load_dataset
    from nodulekit.errors import NodulekitError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("--runs", nargs="*", default=[], help="finished RUNDIRs trained on DATASET")
    p.add_argument("--seeds", type=int, default=5, help="seeds of the re-drawn folds")
    p.add_argument("--copies", type=int, default=8, help="augmented copies per nodule")
    p.add_argument("--forest-seeds", type=int, default=3, help="seeds of the (slower) random-forest rows")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--runs-only", action="store_true", help="only the rows of --runs (skip the feature rows)")
    p.add_argument("-o", "--output", help="write the Markdown table here too")
    args = p.parse_args(argv)
    try:
        ds = load_dataset(args.dataset)
        seeds = list(range(args.seeds))
        rows = []
        if not args.runs_only:
            feats = feature_table(ds)
            rows += split_rows(feats, ds, seeds, args.bootstrap)
            rows += leakage_rows(feats, ds, seeds[: args.forest_seeds], args.bootstrap, args.copies)
            rows += data_size_rows(feats, ds, seeds)
        for r in args.runs:
            rows += deep_rows(Path(r), ds, args.bootstrap)
    except NodulekitError as exc:
        print(f"paper_gap: error: {exc}", file=sys.stderr)
        return 2
    text = markdown(rows)
    print(f"{ds.name}, {len(ds.y)} nodules, {len(np.unique(ds.patient_id))} patients\n\n{text}")
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

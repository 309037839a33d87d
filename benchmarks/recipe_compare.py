#!/usr/bin/env python
"""Recipe ``paper`` against ``robust`` (and the hand-made feature baseline) on the same folds.

For every model: pooled accuracy, sensitivity, specificity and AUC with 95 % patient-bootstrap
intervals, Brier and ECE; then the AUC of each model against the first (the reference) with
its DeLong p, Holm-adjusted over the comparisons. Only folds finished in every run are used
(the table says which). ``--ablate RUNDIR`` adds the post-hoc ingredients of a robust run,
scored from its checkpoints without retraining: EMA weights or the last raw weights, each
with and without test-time augmentation.

A run given as ``LABEL=RUNDIR1,RUNDIR2,...`` is the ensemble of those runs (their test
probabilities averaged per nodule: e.g. one recipe trained with several seeds on the same
folds). By default every model is tested against the first; ``--pair A:B`` (repeatable) tests
only the named pairs instead, Holm-adjusted over them (e.g. each architecture's robust run
against its own paper run).

    python benchmarks/recipe_compare.py /work/data/d11c.h5 paper=runs/hesam-paper robust=runs/hesam-robust \
        --features --ablate runs/hesam-robust
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feature_baseline import ci_text, cross_validated, feature_table, summary  # noqa: E402


def finished_predictions(rundir: Path, folds: list[int]):
    """Test predictions of ``folds`` of a run, in dataset row order."""
    from nodulekit.run import Run

    run = Run(rundir)
    rows, prob = [], []
    for k in folds:
        r = run.fold_result(k)
        rows.append(np.asarray(r.test_index))
        prob.append(np.asarray(r.test_prob))
    rows, prob = np.concatenate(rows), np.concatenate(prob)
    order = np.argsort(rows)
    return rows[order], prob[order]


def ensemble_of(rundirs: list[Path], folds: list[int]):
    """Rows and mean test probability of several runs on the same folds (an ensemble over seeds)."""
    from nodulekit.recipes import ensemble_predictions

    df = ensemble_predictions(rundirs, folds).sort_values("index")
    return df["index"].to_numpy(), df["prob"].to_numpy()


def parse_pairs(specs: list[str], names: list[str]) -> list[tuple[str, str]]:
    """``A:B`` strings -> [(A, B)], both labels among ``names``; none given: every model vs the first."""
    from nodulekit.errors import NodulekitError

    if not specs:
        return [(n, names[0]) for n in names[1:]]
    pairs = []
    for spec in specs:
        a, sep, b = spec.partition(":")
        if not sep or a not in names or b not in names or a == b:
            raise NodulekitError(f"--pair wants A:B, two different labels among {', '.join(names)}; got {spec!r}")
        pairs.append((a, b))
    return pairs


def common_folds(rundirs: list[Path]) -> list[int]:
    from nodulekit.run import Run

    sets = [set(Run(r).finished_folds()) for r in rundirs]
    return sorted(set.intersection(*sets))


def ablation(rundir: Path, ds, folds: list[int]) -> dict[str, np.ndarray]:
    """Probabilities of a recipe run's fold models: {EMA, raw} x {TTA, no TTA} (from the checkpoints)."""
    import torch

    from nodulekit.recipes import tta_probabilities
    from nodulekit.run import build_model, load_checkpoint
    from nodulekit.training import predict_logits

    x = torch.from_numpy(ds.x)
    out = {k: np.full(len(ds.y), np.nan) for k in ("EMA + TTA", "EMA", "raw + TTA", "raw")}
    for k in folds:
        ckpt = load_checkpoint(Path(rundir) / f"fold{k}" / "checkpoint.pt")
        rows = np.flatnonzero(ds.fold == k)
        for label, state in (("EMA", ckpt["state_dict"]), ("raw", (ckpt.get("resume") or {}).get("model"))):
            if state is None:
                continue
            model = build_model(ckpt["arch"], ckpt["in_channels"], 2, ckpt["config"])
            model.load_state_dict(state)
            model.eval()
            with torch.no_grad():
                plain = torch.softmax(predict_logits(model, x, rows, 256, False), 1)[:, 1]
                tta = tta_probabilities(model, x, rows, 256, False, predict_logits)[:, 1]
            out[label][rows] = plain.numpy()
            out[f"{label} + TTA"][rows] = tta.numpy()
    return {k: v for k, v in out.items() if np.isfinite(v[ds.fold == folds[0]]).all()}


def comparison(models: dict[str, np.ndarray], y, patients, boot: int, pairs=None) -> dict[str, list[dict]]:
    """Per model its summary (patient-bootstrap intervals, Brier, ECE); per compared pair (A, B)
    DeLong of A − B and the Holm-adjusted p over the pairs (default: every model vs the first)."""
    from nodulekit.stats import delong_test, holm

    names = list(models)
    pairs = pairs if pairs is not None else [(n, names[0]) for n in names[1:]]
    rows = [{"model": n, **summary(y, models[n], patients, n_resamples=boot)} for n in names]
    tests = [delong_test(y, models[a], models[b]) for a, b in pairs]
    adjusted = holm([t["p_value"] for t in tests]) if tests else []
    compared = [
        {"a": a, "b": b, **t, "holm_p": float(adj)} for (a, b), t, adj in zip(pairs, tests, adjusted, strict=True)
    ]
    return {"models": rows, "pairs": compared}


def markdown_table(result: dict[str, list[dict]]) -> str:
    """:func:`comparison`'s result: one row per model; then one row per compared pair."""
    lines = [
        "| model | accuracy % | sensitivity | specificity | AUC | Brier | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in result["models"]:
        lines.append(
            f"| {s['model']} | {ci_text(s['accuracy'], 100, 2)} | {ci_text(s['sensitivity'])} | {ci_text(s['specificity'])} "
            f"| {ci_text(s['auc'])} | {s['brier']:.3f} | {s['ece']:.3f} |"
        )
    if not result["pairs"]:
        return "\n".join(lines)
    lines += ["", "| comparison | AUC difference [95 % CI] | DeLong p | Holm p |", "|---|---|---|---|"]
    for t in result["pairs"]:
        lines.append(
            f"| {t['a']} − {t['b']} | {t['auc_diff']:+.3f} [{t['diff_low']:+.3f}, {t['diff_high']:+.3f}] "
            f"| {t['p_value']:.2g} | {t['holm_p']:.2g} |"
        )
    return "\n".join(lines)


def table(models: dict[str, np.ndarray], y, patients, boot: int, pairs=None) -> str:
    """One row per model; then one row per compared pair (DeLong, Holm over the pairs)."""
    return markdown_table(comparison(models, y, patients, boot, pairs))


def main(argv=None) -> int:
    from nodulekit.datasets import load_dataset
    from nodulekit.errors import NodulekitError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument(
        "runs",
        nargs="+",
        metavar="LABEL=RUNDIR[,RUNDIR...]",
        help="the first is the reference; several RUNDIRs: their ensemble",
    )
    p.add_argument("--pair", action="append", default=[], metavar="A:B", help="test only A against B (repeatable)")
    p.add_argument("--features", action="store_true", help="add the feature baseline (feature_baseline.py)")
    p.add_argument("--ablate", help="a recipe run whose EMA/TTA ingredients to score post hoc")
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args(argv)
    try:
        ds = load_dataset(args.dataset)
        labelled = [
            (label, [Path(r) for r in dirs.split(",")]) for label, dirs in (s.partition("=")[::2] for s in args.runs)
        ]
        folds = common_folds([r for _, dirs in labelled for r in dirs])
        if not folds:
            raise NodulekitError("the runs have no finished fold in common")
        rows = np.flatnonzero(np.isin(ds.fold, folds))
        models = {}
        for label, rundirs in labelled:
            got_rows, prob = ensemble_of(rundirs, folds)
            if not np.array_equal(got_rows, rows):
                raise NodulekitError(f"{rundirs[0]} was not trained on the folds of {args.dataset}")
            models[label] = prob
        if args.features:
            models["features (LR)"] = cross_validated(feature_table(ds), ds.y, ds.fold)[rows]
        pairs = parse_pairs(args.pair, list(models))
        y, patients = ds.y[rows], ds.patient_id[rows]
        print(f"{ds.name}: folds {folds} ({len(rows)} nodules, {len(np.unique(patients))} patients)\n")
        print(table(models, y, patients, args.bootstrap, pairs))
        if args.ablate:
            ab = {k: v[rows] for k, v in ablation(Path(args.ablate), ds, folds).items()}
            print(f"\nPost-hoc ingredients of {args.ablate} (same trained models):\n")
            print(table(ab, y, patients, args.bootstrap))
    except NodulekitError as exc:
        print(f"recipe_compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

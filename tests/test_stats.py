"""Paired Wilcoxon tests between runs and the reader comparison, on hand-made runs."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from scipy.stats import wilcoxon

from nodulekit import stats as St
from nodulekit.artifacts import provenance
from nodulekit.errors import NodulekitError
from nodulekit.run import write_fold_result


def fake_run(path, ids, y, prob, folds=3, fingerprint="abc", arch="hesam", order_seed=None, skip_fold=None):
    """A RUNDIR whose fold k tested nodules i with i % folds == k (rows permuted by order_seed)."""
    path.mkdir()
    (path / "run.json").write_text(json.dumps({"arch": arch, "n_folds": folds, "dataset_fingerprint": fingerprint}))
    for k in range(folds):
        if k == skip_fold:
            continue
        idx = np.flatnonzero(np.arange(len(ids)) % folds == k)
        if order_seed is not None:
            idx = np.random.default_rng(order_seed + k).permutation(idx)
        (path / f"fold{k}").mkdir()
        write_fold_result(
            path / f"fold{k}" / "result.h5",
            prov=provenance(),
            history=np.zeros((1, 5)),
            test_index=idx,
            test_prob=np.asarray(prob, float)[idx],
            test_y=np.asarray(y)[idx],
            test_nodule_id=[ids[i] for i in idx],
        )
    return path


@pytest.fixture
def two_runs(tmp_path):
    rng = np.random.default_rng(0)
    n = 30
    ids = [f"P{i:03d}:1" for i in range(n)]
    y = rng.integers(0, 2, n)
    pa = np.clip(y * 0.6 + rng.uniform(0, 0.4, n), 0, 1)
    pb = rng.uniform(0, 1, n)
    a = fake_run(tmp_path / "a", ids, y, pa)
    b = fake_run(tmp_path / "b", ids, y, pb, arch="resnet18", order_seed=5)
    return a, b, ids, y, pa, pb


def test_wilcoxon_matches_scipy_on_paired_nodules(two_runs, tmp_path):
    a, b, ids, y, pa, pb = two_runs
    table = St.wilcoxon_runs([a, b])
    assert len(table) == 1
    row = table.iloc[0]
    ref = wilcoxon(pa, pb)
    assert row["n"] == 30 and row["arch_b"] == "resnet18"
    assert row["prob_statistic"] == pytest.approx(ref.statistic) and row["prob_p_value"] == pytest.approx(ref.pvalue)
    ref_e = wilcoxon(np.abs(pa - y), np.abs(pb - y))
    assert row["error_p_value"] == pytest.approx(ref_e.pvalue)
    assert row["median_prob_diff"] == pytest.approx(np.median(pa - pb))
    assert row["median_error_diff"] == pytest.approx(np.median(np.abs(pa - y) - np.abs(pb - y)))
    assert row["error_p_value"] < 0.01 and row["median_error_diff"] < 0  # run a is built to be closer to y
    paths = St.write_report(table, tmp_path / "w.md", title="t", notes=St.WILCOXON_NOTES, record={"stage": "wilcoxon"})
    assert "prob_p_value" in paths["md"].read_text() and paths["csv"].exists()
    assert json.loads(paths["json"].read_text())["rows"][0]["n"] == 30
    with pytest.raises(NodulekitError, match="already exists"):
        St.write_report(table, tmp_path / "w.md", title="t", notes="", record={})


def test_wilcoxon_identical_runs_is_not_significant(two_runs):
    a, *_ = two_runs
    row = St.wilcoxon_runs([a, a]).iloc[0]
    assert row["prob_p_value"] == 1.0 and row["median_prob_diff"] == 0


def test_wilcoxon_refuses_unpaired_runs(two_runs, tmp_path):
    a, b, ids, y, pa, pb = two_runs
    other = fake_run(tmp_path / "c", ids, y, pb, fingerprint="zzz")
    with pytest.raises(NodulekitError, match="different datasets"):
        St.wilcoxon_runs([a, other])
    fewer = fake_run(tmp_path / "d", ids[:20], y[:20], pb[:20])
    with pytest.raises(NodulekitError, match=r"different test nodules \(10 only in the first, 0 only"):
        St.wilcoxon_runs([a, fewer])
    partial = fake_run(tmp_path / "e", ids, y, pb, skip_fold=1)
    with pytest.raises(NodulekitError, match="lacks finished fold.s. fold1"):
        St.wilcoxon_runs([a, partial])
    with pytest.raises(NodulekitError, match="at least two"):
        St.wilcoxon_runs([a])


def test_reader_calls():
    calls = St.reader_calls(np.array([[1, 2, 3, 4, 5, np.nan]]))
    assert calls.tolist() == [[0, 0, -1, 1, 1, -2]]


def test_reader_comparison_counts(tmp_path, tiny_dataset):
    from nodulekit.datasets import dataset_fingerprint, load_dataset

    # 6 nodules relabelled by hand; the rest of the tiny dataset is left unrated (NaN).
    y6 = np.array([1, 1, 1, 0, 0, 0])
    r6 = np.array(
        [
            [4, 2, 3, np.nan],  # malignant: r1 right, r2 FN, r3 abstains
            [5, 4, 4, 4],  # malignant: all right
            [3, 3, 5, np.nan],  # malignant: r1, r2 abstain, r3 right
            [2, 4, 1, np.nan],  # benign: r2 FP
            [1, 1, 4, 5],  # benign: r3 FP, r4 FP
            [2, 3, 2, np.nan],  # benign: r2 abstains
        ],
        np.float32,
    )
    with h5py.File(tiny_dataset, "a") as f:
        ratings = np.full(f["reader_malignancy"].shape, np.nan, np.float32)
        ratings[:6] = r6
        f["reader_malignancy"][...] = ratings
        y = f["y"][()]
        y[:6] = y6
        f["y"][...] = y
        ids = [v.decode() for v in f["nodule_id"][()]]
    ds = load_dataset(tiny_dataset)
    prob = np.where(y == 1, 0.8, 0.2)
    prob[0], prob[3] = 0.3, 0.6  # model: one FN (nodule 0) and one FP (nodule 3)
    run = fake_run(tmp_path / "run", ids, y, prob, folds=5, fingerprint=dataset_fingerprint(ds))
    table = St.reader_comparison(run, tiny_dataset).set_index("who")
    r1, r2, r3, r4, model = (table.loc[w] for w in ("reader 1", "reader 2", "reader 3", "reader 4", "model"))
    assert (r1.n_rated, r1.n_abstained, r1.n_called, r1.fp, r1.fn) == (6, 1, 5, 0, 0) and r1.accuracy == 1.0
    assert (r2.n_abstained, r2.n_called, r2.fp, r2.fn) == (2, 4, 1, 1) and r2.accuracy == pytest.approx(0.5)
    assert (r3.n_abstained, r3.n_called, r3.fp, r3.fn) == (1, 5, 1, 0) and r3.accuracy == pytest.approx(0.8)
    assert (r4.n_rated, r4.n_called, r4.fp, r4.fn) == (2, 2, 1, 0) and r4.accuracy == pytest.approx(0.5)
    assert (model.n_called, model.fp, model.fn) == (40, 1, 1) and model.accuracy == pytest.approx(38 / 40)
    # model on r4's two nodules (1: right, 4: right)
    assert r4.model_accuracy_same_nodules == 1.0
    assert r1.model_accuracy_same_nodules == pytest.approx(3 / 5)  # wrong on nodules 0 and 3
    per = table.attrs["per_nodule"].set_index("nodule_id")
    first = per.loc[ids[0]]
    assert (first.reader1_call, first.reader2_call, first.reader3_call, first.reader4_call, first.model_call) == (
        "malignant",
        "benign",
        "abstain",
        "not rated",
        "benign",
    )
    paths = St.write_report(
        table, tmp_path / "r.md", title="t", notes=St.READERS_NOTES, record={}, per_nodule=table.attrs["per_nodule"]
    )
    assert paths["nodules"].name == "r_nodules.csv" and "circular" in paths["md"].read_text()
    wrong = fake_run(tmp_path / "run2", ids, y, prob, folds=5, fingerprint="nope")
    with pytest.raises(NodulekitError, match="not the dataset"):
        St.reader_comparison(wrong, tiny_dataset)

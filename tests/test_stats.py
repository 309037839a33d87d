"""Paired Wilcoxon tests between runs and the reader comparison, on hand-made runs."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import fake_identity
from scipy.stats import wilcoxon
from sklearn.metrics import roc_auc_score

from nodulekit import stats as St
from nodulekit.artifacts import provenance
from nodulekit.errors import NodulekitError
from nodulekit.run import write_fold_result


def fake_run(
    path, ids, y, prob, folds=3, fingerprint="abc", arch="hesam", order_seed=None, skip_fold=None, identity=None
):
    """A RUNDIR whose fold k tested nodules i with i % folds == k (rows permuted by order_seed)."""
    path.mkdir()
    identity = identity or fake_identity(fingerprint)
    record = {"arch": arch, "n_folds": folds, "dataset_fingerprint": fingerprint, "dataset_identity": identity}
    (path / "run.json").write_text(json.dumps(record))
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
            attrs={"dataset_identity": identity},
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
    # DeLong and the patient-level tests on the same pairs (each method is checked on its own in
    # test_stats_methods.py; here: that the report feeds them the paired nodules)
    assert row["delong_p"] == pytest.approx(St.delong_test(y, pa, pb)["p_value"])
    assert row["auc_a"] == pytest.approx(roc_auc_score(y, pa)) and row["auc_b"] == pytest.approx(roc_auc_score(y, pb))
    flip = St.cluster_sign_flip_test(np.abs(pa - y) - np.abs(pb - y), [i.split(":")[0] for i in ids])
    assert row["error_p_patients"] == pytest.approx(flip["p_value"]) and row["n_patients"] == 30
    assert row["auc_diff_low"] < row["auc_diff"] < row["auc_diff_high"]
    assert row["delong_p_holm"] == row["delong_p"]  # one comparison: nothing to adjust
    patients = [i.split(":")[0] for i in ids]
    assert row["auc_p"] == pytest.approx(St.obuchowski_test(y, pa, pb, patients)["p_value"])
    assert row["auc_verdict"] in ("a higher", "undecided", "a higher, yet within ±0.02")
    paths = St.write_report(
        table,
        tmp_path / "w.md",
        title="t",
        notes=St.wilcoxon_notes(2000, 0, 9999),
        record={"stage": "wilcoxon"},
        md_table=St.comparison_markdown_table(table),
    )
    md = paths["md"].read_text()
    assert "prob_p_value" in md and "delong_p_holm" in md and "2000 resamples of patients" in md
    assert "error_statistic" not in md and "error_statistic" in paths["csv"].read_text()
    assert json.loads(paths["json"].read_text())["rows"][0]["n"] == 30
    with pytest.raises(NodulekitError, match="already exists"):
        St.write_report(table, tmp_path / "w.md", title="t", notes="", record={})


def test_comparisons_are_holm_adjusted_and_clustered_by_patient(tmp_path):
    rng = np.random.default_rng(1)
    n = 40
    ids = [f"P{i // 4:03d}:{i % 4 + 1}" for i in range(n)]  # 10 patients with 4 nodules each
    y = np.repeat(rng.integers(0, 2, 10), 4)
    y[::7] = 1 - y[::7]
    good = np.clip(0.5 + 0.4 * (y - 0.5) + rng.normal(0, 0.1, n), 0, 1)
    runs = [fake_run(tmp_path / "ref", ids, y, good)]
    for k, noise in enumerate((0.3, 0.5, 0.6)):
        runs.append(fake_run(tmp_path / f"r{k}", ids, y, np.clip(good + rng.normal(0, noise, n), 0, 1)))
    table = St.wilcoxon_runs(runs, n_resamples=200, n_permutations=999)
    assert list(table["n_patients"]) == [10, 10, 10]
    for column in St.HOLM_COLUMNS:
        np.testing.assert_allclose(table[f"{column}_holm"], St.holm(table[column]))
    assert (table["delong_p_holm"] >= table["delong_p"]).all() and (table["delong_p_holm"] > table["delong_p"]).any()
    patients = [i.split(":")[0] for i in ids]
    merged = St.run_predictions(runs[0]).merge(St.run_predictions(runs[1]), on="nodule_id")
    diff = np.abs(merged["prob_x"] - merged["y_x"]) - np.abs(merged["prob_y"] - merged["y_y"])
    by_patient = St.cluster_sign_flip_test(diff, merged["patient_id_x"], n_resamples=999)["p_value"]
    assert table["error_p_patients"].iloc[0] == pytest.approx(by_patient)
    assert sorted(set(merged["patient_id_x"])) == sorted(set(patients))
    # the seed reaches the resampling: the same seed repeats every number, another moves the interval
    five, again, six = (St.wilcoxon_runs(runs[:2], n_resamples=200, n_permutations=999, seed=s) for s in (5, 5, 6))
    assert five.equals(again) and five["auc_diff_low"].iloc[0] != six["auc_diff_low"].iloc[0]


def test_wilcoxon_identical_runs_is_not_significant(two_runs):
    a, *_ = two_runs
    row = St.wilcoxon_runs([a, a]).iloc[0]
    assert row["prob_p_value"] == 1.0 and row["median_prob_diff"] == 0
    assert row["auc_p"] == 1.0 and row["tost_p"] == 0.0 and row["auc_verdict"] == "equivalent within ±0.02"


def test_wilcoxon_refuses_unpaired_runs(two_runs, tmp_path):
    a, b, ids, y, pa, pb = two_runs
    fewer = fake_run(tmp_path / "d", ids[:20], y[:20], pb[:20])
    with pytest.raises(NodulekitError, match=r"share 20 test nodules of 30 and 20 \(at least 90% of each"):
        St.wilcoxon_runs([a, fewer])
    relabelled = fake_run(tmp_path / "r", ids, 1 - y, pb)
    with pytest.raises(NodulekitError, match="different labels"):
        St.wilcoxon_runs([a, relabelled])
    with pytest.raises(NodulekitError, match="seeds of one configuration but did not test the same nodules"):
        St.wilcoxon_runs([[a, fewer], b])
    partial = fake_run(tmp_path / "e", ids, y, pb, skip_fold=1)
    with pytest.raises(NodulekitError, match="lacks finished fold.s. fold1"):
        St.wilcoxon_runs([a, partial])
    with pytest.raises(NodulekitError, match="at least two"):
        St.wilcoxon_runs([a])


def test_wilcoxon_pairs_runs_on_different_datasets_by_nodule_id(tmp_path):
    """D1C vs D11C of the same nodules: other fingerprints, a few nodules only in one of them."""
    rng = np.random.default_rng(3)
    n = 60
    ids = [f"P{i // 2:03d}:{i % 2 + 1}" for i in range(n)]
    y = rng.integers(0, 2, n)
    pa = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    pb = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    a = fake_run(tmp_path / "d1c", ids[:58], y[:58], pa[:58], fingerprint="d1c")
    b = fake_run(tmp_path / "d11c", ids[2:], y[2:], pb[2:], fingerprint="d11c", order_seed=1)
    row = St.wilcoxon_runs([a, b], n_resamples=200, n_permutations=99).iloc[0]
    assert (row["n"], row["n_only_a"], row["n_only_b"]) == (56, 2, 2)
    shared = slice(2, 58)
    assert row["auc_a"] == pytest.approx(roc_auc_score(y[shared], pa[shared]))
    assert row["auc_b"] == pytest.approx(roc_auc_score(y[shared], pb[shared]))
    patients = [i.split(":")[0] for i in ids[shared]]
    clustered = St.obuchowski_test(y[shared], pa[shared], pb[shared], patients)
    assert row["auc_p"] == pytest.approx(clustered["p_value"]) and row["n_patients"] == 28
    with pytest.raises(NodulekitError, match="share 56 test nodules of 58 and 58"):
        St.wilcoxon_runs([a, b], min_overlap=0.99)


def test_seed_arms_carry_the_retraining_spread(tmp_path):
    """Three seeds per arm whose AUCs scatter: the seed x patient interval is wider than one seed's
    patient interval, AUCs are means over seeds, and the clustered test sees the seed-averaged
    probabilities."""
    rng = np.random.default_rng(8)
    n = 80
    ids = [f"P{i // 2:03d}:{i % 2 + 1}" for i in range(n)]
    y = rng.integers(0, 2, n)
    base = 0.5 + 0.3 * (y - 0.5)

    def seeds(tag, noises):
        return [
            fake_run(tmp_path / f"{tag}{k}", ids, y, np.clip(base + rng.normal(0, s, n), 0, 1))
            for k, s in enumerate(noises)
        ]

    arm_a, arm_b = seeds("a", (0.15, 0.3, 0.45)), seeds("b", (0.15, 0.3, 0.45))
    boot = dict(n_resamples=400, n_permutations=99)
    row = St.wilcoxon_runs([arm_a, arm_b], **boot).iloc[0]
    one = St.wilcoxon_runs([arm_a[0], arm_b[0]], **boot).iloc[0]
    probs = {
        k: np.stack([St.run_predictions(r).sort_values("nodule_id")["prob"] for r in arm])
        for k, arm in (("a", arm_a), ("b", arm_b))
    }
    y_sorted = St.run_predictions(arm_a[0]).sort_values("nodule_id")["y"].to_numpy()
    aucs_a = [roc_auc_score(y_sorted, p) for p in probs["a"]]
    assert (row["n_seeds_a"], row["n_seeds_b"]) == (3, 3)
    assert row["auc_a"] == pytest.approx(np.mean(aucs_a)) and row["auc_sd_seeds_a"] == pytest.approx(
        np.std(aucs_a, ddof=1)
    )
    assert row["auc_diff_high"] - row["auc_diff_low"] > 1.2 * (one["auc_diff_high"] - one["auc_diff_low"])
    patients = sorted(i.split(":")[0] for i in ids)
    averaged = St.delong_test(y_sorted, probs["a"].mean(0), probs["b"].mean(0))
    assert row["delong_p"] == pytest.approx(averaged["p_value"])
    assert row["auc_diff_averaged"] == pytest.approx(averaged["auc_diff"]) and len(set(patients)) == row["n_patients"]
    assert np.isnan(one["auc_sd_seeds_a"]) and one["n_seeds_a"] == 1


def test_reader_calls():
    calls = St.reader_calls(np.array([[1, 2, 3, 4, 5, np.nan]]))
    assert calls.tolist() == [[0, 0, -1, 1, 1, -2]]
    assert St.reader_calls(np.array([2, 3, 4]), malignant_above=3.5, benign_below=2.5).tolist() == [0, -1, 1]


# 6 nodules rated by hand (the rest of the tiny dataset is left unrated). Leave-one-reader-out
# labels (others' mean; > 3 malignant, < 3 benign, 3 indeterminate; at least 2 others, as the
# dataset's rule asks 3 readers), worked out by hand:
R6 = np.array(
    [
        [4, 2, 3, np.nan],  # others: r1 2.5 B, r2 3.5 M, r3 3.0 ?, r4 (all three) 3.0 ?
        [5, 4, 4, 4],  # others: 4, 4.33, 4.33, 4.33: all M
        [3, 3, 5, np.nan],  # others: r1 4 M, r2 4 M, r3 3 ?, r4 3.67 M
        [2, 4, 1, np.nan],  # others: r1 2.5 B, r2 1.5 B, r3 3 ?, r4 2.33 B
        [1, 1, 4, 5],  # others: r1 3.33 M, r2 3.33 M, r3 2.33 B, r4 2 B
        [2, 3, 2, np.nan],  # others: r1 2.5 B, r2 2 B, r3 2.5 B, r4 2.33 B
    ],
    np.float32,
)
LORO6 = [[0, 1, -1, -1], [1, 1, 1, 1], [1, 1, -1, 1], [0, 0, -1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


def test_leave_one_reader_out_labels():
    ref = St.leave_one_reader_out(R6, min_others=2)
    assert ref.tolist() == LORO6
    # two readers: each one's reference is the other's rating; positions 3, 4 (not rated) see mean 3
    two = np.array([[2.0, 4.0, np.nan, np.nan]])
    assert St.leave_one_reader_out(two, min_others=1).tolist() == [[1, 0, -1, -1]]
    assert St.leave_one_reader_out(two, min_others=2).tolist() == [[-2, -2, -1, -1]]
    assert St.leave_one_reader_out(R6, min_others=4).max() == -2


def test_reader_comparison_against_the_other_readers(tmp_path, tiny_dataset):
    from nodulekit.datasets import dataset_fingerprint, load_dataset

    y6 = np.array([1, 1, 1, 0, 0, 0])
    with h5py.File(tiny_dataset, "a") as f:
        ratings = np.full(f["reader_malignancy"].shape, np.nan, np.float32)
        ratings[:6] = R6
        f["reader_malignancy"][...] = ratings
        y = f["y"][()]
        y[:6] = y6
        f["y"][...] = y
        ids = [v.decode() for v in f["nodule_id"][()]]
    ds = load_dataset(tiny_dataset)
    prob = np.where(y == 1, 0.8, 0.2)
    prob[0], prob[3] = 0.3, 0.6  # model calls: nodules 0..5 = B, M, M, M, B, B
    run = fake_run(tmp_path / "run", ids, y, prob, folds=5, fingerprint=dataset_fingerprint(ds), identity=ds.identity)
    table = St.reader_comparison(run, tiny_dataset, n_resamples=200).set_index("who")
    r1, r2, r3, r4, pooled, model = (
        table.loc[w] for w in ("reader 1", "reader 2", "reader 3", "reader 4", "all readers", "model")
    )
    # reader 1 calls M, M, -, B, B, B against others' B, M, M, B, M, B: right on 1, 3, 5
    assert (r1.n_rated, r1.n_abstained, r1.n_compared, r1.fp, r1.fn) == (6, 1, 5, 1, 1)
    assert r1.reader_accuracy == pytest.approx(3 / 5) and r1.model_accuracy == pytest.approx(3 / 5)
    assert r1.model_accuracy_vs_label == pytest.approx(3 / 5) and r1.n_patients == 3
    # reader 2 calls B, M, -, M, B, - against M, M, M, B, M, B: right only on nodule 1
    assert (r2.n_abstained, r2.n_compared, r2.fp, r2.fn) == (2, 4, 1, 2) and r2.reader_accuracy == pytest.approx(1 / 4)
    assert r2.model_accuracy == pytest.approx(1 / 4)
    # reader 3: others indeterminate on nodules 2 and 3 (both called), so compared on 1, 4, 5
    assert (r3.n_abstained, r3.n_indeterminate_others, r3.n_compared, r3.fp, r3.fn) == (1, 2, 3, 1, 0)
    assert r3.reader_accuracy == pytest.approx(2 / 3) and r3.model_accuracy == 1.0
    assert (r4.n_rated, r4.n_compared, r4.fp) == (2, 2, 1) and r4.reader_accuracy == 0.5 and r4.model_accuracy == 1
    assert pooled.n_compared == 14 and pooled.reader_accuracy == pytest.approx(7 / 14)
    assert pooled.model_accuracy == pytest.approx(9 / 14)
    assert pooled.accuracy_diff == pytest.approx(-2 / 14)
    assert model.n_compared == 40 and model.model_accuracy == pytest.approx(38 / 40) and model.model_fp == 1
    for row in (r1, r2, r3, pooled, model):
        assert row.model_accuracy_low <= row.model_accuracy_high
    np.testing.assert_allclose(table["p_patients_holm"].iloc[:4], St.holm(table["p_patients"].iloc[:4]))
    per = table.attrs["per_nodule"].set_index("nodule_id")
    first = per.loc[ids[0]]
    assert (first.reader1_call, first.reader2_call, first.reader3_call, first.reader4_call, first.model_call) == (
        "malignant",
        "benign",
        "abstain",
        "not rated",
        "benign",
    )
    assert (first.reader1_others_label, first.reader3_others_label) == ("benign", "indeterminate")
    # the per-nodule file's columns, and each nodule's mean rating read from the dataset by its id
    assert list(per.columns[:4]) == ["patient_id", "fold", "y", "malignancy_mean"]
    with h5py.File(tiny_dataset, "r") as f:
        mean_of = dict(zip(ids, f["malignancy_mean"][()].tolist(), strict=True))
    np.testing.assert_allclose(per["malignancy_mean"], [mean_of[i] for i in per.index], rtol=1e-6)
    paths = St.write_report(
        table.reset_index(),
        tmp_path / "r.md",
        title="t",
        notes=St.readers_notes(table.attrs["rule"], 200, 0),
        record={},
        per_nodule=table.attrs["per_nodule"],
        md_table=St.readers_markdown_table(table.reset_index()),
    )
    md = paths["md"].read_text()
    assert paths["nodules"].name == "r_nodules.csv" and "OTHER readers" in md and "at least 2 other" in md
    assert "| reader 1 | 5 | 1 | 0 | 0 | 0.600 [" in md
    # --overwrite replaces the four files together
    again = St.write_report(table.reset_index().head(1), tmp_path / "r.md", title="again", notes="", record={},
                            overwrite=True, per_nodule=table.attrs["per_nodule"].head(2))  # fmt: skip
    assert again == paths and len(pd.read_csv(again["csv"])) == 1 and len(pd.read_csv(again["nodules"])) == 2
    wrong = fake_run(tmp_path / "run2", ids, y, prob, folds=5, fingerprint="nope")
    with pytest.raises(NodulekitError, match="not the dataset"):
        St.reader_comparison(wrong, tiny_dataset)


def test_wilcoxon_cli_takes_seed_arms_and_refuses_low_overlap_in_one_line(two_runs, tmp_path, monkeypatch, capsys):
    from conftest import cli_in_process as cli

    a, b, ids, y, pa, pb = two_runs
    fewer = fake_run(tmp_path / "few", ids[:20], y[:20], pb[:20])
    code, out, err = cli(monkeypatch, capsys, "wilcoxon", a, fewer, "--bootstrap", "50", "--permutations", "50")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("nodulekit: error: ") and "share 20 test nodules of 30 and 20" in err
    out_md = tmp_path / "w.md"
    code, _, err = cli(
        monkeypatch, capsys, "wilcoxon", f"{a},{b}", b, "--bootstrap", "50", "--permutations", "50",
        "--margin", "0.05", "-o", out_md,
    )  # fmt: skip
    assert code == 0, err
    record = json.loads(out_md.with_suffix(".json").read_text())
    assert record["provenance"]["equivalence_margin"] == 0.05
    (row,) = record["rows"]
    assert (row["n_seeds_a"], row["n_seeds_b"], row["equivalence_margin"]) == (2, 1, 0.05)
    assert "| 2 / 1 |" in out_md.read_text() and "|AUC_a - AUC_b| < 0.05" in out_md.read_text()

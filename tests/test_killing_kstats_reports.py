"""The comparison and reader reports of nodulekit.stats: every number of a comparison against the
method it comes from (called here with the same settings), the seed, margin and permutation count
reaching them, the verdict at its boundaries, the tables' cells, the notes as reviewed texts, and
each refusal's message."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from golden import assert_golden
from scipy.stats import wilcoxon
from sklearn.metrics import roc_auc_score
from test_stats import fake_run

from nodulekit import stats as St
from nodulekit.errors import NodulekitError

RNG = np.random.default_rng(21)
N = 24
PATIENTS = np.array([f"P{i // 3:02d}" for i in range(N)])  # 8 patients of 3 nodules
Y = np.tile([1, 0, 1, 0, 0, 1], 4)
PA = np.clip(0.5 + 0.35 * (Y - 0.5) + RNG.normal(0, 0.2, (2, N)), 0, 1)  # two seeds
PB = np.clip(0.5 + 0.1 * (Y - 0.5) + RNG.normal(0, 0.25, N), 0, 1)  # one seed


def test_compare_predictions_every_number_from_its_method():
    kw = dict(margin=0.03, n_resamples=60, seed=4, n_permutations=99)
    res = St.compare_predictions(Y, PA, PB, PATIENTS, **kw)
    ma, mb = PA.mean(0), PB
    boot = St.seed_patient_bootstrap(Y, PA, PB, PATIENTS, n_resamples=60, seed=4)
    clustered = St.obuchowski_test(Y, ma, mb, PATIENTS)
    delong = St.delong_test(Y, ma, mb)
    tost = St.equivalence_test(boot["estimate"], boot["se"], 0.03, 0.05)
    ea, eb = np.abs(ma - Y), np.abs(mb - Y)
    flip = St.cluster_sign_flip_test(ea - eb, PATIENTS, n_resamples=99, seed=4)
    err = St.cluster_bootstrap(PATIENTS, lambda w: ((w @ (ea - eb)) / w.sum(1))[None], n_resamples=60, seed=4)
    aucs_a = [roc_auc_score(Y, p) for p in PA]
    expected = {
        "n": N,
        "n_patients": 8,
        "n_seeds_a": 2,
        "n_seeds_b": 1,
        "auc_a": np.mean(aucs_a),
        "auc_b": roc_auc_score(Y, PB),
        "auc_sd_seeds_a": np.std(aucs_a, ddof=1),
        "auc_sd_seeds_b": np.nan,
        "auc_diff": np.mean(aucs_a) - roc_auc_score(Y, PB),
        "auc_diff_low": boot["low"],
        "auc_diff_high": boot["high"],
        "auc_diff_se": boot["se"],
        "auc_diff_averaged": roc_auc_score(Y, ma) - roc_auc_score(Y, mb),
        "auc_se_clustered": clustered["se"],
        "auc_p": clustered["p_value"],
        "delong_se": delong["se"],
        "delong_z": delong["z"],
        "delong_p": delong["p_value"],
        "equivalence_margin": 0.03,
        "equivalence_low": tost["low"],
        "equivalence_high": tost["high"],
        "tost_p": tost["p_value"],
        "mean_abs_error_a": ea.mean(),
        "mean_abs_error_b": eb.mean(),
        "mean_error_diff": (ea - eb).mean(),
        "error_diff_low": err["low"][0],
        "error_diff_high": err["high"][0],
        "error_p_patients": flip["p_value"],
        "median_prob_diff": np.median(ma - mb),
        "prob_statistic": wilcoxon(ma, mb).statistic,
        "prob_p_value": wilcoxon(ma, mb).pvalue,
        "median_error_diff": np.median(ea - eb),
        "error_statistic": wilcoxon(ea, eb).statistic,
        "error_p_value": wilcoxon(ea, eb).pvalue,
    }
    assert list(res) == list(expected)
    for key, value in expected.items():
        assert res[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
    assert round(res["error_p_patients"] * 100, 9) == round(res["error_p_patients"] * 100)  # 99 sign patterns
    # the defaults: margin 0.02, 2000 resamples, seed 0, 9999 sign patterns
    default = St.compare_predictions(Y, PA[0], PB, PATIENTS)
    assert default["equivalence_margin"] == 0.02 and default["n_seeds_a"] == 1
    boot0 = St.seed_patient_bootstrap(Y, PA[0], PB, PATIENTS, n_resamples=2000, seed=0)
    assert (default["auc_diff_low"], default["auc_diff_se"]) == (boot0["low"], boot0["se"])
    flip0 = St.cluster_sign_flip_test(np.abs(PA[0] - Y) - eb, PATIENTS, n_resamples=9999, seed=0)
    assert default["error_p_patients"] == flip0["p_value"]


def test_wilcoxon_of_identical_probabilities_has_nothing_to_test():
    stat, p = St._wilcoxon(np.array([0.1, 0.5]), np.array([0.1, 0.5]))
    assert np.isnan(stat) and p == 1.0
    stat, p = St._wilcoxon(PB, PA[0])
    ref = wilcoxon(PB, PA[0], alternative="two-sided")
    assert (stat, p) == (ref.statistic, ref.pvalue)


def verdict_row(**kw):
    row = {"auc_p_holm": 0.01, "auc_diff": 0.05, "auc_diff_low": 0.01, "auc_diff_high": 0.09, "tost_p_holm": 0.5}
    return pd.Series(row | kw | {"equivalence_margin": kw.get("equivalence_margin", 0.02)})


def test_auc_verdict_at_each_boundary():
    assert St.auc_verdict(verdict_row()) == "a higher"
    assert St.auc_verdict(verdict_row(auc_diff=-0.05, auc_diff_low=-0.09, auc_diff_high=-0.01)) == "b higher"
    assert St.auc_verdict(verdict_row(auc_p_holm=0.05)) == "undecided"  # exactly alpha: not below it
    assert St.auc_verdict(verdict_row(auc_p_holm=0.049)) == "a higher"
    assert St.auc_verdict(verdict_row(auc_diff_low=0.0)) == "undecided"  # the interval touches 0
    assert St.auc_verdict(verdict_row(auc_diff=-0.05, auc_diff_low=-0.09, auc_diff_high=0.0)) == "undecided"
    assert St.auc_verdict(verdict_row(auc_diff=0.0, auc_diff_low=-0.01, auc_diff_high=0.02)) == "undecided"
    assert St.auc_verdict(verdict_row(tost_p_holm=0.05, auc_p_holm=0.5)) == "undecided"
    assert St.auc_verdict(verdict_row(tost_p_holm=0.049, auc_p_holm=0.5)) == "equivalent within ±0.02"
    assert St.auc_verdict(verdict_row(tost_p_holm=0.01, equivalence_margin=0.035)) == "a higher, yet within ±0.035"


def comparison_table():
    """A wilcoxon_runs-like table of two comparisons with round numbers."""
    return pd.DataFrame(
        {
            "run_b": ["runs/b", "runs/c"],
            "arch_b": ["resnet18", "sam"],
            "n": [120, 118],
            "n_patients": [60, 59],
            "n_seeds_a": [3, 3],
            "n_seeds_b": [1, 2],
            "auc_a": [0.875, 0.875],
            "auc_b": [0.8125, 0.9],
            "auc_diff": [0.0625, -0.025],
            "auc_diff_low": [0.01, -0.05],
            "auc_diff_high": [0.115, 0.0],
            "auc_p": [0.004, 0.06],
            "auc_p_holm": [0.008, 0.06],
            "delong_p": [0.001, 0.03],
            "delong_p_holm": [0.002, 0.03],
            "tost_p_holm": [0.9, 0.2],
            "auc_verdict": ["a higher", "undecided"],
            "mean_error_diff": [-0.03125, 0.5],
            "error_diff_low": [-0.0625, 0.25],
            "error_diff_high": [0.0, 0.75],
            "error_p_patients_holm": [0.1, 0.002],
            "prob_p_value_holm": [0.5, 0.25],
            "only_in_csv": [1, 2],
        }
    )


def test_comparison_markdown_table_cells():
    md = St.comparison_markdown_table(comparison_table())
    assert list(md.columns) == [
        "run_b", "arch_b", "nodules / patients", "seeds a / b", "auc_a", "auc_b", "auc_diff [95 % CI]",
        "auc_p (clustered)", "auc_p_holm", "delong_p", "delong_p_holm", "tost_p_holm", "auc_verdict",
        "mean_error_diff [95 % CI]", "error_p_patients_holm", "prob_p_value_holm",
    ]  # fmt: skip
    first, second = md.iloc[0], md.iloc[1]
    assert (first["nodules / patients"], first["seeds a / b"]) == ("120 / 60", "3 / 1")
    assert first["auc_diff [95 % CI]"] == "+0.0625 [+0.0100, +0.1150]"
    assert second["auc_diff [95 % CI]"] == "-0.0250 [-0.0500, +0.0000]"
    assert first["mean_error_diff [95 % CI]"] == "-0.0312 [-0.0625, +0.0000]"
    assert (first["run_b"], first["arch_b"], first["auc_a"], first["auc_b"]) == ("runs/b", "resnet18", 0.875, 0.8125)
    assert (first["auc_p (clustered)"], first["auc_p_holm"], first["delong_p"], first["delong_p_holm"]) == (
        0.004,
        0.008,
        0.001,
        0.002,
    )
    assert (second["tost_p_holm"], second["auc_verdict"]) == (0.2, "undecided")
    assert (second["error_p_patients_holm"], second["prob_p_value_holm"]) == (0.002, 0.25)


def test_markdown_of_a_report_table():
    table = pd.DataFrame({"who": ["a", "b"], "n": [3, 4], "p": [0.123456, float("nan")], "x": [1e-5, 12345.678]})
    text = St.report_markdown(table, title="Title here", notes="Some notes.")
    assert text == (
        "# Title here\n\n| who | n | p | x |\n|---|---|---|---|\n| a | 3 | 0.1235 | 1e-05 |\n"
        "| b | 4 | nan | 1.235e+04 |\n\nSome notes.\n"
    )
    shorter = St.report_markdown(table, title="T", notes="", md_table=table[["who"]])
    assert shorter == "# T\n\n| who |\n|---|\n| a |\n| b |\n\n\n"


def test_write_report_files_record_and_refusals(tmp_path):
    table = pd.DataFrame({"who": ["a"], "p": [0.5]})
    nodules = pd.DataFrame({"nodule_id": ["P1:1"], "y": [1]})
    paths = St.write_report(
        table, tmp_path / "rep.md", title="T", notes="N", record={"stage": "readers", "seed": 3}, per_nodule=nodules
    )
    assert paths == {
        "md": tmp_path / "rep.md",
        "csv": tmp_path / "rep.csv",
        "json": tmp_path / "rep.json",
        "nodules": tmp_path / "rep_nodules.csv",
    }
    record = json.loads(paths["json"].read_text())
    assert record["rows"] == [{"who": "a", "p": 0.5}]
    assert record["provenance"]["stage"] == "readers" and record["provenance"]["seed"] == 3
    assert St.report_record(table, {"stage": "x"})["rows"] == [{"who": "a", "p": 0.5}]
    assert paths["json"].read_text().startswith('{\n  "provenance"')  # indented for a reader
    assert paths["csv"].read_text() == "who,p\na,0.5\n" and paths["nodules"].read_text() == "nodule_id,y\nP1:1,1\n"
    assert paths["md"].read_text() == "# T\n\n| who | p |\n|---|---|\n| a | 0.5 |\n\nN\n"
    with pytest.raises(NodulekitError, match=r"rep.csv: give the report a .md name \(CSV and JSON go beside it\)$"):
        St.write_report(table, tmp_path / "rep.csv", title="T", notes="", record={})
    with pytest.raises(NodulekitError, match="already exists"):
        St.write_report(table, tmp_path / "rep.md", title="T", notes="", record={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep.csv", "rep.json", "rep.md", "rep_nodules.csv"]
    plain = St.write_report(table, tmp_path / "plain.md", title="T", notes="", record={})
    assert set(plain) == {"md", "csv", "json"} and not (tmp_path / "plain_nodules.csv").exists()


def test_the_notes_are_the_reviewed_texts():
    assert_golden("stats/wilcoxon_notes.md", St.wilcoxon_notes(500, 3, 999, 0.025) + "\n")
    assert_golden("stats/readers_notes.md", St.readers_notes((3.5, 2.5, 2), 100, 1) + "\n")
    assert "|AUC_a - AUC_b| < 0.02 " in St.wilcoxon_notes(5, 0, 9)


def test_readers_markdown_table_cells():
    table = pd.DataFrame(
        {
            "who": ["reader 1", "model"],
            "n_compared": [5, 40],
            "n_abstained": [1, np.nan],
            "reader_accuracy": [0.6, np.nan],
            "reader_accuracy_low": [0.2, np.nan],
            "reader_accuracy_high": [1.0, np.nan],
            "model_accuracy": [0.8, 0.95],
            "model_accuracy_low": [0.4, 0.875],
            "model_accuracy_high": [1.0, 1.0],
            "accuracy_diff": [-0.2, np.nan],
            "accuracy_diff_low": [-0.6, np.nan],
            "accuracy_diff_high": [0.2, np.nan],
            "p_patients": [0.5, np.nan],
            "fp": [1, np.nan],
        }
    )
    md = St.readers_markdown_table(table)
    assert list(md.columns) == [
        "who", "n_compared", "n_abstained", "reader_accuracy [95 % CI]", "model_accuracy [95 % CI]",
        "accuracy_diff [95 % CI]", "p_patients", "fp",
    ]  # fmt: skip
    assert md.iloc[0].tolist() == [
        "reader 1", 5, 1.0, "0.600 [0.200, 1.000]", "0.800 [0.400, 1.000]", "-0.200 [-0.600, 0.200]", 0.5, 1.0,
    ]  # fmt: skip
    assert md.iloc[1].tolist() == ["model", 40, "–", "–", "0.950 [0.875, 1.000]", "–", "–", "–"]


def test_rule_thresholds_reader_calls_and_leave_one_out_at_the_thresholds():
    assert St._rule_thresholds(None) == (3.0, 3.0, 1)
    assert St._rule_thresholds('{"malignant_above": 3.5, "benign_below": 2.5, "min_readers": 3}') == (3.5, 2.5, 3)
    assert St._rule_thresholds({"benign_below": 2}) == (3.0, 2.0, 1)
    # ratings exactly at a threshold abstain; the defaults are 3 and 3
    assert St.reader_calls(np.array([3.0, 3.01, 2.99, np.nan])).tolist() == [-1, 1, 0, -2]
    assert St.reader_calls(np.array([3.5, 2.5, 3.0]), 3.5, 2.5).tolist() == [-1, -1, -1]
    assert St.reader_calls(np.array([[4.0, np.nan]])).dtype.kind == "i"  # codes index the call names
    # the others' mean exactly at a threshold is indeterminate; min_others 0 still needs one reader
    r = np.array([[3.5, 2.5, np.nan], [4.0, np.nan, np.nan], [2.0, 4.0, 5.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reader with no other reader: 0 / 0 expected, no RuntimeWarning
        ref = St.leave_one_reader_out(r, malignant_above=3.5, benign_below=2.5, min_others=0)
    assert ref.dtype.kind == "i"  # codes index the reference names
    assert ref.tolist() == [[-1, -1, -1], [-2, 1, 1], [1, -1, -1]]  # an unrated reader: all rated are others
    assert St.leave_one_reader_out(r, malignant_above=3.5, benign_below=2.5).tolist() == ref.tolist()
    assert St.leave_one_reader_out(r, min_others=2).tolist() == [[-2, -2, -1], [-2, -2, -2], [1, 1, -1]]
    assert St.leave_one_reader_out(r).tolist() == [[0, 1, -1], [-2, 1, 1], [1, 1, -1]]


def _runs(tmp_path):
    ids = [f"P{i // 3:02d}:{i % 3 + 1}" for i in range(N)]
    a = [fake_run(tmp_path / f"a{k}", ids, Y, PA[k], arch=arch) for k, arch in enumerate(("hesam", "sam"))]
    b = fake_run(tmp_path / "b", ids, Y, PB, arch="resnet18", order_seed=2)
    c = fake_run(tmp_path / "c", ids, Y, PA[1][::-1], arch="cam")
    return a, b, c, ids


def test_wilcoxon_runs_hands_its_settings_to_every_comparison(tmp_path):
    a, b, c, ids = _runs(tmp_path)
    kw = dict(n_resamples=40, seed=6, n_permutations=49, margin=0.04)
    table = St.wilcoxon_runs([a, b, str(c)], **kw)
    patients = np.array([i.split(":")[0] for i in ids])
    for row, other in zip(table.itertuples(), (PB, PA[1][::-1]), strict=True):
        expected = St.compare_predictions(Y, PA, other, patients, **kw)
        got = table.loc[row.Index]
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
    assert table.attrs == kw | {"margin": 0.04}
    assert list(table["run_a"]) == [f"{a[0]},{a[1]}"] * 2 and list(table["run_b"]) == [str(b), str(c)]
    assert list(table["arch_a"]) == ["hesam/sam"] * 2 and list(table["arch_b"]) == ["resnet18", "cam"]
    assert list(table["n_only_a"]) == [0, 0] and list(table["n_only_b"]) == [0, 0]
    cols = list(table.columns)
    assert cols[:6] == ["run_a", "arch_a", "run_b", "arch_b", "n_only_a", "n_only_b"]
    for column in St.HOLM_COLUMNS:
        assert cols[cols.index(column) + 1] == f"{column}_holm"
        np.testing.assert_allclose(table[f"{column}_holm"], St.holm(table[column]))
    assert cols[cols.index("auc_diff") - 1] == "auc_verdict"
    assert list(table["auc_verdict"]) == [St.auc_verdict(r) for _, r in table.iterrows()]


def test_arms_and_pairs_refuse_with_one_clear_line(tmp_path):
    a, b, c, ids = _runs(tmp_path)
    arm = St.arm_predictions([a[1], a[0]])
    assert {k: arm.attrs[k] for k in ("arch", "label", "n_seeds")} == {
        "arch": "hesam/sam",
        "label": f"{a[1]},{a[0]}",
        "n_seeds": 2,
    }
    assert list(arm.columns) == ["nodule_id", "patient_id", "y", "p0", "p1"]
    order = np.argsort(ids)
    np.testing.assert_allclose(arm["p0"], PA[1][order])
    np.testing.assert_allclose(arm["p1"], PA[0][order])
    one = St.arm_predictions(b)
    assert (one.attrs["arch"], one.attrs["label"], one.attrs["n_seeds"]) == ("resnet18", str(b), 1)
    relabelled = fake_run(tmp_path / "r", ids, 1 - Y, PB)
    with pytest.raises(NodulekitError) as err:
        St.arm_predictions([a[0], relabelled])
    assert str(err.value) == (
        f"{relabelled} and {a[0]} are given as seeds of one configuration but did not test the same nodules with "
        "the same labels"
    )
    few = fake_run(tmp_path / "few", ids[:21], Y[:21], PB[:21])
    with pytest.raises(NodulekitError) as err:
        St.wilcoxon_runs([a[0], few])
    assert str(err.value) == (
        f"{a[0]} and {few} share 21 test nodules of 24 and 21 (at least 90% of each needed); paired tests pair "
        "nodules by id"
    )
    row = St.wilcoxon_runs([a[0], few], min_overlap=0.875, n_resamples=20, n_permutations=9).iloc[0]
    assert (row["n"], row["n_only_a"], row["n_only_b"]) == (21, 3, 0)
    with pytest.raises(
        NodulekitError, match=r"^.* and .* give some shared nodules different labels \(another label rule\?\)$"
    ):
        St.wilcoxon_runs([a[0], relabelled])
    other = St.arm_predictions(a[0])
    other.loc[3, "patient_id"] = "P99"  # one shared nodule given to another patient
    with pytest.raises(NodulekitError, match=r"^x and y give some shared nodules different patients$"):
        St._paired_predictions(St.arm_predictions(a[0]), other, "x", "y")
    with pytest.raises(
        NodulekitError, match=r"^give at least two RUNDIRs: the first is compared with each of the others$"
    ):
        St.wilcoxon_runs([[a[0], a[1]]])


def test_run_predictions_refuses_a_nodule_tested_twice(tmp_path):
    ids = [f"P{i:02d}:1" for i in range(6)]
    run = fake_run(tmp_path / "twice", ids[:5] + ids[:1], Y[:6], PB[:6], folds=2)
    with pytest.raises(NodulekitError, match=r"twice: nodule P00:1 is in the test set of more than one fold$"):
        St.run_predictions(run)
    ok = St.run_predictions(fake_run(tmp_path / "ok", ids, Y[:6], PB[:6], folds=2, arch="sam", fingerprint="fp"))
    assert ok.attrs == {"rundir": str(tmp_path / "ok"), "arch": "sam", "fingerprint": "fp", "label": "ok"}
    assert list(ok.columns) == ["nodule_id", "patient_id", "index", "fold", "prob", "y"]
    assert ok["fold"].tolist() == [0, 0, 0, 1, 1, 1] and ok["index"].tolist() == [0, 2, 4, 1, 3, 5]
    assert ok["patient_id"].tolist() == ["P00", "P02", "P04", "P01", "P03", "P05"]
    assert ok.index.tolist() == list(range(6)) and ok["y"].dtype.kind == "i"  # one row index over the folds


def test_reader_comparison_rows_attrs_and_per_nodule_detail(tmp_path, tiny_dataset):
    """The ratings of test_stats.py's hand example: every reader row's numbers from the reader's
    calls and the leave-one-out reference, the intervals and p from the same seed, the attrs."""
    import h5py
    from test_stats import R6

    from nodulekit.datasets import dataset_fingerprint, load_dataset

    with h5py.File(tiny_dataset, "a") as f:
        ratings = np.full(f["reader_malignancy"].shape, np.nan, np.float32)
        ratings[:6] = R6
        ratings[6] = [4, np.nan, np.nan, np.nan]  # one reader only: too few others for them
        f["reader_malignancy"][...] = ratings
        y = f["y"][()]
        y[:6] = [1, 1, 1, 0, 0, 0]
        f["y"][...] = y
        ids = [v.decode() for v in f["nodule_id"][()]]
        patients = np.array([v.decode() for v in f["patient_id"][()]])
    ds = load_dataset(tiny_dataset)
    prob = np.where(y == 1, 0.8, 0.2)
    prob[0], prob[3], prob[8] = 0.3, 0.6, 0.7  # model calls B, M, M, M, B, B on 0..5; nodule 8 a false call
    run = fake_run(tmp_path / "run", ids, y, prob, folds=5, fingerprint=dataset_fingerprint(ds), identity=ds.identity)
    table = St.reader_comparison(run, tiny_dataset, n_resamples=60, seed=3)
    assert table.attrs["rule"] == (3.0, 3.0, 2) and table.attrs["n"] == 40 and table.attrs["arch"] == "hesam"
    assert (table.attrs["n_resamples"], table.attrs["seed"], table.attrs["rundir"]) == (60, 3, str(run))
    assert table.attrs["dataset"] == str(tiny_dataset)
    assert list(table["who"]) == ["reader 1", "reader 2", "reader 3", "reader 4", "all readers", "model"]
    cols = list(table.columns)
    assert cols[cols.index("p_patients") + 1] == "p_patients_holm"
    assert table["p_patients_holm"].iloc[4:].isna().all()
    calls = St.reader_calls(ratings)
    ref = St.leave_one_reader_out(ratings, min_others=2)
    model_call = (prob > 0.5).astype(int)
    r1 = table.iloc[0]
    assert (r1["n_rated"], r1["n_too_few_others"], r1["n_indeterminate_others"]) == (7, 1, 0)
    compared = (calls[:, 0] >= 0) & (ref[:, 0] >= 0)
    right_r, right_m = calls[compared, 0] == ref[compared, 0], model_call[compared] == ref[compared, 0]
    boot = St.cluster_bootstrap(
        patients[compared],
        lambda w: np.stack([w @ right_r, w @ right_m, w @ (right_r * 1.0 - right_m)]) / w.sum(1),
        n_resamples=60,
        seed=3,
    )
    for i, name in enumerate(("reader_accuracy", "model_accuracy", "accuracy_diff")):
        assert r1[name] == pytest.approx(boot["estimate"][i])
        assert (r1[f"{name}_low"], r1[f"{name}_high"]) == (
            pytest.approx(boot["low"][i]),
            pytest.approx(boot["high"][i]),
        )
    flip = St.cluster_sign_flip_test(right_r * 1.0 - right_m, patients[compared], seed=3)
    assert r1["p_patients"] == pytest.approx(flip["p_value"]) and r1["n_patients"] == len(set(patients[compared]))
    assert (r1["model_fp"], r1["model_fn"]) == (
        int(((model_call[compared] == 1) & (ref[compared, 0] == 0)).sum()),
        int(((model_call[compared] == 0) & (ref[compared, 0] == 1)).sum()),
    )
    assert r1["model_accuracy_vs_label"] == pytest.approx((model_call[compared] == y[compared]).mean())
    model = table.iloc[5]
    mboot = St.cluster_bootstrap(patients, lambda w: (w @ (model_call == y)) / w.sum(1)[None], n_resamples=60, seed=3)
    assert (model["model_accuracy"], model["model_accuracy_low"], model["model_accuracy_high"]) == (
        pytest.approx(37 / 40),  # wrong on nodules 0 (missed), 3 and 8 (false calls)
        pytest.approx(mboot["low"][0]),
        pytest.approx(mboot["high"][0]),
    )
    assert (model["model_fp"], model["model_fn"], model["n_patients"], model["n_compared"]) == (2, 1, 20, 40)
    assert model["model_accuracy_vs_label"] == pytest.approx(37 / 40)
    per = table.attrs["per_nodule"]
    assert list(per.columns[:5]) == ["nodule_id", "patient_id", "fold", "y", "malignancy_mean"]
    assert list(per.columns[5:8]) == ["reader1_rating", "reader1_call", "reader1_others_label"]
    assert list(per.columns[-2:]) == ["model_prob", "model_call"]
    row6 = per.set_index("nodule_id").loc[ids[6]]
    assert (row6.reader1_rating, row6.reader1_call, row6.reader1_others_label) == (
        4.0,
        "malignant",
        "too few other readers",
    )
    assert (row6.reader2_call, row6.reader2_others_label) == ("not rated", "too few other readers")
    assert row6.model_prob == prob[6] and row6.model_call == ("malignant" if prob[6] > 0.5 else "benign")

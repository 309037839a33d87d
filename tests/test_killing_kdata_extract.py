"""extract on a synthetic source of non-square pixels, checked against the one model-input function
(predict's), and what a rois file records of each nodule; the parts folder and its input stamps."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from nodulekit import extract
from nodulekit.cohort import LabelRule, NoduleRecord, class_counts
from nodulekit.datasets import build_dataset, load_dataset
from nodulekit.errors import DataError, NodulekitError
from nodulekit.extract import extract_rois, input_stamp, part_is_current
from nodulekit.inputs import model_input, paper_spec
from nodulekit.sources import DataSource, SourceNodule, Unit, Volume, record_of, safe_key, unit_record

ROW_MM, COL_MM, Z_MM = 0.6, 0.9, 1.5  # rows and columns of different sizes
SHAPE = (60, 44, 24)
CENTRE = (29.3, 21.6, 11.4)  # row, col, slice
RADII_MM = (3.0, 4.0, 5.0)


def _ball(radius_mm: float) -> np.ndarray:
    r, c, s = np.indices(SHAPE, dtype=float)
    d2 = ((r - CENTRE[0]) * ROW_MM) ** 2 + ((c - CENTRE[1]) * COL_MM) ** 2 + ((s - CENTRE[2]) * Z_MM) ** 2
    return d2 <= radius_mm**2


def _volume_hu(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r, c, s = np.indices(SHAPE, dtype=float)
    hu = -850.0 + 6.0 * r - 4.0 * c + 3.0 * s + rng.normal(0, 15, SHAPE)
    hu[_ball(4.0)] = 30.0 + rng.normal(0, 10, int(_ball(4.0).sum()))
    return np.rint(hu).astype(np.int16)


class AnisoSource(DataSource):
    """Four synthetic scans with 0.6 x 0.9 mm pixels, one nodule each (two malignant, two benign)."""

    name = "aniso"
    unit_name = "scan"

    def plan(self, rule, patients=None, workers=1, progress=True):
        units, records = [], []
        for i in range(4):
            rec = NoduleRecord(
                patient_id=f"A{i}",
                series_uid=f"1.2.9.{i}",
                study_uid="1.2.9",
                cluster_index=1,
                annotation_ids=[1, 2, 3],
                reader_malignancy=[5.0, 4.0, 5.0] if i % 2 else [1.0, 2.0, 1.0],
                reader_characteristics=[[3.0] * 8] * 3,
                reader_diameter_mm=[2 * r for r in RADII_MM],
                centroid_ijk=list(CENTRE),
                pixel_spacing_mm=ROW_MM,
                slice_thickness_mm=Z_MM,
                slice_spacing_mm=Z_MM,
                n_slices=SHAPE[2],
            ).labelled(rule)
            records.append(rec)
            units.append(Unit(safe_key(rec.nodule_id), self, rec.patient_id, rec.series_uid, [unit_record(rec)]))
        return units, [], class_counts(records)

    def read(self, unit):
        i = int(unit.patient_id[1:])
        zvals = -40.0 + Z_MM * np.arange(SHAPE[2])
        vol = Volume(_volume_hu(i), zvals, (ROW_MM, COL_MM), (-100.0, 50.0), unit.patient_id, unit.series_uid)
        agreement = sum(_ball(r).astype(np.uint8) for r in RADII_MM)
        raw = unit.records[0]
        return vol, [SourceNodule(raw["nodule_id"], record_of(raw), agreement, (0, 0, 0), Z_MM)]


@pytest.fixture(scope="module")
def aniso_rois(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aniso")
    (folder / "src").mkdir()
    out = folder / "rois.h5"
    res = extract_rois(out, source=AnisoSource(folder / "src"), rule=LabelRule(), progress=False)
    assert res.errors == [] and res.n_nodules == 4
    return out


def test_build_from_extract_gives_predicts_input_for_non_square_pixels(aniso_rois, tmp_path):
    """extract -> build and predict's model_input are one computation: the same x, also when a pixel's
    rows and columns differ in size (the rois file must carry both)."""
    ds = load_dataset(build_dataset(aniso_rois, tmp_path / "d3.h5", channels=3, n_folds=2, progress=False))
    with h5py.File(aniso_rois) as f:
        for i, nid in enumerate(ds.nodule_id):
            g = f["nodules"][nid.replace(":", "_")]
            row, col, kk = g.attrs["centre_voxel"]
            vol_z = -40.0 + Z_MM * np.arange(SHAPE[2])
            direct = model_input(
                _volume_hu(int(nid[1])),
                vol_z,
                (ROW_MM, COL_MM),
                (row, col),
                float(np.interp(kk, np.arange(SHAPE[2]), vol_z)),
                float(g.attrs["diameter_mm"]),
                paper_spec(3),
            )
            np.testing.assert_allclose(ds.x[i], direct.x, atol=1e-6)
            np.testing.assert_allclose(ds.pixel_mm[i], direct.pixel_mm)


def test_what_the_rois_file_records_of_a_nodule(aniso_rois):
    consensus = _ball(4.0)  # two of three readers (level 0.5): the 4 mm contour
    idx = np.argwhere(consensus)
    with h5py.File(aniso_rois) as f:
        assert list(f["nodules"]) == ["A0_1", "A1_1", "A2_1", "A3_1"]
        np.testing.assert_array_equal(f["label"][()], [0, 1, 0, 1])
        g = f["nodules/A1_1"]
        a = g.attrs
        np.testing.assert_allclose(a["centre_voxel"], idx.mean(axis=0))
        row, col, kk = idx.mean(axis=0)
        np.testing.assert_allclose(a["centre_mm"], [-100.0 + col * COL_MM, 50.0 + row * ROW_MM, -40.0 + kk * Z_MM])
        volume = consensus.sum() * ROW_MM * COL_MM * Z_MM
        assert a["consensus_voxels"] == consensus.sum()
        assert a["consensus_volume_mm3"] == pytest.approx(volume)
        assert a["diameter_mm"] == pytest.approx((6 * volume / np.pi) ** (1 / 3))
        assert a["reader_mean_diameter_mm"] == pytest.approx(8.0) and a["n_readers"] == 3
        assert a["consensus_level"] == 0.5 and a["consensus_min_readers"] == 2
        assert a["source_slice_spacing_mm"] == Z_MM and a["z_step_mm"] == 1.0
        assert list(a["z_offsets_mm"]) == [float(v) for v in range(-10, 11)]
        side = g["hu"].shape[1]
        assert side == 2 * int(np.ceil(max(4.5 * a["diameter_mm"], 16.0) / ROW_MM) / 2) + 1 or side % 2 == 1
        assert side * ROW_MM >= 4.5 * a["diameter_mm"]  # the smaller spacing sizes the window
        assert list(a["window_origin_rc"]) == [round(row) - side // 2, round(col) - side // 2]
        np.testing.assert_allclose(
            a["centre_in_window"], [row - a["window_origin_rc"][0], col - a["window_origin_rc"][1]]
        )
        assert a["z_filled"] == len(a["z_filled_offsets_mm"])
        assert a["inplane_filled"] == side * side - np.diff(a["valid_rows"])[0] * np.diff(a["valid_cols"])[0]
        assert a["fill_method"] == extract.FILL_METHOD
        np.testing.assert_array_equal(g["mask"][()], g["agreement"][()] >= 2)
        assert "record" not in a
        assert f.attrs["source"] == "aniso" and f.attrs["mask_sampling"] == extract.MASK_SAMPLING
        assert f.attrs["consensus_level"] == 0.5
        np.testing.assert_allclose(f["diameter_mm"][1], a["diameter_mm"])
        np.testing.assert_allclose(f["reader_mean_diameter_mm"][()], [8.0] * 4)
        assert f["diameter_mm"].attrs["meaning"].startswith("equivalent diameter of the consensus mask; ")
        assert "not the one used for cropping" in f["reader_mean_diameter_mm"].attrs["meaning"]
        prov = json.loads(f.attrs["provenance"])
        assert prov["source"] == "aniso" and prov["failed"] == [] and prov["consensus_level"] == 0.5
        assert prov["class_counts"] == {"benign": 2, "malignant": 2}
        assert prov["window"] == "max(4.5 x diameter, 16.0 mm)"
        assert prov["fill_method"] == extract.FILL_METHOD and prov["mask_sampling"] == extract.MASK_SAMPLING


def test_exactly_one_source_is_required(tmp_path):
    for kwargs in ({}, {"lidc_root": tmp_path, "vois": tmp_path}):
        with pytest.raises(NodulekitError) as err:
            extract_rois(tmp_path / "r.h5", progress=False, **kwargs)
        assert str(err.value) == "give exactly one source: --lidc-root DIR or --vois DIR"
    assert type(extract._the_source(tmp_path, None, None)).__name__ == "DicomSource"
    assert type(extract._the_source(None, tmp_path, None)).__name__ == "VoiSource"


def test_input_stamps_notice_a_changed_added_or_removed_file(tmp_path):
    a, b = tmp_path / "s" / "a.dcm", tmp_path / "s" / "b.dcm"
    a.parent.mkdir()
    a.write_bytes(b"1")
    b.write_bytes(b"22")
    (tmp_path / "s" / ".hidden.dcm").write_bytes(b"x")
    stamp = input_stamp([a], dicom=True)  # a DICOM series: every .dcm of its folder counts
    assert sorted(stamp["files"]) == [str(a), str(b)] and stamp["dirs"] == [str(a.parent)]
    assert stamp["files"][str(b)] == [2, b.stat().st_mtime_ns]
    assert extract._stamp_current(stamp)
    c = tmp_path / "s" / "c.dcm"
    c.write_bytes(b"3")
    assert not extract._stamp_current(stamp)  # a slice added
    c.unlink()
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))
    assert not extract._stamp_current(stamp)  # a slice touched
    plain = input_stamp([a, b])
    assert plain["dirs"] == [] and sorted(plain["files"]) == [str(a), str(b)]
    assert extract._stamp_current(plain)
    b.write_bytes(b"333")
    assert not extract._stamp_current(plain)  # a file of another size
    b.unlink()
    assert not extract._stamp_current(plain)  # a file gone
    assert not extract._stamp_current({"files": {}})  # a stamp without its keys
    assert extract._stamp_current({"files": {}, "dirs": []})


def test_a_part_file_is_current_only_when_readable_and_stamped(tmp_path):
    src = tmp_path / "in.nii"
    src.write_bytes(b"data")
    part = tmp_path / "p.h5"
    with h5py.File(part, "w") as f:
        f.attrs["inputs"] = json.dumps(input_stamp([src]))
    assert part_is_current(part)
    src.write_bytes(b"other data")
    assert not part_is_current(part)
    with h5py.File(part, "w") as f:
        f.attrs["inputs"] = "{not json"
    assert not part_is_current(part)
    with h5py.File(part, "w") as f:
        f.attrs["other"] = 1
    assert not part_is_current(part)
    part.write_bytes(b"not hdf5")
    assert not part_is_current(part)
    assert not part_is_current(tmp_path / "missing.h5")


def test_the_parts_folder_is_kept_for_the_same_extraction_only(tmp_path):
    src = AnisoSource(tmp_path)
    out = tmp_path / "rois.h5"
    parts = extract._parts_folder(out, src, LabelRule(), 0.5)
    assert parts == tmp_path / ".rois.h5.parts" and parts.is_dir()
    config = json.loads((parts / "config.json").read_text())
    assert config == {
        "schema": 3,
        "source": "aniso",
        "source_path": str(tmp_path.resolve()),
        "label_rule": LabelRule().as_dict(),
        "z_offsets_mm": [float(v) for v in range(-10, 11)],
        "window_diameters": 4.5,
        "min_window_mm": 16.0,
        "consensus_level": 0.5,
    }
    (parts / "u.h5").write_bytes(b"a finished unit")
    assert (extract._parts_folder(out, src, LabelRule(), 0.5) / "u.h5").exists()  # same options: kept
    assert not (extract._parts_folder(out, src, LabelRule(), 0.75) / "u.h5").exists()  # another level: emptied
    (parts / "u.h5").write_bytes(b"a finished unit")
    (parts / "config.json").write_text("{broken")
    assert not (extract._parts_folder(out, src, LabelRule(), 0.75) / "u.h5").exists()


def test_a_failed_run_keeps_finished_parts_and_says_so(tmp_path):
    from nodulekit.errors import WriteFailed

    parts = tmp_path / ".o.h5.parts"
    parts.mkdir()
    exc = extract._keep_or_drop_parts(parts, tmp_path / "o.h5", WriteFailed("x", reason="disk full"))
    assert not parts.exists() and str(exc) == f"could not write {tmp_path / 'o.h5'}: disk full"
    parts.mkdir()
    (parts / "a.h5").write_bytes(b"1")
    (parts / "b.h5").write_bytes(b"1")
    exc = extract._keep_or_drop_parts(parts, tmp_path / "o.h5", WriteFailed("x", reason="disk full"))
    assert str(exc) == (
        f"could not write {tmp_path / 'o.h5'}: disk full; 2 finished unit(s) are kept in {parts} and a re-run resumes"
    )
    assert exc.reason == "disk full" and parts.exists()
    other = DataError("bad")
    assert extract._keep_or_drop_parts(parts, tmp_path / "o.h5", other) is other


def test_nothing_extracted_names_the_first_error(tmp_path):
    class Broken(AnisoSource):
        def read(self, unit):
            raise DataError(f"{unit.patient_id} is unreadable")

    lines = []
    with pytest.raises(DataError) as err:
        extract_rois(tmp_path / "r.h5", source=Broken(tmp_path), progress=False, report=lines.append)
    assert str(err.value) == (
        f"no nodule could be extracted from {tmp_path.resolve()} (4 error(s), first: A0_1: A0 is unreadable)"
    )
    assert lines[0] == "nodulekit: skipped A0_1: A0 is unreadable" and len(lines) == 4
    assert not (tmp_path / "r.h5").exists() and not (tmp_path / ".r.h5.parts").exists()

    class Nothing(AnisoSource):
        def plan(self, rule, patients=None, workers=1, progress=True):
            return [], ["line 3: not usable"], {"benign": 0, "malignant": 0}

    lines = []
    with pytest.raises(DataError) as err:
        extract_rois(tmp_path / "r.h5", source=Nothing(tmp_path), progress=False, report=lines.append)
    assert (
        str(err.value)
        == f"no nodule could be extracted from {tmp_path.resolve()} (1 error(s), first: line 3: not usable)"
    )
    assert lines == ["nodulekit: skipped line 3: not usable"]


def test_an_unexpected_error_of_one_unit_is_reported_with_its_type(tmp_path):
    class Odd(AnisoSource):
        def read(self, unit):
            if unit.patient_id == "A2":
                raise ValueError("odd bytes")
            return super().read(unit)

    lines = []
    res = extract_rois(tmp_path / "r.h5", source=Odd(tmp_path), progress=False, report=lines.append)
    assert res.n_nodules == 3 and res.errors == ["A2_1: ValueError: odd bytes"]
    assert lines == ["nodulekit: skipped A2_1: ValueError: odd bytes"]
    assert (tmp_path / ".r.h5.parts").is_dir()  # kept: a re-run redoes only the failed unit
    with h5py.File(tmp_path / "r.h5") as f:
        assert json.loads(f.attrs["provenance"])["failed"] == ["A2_1: ValueError: odd bytes"]


def test_the_rois_table_is_in_patient_series_cluster_order_whatever_the_plan(tmp_path):
    from nodulekit.artifacts import read_strings

    class Reversed(AnisoSource):
        def plan(self, rule, patients=None, workers=1, progress=True):
            units, errors, counts = super().plan(rule, patients, workers, progress)
            return units[::-1], errors, counts

    out = tmp_path / "r.h5"
    extract_rois(out, source=Reversed(tmp_path), progress=False)
    with h5py.File(out) as f:
        assert read_strings(f["nodule_id"]) == ["A0:1", "A1:1", "A2:1", "A3:1"]
        assert read_strings(f["patient_id"]) == ["A0", "A1", "A2", "A3"]
        np.testing.assert_array_equal(f["label"][()], [0, 1, 0, 1])

    class Twice(AnisoSource):
        def plan(self, rule, patients=None, workers=1, progress=True):
            units, errors, counts = super().plan(rule, patients, workers, progress)
            twin = Unit("copy", self, units[0].patient_id, units[0].series_uid, list(units[0].records))
            return units + [twin], errors, counts

    with pytest.raises(NodulekitError, match=r"^internal: duplicate nodule ids in extraction$"):
        extract_rois(tmp_path / "t.h5", source=Twice(tmp_path), progress=False)
    assert not (tmp_path / "t.h5").exists()

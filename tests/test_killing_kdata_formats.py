"""CT formats and scans on grids where a wrong axis, sign or bound shows: oblique axes tilted in
two planes with voxels of three sizes, a direction component exactly at the tolerance, points
outside the scan's slices, and each refusal's text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nodulekit import scans
from nodulekit.errors import DataError
from nodulekit.sources import Volume, formats
from nodulekit.sources.formats import AXIS_TOL, check_affine, check_axis_aligned, check_voxels
from tests.scan_fixtures import ORIGIN, SHAPE, SPACING, canonical_ct, stored_variant, write_nifti


def _rotation(about_z_deg: float, about_x_deg: float) -> np.ndarray:
    a, b = np.radians(about_z_deg), np.radians(about_x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _affine(rot: np.ndarray, sizes=(0.5, 0.8, 2.5)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rot * np.asarray(sizes)  # column j: axis j's direction times its voxel size
    affine[:3, 3] = (-10.0, 20.0, 30.0)
    return affine


def _reported_angle(affine: np.ndarray) -> str:
    with pytest.raises(DataError) as err:
        check_axis_aligned(affine, Path("ct.nii"))
    text = str(err.value)
    assert text.startswith("ct.nii has an oblique grid (an axis is rotated ")
    assert text.endswith(
        " degrees from the scanner axes); resample it to an axis-aligned grid first (e.g. with ITK or 3D Slicer)"
    )
    return text.split("rotated ")[1].split(" degrees")[0]


@pytest.mark.parametrize("about_z, about_x", [(3.0, 0.0), (0.0, 7.0), (3.0, 7.0), (20.0, 1.0)])
def test_the_reported_tilt_is_that_of_the_most_tilted_unit_axis(about_z, about_x):
    rot = _rotation(about_z, about_x)
    # By hand: the largest of the two smaller components of the unit axes is the sine of the largest tilt.
    expected = np.degrees(np.arcsin(np.sort(np.abs(rot), axis=0)[:2].max()))
    assert _reported_angle(_affine(rot)) == f"{expected:.2g}"


def test_a_tilt_in_two_planes_is_measured_on_the_axes_not_the_rows():
    # Columns normalised by their own length give the tilt; dividing by row lengths (or scaling by
    # the voxel sizes) would change it when the voxel sizes differ this much.
    rot = _rotation(30.0, 40.0)
    assert (
        _reported_angle(_affine(rot, sizes=(0.4, 1.0, 5.0)))
        == f"{np.degrees(np.arcsin(np.sort(np.abs(rot), axis=0)[:2].max())):.2g}"
    )
    assert _reported_angle(_affine(rot, sizes=(0.4, 1.0, 5.0))) == "40"


def test_a_component_exactly_at_the_tolerance_is_still_axis_aligned():
    a = np.sqrt(1 - AXIS_TOL**2)
    affine = np.diag([2.5, 0.7, 0.7, 1.0])
    affine[:3, 0] = [a * 2.5, AXIS_TOL * 2.5, 0.0]
    unit = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    assert unit[1, 0] == AXIS_TOL  # the fixture sits exactly on the bound
    check_axis_aligned(affine, Path("ct.nii"))
    affine[1, 0] *= 1.5
    with pytest.raises(DataError, match="oblique grid"):
        check_axis_aligned(affine, Path("ct.nii"))


def test_flipped_and_permuted_axes_with_unequal_voxels_are_axis_aligned():
    perm = np.array([[0, -1, 0], [0, 0, 1], [-1, 0, 0]], float)
    check_axis_aligned(_affine(perm, sizes=(0.5, 0.8, 2.5)), Path("ct.nii"))


def test_voxel_checks_name_the_file_and_the_problem():
    p = Path("v.nii")
    with pytest.raises(DataError) as err:
        check_voxels(np.zeros((3, 3, 3), np.complex64), p, "scan")
    assert str(err.value) == "scan v.nii holds complex64 voxels, not grey values; a CT has one number per voxel"
    rgb = np.zeros((3, 3, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(DataError) as err:
        check_voxels(rgb, p, "mask")
    assert str(err.value) == "mask v.nii holds colour (RGB) voxels, not grey values; a CT has one number per voxel"
    data = np.zeros((3, 3, 3), np.float32)
    data[0, 0, 0], data[1, 1, 1] = np.inf, np.nan
    with pytest.raises(DataError) as err:
        check_voxels(data, p, "scan")
    assert str(err.value) == "scan v.nii holds 2 NaN or infinite voxel value(s) of 27"
    with pytest.raises(DataError) as err:
        check_voxels(np.zeros((3, 3, 3, 2, 1)), p, "scan")
    assert str(err.value) == "scan v.nii is a 4-D series of 2 volumes; give one 3-D CT volume"
    with pytest.raises(DataError) as err:
        check_voxels(np.zeros((3, 1, 3)), p, "scan")
    assert str(err.value) == "scan v.nii is a 2-D image (shape (3, 1, 3)); a 3-D CT volume is needed"
    # trailing axes of length one go; two voxels a side are enough; booleans and integers are grey values
    assert check_voxels(np.zeros((2, 2, 2, 1, 1), bool), p, "scan").shape == (2, 2, 2)
    assert check_voxels(np.zeros((2, 3, 4), np.uint8), p, "scan").shape == (2, 3, 4)


def test_affine_checks_name_the_file_and_the_sizes():
    p = Path("a.nii")
    bad = np.eye(4)
    bad[0, 3] = np.nan
    with pytest.raises(DataError, match=r"^scan a.nii has a voxel-to-world affine with NaN or infinite entries$"):
        check_affine(bad, p, "scan")
    with pytest.raises(DataError, match="NaN or infinite entries"):
        check_affine(np.eye(3), p, "scan")
    flat = np.diag([0.7, 0.7, 2.0, 1.0])
    flat[:3, 2] = [0.7, 0.0, 0.0]  # the third axis along the first: singular
    with pytest.raises(DataError) as err:
        check_affine(flat, p, "scan")
    assert str(err.value) == "scan a.nii has a singular voxel-to-world affine (voxel sizes [0.7, 0.7, 0.7] mm)"
    zero = np.diag([0.7, 0.0, 2.0, 1.0])
    with pytest.raises(DataError, match="singular"):
        check_affine(zero, p, "scan")
    with pytest.raises(DataError) as err:
        check_affine(np.diag([0.7, 0.7, 25.0, 1.0]), p, "mask")
    assert str(err.value) == "mask a.nii has an implausible voxel size of 25 mm (a CT's lie in 0.01-20 mm)"
    check_affine(np.diag([0.01, 20.0, 2.0, 1.0]), p, "scan")  # both ends of the range are plausible
    with pytest.raises(DataError, match="implausible voxel size of 0.0099 mm"):
        check_affine(np.diag([0.0099, 1.0, 1.0, 1.0]), p, "scan")


def test_format_lookup_by_ending_and_for_folders(tmp_path):
    assert formats.format_of(tmp_path / "x.NII.GZ").name == "nifti"
    assert formats.format_of(tmp_path / "x.nii").name == "nifti"
    assert formats.format_of(tmp_path).name == "dicom"
    with pytest.raises(DataError) as err:
        formats.format_of(tmp_path, "mask")
    assert str(err.value).startswith(f"mask {tmp_path} is a folder; give a file (")
    with pytest.raises(DataError) as err:
        formats.format_of(tmp_path / "x.png")
    assert str(err.value) == (
        f"scan {tmp_path / 'x.png'} is not a format nodulekit reads (accepted: {formats.accepted_text()})"
    )
    text = formats.accepted_text()
    assert ".nii, .nii.gz (" in text and text.endswith("a folder (a DICOM series)")
    assert formats.strip_suffix(Path("1.2.3.MHD"), [".mhd", ".d"]) == "1.2.3"
    assert formats.strip_suffix(Path("scan.nii.gz"), [".gz", ".nii.gz"]) == "scan"
    assert formats.strip_suffix(Path("scan.raw"), [".mhd"]) == "scan"


def test_reorient_keeps_unequal_spacings_on_their_axes(tmp_path):
    hu = canonical_ct()
    stored, affine = stored_variant(hu, (2, 0, 1), (1,))
    vol = formats.read_volume(write_nifti(tmp_path / "ct.nii.gz", stored, affine))
    np.testing.assert_array_equal(vol.hu, hu)
    assert vol.pixel_spacing == pytest.approx((0.8, 0.7)) and vol.slice_spacing == pytest.approx(2.0)
    assert isinstance(vol, Volume)


def _scan_of(tmp_path) -> scans.Scan:
    stored, affine = stored_variant(canonical_ct())
    return scans.read_scan(write_nifti(tmp_path / "ct.nii.gz", stored, affine))


def test_points_beyond_the_first_and_last_slice_extrapolate_with_the_end_spacing(tmp_path):
    scan = _scan_of(tmp_path)
    vol = scan.volume
    vol.zvals = np.array([0.0, 1.0, 3.0, 6.0] + [6.0 + 4.0 * i for i in range(1, vol.shape[2] - 3)])
    last = vol.zvals[-1]
    x0, y0 = vol.origin_xy
    for rck, z in [
        ((1, 2, -1.5), -1.5),
        ((0, 0, 1.5), 2.0),
        ((0, 0, 2.25), 3.75),
        ((0, 0, vol.shape[2] + 0.5), last + 6.0),
    ]:
        lps = scan.voxel_to_lps(rck)
        np.testing.assert_allclose(lps, [x0 + rck[1] * 0.7, y0 + rck[0] * 0.8, z])
        np.testing.assert_allclose(scan.lps_to_voxel(lps), rck)
    np.testing.assert_allclose(scan.lps_to_voxel((x0, y0, vol.zvals[0])), [0, 0, 0])
    np.testing.assert_allclose(scan.lps_to_voxel((x0, y0, last)), [0, 0, vol.shape[2] - 1])


def test_extent_text_and_description(tmp_path):
    scan = _scan_of(tmp_path)
    assert scan.extent_text("voxel") == "voxel indices -0.5..23.5, -0.5..27.5, -0.5..13.5"
    lo = [ORIGIN[0] - SPACING[1] / 2, ORIGIN[1] - SPACING[0] / 2, ORIGIN[2] - SPACING[2] / 2]
    hi = [ORIGIN[0] + (SHAPE[1] - 0.5) * SPACING[1], ORIGIN[1] + (SHAPE[0] - 0.5) * SPACING[0]]
    hi.append(ORIGIN[2] + (SHAPE[2] - 0.5) * SPACING[2])

    def numbers(text: str, suffix: str) -> list[float]:
        assert text.endswith(suffix) and [part.split()[0] for part in text.split(", ")] == ["x", "y", "z"]
        return [float(v) for part in text[: -len(suffix)].split(", ") for v in part.split()[1].split("..")]

    # one decimal each: a bound at x.x5 may round either way from float noise, so compare within 0.05
    expected_lps = [lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]]
    np.testing.assert_allclose(numbers(scan.extent_text("lps"), " mm LPS"), expected_lps, atol=0.051)
    expected_ras = [-hi[0], -lo[0], -hi[1], -lo[1], lo[2], hi[2]]
    np.testing.assert_allclose(numbers(scan.extent_text("ras"), " mm RAS"), expected_ras, atol=0.051)
    assert scan.describe() == "ct.nii.gz (nifti, 24x28x14 voxels, 0.8x0.7x2 mm)"
    assert scan.kind == "nifti" and scan.spacing == pytest.approx((0.8, 0.7, 2.0))


def test_label_image_refusals_say_how_the_grids_differ(tmp_path):
    stored, affine = stored_variant(canonical_ct())
    scan = scans.read_scan(write_nifti(tmp_path / "ct.nii.gz", stored, affine))
    labels = np.zeros(stored.shape, np.uint8)
    labels[2:4, 2:4, 2:4] = 1
    with pytest.raises(DataError) as err:
        scans.read_label_image(write_nifti(tmp_path / "s.nii", labels[:, :-2], affine), scan)
    assert str(err.value).endswith(
        "it covers another physical space (24x26x14 voxels in the scan's order, the scan 24x28x14)"
    )
    moved = affine.copy()
    moved[:3, 3] += [0.07, 0.0, 0.0]  # a tenth of the smallest voxel (0.7 mm): still the same grid
    assert scans.read_label_image(write_nifti(tmp_path / "ok.nii", labels, moved), scan).sum() == 8
    moved[:3, 3] += [0.0, 0.0, 0.2]
    with pytest.raises(DataError) as err:
        scans.read_label_image(write_nifti(tmp_path / "m.nii", labels, moved), scan)
    assert str(err.value).endswith("(its voxels lie up to 0.2 mm from the scan's)")
    negative = labels.astype(np.int16)
    negative[0, 0, 0] = -1
    with pytest.raises(DataError) as err:
        scans.read_label_image(write_nifti(tmp_path / "n.nii", negative, affine), scan)
    assert str(err.value) == f"mask {tmp_path / 'n.nii'} is not a label image (values must be whole numbers >= 0)"
    with pytest.raises(DataError) as err:
        scans.read_label_image(write_nifti(tmp_path / "z.nii", np.zeros_like(labels), affine), scan)
    assert str(err.value) == f"mask {tmp_path / 'z.nii'} is empty (no voxel above 0)"

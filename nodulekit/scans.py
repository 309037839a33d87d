"""Reading a user's own chest CT for ``nodulekit predict``: any registered CT format (NIfTI, a DICOM
series folder, MetaImage, NRRD; :mod:`nodulekit.sources.formats`).

The scan becomes a :class:`nodulekit.sources.Volume` on the convention extraction uses
(``hu[row, col, slice]``, rows towards posterior, columns towards patient left, slices by
increasing z; LPS millimetres), so predict samples nodules with exactly the code of
``extract``. What the file says about geometry is the truth:

- NIfTI: the affine (sform or qform, as nibabel chooses), in any axis order and any
  axis direction; RAS world as the format defines it.
- DICOM: ImagePositionPatient / ImageOrientationPatient / PixelSpacing of every slice,
  slices sorted by their position along the slice normal whatever the file names or
  order; stored values turned into HU through the modality LUT (RescaleSlope/Intercept
  or a Modality LUT Sequence). The reader is extraction's (:func:`nodulekit.sources.dicom.read_series`).
- MetaImage / NRRD (SimpleITK): origin, direction and spacing, in ITK's LPS world.

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
from nodulekit.sources import Image, Volume, check_ct_intensities, read_image
from nodulekit.sources.formats import VOLUME_AXES, check_axis_aligned, reorient


@dataclass
class Scan:
    """A CT volume in extraction's convention plus the way back to the file's own grid.

    ``src_shape`` and ``src_affine_ras`` describe the grid as stored (NIfTI array order;
    for DICOM: column, row, slice sorted along the normal). ``ornt`` is nibabel's
    orientation transform from that grid to ``volume.hu``'s.
    """

    volume: Volume
    path: Path
    kind: str  # the registered format that read it: "nifti", "dicom", "metaimage", "nrrd", ...
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
    """A CT in any registered format (NIfTI, a DICOM series folder, MetaImage, NRRD, ...), checked as CT."""
    path = Path(path)
    image = read_image(path, "scan")
    scan = scan_from_image(image, path)
    check_ct_intensities(scan.volume.hu, path)
    return scan


def scan_from_image(image: Image, path: Path) -> Scan:
    """Reorient a format's stored grid to extraction's convention, keeping the way back."""
    vol, transform = reorient(image, path)
    affine = np.asarray(image.affine_ras, float)
    return Scan(vol, path, image.format, tuple(image.data.shape), affine, transform, image.series_uid, image.notes)


# ----------------------------------------------------------------------------- label images


def read_label_image(path: str | Path, scan: Scan) -> np.ndarray:
    """A label image in the scan's physical space, in any voxel order: int [row, col, slice] on the volume grid.

    Any registered format; stored in another axis order or direction than the scan (a NIfTI
    mask of a DICOM scan, an LPS NRRD of a RAS NIfTI), it is reoriented without
    interpolation. A mask covering another physical space is refused: it would need resampling.
    """
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    path = Path(path)
    image = read_image(path, "mask")
    data, affine = image.data, np.asarray(image.affine_ras, float)
    if np.any(data != np.round(data)) or np.any(data < 0):
        raise DataError(f"mask {path} is not a label image (values must be whole numbers >= 0)")
    check_axis_aligned(affine, path)
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(VOLUME_AXES))
    labels = apply_orientation(data.astype(np.int32), transform)
    moved = _grid_mismatch_mm(
        labels.shape, affine @ inv_ornt_aff(transform, data.shape), scan.volume.shape, _volume_affine(scan)
    )
    if moved is not None:
        raise DataError(f"mask {path} is not on the scan's grid: it covers another physical space ({moved})")
    if not labels.any():
        raise DataError(f"mask {path} is empty (no voxel above 0)")
    return labels


def _volume_affine(scan: Scan) -> np.ndarray:
    from nibabel.orientations import inv_ornt_aff

    return scan.src_affine_ras @ inv_ornt_aff(scan.ornt, scan.src_shape)


def _grid_mismatch_mm(shape, affine, ref_shape, ref_affine) -> str | None:
    """Why two grids (already in one voxel order) differ, or None when every voxel centre agrees
    to a tenth of the smallest voxel."""
    if tuple(shape) != tuple(ref_shape):
        return f"{'x'.join(map(str, shape))} voxels in the scan's order, the scan {'x'.join(map(str, ref_shape))}"
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    )
    moved = float(np.abs(corners @ (affine - ref_affine).T).max())
    tol = 0.1 * float(np.linalg.norm(ref_affine[:3, :3], axis=0).min())
    return None if moved <= tol else f"its voxels lie up to {moved:.3g} mm from the scan's"


# ----------------------------------------------------------------------------- intensities

# The check every CT gets lives with the sources (extraction runs it too); importable from here as before.
__all__ = ["Scan", "check_ct_intensities", "read_label_image", "read_scan", "scan_from_image"]

"""CT file formats behind one registry: a new format is one file that registers a :class:`CTFormat`.

A format turns a path (a file, or a folder for DICOM) into an :class:`Image`: the voxel array
as stored and the affine from stored index (i, j, k) to world millimetres (RAS, as nibabel
writes it). Everything after that is shared: the checks every CT gets
(:func:`read_image`: existence, the reader installed, a finite invertible affine, one 3-D grey
volume of finite values), reorienting to extraction's ``hu[row, col, slice]``
(:mod:`nodulekit.scans`), and for labelled LIDC scans, extraction (``extract --scans``,
:class:`~nodulekit.sources.scan_folder.ScanFolderSource`).

Built in: DICOM series folders (:mod:`~nodulekit.sources.dicom`), NIfTI
(:mod:`~nodulekit.sources.nifti`), MetaImage and NRRD through SimpleITK
(:mod:`~nodulekit.sources.itk`). The package imports every module in it, so a format's file
only has to decorate its class with :func:`register_format`.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from nodulekit.errors import DataError
from nodulekit.sources import Volume, check_ct_intensities, hu_int16

# A DICOM UID: digits in dot-separated groups (LUNA16 names its MetaImages by the series UID).
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)+$")
# A direction cosine component below this is taken as exactly 0 (float noise in headers);
# at 500 mm from the origin it moves a point by at most 0.05 mm.
AXIS_TOL = 1e-4
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
VOLUME_AXES = ("P", "L", "S")  # nibabel axis codes of hu[row, col, slice]
# Voxel sizes outside this range are header errors, not CT (LIDC: 0.46-0.98 mm pixels, 0.45-5 mm slices).
SPACING_RANGE_MM = (0.01, 20.0)


@dataclass
class Image:
    """A volume as its file stores it: ``data[i, j, k]`` and ``affine_ras`` (index -> RAS mm).

    ``zvals``: the exact slice positions (LPS z, in stored slice order) when the format knows
    them better than the affine does (a DICOM series' own ImagePositionPatient).
    """

    data: np.ndarray
    affine_ras: np.ndarray
    files: list[str] = field(default_factory=list)
    series_uid: str = ""
    zvals: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    format: str = ""  # the registered format's name, set by read_image


class CTFormat:
    """One way of storing a CT (or a label image); subclasses set the class attributes and :meth:`read`.

    ``suffixes``: lower-case file name endings it reads (``.nii.gz``); ``folder``: it reads a
    folder instead (one per registry); ``module`` / ``extra``: the library the reader imports
    and the nodulekit extra that installs it, for the one-line message when it is missing.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()
    folder: ClassVar[bool] = False
    module: ClassVar[str | None] = None
    extra: ClassVar[str | None] = None

    def read(self, path: Path, what: str) -> Image:
        """The stored array and affine; problems are one-line :class:`DataError` s naming ``what path``."""
        raise NotImplementedError

    def series_uid(self, path: Path) -> str:
        """The series UID of a scan without reading its voxels: by default the file name, when it is one (LUNA16)."""
        stem = strip_suffix(path, self.suffixes)
        return stem if UID_PATTERN.match(stem) else ""

    def require_reader(self, path: Path, what: str) -> None:
        if self.module is None:
            return
        try:
            importlib.import_module(self.module)
        except ImportError:
            raise DataError(
                f"{what} {path} is {self.description}; reading it needs {self.module}: "
                f"pip install 'nodulekit[{self.extra}]'"
            ) from None


_FORMATS: dict[str, CTFormat] = {}


def register_format(cls: type[CTFormat]) -> type[CTFormat]:
    """Class decorator: make a :class:`CTFormat` readable by ``predict``, ``--mask`` and ``extract --scans``."""
    if not cls.name or not (cls.suffixes or cls.folder):
        raise TypeError(f"{cls.__name__} needs a name and suffixes (or folder = True)")
    taken = {s for f in _FORMATS.values() if f.name != cls.name for s in f.suffixes}
    clash = sorted(taken & set(cls.suffixes))
    if clash:
        raise ValueError(f"format {cls.name}: suffix {clash[0]} is already another format's")
    _FORMATS[cls.name] = cls()
    return cls


def unregister_format(name: str) -> None:
    _FORMATS.pop(name, None)


def available_formats() -> list[CTFormat]:
    return list(_FORMATS.values())


def strip_suffix(path: Path, suffixes) -> str:
    name = path.name
    for s in sorted(suffixes, key=len, reverse=True):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return path.stem


def accepted_text() -> str:
    kinds = [f"{', '.join(f.suffixes)} ({f.description})" for f in _FORMATS.values() if f.suffixes]
    folders = [f"a folder ({f.description})" for f in _FORMATS.values() if f.folder]
    return "; ".join(kinds + folders)


def format_of(path: Path, what: str = "scan") -> CTFormat:
    """The registered format that reads ``path`` (by its ending, or the folder format for a folder)."""
    if path.is_dir():
        found = [f for f in _FORMATS.values() if f.folder]
        if what != "scan" or not found:
            raise DataError(f"{what} {path} is a folder; give a file ({accepted_text()})")
        return found[0]
    name = path.name.lower()
    for fmt in sorted(_FORMATS.values(), key=lambda f: -max((len(s) for s in f.suffixes), default=0)):
        if any(name.endswith(s) for s in fmt.suffixes):
            return fmt
    raise DataError(f"{what} {path} is not a format nodulekit reads (accepted: {accepted_text()})")


def read_image(path: str | Path, what: str = "scan") -> Image:
    """Read any registered format and check what every volume must be (one-line errors naming the file)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    fmt = format_of(path, what)
    fmt.require_reader(path, what)
    image = fmt.read(path, what)
    image.format = fmt.name
    image.data = check_voxels(image.data, path, what)
    check_affine(image.affine_ras, path, what)
    return image


def check_voxels(data: np.ndarray, path: Path, what: str) -> np.ndarray:
    """One 3-D volume of finite grey values (trailing length-1 axes dropped)."""
    data = np.asarray(data)
    if data.dtype.names or data.dtype.kind not in "biuf":
        kind = "colour (RGB) voxels" if data.dtype.names else f"{data.dtype} voxels"
        raise DataError(f"{what} {path} holds {kind}, not grey values; a CT has one number per voxel")
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        bad = int(np.sum(~np.isfinite(data)))
        raise DataError(f"{what} {path} holds {bad} NaN or infinite voxel value(s) of {data.size}")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise DataError(f"{what} {path} is a 4-D series of {data.shape[3]} volumes; give one 3-D CT volume")
    if data.ndim != 3 or min(data.shape) < 2:
        raise DataError(f"{what} {path} is a 2-D image (shape {data.shape}); a 3-D CT volume is needed")
    return data


def check_affine(affine: np.ndarray, path: Path, what: str) -> None:
    """A finite affine whose three axes are independent (a NaN or singular affine places nothing)."""
    affine = np.asarray(affine, float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(f"{what} {path} has a voxel-to-world affine with NaN or infinite entries")
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if sizes.min() <= 0 or abs(np.linalg.det(affine[:3, :3] / sizes)) < 1e-3:
        raise DataError(
            f"{what} {path} has a singular voxel-to-world affine (voxel sizes {np.round(sizes, 4).tolist()} mm)"
        )
    check_spacing(sizes, f"{what} {path}")


def check_spacing(sizes, where: str) -> None:
    """Refuse voxel sizes no CT has (a header error such as a 1e6 mm slice spacing)."""
    lo, hi = SPACING_RANGE_MM
    bad = [float(v) for v in sizes if not lo <= float(v) <= hi]
    if bad:
        raise DataError(f"{where} has an implausible voxel size of {bad[0]:.4g} mm (a CT's lie in {lo:g}-{hi:g} mm)")


# ----------------------------------------------------------------------------- to extraction's convention


def check_axis_aligned(affine: np.ndarray, path: Path) -> None:
    """Refuse oblique grids: sampling them would need a resampling step extraction does not have."""
    rot = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    off = np.sort(np.abs(rot), axis=0)[:2]  # the two smaller components of each axis
    if off.max() > AXIS_TOL:
        angle = float(np.degrees(np.arcsin(min(1.0, off.max()))))
        raise DataError(
            f"{path} has an oblique grid (an axis is rotated {angle:.2g} degrees from the scanner axes); "
            "resample it to an axis-aligned grid first (e.g. with ITK or 3D Slicer)"
        )


def reorient(image: Image, path: Path) -> tuple[Volume, np.ndarray]:
    """The image as ``hu[row, col, slice]`` (P, L, S; int16 HU) without interpolation, and nibabel's
    orientation transform from the stored grid to it."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    affine_ras = np.asarray(image.affine_ras, float)
    check_axis_aligned(affine_ras, path)
    data = hu_int16(image.data, f"scan {path}")
    transform = ornt_transform(io_orientation(affine_ras), axcodes2ornt(VOLUME_AXES))
    hu = apply_orientation(data, transform)
    aff = LPS_FROM_RAS @ affine_ras @ inv_ornt_aff(transform, data.shape)
    zvals = image.zvals if image.zvals is not None else aff[2, 3] + aff[2, 2] * np.arange(hu.shape[2])
    vol = Volume(
        hu=hu,
        zvals=np.asarray(zvals, float),
        pixel_spacing=(float(aff[1, 0]), float(aff[0, 1])),
        origin_xy=(float(aff[0, 3]), float(aff[1, 3])),
        series_uid=image.series_uid,
        files=list(image.files),
    )
    return vol, transform


def read_volume(path: str | Path) -> Volume:
    """A CT in any registered format on extraction's convention, checked as CT (HU)."""
    path = Path(path)
    vol, _ = reorient(read_image(path, "scan"), path)
    check_ct_intensities(vol.hu, path)
    return vol

